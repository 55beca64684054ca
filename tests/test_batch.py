"""`to-pt` of many checkpoints at once: names that never collide, failures that stop nothing, the exit code
and summary lines that say which input failed, and outputs identical to one-at-a-time conversions."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import copy_tree, run_cli

from cosybridge.batch import output_names
from cosybridge.convert import to_pt
from cosybridge.errors import CheckpointError


def test_names_keep_what_differs():
    assert output_names(["ckpt/global_step_100/merged_hf_model", "ckpt/global_step_200/merged_hf_model/"]) == \
        ["global_step_100", "global_step_200"]
    assert output_names(["/r/a/step_1/hf", "/r/b/step_1/hf", "/r/b/step_2/hf"]) == \
        ["a-step_1", "b-step_1", "b-step_2"]
    assert output_names(["runs/x", "runs/x/again"]) == ["x", "x-again"]  # one inside the other
    assert output_names(["only/one/merged_hf_model"]) == ["merged_hf_model"]


def test_names_refuse_duplicates_and_clashes():
    with pytest.raises(CheckpointError, match="given twice"):
        output_names(["a/hf", "a/./hf"])
    with pytest.raises(CheckpointError, match=r"both be written as a-b\.pt"):
        output_names(["r/a-b/hf", "r/a/b/hf"])


@pytest.fixture
def runs(cv2_hf, tmp_path) -> Path:
    """ckpt/global_step_{100,200}/merged_hf_model (different weights) and a broken global_step_300."""
    root = tmp_path / "ckpt"
    for step, scale in ((100, 1.0), (200, 2.0)):
        hf = copy_tree(cv2_hf, root / f"global_step_{step}" / "merged_hf_model")
        tensors = load_file(hf / "model.safetensors")
        tensors["model.norm.weight"] = tensors["model.norm.weight"] * scale
        save_file(tensors, hf / "model.safetensors", metadata={"format": "pt"})
    broken = copy_tree(cv2_hf, root / "global_step_300" / "merged_hf_model")
    (broken / "config.json").unlink()
    return root


def _dirs(root: Path, steps=(100, 200, 300)) -> list[Path]:
    return [root / f"global_step_{s}" / "merged_hf_model" for s in steps]


def test_one_failure_stops_nothing_and_is_named(runs, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("to-pt", *_dirs(runs), "-o", out, "--jobs", "2")
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    broken = str(_dirs(runs)[2])
    errors = [line for line in lines if line.startswith("cosybridge: error:")]
    assert len(errors) == 1 and broken in errors[0] and "config.json" in errors[0]
    assert re.fullmatch(rf"cosybridge: to-pt: 2 of 3 converted: \d+ tensors, [\d,.]+ MB in [\d.]+ s "
                        rf"\([\d,]+ MB/s\); FAILED: {re.escape(broken)}", lines[-1]), lines[-1]
    assert sorted(os.listdir(out)) == ["global_step_100.pt", "global_step_200.pt"]  # nothing half-written
    for step, hf in zip((100, 200), _dirs(runs)):  # each equals a conversion on its own
        single = tmp_path / f"single_{step}.pt"
        to_pt(str(hf), str(single))
        assert (out / f"global_step_{step}.pt").read_bytes() == single.read_bytes()
    a = torch.load(out / "global_step_100.pt", weights_only=True)["llm.model.model.norm.weight"]
    b = torch.load(out / "global_step_200.pt", weights_only=True)["llm.model.model.norm.weight"]
    assert torch.equal(a * 2, b)


def test_all_converted_quietly_without_progress_bar(runs, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("to-pt", *_dirs(runs, (100, 200)), "-o", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("cosybridge: to-pt") for line in lines), lines
    assert lines[-1].startswith("cosybridge: to-pt: 2 of 2 converted:") and "FAILED" not in lines[-1]
    assert "\r" not in proc.stderr and "%|" not in proc.stderr  # stderr is not a terminal: no bar
    again = run_cli("to-pt", *_dirs(runs, (100, 200)), "-o", out)  # existing outputs: refused, each by name
    assert again.returncode == 1
    assert again.stderr.count("already exists; pass --force") == 2


def test_output_directory_for_one_input(runs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = run_cli("to-pt", _dirs(runs)[0], "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert os.listdir(out) == ["merged_hf_model.pt"]
