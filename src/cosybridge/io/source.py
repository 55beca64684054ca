"""What every checkpoint reader offers: names, header-only info, and rows read on demand.

Readers return fresh tensors (never views of a mapped file), so memory stays at what the caller holds.
"""
from __future__ import annotations

from typing import NamedTuple, Protocol

from ..errors import CheckpointError
from .dtypes import nbytes


class TensorInfo(NamedTuple):
    dtype: str                 # safetensors name: "F32", "BF16", ...
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1


class Source(Protocol):
    path: str

    def names(self) -> list[str]: ...

    def info(self, name: str) -> TensorInfo: ...

    def read(self, name: str, start: int = 0, stop: int | None = None, out=None):
        """Rows [start, stop) of a tensor as a new torch.Tensor; or, given `out` (a tensor of as many
        elements, any dtype), written into it with a cast to out's dtype, and `out` returned. Streaming
        passes one reused `out`: no allocation per chunk, and a cast in the same pass as the read."""

    def close(self) -> None: ...


class CombinedSource:
    """Several sources seen as one namespace (an HF model plus its sidecar, or plus a base llm.pt)."""

    def __init__(self, *sources):
        self.sources = [s for s in sources if s is not None]
        self.path = self.sources[0].path
        self._owner = {}
        for s in self.sources:
            for name in s.names():
                if name in self._owner:
                    raise CheckpointError(f"tensor {name!r} is in both {self._owner[name].path} and {s.path}")
                self._owner[name] = s

    def names(self) -> list[str]:
        return list(self._owner)

    def owner(self, name: str):
        try:
            return self._owner[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor {name!r}") from None

    def info(self, name: str) -> TensorInfo:
        return self.owner(name).info(name)

    def read(self, name: str, start: int = 0, stop: int | None = None, out=None):
        return self.owner(name).read(name, start, stop, out=out)

    def close(self) -> None:
        for s in self.sources:
            s.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def row_range(info: TensorInfo, name: str, start: int, stop: int | None, path: str) -> tuple[int, int]:
    rows = info.rows
    stop = rows if stop is None else stop
    if not (0 <= start <= stop <= rows) or not info.shape:
        if not info.shape and (start, stop) == (0, 1):
            return 0, 1
        raise CheckpointError(f"{path}: rows [{start}, {stop}) of {name!r} are outside its shape {list(info.shape)}")
    return start, stop
