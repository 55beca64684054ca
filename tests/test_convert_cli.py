"""`cosybridge to-hf` / `to-pt` as a user runs them: bad inputs, usage errors, --debug, --force, upstream's flag
names. Every refusal: exit code 1, exactly one `cosybridge: error:` line naming the problem, no traceback, no
output (complete or partial) left behind, every input byte-identical."""
from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import copy_tree, real_qwen2lm, run_cli, tree_bytes

EMBED, HEAD = "llm.model.model.embed_tokens.weight", "llm.model.lm_head.weight"


def load_pt(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_checkpoint(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert got[HEAD].untyped_storage().data_ptr() == got[EMBED].untyped_storage().data_ptr()


def leftovers(root: Path) -> list[str]:
    """Temporary names our atomic writers use (`.NAME.*.partial`, `.NAME.*.old`)."""
    return sorted(str(p) for p in root.rglob("*") if p.name.endswith((".partial", ".old")))


@pytest.fixture(scope="module")
def qwen2lm(cv2_dir):
    return real_qwen2lm(cv2_dir)


# ---- bad inputs ---------------------------------------------------------------------------------------------
# Each case prepares its inputs under tmp and returns (CLI args, the output path, the inputs, key words the
# error line must contain). The output path must not exist afterwards unless it existed before.

def _model(tmp: Path, cv2_dir: Path) -> Path:
    return copy_tree(cv2_dir, tmp / "model")


def _hf(tmp: Path, cv2_hf: Path) -> Path:
    return copy_tree(cv2_hf, tmp / "hf")


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def case_missing_llm_pt(tmp, cv2_dir, cv2_hf):
    m = _model(tmp, cv2_dir)
    (m / "llm.pt").unlink()
    return ["to-hf", m, "-o", tmp / "out"], [m], [r"missing llm\.pt", "model"]


def case_missing_yaml(tmp, cv2_dir, cv2_hf):
    m = _model(tmp, cv2_dir)
    (m / "cosyvoice2.yaml").unlink()
    return ["to-hf", m, "-o", tmp / "out"], [m], ["missing", r"cosyvoice2\.yaml"]


def case_missing_blanken(tmp, cv2_dir, cv2_hf):
    m = _model(tmp, cv2_dir)
    shutil.rmtree(m / "CosyVoice-BlankEN")
    return ["to-hf", m, "-o", tmp / "out"], [m], ["missing", "CosyVoice-BlankEN"]


def case_yaml_speech_token_size(tmp, cv2_dir, cv2_hf):
    m = _model(tmp, cv2_dir)
    _edit(m / "cosyvoice2.yaml", "speech_token_size: 6561", "speech_token_size: 4096")
    return (["to-hf", m, "-o", tmp / "out"], [m],
            [r"llm\.pt", "does not match", r"cosyvoice2\.yaml", r"speech_embedding\.weight", r"\[6564, 32\]",
             r"\[4099, 32\]"])


def case_yaml_hidden_size(tmp, cv2_dir, cv2_hf):
    """The yaml and BlankEN config agree on hidden 64, the llm.pt was trained with 32."""
    m = _model(tmp, cv2_dir)
    for key in ("llm_input_size", "llm_output_size"):
        _edit(m / "cosyvoice2.yaml", f"{key}: 32", f"{key}: 64")
    config = json.loads((m / "CosyVoice-BlankEN" / "config.json").read_text())
    config["hidden_size"] = 64
    (m / "CosyVoice-BlankEN" / "config.json").write_text(json.dumps(config))
    return (["to-hf", m, "-o", tmp / "out"], [m],
            [r"llm\.pt", "does not match", "size mismatch", r"embed_tokens\.weight.*\[151936, 32\].*\[151936, 64\]"])


def case_yaml_disagrees_with_blanken(tmp, cv2_dir, cv2_hf):
    m = _model(tmp, cv2_dir)
    _edit(m / "cosyvoice2.yaml", "llm_input_size: 32", "llm_input_size: 896")
    return (["to-hf", m, "-o", tmp / "out"], [m], [r"cosyvoice2\.yaml", "llm_input_size is 896", "hidden_size 32"])


def case_pt_is_a_list(tmp, cv2_dir, cv2_hf):
    m = _model(tmp, cv2_dir)
    torch.save(list(load_pt(m / "llm.pt").values()), m / "llm.pt")
    return ["to-hf", m, "-o", tmp / "out"], [m], [r"llm\.pt", "holds a list", "dict of name"]


def case_pt_entry_not_a_tensor(tmp, cv2_dir, cv2_hf):
    m = _model(tmp, cv2_dir)
    torch.save({**load_pt(m / "llm.pt"), "note": "trained by me"}, m / "llm.pt")
    return ["to-hf", m, "-o", tmp / "out"], [m], [r"llm\.pt", "'note'", "not a tensor"]


def case_pt_pickles_code(tmp, cv2_dir, cv2_hf):
    m = _model(tmp, cv2_dir)
    torch.save({"args": argparse.Namespace(lr=1e-4)}, m / "llm.pt")
    return ["to-hf", m, "-o", tmp / "out"], [m], [r"llm\.pt", "refused to load", "nothing from it was executed"]


def case_pt_is_a_git_lfs_pointer(tmp, cv2_dir, cv2_hf):
    """A model repo cloned without git-lfs: llm.pt is a 130-byte text file."""
    m = _model(tmp, cv2_dir)
    (m / "llm.pt").write_bytes(b"version https://git-lfs.github.com/spec/v1\n"
                               b"oid sha256:" + b"0" * 64 + b"\nsize 2023964170\n")
    return ["to-hf", m, "-o", tmp / "out"], [m], [r"llm\.pt", "Git LFS pointer", "git lfs pull"]


def case_pt_truncated(tmp, cv2_dir, cv2_hf):
    """An interrupted download."""
    m = _model(tmp, cv2_dir)
    data = (m / "llm.pt").read_bytes()
    (m / "llm.pt").write_bytes(data[:len(data) // 2])
    return ["to-hf", m, "-o", tmp / "out"], [m], [r"llm\.pt", "not a readable torch checkpoint", "truncated"]


def case_to_hf_output_is_input(tmp, cv2_dir, cv2_hf):
    m = _model(tmp, cv2_dir)
    return ["to-hf", m, "-o", m, "--force"], [m], ["overwrite the input", "another output"]


def case_to_hf_output_inside_input(tmp, cv2_dir, cv2_hf):
    m = _model(tmp, cv2_dir)
    return ["to-hf", m, "-o", m / "CosyVoice-BlankEN" / "hf"], [m], ["overwrite the input"]


def case_to_hf_output_on_llm_pt(tmp, cv2_dir, cv2_hf):
    m = _model(tmp, cv2_dir)
    return ["to-hf", m, "-o", m / "llm.pt", "--force"], [m], ["overwrite the input"]


def case_no_speech_tokens(tmp, cv2_dir, cv2_hf):
    """A plain Qwen2 checkpoint: the HF dir's tokenizer is BlankEN's, without <|s_0|>."""
    h = _hf(tmp, cv2_hf)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (h / name).unlink()
    shutil.copy(cv2_dir / "CosyVoice-BlankEN" / "tokenizer_config.json", h / "tokenizer_config.json")
    return ["to-pt", h, "-o", tmp / "llm.pt"], [h], [r"no <\|s_0\|>", "tokenizer"]


def case_speech_tokens_not_contiguous(tmp, cv2_dir, cv2_hf):
    h = _hf(tmp, cv2_hf)
    data = json.loads((h / "tokenizer.json").read_text(encoding="utf-8"))
    by_content = {t["content"]: t for t in data["added_tokens"]}
    a, b = by_content["<|s_5|>"], by_content["<|s_6|>"]
    a["content"], b["content"] = b["content"], a["content"]  # ids swapped: <|s_5|> is 151669
    (h / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return ["to-pt", h, "-o", tmp / "llm.pt"], [h], ["not contiguous", r"<\|s_5\|>", "151669", "151668"]


def case_not_an_hf_dir(tmp, cv2_dir, cv2_hf):
    m = _model(tmp, cv2_dir)
    return ["to-pt", m, "-o", tmp / "llm.pt"], [m], ["no config.json", "Hugging Face"]


def case_missing_hf_dir(tmp, cv2_dir, cv2_hf):
    return ["to-pt", tmp / "checkpoint-400", "-o", tmp / "llm.pt"], [], ["checkpoint-400", "not a directory"]


def case_to_pt_output_inside_input(tmp, cv2_dir, cv2_hf):
    h = _hf(tmp, cv2_hf)
    return ["to-pt", h, "-o", h / "llm.pt"], [h], ["overwrite the input"]


def case_to_pt_output_is_input(tmp, cv2_dir, cv2_hf):
    h = _hf(tmp, cv2_hf)
    return ["to-pt", h, "-o", h, "--force"], [h], ["overwrite the input"]


def case_to_pt_output_is_base(tmp, cv2_dir, cv2_hf):
    h, m = _hf(tmp, cv2_hf), _model(tmp, cv2_dir)
    return ["to-pt", h, "-o", m / "llm.pt", "--base", m, "--force"], [h, m], ["overwrite the input"]


def case_base_of_other_family(tmp, cv2_dir, cv2_hf, cv3_dir):
    h, m = _hf(tmp, cv2_hf), copy_tree(cv3_dir, tmp / "cv3")
    return ["to-pt", h, "-o", tmp / "llm.pt", "--base", m], [h, m], ["--base", "cosyvoice3", "cosyvoice2"]


CASES = {name[len("case_"):]: fn for name, fn in dict(globals()).items() if name.startswith("case_")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_refused_with_one_line(case, cv2_dir, cv2_hf, request, tmp_path):
    fn = CASES[case]
    extra = [request.getfixturevalue("cv3_dir")] if fn.__code__.co_argcount == 4 else []
    args, inputs, words = fn(tmp_path, cv2_dir, cv2_hf, *extra)
    out = Path(args[args.index("-o") + 1])
    out_existed = out.exists()
    before = {p: tree_bytes(p) for p in inputs}
    proc = run_cli(*args)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("cosybridge: error:")]
    assert len(errors) == 1, proc.stderr
    for word in words:
        assert re.search(word, errors[0]), f"{word!r} not in {errors[0]!r}"
    assert "Traceback" not in proc.stderr
    assert out.exists() == out_existed
    assert not leftovers(tmp_path)
    for p, b in before.items():
        assert tree_bytes(p) == b, f"{p} changed"


@pytest.mark.parametrize("command", ["to-hf", "to-pt"])
def test_existing_output_needs_force_with_upstreams_flag_names(command, cv2_dir, cv2_hf, qwen2lm, tmp_path):
    """Upstream's recipe run again with only the program name changed: its flag names work, the existing
    output is refused until --force, then replaced as a whole. to-hf writes beside the files it reads
    (MODEL_DIR/hf_merged, as CosyVoice's own vllm export does) and leaves them byte-identical."""
    from cosybridge.convert import to_pt

    if command == "to-hf":
        src = _model(tmp_path, cv2_dir)
        inputs = [src / "llm.pt", src / "cosyvoice2.yaml", src / "CosyVoice-BlankEN"]
        out = src / "hf_merged"
        out.mkdir()
        (out / "model.safetensors").write_bytes(b"an older conversion")
        args = ["to-hf", "--pretrained-cosyvoice2-path", src, "--save-path", out]
    else:
        inputs, out = [cv2_hf], tmp_path / "llm-new.pt"
        out.write_bytes(b"an older conversion")
        args = ["to-pt", "--hf-cosyvoice2-llm-path", cv2_hf, "--output-path", out]
    before, inputs = tree_bytes(out), {p: tree_bytes(p) for p in inputs}
    proc = run_cli(*args)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("cosybridge: error:")]
    assert len(errors) == 1 and "already exists" in errors[0] and "--force" in errors[0], proc.stderr
    assert tree_bytes(out) == before and not leftovers(tmp_path)

    proc = run_cli(*args, "--force")
    assert proc.returncode == 0, proc.stderr
    assert f"{command} cosyvoice2: " in proc.stderr  # the summary line
    assert {p: tree_bytes(p) for p in inputs} == inputs and not leftovers(tmp_path)
    pt = out
    if command == "to-hf":
        assert b"an older conversion" not in (out / "model.safetensors").read_bytes()[:64]
        pt = tmp_path / "back.pt"
        to_pt(str(out), str(pt))
    assert_same_checkpoint(load_pt(pt), load_pt(cv2_dir / "llm.pt"))
    qwen2lm.load_state_dict(load_pt(pt), strict=True)


# ---- usage and --debug ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    [],
    ["to-hf"],
    ["to-hf", "{model}"],                                                            # no -o
    ["to-hf", "-o", "{out}"],                                                        # no MODEL_DIR
    ["to-hf", "{model}", "--pretrained-cosyvoice2-path", "{model}", "-o", "{out}"],  # two MODEL_DIRs
    ["to-pt", "-o", "{out}"],                                                        # no HF_DIR
    ["to-pt", "{hf}", "{hf}", "-o", "{out}"],                                        # the same HF_DIR twice
    ["to-pt", "{hf}", "--hf-cosyvoice2-llm-path", "{hf}", "-o", "{out}"],
    ["to-pt", "{hf}", "-o", "{out}", "--dtype", "fp8"],
    ["to-hf", "{model}", "-o", "{out}", "--family", "cosyvoice1"],
    ["convert", "{model}"],
], ids=lambda a: " ".join(a) or "nothing")
def test_usage_errors_exit_2(args, cv2_dir, cv2_hf, tmp_path):
    out = tmp_path / "out"
    proc = run_cli(*[a.format(model=cv2_dir, hf=cv2_hf, out=out) for a in args])
    assert proc.returncode == 2, proc.stderr
    assert "usage:" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and not leftovers(tmp_path)


def test_debug_shows_the_traceback(tmp_path):
    proc = run_cli("--debug", "to-hf", tmp_path / "nowhere", "-o", tmp_path / "out")
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr and "CheckpointError" in proc.stderr
    assert "nowhere" in proc.stderr and not (tmp_path / "out").exists()
