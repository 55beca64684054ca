"""CosyVoice's llm.pt: a safe lazy reader and a streaming writer of torch.save's zip format.

Reading goes only through `torch.load(weights_only=True)`, so a pickle that carries code is refused before
it runs; with `mmap=True` tensors stay on disk until a row range is copied out, and the pages copied are
handed back to the kernel (madvise) so the resident set does not grow with the file.

Writing is by hand because torch.save needs every tensor whole in memory; the format is small and fixed
(a protocol-2 pickle naming storages by key, one uncompressed zip record per storage, data 64-byte
aligned: zipstream.py), and tests load the output with torch.load, mapped and not (which checks CRCs).
"""
from __future__ import annotations

import ctypes
import logging
import mmap
import os
import pickle
import re
import warnings
from collections import OrderedDict
from typing import Callable, Iterable

from ..errors import CheckpointError
from .dtypes import from_torch, nbytes
from .source import TensorInfo, row_range
from .writeback import Writeback
from .zipstream import ALIGN, ZipStream

log = logging.getLogger(__name__)

# Entries that training adds around a state dict (CosyVoice's train loop, DeepSpeed's epoch_N_whole).
TRAINING_SCALARS = ("epoch", "step", "global_step", "lr", "loss",
                    "ds_config", "ds_version")  # DeepSpeed's zero_pp_rank_*_optim_states.pt carry these
WRAPPER_KEYS = ("module", "state_dict", "model")
OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "lr_scheduler", "scheduler")

_libc = ctypes.CDLL(None, use_errno=True)
_PAGE = mmap.PAGESIZE


class PtFile:
    """A flat name → tensor dict from a .pt file, possibly unwrapped from a training checkpoint."""

    def __init__(self, path: str):
        self.path = str(path)
        self.notes: list[str] = []      # what was unwrapped or stripped, for inspect and the log
        self.wrapper: str | None = None
        obj, self._mapped = self._load()
        self._tensors = self._unwrap(obj)

    def _load(self):
        import torch

        if not os.path.isfile(self.path):
            raise CheckpointError(f"{self.path}: no such file")
        with open(self.path, "rb") as f:
            head = f.read(32)
        # torch.save writes a zip (or, before torch 1.6, a bare protocol-2 pickle); anything else would reach
        # the weights_only unpickler and be reported as a pickle that asks to run code, which misleads
        if head.startswith(b"version https://git-lfs"):
            raise CheckpointError(f"{self.path}: a Git LFS pointer, not the weights; fetch them with `git lfs pull`")
        if not head.startswith((b"PK\x03\x04", b"\x80")):
            raise CheckpointError(f"{self.path}: not a torch checkpoint (it starts with {head[:16]!r}, not a zip or "
                                  "pickle); copy or download it again")
        try:
            with warnings.catch_warnings():
                # torch warns about pickle protocols before refusing; the refusal below is the one line we show
                warnings.simplefilter("ignore")
                try:
                    return torch.load(self.path, map_location="cpu", weights_only=True, mmap=True), True
                except RuntimeError as e:
                    if "mmap" not in str(e) and "zip" not in str(e).lower():
                        raise
                    # legacy (pre-1.6) format cannot be mapped; still weights_only
                    return torch.load(self.path, map_location="cpu", weights_only=True), False
        except pickle.UnpicklingError as e:
            reason = _unpickling_reason(e)
            what = ("the pickle asks to run code or build objects that are not tensors" if "GLOBAL" in reason
                    else "not a plain torch checkpoint")
            raise CheckpointError(f"{self.path}: refused to load: {what} ({reason}); nothing from it was executed; "
                                  "use a checkpoint saved with torch.save(model.state_dict())") from None
        except MemoryError:
            raise CheckpointError(f"{self.path}: not a readable torch checkpoint (it asks for more memory than "
                                  "there is); the file is corrupt") from None
        except Exception as e:  # noqa: BLE001 - torch's parsers raise anything (IndexError, KeyError, ...) on bad bytes
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            msg = msg.split(". This is an internal miniz error")[0]
            raise CheckpointError(f"{self.path}: not a readable torch checkpoint ({msg[:160]}); the file is "
                                  "truncated or corrupt: copy or download it again") from None

    def _unwrap(self, obj) -> dict:
        import torch

        if not isinstance(obj, dict):
            raise CheckpointError(f"{self.path}: holds a {type(obj).__name__}, expected a dict of name → tensor")
        for key in WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                rest = sorted(k for k in obj if k != key)
                self.wrapper = key
                self.notes.append(f"unwrapped the {key!r} dict of a training checkpoint"
                                  + (f" (ignoring {', '.join(map(str, rest))})" if rest else ""))
                obj = inner
                break
        tensors, stripped = {}, []
        for k, v in obj.items():
            if isinstance(v, torch.Tensor):
                tensors[str(k)] = v
            elif k in TRAINING_SCALARS or k in OPTIMIZER_KEYS:
                stripped.append(str(k))
            else:
                raise CheckpointError(f"{self.path}: entry {k!r} is a {type(v).__name__}, not a tensor; "
                                      "expected a flat dict of name → tensor")
        if stripped:
            self.notes.append(f"stripped training entries: {', '.join(sorted(stripped))}")
        if not tensors:
            what = "optimizer state only" if any(k in OPTIMIZER_KEYS for k in stripped) else "no tensors"
            raise CheckpointError(f"{self.path}: holds {what}, no model weights; "
                                  "use the model checkpoint (llm.pt or epoch_N_whole.pt)")
        return tensors

    def names(self) -> list[str]:
        return list(self._tensors)

    def tensor(self, name: str):
        try:
            return self._tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor {name!r}") from None

    def info(self, name: str) -> TensorInfo:
        t = self.tensor(name)
        return TensorInfo(from_torch(t.dtype), tuple(t.shape))

    def shares_storage(self, a: str, b: str) -> bool:
        """True when two entries are the same bytes (the tied lm_head of a saved Qwen2ForCausalLM)."""
        ta, tb = self.tensor(a), self.tensor(b)
        return (ta.untyped_storage().data_ptr() == tb.untyped_storage().data_ptr()
                and ta.storage_offset() == tb.storage_offset()
                and ta.shape == tb.shape and ta.stride() == tb.stride() and ta.dtype == tb.dtype)

    def same_values(self, a: str, b: str, chunk_bytes: int = 16 << 20) -> bool:
        """True when two entries hold the same bytes: one storage (a tied lm_head), or compared a chunk
        at a time straight from the mapped file, without copies, stopping at the first difference."""
        import torch

        if self.shares_storage(a, b):
            return True
        ta, tb = self.tensor(a), self.tensor(b)
        if ta.shape != tb.shape or ta.dtype != tb.dtype:
            return False
        if ta.dim() == 0:
            return bool(torch.equal(ta.reshape(1).view(torch.uint8), tb.reshape(1).view(torch.uint8)))
        step = max(chunk_bytes // max(ta[0].numel() * ta.element_size(), 1), 1)
        for i in range(0, ta.shape[0], step):
            pa, pb = ta[i:i + step], tb[i:i + step]
            same = torch.equal(pa.contiguous().view(torch.uint8), pb.contiguous().view(torch.uint8))
            if self._mapped:
                for part in (pa, pb):
                    if part.is_contiguous():
                        self._release(part)
            if not same:
                return False
        return True

    def read(self, name: str, start: int = 0, stop: int | None = None, out=None):
        """Rows [start, stop) as a new tensor, or copied into `out` (cast to its dtype on the way) and returned."""
        t = self.tensor(name)
        start, stop = row_range(self.info(name), name, start, stop, self.path)
        part = t[start:stop] if t.dim() else t
        if out is None:
            out = part.clone(memory_format=__import__("torch").contiguous_format)
        elif out.numel() != part.numel():
            raise ValueError(f"out has {out.numel()} elements; rows [{start}, {stop}) of {name!r} have {part.numel()}")
        else:  # one pass from the mapped file into the caller's buffer, casting as it goes
            out.copy_(part.reshape(out.shape))
        if self._mapped and part.is_contiguous():
            self._release(part)
        return out

    @staticmethod
    def _release(part) -> None:
        """Drop the copied pages from our resident set; they stay in the page cache (MAP_PRIVATE, never written)."""
        begin = part.data_ptr()
        end = begin + part.numel() * part.element_size()
        begin -= begin % _PAGE
        end += -end % _PAGE
        if end > begin:
            _libc.madvise(ctypes.c_void_p(begin), ctypes.c_size_t(end - begin), 4)  # MADV_DONTNEED

    def close(self) -> None:
        self._tensors = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---- writing ---------------------------------------------------------------------------------------

_STORAGE_CLASS = {"F32": "FloatStorage", "F64": "DoubleStorage", "F16": "HalfStorage", "BF16": "BFloat16Storage",
                  "I64": "LongStorage", "I32": "IntStorage", "I16": "ShortStorage", "I8": "CharStorage",
                  "U8": "ByteStorage", "BOOL": "BoolStorage"}


class _Storage:
    def __init__(self, key: str, dtype: str, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _Tensor:
    def __init__(self, storage: _Storage, shape: tuple[int, ...]):
        self.storage, self.shape = storage, tuple(shape)

    def __reduce_ex__(self, protocol):
        import torch

        stride, acc = [], 1
        for d in reversed(self.shape):
            stride.append(acc)
            acc *= d
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, self.shape, tuple(reversed(stride)), False, OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            import torch

            return ("storage", getattr(torch, _STORAGE_CLASS[obj.dtype]), obj.key, "cpu", obj.numel)
        return None


def write_pt(f, entries: list[tuple[str, str, tuple[int, ...], str | None]],
             chunks: Callable[[str], Iterable], archive: str = "archive") -> int:
    """Stream a dict name → tensor into an open binary file in torch.save's format.

    entries: (name, dtype, shape, alias_of); an alias shares the storage of the named entry, as a tied
    lm_head does. chunks(name) yields torch tensors whose bytes, concatenated, are the tensor's data.
    """
    import torch

    storages: dict[str, _Storage] = {}
    refs = {}
    for name, dtype, shape, alias in entries:
        if alias is not None:
            refs[name] = _Tensor(storages[alias], shape)
            continue
        numel = nbytes(dtype, shape) // nbytes(dtype, ())
        storages[name] = _Storage(str(len(storages)), dtype, numel)
        refs[name] = _Tensor(storages[name], shape)
    zs = ZipStream(f)
    zs.add(f"{archive}/data.pkl", _pickle_dict(refs))
    for rec, data in ((".format_version", b"1"), (".storage_alignment", str(ALIGN).encode()),
                      ("byteorder", b"little")):
        zs.add(f"{archive}/{rec}", data)
    written = 0
    writeback = Writeback(f)
    for name, dtype, shape, alias in entries:
        if alias is not None:
            continue
        record = zs.open(f"{archive}/data/{storages[name].key}", nbytes(dtype, shape))
        for chunk in chunks(name):
            data = memoryview(chunk.contiguous().reshape(-1).view(torch.uint8).numpy())
            record.write(data)
            writeback(len(data))
        record.close()
        written += record.written
    zs.add(f"{archive}/version", b"3\n")
    zs.close()
    return written


def _unpickling_reason(e: Exception) -> str:
    """The informative line of torch's weights_only refusal (it also advises weights_only=False: not us)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    named = re.search(r"GLOBAL ([\w.]+)", str(e))
    if named:  # torch goes on to suggest allow-listing it, which is exactly what must not be done here
        return f"GLOBAL {named.group(1)}"
    for line in lines:
        if "Unsupported" in line:
            return line[:160]
    for i, line in enumerate(lines):
        if line.endswith("WeightsUnpickler error:") and i + 1 < len(lines):
            return lines[i + 1][:160]
    return (lines[0] if lines else type(e).__name__)[:160]


def _pickle_dict(refs: dict) -> bytes:
    import io

    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(refs)
    return buf.getvalue()
