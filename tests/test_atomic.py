"""atomic_dir replacing an existing output: the old one is swapped out in one step and nothing is left beside it."""
import os

import pytest

from cosybridge.io import atomic


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_atomic_dir_replaces_existing_output(tmp_path, monkeypatch, exchange):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    used = []
    real = atomic._exchange

    def spy(a, b):
        used.append(True)
        return real(a, b) if exchange else False
    monkeypatch.setattr(atomic, "_exchange", spy)
    with atomic.atomic_dir(str(out)) as tmp:
        (tmp_path / tmp / "new.txt").write_text("new")
    assert used and sorted(os.listdir(out)) == ["new.txt"]
    assert os.listdir(tmp_path) == ["out"]


def test_failed_write_keeps_the_previous_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_dir(str(out)) as tmp:
            (tmp_path / tmp / "new.txt").write_text("new")
            raise RuntimeError("disk on fire")
    assert os.listdir(out) == ["old.txt"] and os.listdir(tmp_path) == ["out"]
