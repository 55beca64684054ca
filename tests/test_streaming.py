"""The streaming path against the simple one, and what streaming must never cost.

The simple path is the benchmark's "plain" method (bench/bench.py): every tensor loaded whole
(safetensors.torch.load_file / torch.load without mmap), the same plan built with torch.cat, saved with
torch.save / save_file. The converters must give the same tensors bit for bit, with chunks so small that
every tensor, cast and fill crosses many chunk boundaries. Outputs are read back by independent readers:
torch.load (mapped and not), zipfile's testzip (which recomputes every CRC-32), safetensors.safe_open.
"""
from __future__ import annotations

import importlib.util
import os
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import REPO, SRC

import cosybridge.convert as convert
import cosybridge.io.writeback as writeback
import cosybridge.io.zipstream as zipstream
import cosybridge.stream as stream
from cosybridge.convert import to_hf, to_pt
from cosybridge.hfdir import SIDECAR


def _bench():
    spec = importlib.util.spec_from_file_location("cosybridge_bench", REPO / "bench" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _bench()


@pytest.fixture
def tiny_chunks(monkeypatch):
    """64 KiB chunks: the 151936-row embedding of a tiny model streams in ~300 pieces, and casts and fills
    cross chunk boundaries."""
    monkeypatch.setattr(stream, "CHUNK_BYTES", 1 << 16)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _assert_same(ours: dict, simple: dict) -> None:
    assert list(ours) == list(simple)
    for name in simple:
        a, b = ours[name], simple[name]
        assert (a.dtype, tuple(a.shape)) == (b.dtype, tuple(b.shape)), name
        assert torch.equal(_bits(a), _bits(b)), f"{name} differs"


@pytest.mark.parametrize("family, dtype", [("cv2", "keep"), ("cv3", "bf16")])
def test_to_pt_streaming_equals_simple_path(request, family, dtype, tiny_chunks, tmp_path):
    hf = request.getfixturevalue(f"{family}_hf")
    ours = tmp_path / "llm.pt"
    to_pt(str(hf), str(ours), dtype=dtype)
    simple = tmp_path / "simple.pt"
    torch.save(bench.plain_to_pt_tensors(str(hf), dtype), simple)
    for mmap in (False, True):
        a = torch.load(ours, weights_only=True, mmap=mmap)
        b = torch.load(simple, weights_only=True, mmap=mmap)
        _assert_same(a, b)
        for sd in (a, b):  # the tied lm_head is one storage in both
            head, embed = sd["llm.model.lm_head.weight"], sd["llm.model.model.embed_tokens.weight"]
            assert head.untyped_storage().data_ptr() == embed.untyped_storage().data_ptr()
    assert ours.stat().st_size <= simple.stat().st_size * 1.001  # no padding beyond torch.save's own


@pytest.mark.parametrize("family, dtype", [("cv2", "bf16"), ("cv3", "keep")])
def test_to_hf_streaming_equals_simple_path(request, family, dtype, tiny_chunks, tmp_path):
    model_dir = request.getfixturevalue(f"{family}_dir")
    out = tmp_path / "hf"
    to_hf(str(model_dir), str(out), dtype=dtype)
    model, side = bench.plain_to_hf_tensors(str(model_dir), dtype)
    for path, simple in ((out / "model.safetensors", model), (out / SIDECAR, side)):
        with safe_open(str(path), framework="pt") as f:  # the safetensors library reads ours
            ours = {name: f.get_tensor(name) for name in f.keys()}
        assert sorted(ours) == sorted(simple)
        _assert_same({n: ours[n] for n in simple}, simple)


def _records(path: Path) -> list[tuple[zipfile.ZipInfo, int]]:
    """(entry, offset of its data) read from the local headers."""
    out = []
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for info in z.infolist():
            f.seek(info.header_offset)
            sig, *_, name_len, extra_len = struct.unpack("<IHHHHHIIIHH", f.read(30))
            assert sig == 0x04034B50
            out.append((info, info.header_offset + 30 + name_len + extra_len))
    return out


def test_pt_records_are_aligned_with_right_crcs(cv2_hf, tmp_path):
    out = tmp_path / "llm.pt"
    to_pt(str(cv2_hf), str(out))
    with zipfile.ZipFile(out) as z:
        assert z.testzip() is None  # zipfile recomputes every CRC-32 with zlib
    records = _records(out)
    assert all(offset % 64 == 0 for _, offset in records)  # torch.save's .storage_alignment
    # the check has teeth: one flipped bit in the largest tensor's data is named by testzip
    info, offset = max(records, key=lambda r: r[0].file_size)
    data = bytearray(out.read_bytes())
    data[offset + info.file_size // 2] ^= 0x01
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(data))
    with zipfile.ZipFile(bad) as z:
        assert z.testzip() == info.filename


def test_zlib_crc_gives_the_same_file(cv2_hf, tmp_path, monkeypatch):
    to_pt(str(cv2_hf), str(tmp_path / "isal.pt"))
    monkeypatch.setattr(zipstream, "crc32", zlib.crc32)
    to_pt(str(cv2_hf), str(tmp_path / "zlib.pt"))
    assert (tmp_path / "isal.pt").read_bytes() == (tmp_path / "zlib.pt").read_bytes()


def test_writeback_does_not_change_the_bytes(cv2_hf, tmp_path, monkeypatch):
    to_pt(str(cv2_hf), str(tmp_path / "plain.pt"))
    calls = []
    real = writeback.start_writeback
    monkeypatch.setattr(writeback, "WRITEBACK_BYTES", 1 << 20)
    monkeypatch.setattr(stream, "CHUNK_BYTES", 1 << 18)
    monkeypatch.setattr(writeback, "start_writeback", lambda *a: (calls.append(a[1:]), real(*a))[1])
    to_pt(str(cv2_hf), str(tmp_path / "wb.pt"))
    assert len(calls) >= 15  # ~21 MB handed over a megabyte at a time, each range once, in order
    assert all(a[1] == b[0] for a, b in zip(calls, calls[1:])) and calls[0][0] == 0
    assert (tmp_path / "plain.pt").read_bytes() == (tmp_path / "wb.pt").read_bytes()


def _failing_chunks(after: int):
    real = convert.tensor_chunks
    count = [0]

    def chunks(source, out, *args, **kwargs):
        for chunk in real(source, out, *args, **kwargs):
            count[0] += 1
            if count[0] > after:
                raise RuntimeError("disk on fire")
            yield chunk
    return chunks


@pytest.mark.parametrize("existing", [False, True])
def test_failure_mid_write_leaves_no_file(cv2_hf, tmp_path, monkeypatch, existing):
    out = tmp_path / "llm.pt"
    if existing:
        out.write_bytes(b"the previous llm.pt")
    before = sorted(os.listdir(tmp_path))
    monkeypatch.setattr(stream, "CHUNK_BYTES", 1 << 16)
    monkeypatch.setattr(convert, "tensor_chunks", _failing_chunks(after=100))
    with pytest.raises(RuntimeError, match="disk on fire"):
        to_pt(str(cv2_hf), str(out), force=existing)
    assert sorted(os.listdir(tmp_path)) == before  # no .partial, no half-written llm.pt
    if existing:
        assert out.read_bytes() == b"the previous llm.pt"


@pytest.mark.parametrize("existing", [False, True])
def test_failure_mid_write_leaves_no_directory(cv2_dir, tmp_path, monkeypatch, existing):
    out = tmp_path / "hf"
    if existing:
        out.mkdir()
        (out / "keep.txt").write_text("the previous output")
    before = sorted(os.listdir(tmp_path))
    monkeypatch.setattr(stream, "CHUNK_BYTES", 1 << 16)
    monkeypatch.setattr(convert, "tensor_chunks", _failing_chunks(after=100))
    with pytest.raises(RuntimeError, match="disk on fire"):
        to_hf(str(cv2_dir), str(out), force=existing)
    assert sorted(os.listdir(tmp_path)) == before
    if existing:
        assert sorted(os.listdir(out)) == ["keep.txt"]


def test_same_values_compares_bytes_without_copies(tmp_path):
    from cosybridge.io.pt_io import PtFile

    embed = torch.arange(6000, dtype=torch.float32).reshape(1000, 6)
    head = embed.clone()
    other = embed.clone()
    other[999, 5] = -other[999, 5]
    signed = embed.clone()
    signed[0, 0] = -0.0  # equal as numbers, not as bytes: not the same tensor
    torch.save({"e": embed, "tied": embed, "h": head, "o": other, "s": signed}, tmp_path / "x.pt")
    pt = PtFile(str(tmp_path / "x.pt"))
    assert pt.same_values("e", "tied") and pt.same_values("e", "h", chunk_bytes=64)
    assert not pt.same_values("e", "o", chunk_bytes=64)
    assert not pt.same_values("e", "s")


def test_conversions_never_import_transformers(cv2_dir, cv2_hf, tmp_path):
    """to-pt, to-hf and inspect import torch, safetensors and tokenizers only; transformers is for verify."""
    script = f"""
import sys
from cosybridge.cli import main
seen = []
for argv in (["-q", "to-pt", {str(cv2_hf)!r}, "-o", {str(tmp_path / "llm.pt")!r}],
             ["-q", "to-hf", {str(cv2_dir)!r}, "-o", {str(tmp_path / "hf")!r}],
             ["inspect", {str(cv2_hf)!r}]):
    assert main(argv) == 0, argv
    seen.append((argv[0] if argv[0] != "-q" else argv[1], "transformers" in sys.modules))
print("SEEN", seen)
"""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    seen = [line for line in proc.stdout.splitlines() if line.startswith("SEEN ")]
    assert seen == ["SEEN [('to-pt', False), ('to-hf', False), ('inspect', False)]"]


def test_fast_tokenizer_build_equals_the_checked_one(cv2_dir, monkeypatch):
    """to-hf builds the BlankEN tokenizer with tokenizers' own parser; the result is the one the checked
    (line by line) path builds, serialised to the same bytes."""
    import cosybridge.tokens as tokens

    blanken = cv2_dir / "CosyVoice-BlankEN"
    fast = tokens._base_tokenizer_fast(blanken)
    assert fast is not None
    monkeypatch.setattr(tokens, "_base_tokenizer_fast", lambda folder: None)
    checked = tokens.base_tokenizer(blanken)
    assert fast.to_str(pretty=True) == checked.to_str(pretty=True)
    text = "Hello, world! 你好 <|endoftext|> 123"
    assert fast.encode(text).ids == checked.encode(text).ids


def test_one_thread_restores_torch_threads_whatever_the_order():
    """Conversions hold torch at one thread (memory-bound copies); interleaved holders (generators of two
    tensors, two threads) restore the caller's setting only when the last one is done."""
    original = torch.get_num_threads()
    torch.set_num_threads(3)  # whatever this machine has: a count one_thread must give back
    try:
        a, b = stream.one_thread(), stream.one_thread()
        a.__enter__()
        b.__enter__()
        assert torch.get_num_threads() == 1
        a.__exit__(None, None, None)  # the first out is not the last
        assert torch.get_num_threads() == 1
        b.__exit__(None, None, None)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(original)
