"""Hostile and broken inputs, as the CLI meets them: code-carrying pickles, truncated and bit-flipped
safetensors headers and data, broken shard indexes, a scrambled tokenizer, NaN in a weight, outputs that
would overwrite an input. Each refusal: exit 1, exactly one `cosybridge: error:` line (with -q nothing else),
no output and no temporary left behind, every input byte-identical, and no code from a pickle ever run.

The CLI runs in-process (`cli.main`), which is the same code `python -m cosybridge` runs, minus 3 s of
importing torch per case.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import copy_tree, tree_bytes

NORM = "model.layers.0.input_layernorm.weight"


def run(capsys, *args) -> tuple[int, str]:
    from cosybridge.cli import main

    rc = main(["-q", *map(str, args)])
    return rc, capsys.readouterr().err


def leftovers(root: Path) -> list[str]:
    return sorted(str(p) for p in Path(root).rglob("*") if p.name.endswith((".partial", ".old")))


# ---- pickles that carry code -----------------------------------------------------------------------------

class Payload:
    """Unpickling calls `fn(*args)`: each creates the marker file, so the marker proves whether code ran."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def payloads(marker: Path) -> dict:
    return {"open": Payload(open, str(marker), "w"),
            "os.system": Payload(os.system, f"touch {marker}"),
            "exec": Payload(exec, f"open({str(marker)!r}, 'w').close()")}


def write_evil(path: Path, kind: str, marker: Path, state: dict, how: str = "open") -> None:
    evil = payloads(marker)[how]
    if kind == "zip":               # torch.save's format, code beside real weights
        torch.save({**state, "x": evil}, path)
    elif kind == "legacy":          # pre-1.6 torch.save format (no zip)
        torch.save({**state, "x": evil}, path, _use_new_zipfile_serialization=False)
    elif kind == "raw":             # a bare pickle, protocol 4
        path.write_bytes(pickle.dumps({**state, "x": evil}, protocol=4))
    elif kind == "training":        # CosyVoice's training checkpoint: weights + epoch/step
        torch.save({"model": state, "epoch": evil, "step": 400}, path)
    elif kind == "deepspeed":       # DeepSpeed epoch_N_whole: module + optimizer
        torch.save({"module": state, "optimizer": evil}, path)
    else:
        raise ValueError(kind)


@pytest.mark.parametrize("how", ["open", "os.system", "exec"])
def test_payloads_are_live(how, tmp_path):
    """The payloads do run when a pickle is loaded the unsafe way, so the refusals below mean something."""
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    write_evil(path, "zip", marker, {"w": torch.zeros(2)}, how)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.fixture(scope="module")
def state(cv2_dir):
    return torch.load(cv2_dir / "llm.pt", weights_only=True)


# ---- the cases ---------------------------------------------------------------------------------------------
# Each returns (CLI args, inputs that must stay byte-identical, words the error line must contain).

def _model(tmp, cv2_dir):
    return copy_tree(cv2_dir, tmp / "model")


def _hf(tmp, cv2_hf):
    return copy_tree(cv2_hf, tmp / "hf")


def _split_st(path: Path) -> tuple[bytes, dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return data[:8], json.loads(data[8:8 + n]), data[8 + n:]


def _join_st(path: Path, header_text: str, body: bytes) -> None:
    raw = header_text.encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def _flip(path: Path, pos: int, bit: int) -> None:
    data = bytearray(path.read_bytes())
    data[pos] ^= 1 << bit
    path.write_bytes(bytes(data))


def _sharded(tmp, cv2_hf) -> Path:
    """cv2_hf split into two shards + index by the safetensors library (not our writer)."""
    h = _hf(tmp, cv2_hf)
    tensors = load_file(h / "model.safetensors")
    (h / "model.safetensors").unlink()
    names = list(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:10], "model-00002-of-00002.safetensors": names[10:]}
    for fname, part in shards.items():
        save_file({n: tensors[n] for n in part}, h / fname, metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": {n: f for f, part in shards.items() for n in part}}
    (h / "model.safetensors.index.json").write_text(json.dumps(index))
    return h


def _edit_index(h: Path, fn) -> None:
    path = h / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    fn(index["weight_map"])
    path.write_text(json.dumps(index))


def to_hf(m, tmp):
    return ["to-hf", m, "-o", tmp / "out"]


def to_pt(h, tmp, *extra):
    return ["to-pt", h, "-o", tmp / "llm.pt", *extra]


PICKLE_WORDS = [r"llm\.pt", "refused to load", "nothing from it was executed"]
NAMED = {"open": r"GLOBAL (io|builtins)\.open", "os.system": r"GLOBAL (posix|os)\.system", "exec": "GLOBAL (builtins.)?exec"}


def pickle_case(kind, how="open"):
    def case(tmp, cv2_dir, cv2_hf, state):
        m = _model(tmp, cv2_dir)
        write_evil(m / "llm.pt", kind, tmp / "MARKER", state, how)
        # protocol 4 stops torch's unpickler at its first FRAME opcode, before the GLOBAL
        named = "not a plain torch checkpoint" if kind == "raw" else NAMED[how]
        return to_hf(m, tmp), [m], [*PICKLE_WORDS, named]
    return case


def case_pickle_as_base(tmp, cv2_dir, cv2_hf, state):
    h, m = _hf(tmp, cv2_hf), _model(tmp, cv2_dir)
    write_evil(m / "llm.pt", "zip", tmp / "MARKER", state, "os.system")
    return to_pt(h, tmp, "--base", m), [h, m], [*PICKLE_WORDS, NAMED["os.system"]]


def case_pickle_in_install_target(tmp, cv2_dir, cv2_hf, state):
    """No sidecar: install-into reads the rows it needs from MODEL_DIR's llm.pt, which carries code."""
    h, m = _hf(tmp, cv2_hf), _model(tmp, cv2_dir)
    (h / "cosybridge_sidecar.safetensors").unlink()
    write_evil(m / "llm.pt", "training", tmp / "MARKER", state, "exec")
    return ["to-pt", h, "--install-into", m], [h, m], [*PICKLE_WORDS, NAMED["exec"]]


def case_pt_truncated(tmp, cv2_dir, cv2_hf, state):
    m = _model(tmp, cv2_dir)
    data = (m / "llm.pt").read_bytes()
    (m / "llm.pt").write_bytes(data[: len(data) // 2])
    return to_hf(m, tmp), [m], [r"llm\.pt", "not a readable torch checkpoint", "truncated or corrupt"]


def case_pt_zip_directory_flipped(tmp, cv2_dir, cv2_hf, state):
    m = _model(tmp, cv2_dir)
    data = (m / "llm.pt").read_bytes()
    _flip(m / "llm.pt", data.rindex(b"PK\x05\x06"), 0)  # end-of-central-directory signature
    return to_hf(m, tmp), [m], [r"llm\.pt", "not a readable torch checkpoint"]


def case_pt_pickle_opcode_flipped(tmp, cv2_dir, cv2_hf, state):
    """A bit flip in data.pkl that made torch's weights_only unpickler raise a bare IndexError."""
    m = _model(tmp, cv2_dir)
    data = (m / "llm.pt").read_bytes()
    pos = data.index(b"\x80\x02}")  # PROTO 2, EMPTY_DICT: the top-level dict
    _flip(m / "llm.pt", pos + 2, 3)  # EMPTY_DICT '}' → SETITEMS 'u' on an empty stack
    return to_hf(m, tmp), [m], [r"llm\.pt", "(not a readable torch checkpoint|refused to load)"]


def case_st_header_length_beyond_file(tmp, cv2_dir, cv2_hf, state):
    h = _hf(tmp, cv2_hf)
    _flip(h / "model.safetensors", 5, 3)
    return to_pt(h, tmp), [h], [r"model\.safetensors", "header length", "exceeds the file"]


def case_st_truncated_in_header(tmp, cv2_dir, cv2_hf, state):
    h = _hf(tmp, cv2_hf)
    data = (h / "model.safetensors").read_bytes()
    (h / "model.safetensors").write_bytes(data[:200])
    return to_pt(h, tmp), [h], [r"model\.safetensors", "exceeds the file", "truncated"]


def case_st_truncated_in_data(tmp, cv2_dir, cv2_hf, state):
    h = _hf(tmp, cv2_hf)
    data = (h / "model.safetensors").read_bytes()
    (h / "model.safetensors").write_bytes(data[: len(data) - 1000])
    return to_pt(h, tmp), [h], [r"model\.safetensors", "outside the", "data block"]


def case_st_too_short(tmp, cv2_dir, cv2_hf, state):
    h = _hf(tmp, cv2_hf)
    (h / "model.safetensors").write_bytes(b"\x10\x00\x00")
    return to_pt(h, tmp), [h], [r"model\.safetensors", "too short"]


def case_st_header_json_flipped(tmp, cv2_dir, cv2_hf, state):
    h = _hf(tmp, cv2_hf)
    _flip(h / "model.safetensors", 8, 0)  # the header's opening '{' becomes 'z'
    return to_pt(h, tmp), [h], [r"model\.safetensors", "not valid JSON"]


def case_st_dtype_flipped(tmp, cv2_dir, cv2_hf, state):
    h = _hf(tmp, cv2_hf)
    data = (h / "model.safetensors").read_bytes()
    _flip(h / "model.safetensors", data.index(b'"F32"') + 3, 0)  # F32 → F33
    return to_pt(h, tmp), [h], [r"model\.safetensors", "unknown dtype 'F33'"]


def case_st_offset_digit_flipped(tmp, cv2_dir, cv2_hf, state):
    h = _hf(tmp, cv2_hf)
    data = (h / "model.safetensors").read_bytes()
    pos = data.index(b'"data_offsets":[', data.index(NORM.encode())) + len(b'"data_offsets":[')
    _flip(h / "model.safetensors", pos, 2)  # the first digit of the begin offset changes by 4
    return to_pt(h, tmp), [h], [r"model\.safetensors", NORM.replace(".", r"\."), "(span|overlap|outside)"]


def case_st_duplicate_name(tmp, cv2_dir, cv2_hf, state):
    h = _hf(tmp, cv2_hf)
    path = h / "model.safetensors"
    _, header, body = _split_st(path)
    other = "model.layers.0.post_attention_layernorm.weight"
    text = json.dumps(header, separators=(",", ":")).replace(json.dumps(other), json.dumps(NORM))
    _join_st(path, text, body)
    return to_pt(h, tmp), [h], [r"model\.safetensors", "duplicate entry", NORM.replace(".", r"\.")]


def case_st_overlapping_tensors(tmp, cv2_dir, cv2_hf, state):
    h = _hf(tmp, cv2_hf)
    path = h / "model.safetensors"
    _, header, body = _split_st(path)
    header["model.layers.0.post_attention_layernorm.weight"]["data_offsets"] = header[NORM]["data_offsets"]
    _join_st(path, json.dumps(header), body)
    return to_pt(h, tmp), [h], [r"model\.safetensors", "overlap"]


def case_st_shape_disagrees_with_bytes(tmp, cv2_dir, cv2_hf, state):
    h = _hf(tmp, cv2_hf)
    path = h / "model.safetensors"
    _, header, body = _split_st(path)
    header[NORM]["shape"] = [10 ** 12]
    _join_st(path, json.dumps(header), body)
    return to_pt(h, tmp), [h], [r"model\.safetensors", r"\[1000000000000\]", "needs", "bytes"]


def case_sidecar_truncated(tmp, cv2_dir, cv2_hf, state):
    h = _hf(tmp, cv2_hf)
    data = (h / "cosybridge_sidecar.safetensors").read_bytes()
    (h / "cosybridge_sidecar.safetensors").write_bytes(data[:-8])
    return to_pt(h, tmp), [h], [r"cosybridge_sidecar\.safetensors", "outside the"]


def case_index_missing_shard(tmp, cv2_dir, cv2_hf, state):
    h = _sharded(tmp, cv2_hf)
    (h / "model-00002-of-00002.safetensors").unlink()
    return to_pt(h, tmp), [h], [r"index\.json", "model-00002-of-00002.safetensors is missing"]


def case_index_names_tensor_not_in_shard(tmp, cv2_dir, cv2_hf, state):
    h = _sharded(tmp, cv2_hf)
    _edit_index(h, lambda wm: wm.__setitem__("model.layers.9.mlp.up_proj.weight", "model-00001-of-00002.safetensors"))
    return to_pt(h, tmp), [h], ["in the index but not in the shard", r"layers\.9"]


def case_shard_holds_tensor_not_in_index(tmp, cv2_dir, cv2_hf, state):
    h = _sharded(tmp, cv2_hf)
    _edit_index(h, lambda wm: wm.pop(NORM))
    return to_pt(h, tmp), [h], ["in the shard but not in the index", NORM.replace(".", r"\.")]


def case_index_shard_outside_dir(tmp, cv2_dir, cv2_hf, state):
    h = _sharded(tmp, cv2_hf)
    _edit_index(h, lambda wm: wm.__setitem__(NORM, "../model-00001-of-00002.safetensors"))
    return to_pt(h, tmp), [h], ["shard name", "plain"]


def case_index_not_json(tmp, cv2_dir, cv2_hf, state):
    h = _sharded(tmp, cv2_hf)
    (h / "model.safetensors.index.json").write_text('{"weight_map": {"a": ')
    return to_pt(h, tmp), [h], [r"index\.json", "not a valid index"]


def case_speech_tokens_not_contiguous(tmp, cv2_dir, cv2_hf, state):
    h = _hf(tmp, cv2_hf)
    data = json.loads((h / "tokenizer.json").read_text(encoding="utf-8"))
    for t in data["added_tokens"]:  # <|s_100|> and <|s_101|> trade ids
        t["content"] = {"<|s_100|>": "<|s_101|>", "<|s_101|>": "<|s_100|>"}.get(t["content"], t["content"])
    (h / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return to_pt(h, tmp), [h], [r"hf: ", "not contiguous", r"<\|s_100\|>", "tokenizer files saved with"]


def case_blanken_has_more_layers_than_llm_pt(tmp, cv2_dir, cv2_hf, state):
    m = _model(tmp, cv2_dir)
    config = json.loads((m / "CosyVoice-BlankEN" / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (m / "CosyVoice-BlankEN" / "config.json").write_text(json.dumps(config))
    return to_hf(m, tmp), [m], ["does not match", "missing key", r"layers\.2\."]


def _with_value(h: Path, name: str, index, value: float) -> None:
    tensors = load_file(h / "model.safetensors")
    tensors[name][index] = value
    save_file(tensors, h / "model.safetensors", metadata={"format": "pt"})


def case_nan_in_weight_strict(tmp, cv2_dir, cv2_hf, state):
    h = _hf(tmp, cv2_hf)
    _with_value(h, "model.layers.1.mlp.down_proj.weight", (3, 4), float("nan"))
    return (to_pt(h, tmp, "--strict"), [h],
            [r"model\.layers\.1\.mlp\.down_proj\.weight", "1 NaN", "drop --strict"])


def case_inf_in_llm_pt_strict(tmp, cv2_dir, cv2_hf, state):
    m = _model(tmp, cv2_dir)
    sd = dict(state)
    sd["speech_embedding.weight"] = sd["speech_embedding.weight"].clone()
    sd["speech_embedding.weight"][7, :3] = float("inf")
    torch.save(sd, m / "llm.pt")
    return to_hf(m, tmp) + ["--strict"], [m], [r"speech_embedding\.weight", r"3 \+Inf"]


def case_data_bit_flip_makes_nan_strict(tmp, cv2_dir, cv2_hf, state):
    """One flipped bit in the data block: the top exponent bit of a layernorm weight in [1, 2) makes it
    Inf or NaN. safetensors has no checksum, so only the value check can see it."""
    h = _hf(tmp, cv2_hf)
    path = h / "model.safetensors"
    first8, header, body = _split_st(path)
    begin = header[NORM]["data_offsets"][0]
    values = torch.frombuffer(bytearray(body[begin:begin + 4 * 32]), dtype=torch.float32)
    i = int(torch.nonzero((values >= 1) & (values < 2))[0])
    data_start = len(first8) + struct.unpack("<Q", first8)[0]
    _flip(path, data_start + begin + 4 * i + 3, 6)  # byte 3, bit 6 = bit 30: the exponent's top bit
    return to_pt(h, tmp, "--strict"), [h], [NORM.replace(".", r"\."), r"(NaN|\+Inf)"]


def case_to_pt_output_is_input(tmp, cv2_dir, cv2_hf, state):
    h = _hf(tmp, cv2_hf)
    return ["to-pt", h, "-o", h / "model.safetensors", "--force"], [h], ["overwrite the input"]


def case_to_hf_output_is_llm_pt(tmp, cv2_dir, cv2_hf, state):
    m = _model(tmp, cv2_dir)
    return ["to-hf", m, "-o", m / "llm.pt", "--force"], [m], ["overwrite the input"]


def case_existing_output_without_force(tmp, cv2_dir, cv2_hf, state):
    h = _hf(tmp, cv2_hf)
    (tmp / "llm.pt").write_bytes(b"yesterday's conversion")
    return to_pt(h, tmp), [h, tmp / "llm.pt"], ["already exists", "--force"]


def case_output_directory_missing(tmp, cv2_dir, cv2_hf, state):
    h = _hf(tmp, cv2_hf)
    return ["to-pt", h, "-o", tmp / "no" / "such" / "llm.pt"], [h], ["output directory does not exist", "mkdir"]


CASES = {name[len("case_"):]: fn for name, fn in dict(globals()).items() if name.startswith("case_")}
for _kind in ("zip", "legacy", "raw", "training", "deepspeed"):
    CASES[f"pickle_{_kind}_llm_pt"] = pickle_case(_kind)
CASES["pickle_os_system_llm_pt"] = pickle_case("zip", "os.system")


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_cleanly(case, cv2_dir, cv2_hf, state, capsys, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    args, inputs, words = CASES[case](work, cv2_dir, cv2_hf, state)
    out = Path(args[args.index("-o") + 1]) if "-o" in args else None
    out_before = tree_bytes(out) if out is not None and out.exists() else None
    before = {p: tree_bytes(p) for p in inputs}

    rc, err = run(capsys, *args)

    assert rc == 1, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cosybridge: error: "), err
    for word in words:
        assert re.search(word, lines[0]), f"{word!r} not in {lines[0]!r}"
    assert not (work / "MARKER").exists(), "the pickle's code ran"
    if out is not None:
        assert (tree_bytes(out) if out.exists() else None) == out_before
    assert not leftovers(tmp_path)
    for p, b in before.items():
        assert tree_bytes(p) == b, f"{p} changed"


# ---- NaN/Inf without --strict: converted, and reported by name ------------------------------------------------

def test_nan_is_reported_and_converted(cv2_hf, capsys, tmp_path):
    h = _hf(tmp_path, cv2_hf)
    _with_value(h, "model.layers.1.mlp.down_proj.weight", (3, 4), float("nan"))
    _with_value(h, "model.norm.weight", slice(0, 2), float("-inf"))
    rc, err = run(capsys, "to-pt", h, "-o", tmp_path / "llm.pt")
    assert rc == 0, err
    warning = [line for line in err.splitlines() if "non-finite" in line]
    assert len(warning) == 1, err
    assert "llm.model.model.layers.1.mlp.down_proj.weight (from model.layers.1.mlp.down_proj.weight): 1 NaN" in warning[0]
    assert "llm.model.model.norm.weight (from model.norm.weight): 2 -Inf" in warning[0]
    got = torch.load(tmp_path / "llm.pt", weights_only=True)
    assert torch.isnan(got["llm.model.model.layers.1.mlp.down_proj.weight"][3, 4])
    assert int(torch.isneginf(got["llm.model.model.norm.weight"]).sum()) == 2


def test_lm_head_bias_mask_is_expected(cv2_dir, cv2_hf, capsys, tmp_path):
    """CosyVoice2's HF lm_head.bias is -inf on every text row: written by to-hf, read by to-pt, never reported."""
    bias = load_file(cv2_hf / "model.safetensors")["lm_head.bias"]
    assert int(torch.isneginf(bias).sum()) > 150_000  # the mask is really there
    rc, err = run(capsys, "to-hf", cv2_dir, "-o", tmp_path / "hf", "--strict")
    assert rc == 0 and "non-finite" not in err, err
    rc, err = run(capsys, "to-pt", cv2_hf, "-o", tmp_path / "llm.pt", "--strict")
    assert rc == 0 and "non-finite" not in err, err


def test_a_cast_that_overflows_is_reported(cv2_hf, capsys, tmp_path):
    """bf16 holds 1e5, fp16 does not: --dtype fp16 turns it into inf, which the output check catches."""
    h = _hf(tmp_path, cv2_hf)
    _with_value(h, "model.layers.0.self_attn.q_proj.weight", (0, 0), 1e5)
    rc, err = run(capsys, "to-pt", h, "-o", tmp_path / "llm.pt", "--dtype", "fp16", "--strict")
    assert rc == 1 and "llm.model.model.layers.0.self_attn.q_proj.weight" in err and "1 +Inf" in err, err
    assert not (tmp_path / "llm.pt").exists() and not leftovers(tmp_path)


def test_count_nonfinite_matches_torch():
    from cosybridge.numerics import count_nonfinite

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        t = torch.randn(1000, generator=g).to(dtype)
        assert count_nonfinite(t) is None
        t[[1, 5, 9]] = float("nan")
        t[[2, 3]] = float("inf")
        t[7] = float("-inf")
        c = count_nonfinite(t)
        assert (c.nan, c.posinf, c.neginf) == (3, 2, 1)
    big = torch.full((1000,), 60000.0, dtype=torch.float16)  # finite values whose fp16 sum overflows
    assert count_nonfinite(big) is None
    assert count_nonfinite(torch.arange(10)) is None
