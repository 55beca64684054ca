"""`to-pt HF_DIR --install-into MODEL_DIR` and `restore MODEL_DIR`: the result is checked against MODEL_DIR's
yaml and BlankEN config before anything is replaced; the old llm.pt is kept as llm.pt.bak-<UTC time>; restore
walks back one install at a time and keeps what it replaces; refusals change nothing."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import copy_tree, real_qwen2lm, tree_bytes

TRAINED = "model.layers.0.mlp.up_proj.weight"


def run(capsys, *args) -> tuple[int, str]:
    from cosybridge.cli import main

    rc = main([*map(str, args)])
    return rc, capsys.readouterr().err


def names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


@pytest.fixture(scope="module")
def trained_hf(cv2_hf, tmp_path_factory) -> Path:
    """cv2_hf after 'training': one weight changed (written by the safetensors library, not by us)."""
    h = copy_tree(cv2_hf, tmp_path_factory.mktemp("trained") / "hf")
    tensors = load_file(h / "model.safetensors")
    tensors[TRAINED] = tensors[TRAINED] * 1.5
    save_file(tensors, h / "model.safetensors", metadata={"format": "pt"})
    return h


@pytest.fixture
def stamps(monkeypatch):
    """Distinct backup times without sleeping: 20260101T000001Z, ...02Z, ..."""
    import cosybridge.install as install

    counter = iter(range(1, 10_000))
    monkeypatch.setattr(install, "_stamp", lambda: f"20260101T{next(counter):06d}Z")


def test_install_replaces_llm_pt_and_keeps_a_backup(cv2_dir, trained_hf, capsys, tmp_path):
    m = copy_tree(cv2_dir, tmp_path / "model")
    (m / "vllm").mkdir()  # an earlier CosyVoice start-up exported the old weights here
    os.chmod(m / "llm.pt", 0o640)
    original, hf_before = (m / "llm.pt").read_bytes(), tree_bytes(trained_hf)

    rc, err = run(capsys, "to-pt", trained_hf, "--install-into", m)

    assert rc == 0, err
    backups = [n for n in names(m) if n.startswith("llm.pt.bak-")]
    assert len(backups) == 1 and re.fullmatch(r"llm\.pt\.bak-\d{8}T\d{6}Z", backups[0])
    assert (m / backups[0]).read_bytes() == original
    assert names(m) == sorted(["CosyVoice-BlankEN", "cosyvoice2.yaml", "llm.pt", backups[0], "vllm"])  # no temporaries
    assert os.stat(m / "llm.pt").st_mode & 0o777 == 0o640
    assert tree_bytes(trained_hf) == hf_before
    assert "vllm" in err and "reuses it" in err and "rm -r" in err
    assert f"kept as {m / backups[0]}" in err and "cosybridge restore" in err

    got = torch.load(m / "llm.pt", weights_only=True)
    want = torch.load(cv2_dir / "llm.pt", weights_only=True)
    trained = load_file(trained_hf / "model.safetensors")[TRAINED]
    assert sorted(got) == sorted(want)  # the safetensors library stores names sorted: order follows the file
    for k in want:
        expected = trained if k == "llm.model." + TRAINED else want[k]
        assert got[k].dtype == expected.dtype and torch.equal(got[k], expected), k
    real_qwen2lm(m).load_state_dict(got, strict=True)  # what CosyVoice does with it


def test_restore_walks_back_one_install_at_a_time(cv2_dir, trained_hf, stamps, capsys, tmp_path):
    m = copy_tree(cv2_dir, tmp_path / "model")
    original = (m / "llm.pt").read_bytes()
    assert run(capsys, "to-pt", trained_hf, "--install-into", m)[0] == 0
    first = (m / "llm.pt").read_bytes()
    assert first != original
    # a second, different install on top
    h2 = copy_tree(trained_hf, tmp_path / "hf2")
    tensors = load_file(h2 / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1
    save_file(tensors, h2 / "model.safetensors", metadata={"format": "pt"})
    assert run(capsys, "to-pt", h2, "--install-into", m)[0] == 0
    second = (m / "llm.pt").read_bytes()
    assert second not in (original, first)
    assert [n for n in names(m) if ".bak-" in n] == ["llm.pt.bak-20260101T000001Z", "llm.pt.bak-20260101T000002Z"]

    rc, err = run(capsys, "restore", m)
    assert rc == 0, err
    assert (m / "llm.pt").read_bytes() == first
    assert (m / "llm.pt.replaced-20260101T000003Z").read_bytes() == second
    assert "restored" in err and "1 older backup(s) left" in err

    rc, err = run(capsys, "restore", m)
    assert rc == 0, err
    assert (m / "llm.pt").read_bytes() == original
    assert (m / "llm.pt.replaced-20260101T000004Z").read_bytes() == first
    assert not [n for n in names(m) if ".bak-" in n]

    before = tree_bytes(m)
    rc, err = run(capsys, "-q", "restore", m)
    assert rc == 1 and err.count("\n") == 1 and "no llm.pt.bak-* backup to restore" in err, err
    assert tree_bytes(m) == before


def test_existing_backup_name_is_never_overwritten(cv2_dir, trained_hf, monkeypatch, capsys, tmp_path):
    import cosybridge.install as install

    monkeypatch.setattr(install, "_stamp", lambda: "20260101T000000Z")
    m = copy_tree(cv2_dir, tmp_path / "model")
    (m / "llm.pt.bak-20260101T000000Z").write_bytes(b"an older backup")
    before = tree_bytes(m)
    rc, err = run(capsys, "-q", "to-pt", trained_hf, "--install-into", m)
    assert rc == 1 and err.count("\n") == 1, err
    assert "llm.pt.bak-20260101T000000Z: already exists" in err and "never overwritten" in err
    assert tree_bytes(m) == before


def test_result_that_does_not_fit_the_yaml_is_refused_with_every_problem(cv2_dir, cv2_hf, capsys, tmp_path):
    """The model dir's yaml says 4096 speech tokens: the converted llm.pt (6561 + 3 rows) would fail in
    CosyVoice's load_state_dict; install lists all three tensors that disagree and changes nothing."""
    m = copy_tree(cv2_dir, tmp_path / "model")
    yaml = m / "cosyvoice2.yaml"
    yaml.write_text(yaml.read_text().replace("speech_token_size: 6561", "speech_token_size: 4096"))
    before, hf_before = tree_bytes(m), tree_bytes(cv2_hf)
    rc, err = run(capsys, "-q", "to-pt", cv2_hf, "--install-into", m)
    assert rc == 1 and err.count("\n") == 1, err
    for name in ("speech_embedding.weight", "llm_decoder.weight", "llm_decoder.bias"):
        assert re.search(rf"size mismatch for {re.escape(name)}: checkpoint \[6564(, 32)?\], model \[4099(, 32)?\]", err), err
    assert "llm.pt was left unchanged" in err
    assert tree_bytes(m) == before and tree_bytes(cv2_hf) == hf_before


def test_other_family_is_refused(cv2_dir, cv3_hf, capsys, tmp_path):
    m = copy_tree(cv2_dir, tmp_path / "model")
    before = tree_bytes(m)
    rc, err = run(capsys, "-q", "to-pt", cv3_hf, "--install-into", m)
    assert rc == 1 and err.count("\n") == 1, err
    assert "cosyvoice3" in err and "cosyvoice2" in err
    assert tree_bytes(m) == before


def test_nan_with_strict_changes_nothing(cv2_dir, trained_hf, capsys, tmp_path):
    h = copy_tree(trained_hf, tmp_path / "hf")
    tensors = load_file(h / "model.safetensors")
    tensors["model.layers.1.self_attn.o_proj.weight"][0, 0] = float("nan")
    save_file(tensors, h / "model.safetensors", metadata={"format": "pt"})
    m = copy_tree(cv2_dir, tmp_path / "model")
    before = tree_bytes(m)
    rc, err = run(capsys, "-q", "to-pt", h, "--install-into", m, "--strict")
    assert rc == 1 and err.count("\n") == 1 and "o_proj.weight" in err and "1 NaN" in err, err
    assert tree_bytes(m) == before


def test_without_sidecar_the_rows_come_from_the_model_dir(cv2_dir, trained_hf, capsys, tmp_path):
    """An upstream-made HF dir has no sidecar: install reads the rows the HF layout cannot hold from
    MODEL_DIR's own llm.pt, as `to-pt --base MODEL_DIR` does, so only the trained weight changes."""
    h = copy_tree(trained_hf, tmp_path / "hf")
    (h / "cosybridge_sidecar.safetensors").unlink()
    config = json.loads((h / "config.json").read_text())
    config.pop("cosyvoice")
    (h / "config.json").write_text(json.dumps(config))
    m = copy_tree(cv2_dir, tmp_path / "model")
    rc, err = run(capsys, "to-pt", h, "--install-into", m)
    assert rc == 0, err
    got = torch.load(m / "llm.pt", weights_only=True)
    want = torch.load(cv2_dir / "llm.pt", weights_only=True)
    for k in want:
        if k != "llm.model." + TRAINED:
            assert torch.equal(got[k], want[k]), k
    assert not torch.equal(got["llm.model." + TRAINED], want["llm.model." + TRAINED])


def test_llm_pt_symlinked_into_a_download_cache_is_never_written_through(cv2_dir, trained_hf, capsys, tmp_path):
    """Hub downloads often make llm.pt a symlink into a shared cache: install replaces the link, the cached
    blob stays as it was, and the backup holds its bytes."""
    m = copy_tree(cv2_dir, tmp_path / "model")
    blob = tmp_path / "cache" / "blobs" / "3f2a"
    blob.parent.mkdir(parents=True)
    (m / "llm.pt").rename(blob)
    (m / "llm.pt").symlink_to(blob)
    original = blob.read_bytes()
    assert run(capsys, "to-pt", trained_hf, "--install-into", m)[0] == 0
    assert blob.read_bytes() == original
    assert not (m / "llm.pt").is_symlink() and (m / "llm.pt").read_bytes() != original
    (backup,) = [p for p in m.iterdir() if p.name.startswith("llm.pt.bak-")]
    assert backup.read_bytes() == original
    assert run(capsys, "restore", m)[0] == 0
    assert (m / "llm.pt").read_bytes() == original and blob.read_bytes() == original


def test_staging_left_by_a_killed_install_is_removed(cv2_dir, trained_hf, capsys, tmp_path):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process id that no longer runs
    alive = 1  # init: always running
    m = copy_tree(cv2_dir, tmp_path / "model")
    for pid in (dead.pid, alive):
        (m / f".llm.pt.install-{pid}.partial").write_bytes(b"half an llm.pt")
        (m / f"..llm.pt.install-{pid}.partial.x1y2z3.partial").write_bytes(b"a quarter")
    assert run(capsys, "to-pt", trained_hf, "--install-into", m)[0] == 0
    left = sorted(n for n in names(m) if n.endswith(".partial"))
    assert left == sorted([f".llm.pt.install-{alive}.partial", f"..llm.pt.install-{alive}.partial.x1y2z3.partial"])


@pytest.mark.parametrize("args", [
    ["to-pt", "{hf}", "--install-into", "{m}", "-o", "{out}"],
    ["to-pt", "{hf}", "--install-into", "{m}", "--force"],
    ["to-pt", "{hf}", "{hf}", "--install-into", "{m}"],
    ["restore"],
])
def test_usage_errors(args, cv2_dir, cv2_hf, tmp_path):
    from cosybridge.cli import main

    with pytest.raises(SystemExit) as e:
        main([a.format(hf=cv2_hf, m=cv2_dir, out=tmp_path / "x.pt") for a in args])
    assert e.value.code == 2
