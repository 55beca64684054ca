"""Moving bytes for a plan: each output tensor as a sequence of bounded chunks, cast on the way."""
from __future__ import annotations

from typing import Iterator

from .io.dtypes import nbytes, to_torch
from .plan import Fill, OutTensor, Rows

CHUNK_BYTES = 64 << 20  # memory held per chunk; large enough that per-call overhead is noise


def tensor_chunks(source, out: OutTensor, chunk_bytes: int = CHUNK_BYTES) -> Iterator:
    """Yield torch tensors whose bytes, in order, are `out`'s data in out.dtype."""
    import torch

    dtype = to_torch(out.dtype)
    row_bytes = max(nbytes(out.dtype, out.shape[1:]), 1)
    step = max(chunk_bytes // row_bytes, 1)
    for piece in out.pieces:
        if isinstance(piece, Rows):
            for a in range(piece.start, piece.stop, step):
                chunk = source.read(piece.source, a, min(a + step, piece.stop))
                yield chunk if chunk.dtype == dtype else chunk.to(dtype)
        elif isinstance(piece, Fill):
            for a in range(0, piece.rows, step):
                rows = min(step, piece.rows - a)
                yield torch.full((rows, *out.shape[1:]), piece.value, dtype=dtype)
    if not out.pieces and not out.shape:
        return
