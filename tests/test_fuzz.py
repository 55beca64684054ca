"""Property-based and fuzz tests (hypothesis).

- The tensor mapping round-trips bit-identically for random small models: both families, hidden sizes,
  head counts, layer counts, dtypes, tied or untied lm_head, codebook sizes and embedding-row counts,
  through the real plans, streams, readers and writers (llm.pt → merged HF + sidecar → llm.pt).
- The readers of untrusted files (safetensors header, .pt, shard index) raise nothing but CheckpointError on
  mutated, truncated or invented bytes: never a crash, a hang or a huge allocation.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from cosybridge.errors import CheckpointError

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
TRIED: dict[str, int] = {}


def _count(what: str) -> None:
    TRIED[what] = TRIED.get(what, 0) + 1


# ---- the mapping round trip ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def offsets(cv2_hf, cv3_hf) -> dict[str, int]:
    """<|s_0|> of each family, from the real Qwen2 vocabulary (as recorded by to-hf)."""
    return {f: json.loads((d / "config.json").read_text())["cosyvoice"]["speech_token_offset"]
            for f, d in (("cosyvoice2", cv2_hf), ("cosyvoice3", cv3_hf))}


@st.composite
def models(draw):
    heads = draw(st.sampled_from([1, 2, 4]))
    return {
        "family": draw(st.sampled_from(["cosyvoice2", "cosyvoice3"])),
        "heads": heads,
        "kv_heads": draw(st.sampled_from([d for d in (1, 2, 4) if heads % d == 0])),
        "head_dim": draw(st.sampled_from([2, 4, 8])),
        "layers": draw(st.integers(1, 3)),
        "intermediate": draw(st.integers(1, 40)),
        "dtype": draw(st.sampled_from(["F32", "BF16", "F16"])),
        "tied": draw(st.booleans()),
        "speech_token_size": draw(st.integers(1, 300)),
        "extra_rows": draw(st.integers(0, 300)),   # embedding rows past <|s_0|> (0: none to keep aside)
        "seed": draw(st.integers(0, 10_000)),
    }


@settings(FUZZ, max_examples=10)
@given(m=models())
def test_mapping_round_trips_bit_identically(m, offsets):
    from cosybridge.convert import NoProgress, lm_head_tied, plan_chunks
    from cosybridge.families import FAMILIES, TokenLayout
    from cosybridge.io.pt_io import PtFile, write_pt
    from cosybridge.io.safetensors_io import SafetensorsFile, write_safetensors
    from cosybridge.io.source import CombinedSource
    from cosybridge.numerics import NonFiniteCheck
    from cosybridge.plan import HF_BIAS, HF_EMBED, PT_EMBED, plan_to_hf, plan_to_pt
    from cosybridge.synth import Dims, write_llm_pt

    fam = FAMILIES[m["family"]]
    off = offsets[m["family"]]
    dims = Dims(hidden=m["heads"] * m["head_dim"], layers=m["layers"], heads=m["heads"], kv_heads=m["kv_heads"],
                intermediate=m["intermediate"], vocab_rows=off + m["extra_rows"])
    strict = NonFiniteCheck(strict=True)  # the -inf mask the plan writes must not count as a problem
    with tempfile.TemporaryDirectory() as tmp:
        src, model_st, side_st, back = (os.path.join(tmp, n) for n in
                                        ("llm.pt", "model.safetensors", "side.safetensors", "back.pt"))
        write_llm_pt(src, fam, dims, dtype=m["dtype"], seed=m["seed"], tied=m["tied"],
                     speech_token_size=m["speech_token_size"])
        with PtFile(src) as pt:
            infos = {n: pt.info(n) for n in pt.names()}
            layout = TokenLayout(fam, off, infos[PT_EMBED].rows, m["speech_token_size"])
            tied = lm_head_tied(pt)
            assert tied == m["tied"]
            model, side = plan_to_hf(infos, layout, lm_head_tied=tied)
            for path, plan in ((model_st, model), (side_st, side)):
                with open(path, "wb") as f:
                    write_safetensors(f, [(t.name, t.dtype, t.shape) for t in plan.tensors], {"format": "pt"},
                                      plan_chunks(pt, plan, NoProgress(), strict))
        hf, sc = SafetensorsFile(model_st), SafetensorsFile(side_st)
        with hf, sc:
            plan = plan_to_pt({n: hf.info(n) for n in hf.names()}, layout,
                              sidecar={n: sc.info(n) for n in sc.names()}, sidecar_tied=tied)
            with open(back, "wb") as f:
                write_pt(f, [(t.name, t.dtype, t.shape, t.alias_of) for t in plan.tensors],
                         plan_chunks(CombinedSource(hf, sc), plan, NoProgress(), strict))
        assert Path(back).read_bytes() == Path(src).read_bytes()
        # the HF file as the safetensors library reads it: speech rows where the tokenizer puts them
        weights, native = load_file(model_st), torch.load(src, weights_only=True)
        speech = native["speech_embedding.weight"]
        assert torch.equal(weights[HF_EMBED][off:off + speech.shape[0]], speech)
        assert weights[HF_EMBED].shape[0] == layout.vocab_size and weights[HF_EMBED].dtype == speech.dtype
        if fam.decoder_bias:
            mask = torch.isneginf(weights[HF_BIAS])
            assert int(mask.sum()) == layout.vocab_size - speech.shape[0]
            assert not mask[off:off + speech.shape[0]].any()
    _count("random models round-tripped")


# ---- safetensors header fuzz ------------------------------------------------------------------------------

def _valid_file() -> bytes:
    from cosybridge.io.safetensors_io import header_bytes

    entries = [("a.weight", "F32", (4, 3)), ("b.bias", "BF16", (5,)), ("c", "I64", (2, 2)), ("d", "F16", ())]
    body = b"".join(bytes(range(n % 251, n % 251 + 1)) * n for n in (48, 10, 32, 2))
    return header_bytes(entries, {"format": "pt"}) + body


VALID = _valid_file()


def _read_everything(path: str) -> None:
    from cosybridge.io.safetensors_io import SafetensorsFile

    with SafetensorsFile(path) as f:
        for name in f.names():
            info = f.info(name)
            f.read(name)
            if info.shape and info.shape[0] > 1:
                f.read(name, 1, info.shape[0])


def _expect_only_checkpoint_error(data: bytes, what: str) -> None:
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as tmp:
        tmp.write(data)
        tmp.flush()
        try:
            _read_everything(tmp.name)
        except CheckpointError:
            pass
    _count(what)


@settings(FUZZ, max_examples=600)
@given(edits=st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.one_of(st.none(), st.integers(0, len(VALID))), tail=st.binary(max_size=16))
def test_mutated_safetensors_raise_only_checkpoint_error(edits, cut, tail):
    data = bytearray(VALID)
    for pos, value in edits:
        data[pos] = value
    data = bytes(data[:cut] if cut is not None else data) + tail
    _expect_only_checkpoint_error(data, "mutated safetensors files")


JUNK = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                    max_leaves=6)
ENTRY = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "BF16", "F16", "I64", "BOOL", "F8_E4M3", "U8", "F33", "f32", ""]) | JUNK,
    "shape": st.lists(st.integers(-2, 2**40) | JUNK, max_size=3) | JUNK,
    "data_offsets": st.lists(st.integers(-8, 200) | st.integers(0, 2**64) | JUNK, min_size=0, max_size=3) | JUNK,
}) | JUNK


@settings(FUZZ, max_examples=300)
@given(header=st.dictionaries(st.text(max_size=6) | st.just("__metadata__"), ENTRY, max_size=5),
       body=st.binary(max_size=200), pad=st.integers(0, 9))
def test_invented_headers_raise_only_checkpoint_error(header, body, pad):
    raw = json.dumps(header).encode() + b" " * pad
    _expect_only_checkpoint_error(struct.pack("<Q", len(raw)) + raw + body, "invented safetensors headers")


@settings(FUZZ, max_examples=100)
@given(length=st.integers(0, 2**64 - 1), rest=st.binary(max_size=64))
def test_any_header_length_raises_only_checkpoint_error(length, rest):
    _expect_only_checkpoint_error(struct.pack("<Q", length) + rest, "header lengths")


def test_header_with_a_5000_digit_integer():
    big = b'{"a":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,4]}}'
    with pytest.raises(CheckpointError, match="not valid JSON"):
        from cosybridge.io.safetensors_io import parse_header
        parse_header(big, 4, "x.safetensors")


# ---- .pt and index fuzz -----------------------------------------------------------------------------------------

def _valid_pt() -> bytes:
    import io

    buf = io.BytesIO()
    torch.save({"a": torch.arange(12.0).reshape(4, 3), "b": torch.ones(3, dtype=torch.bfloat16),
                "epoch": 3}, buf)
    return buf.getvalue()


VALID_PT = _valid_pt()


@settings(FUZZ, max_examples=200)
@given(edits=st.lists(st.tuples(st.integers(0, len(VALID_PT) - 1), st.integers(0, 7)), min_size=1, max_size=3),
       cut=st.one_of(st.none(), st.integers(0, len(VALID_PT))))
def test_bit_flipped_pt_raises_only_checkpoint_error(edits, cut):
    from cosybridge.io.pt_io import PtFile

    data = bytearray(VALID_PT)
    for pos, bit in edits:
        data[pos] ^= 1 << bit
    with tempfile.NamedTemporaryFile(suffix=".pt") as tmp:
        tmp.write(bytes(data[:cut] if cut is not None else data))
        tmp.flush()
        try:
            with PtFile(tmp.name) as pt:
                for name in pt.names():
                    pt.read(name)
        except CheckpointError:
            pass
    _count("bit-flipped or truncated .pt files")


@settings(FUZZ, max_examples=100)
@given(index=JUNK | st.fixed_dictionaries({"weight_map": st.dictionaries(st.text(max_size=8), JUNK
                                                                                 | st.sampled_from(["model.safetensors", "../x.safetensors", "a.safetensors"]),
                                                                                 max_size=4) | JUNK}))
def test_invented_index_raises_only_checkpoint_error(index):
    from cosybridge.io.sharded import HFWeights

    with tempfile.TemporaryDirectory() as d:
        Path(d, "model.safetensors.index.json").write_text(json.dumps(index))
        Path(d, "model.safetensors").write_bytes(VALID)
        try:
            HFWeights(d).close()
        except CheckpointError:
            pass
    _count("invented shard indexes")


def test_zz_report_counts(capsys):
    with capsys.disabled():
        print("\n[fuzz] " + ", ".join(f"{what}: {n}" for what, n in TRIED.items()))
    assert TRIED.get("mutated safetensors files", 0) > 0
