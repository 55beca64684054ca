"""safetensors: a validating header reader, row-range reads, and a streaming writer.

Written by hand rather than with `safetensors.safe_open` because we need (a) every header defect reported
as our own one-line error before any byte is used, and (b) reads of a row range into fresh memory with
`preadv`, so a 1 GB checkpoint never sits mapped in our resident set. The format is the documented one:
8-byte little-endian header length, a JSON header, then the data block.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterable

from ..errors import CheckpointError
from .dtypes import DTYPE_SIZES, nbytes, to_torch
from .source import TensorInfo, row_range
from .writeback import Writeback

MAX_HEADER = 100 * 1024 * 1024  # the same cap as the safetensors library
ALIGN = 8                        # the safetensors library pads the header so data starts 8-aligned


def _no_duplicates(pairs):
    seen = {}
    for k, v in pairs:
        if k in seen:
            raise CheckpointError(f"duplicate entry {k!r}")
        seen[k] = v
    return seen


_FIX = "the file is truncated or corrupt: copy or download it again"


def parse_header(raw: bytes, data_size: int, where: str) -> tuple[dict[str, tuple[TensorInfo, int, int]], dict]:
    """Validate a header: every entry's dtype, shape and byte range; no overlaps; nothing out of range."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: safetensors header has a {e}; {_FIX}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: JSON, and ints over 4300 digits
        raise CheckpointError(f"{where}: safetensors header is not valid JSON ({type(e).__name__}); "
                              f"{_FIX}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: safetensors header is not a JSON object; {_FIX}")
    metadata = header.pop("__metadata__", {})
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{where}: safetensors __metadata__ must map strings to strings; {_FIX}")
    entries = {}
    for name, e in header.items():
        bad = f"{where}: tensor {name!r}"
        if not isinstance(e, dict) or set(e) - {"dtype", "shape", "data_offsets"} or len(e) != 3:
            raise CheckpointError(f"{bad} needs exactly dtype, shape and data_offsets in the header; {_FIX}")
        dtype, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise CheckpointError(f"{bad} has unknown dtype {dtype!r}; {_FIX}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise CheckpointError(f"{bad} has an invalid shape {shape!r}; {_FIX}")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int for o in offs)
                or not 0 <= offs[0] <= offs[1] <= data_size):
            raise CheckpointError(f"{bad} has data_offsets {offs!r} outside the {data_size}-byte data block; {_FIX}")
        if offs[1] - offs[0] != nbytes(dtype, tuple(shape)):
            raise CheckpointError(f"{bad}: shape {shape} of {dtype} needs {nbytes(dtype, tuple(shape))} bytes "
                                  f"but data_offsets span {offs[1] - offs[0]}; {_FIX}")
        entries[name] = (TensorInfo(dtype, tuple(shape)), offs[0], offs[1])
    spans = sorted((b, e, n) for n, (_, b, e) in entries.items() if e > b)
    for (b1, e1, n1), (b2, _, n2) in zip(spans, spans[1:]):
        if b2 < e1:
            raise CheckpointError(f"{where}: tensors {n1!r} and {n2!r} overlap in the data block; {_FIX}")
    return entries, metadata


class SafetensorsFile:
    """One .safetensors file, header validated on open; data read on demand with preadv."""

    def __init__(self, path: str):
        self.path = str(path)
        self._scratch = None   # a buffer reused by reads that cast (see read)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open ({e.strerror})") from None
        try:
            size = os.fstat(self._fd).st_size
            if size < 8:
                raise CheckpointError(f"{self.path}: {size} bytes is too short for a safetensors file")
            (n,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
            if n > min(MAX_HEADER, size - 8):
                raise CheckpointError(f"{self.path}: safetensors header length {n} exceeds the file "
                                      f"({size} bytes); the file is truncated or not safetensors")
            raw = os.pread(self._fd, n, 8)
            self._data_start = 8 + n
            self._entries, self.metadata = parse_header(raw, size - self._data_start, self.path)
        except BaseException:
            os.close(self._fd)
            raise

    def names(self) -> list[str]:
        return list(self._entries)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._entries[name][0]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor {name!r}") from None

    def byte_range(self, name: str) -> tuple[int, int]:
        _, b, e = self._entries[name]
        return self._data_start + b, self._data_start + e

    def read(self, name: str, start: int = 0, stop: int | None = None, out=None):
        """Rows [start, stop) as a new tensor, or written into `out` (cast to its dtype) and returned."""
        import torch

        info = self.info(name)
        start, stop = row_range(info, name, start, stop, self.path)
        row_bytes = nbytes(info.dtype, info.shape[1:]) if info.shape else DTYPE_SIZES[info.dtype]
        size, dtype = (stop - start) * row_bytes, to_torch(info.dtype)
        shape = (stop - start, *info.shape[1:]) if info.shape else ()
        if out is None:
            buf = torch.empty(size, dtype=torch.uint8)
        elif out.numel() != size // DTYPE_SIZES[info.dtype]:
            raise ValueError(f"out has {out.numel()} elements; rows [{start}, {stop}) of {name!r} have "
                             f"{size // DTYPE_SIZES[info.dtype]}")
        elif out.dtype == dtype and out.is_contiguous():
            buf = out.view(-1).view(torch.uint8)  # straight into the caller's buffer
        else:  # read, then cast into out; the staging buffer is reused, as a fresh one costs page faults
            if self._scratch is None or self._scratch.numel() < size:
                self._scratch = torch.empty(size, dtype=torch.uint8)
            buf = self._scratch[:size]
        self._pread_into(buf, self.byte_range(name)[0] + start * row_bytes, name)
        if out is None:
            return buf.view(dtype).reshape(shape)
        if buf.data_ptr() != out.data_ptr():
            out.copy_(buf.view(dtype).reshape(out.shape))
        return out

    def _pread_into(self, buf, offset: int, name: str) -> None:
        view = memoryview(buf.numpy())
        done = 0
        while done < len(view):
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n <= 0:
                raise CheckpointError(f"{self.path}: data of {name!r} ends early; the file is truncated")
            done += n

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def header_bytes(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None) -> bytes:
    """The header for tensors written in the given order, padded with spaces to 8 bytes as safetensors does."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in entries:
        size = nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % ALIGN)
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(f, entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None,
                      chunks: Callable[[str], Iterable]) -> int:
    """Stream tensors into an open binary file: header, then each tensor's chunks (torch tensors) in order."""
    f.write(header_bytes(entries, metadata))
    written = 0
    writeback = Writeback(f)
    for name, dtype, shape in entries:
        expected = nbytes(dtype, shape)
        got = 0
        for chunk in chunks(name):
            data = memoryview(chunk.contiguous().reshape(-1).view(__import__("torch").uint8).numpy())
            f.write(data)
            writeback(len(data))
            got += len(data)
        if got != expected:  # a plan bug, never user input: stop before a wrong file is finished
            raise AssertionError(f"{name}: wrote {got} bytes, header says {expected}")
        written += got
    return written
