"""Moving bytes for a plan: each output tensor as a sequence of bounded chunks, cast on the way.

Measured on a busy 2-core machine (fp32 → bf16, 2 GB): a fresh tensor per chunk plus a separate cast took
1.3-4.5 s; one reused buffer filled by a single cast-while-copying pass took 0.40 s, and only with torch held
to one thread: copies are memory-bound, so extra threads only wait for a core (1.6-2.0 s with two).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

from .io.dtypes import DTYPE_SIZES, to_torch
from .plan import Fill, OutTensor, Rows

# Memory held per chunk (plus as much again when a read must cast). 4-64 MB all stream at the same speed;
# the smaller end keeps the resident set small.
CHUNK_BYTES = 16 << 20


_threads_lock = threading.Lock()
_threads_held = [0, 1]  # [entries still inside one_thread, torch's thread count before the first]


@contextlib.contextmanager
def one_thread():
    """torch at one intra-op thread while bytes move. The setting is process-wide, so it is counted: the
    first to enter sets it, the last to leave restores it, whatever threads or generators interleave."""
    import torch

    with _threads_lock:
        if _threads_held[0] == 0:
            _threads_held[1] = torch.get_num_threads()
            torch.set_num_threads(1)
        _threads_held[0] += 1
    try:
        yield
    finally:
        with _threads_lock:
            _threads_held[0] -= 1
            if _threads_held[0] == 0:
                torch.set_num_threads(_threads_held[1])


def tensor_chunks(source, out: OutTensor, chunk_bytes: int | None = None) -> Iterator:
    """Yield torch tensors whose bytes, in order, are `out`'s data in out.dtype.

    Every chunk is a view of ONE buffer that the next chunk overwrites: consume (write) each chunk before
    asking for the next, and copy it if it must be kept."""
    import torch

    chunk_bytes = chunk_bytes or CHUNK_BYTES  # read at call time, so tests can shrink it
    dtype = to_torch(out.dtype)
    row_shape = out.shape[1:]
    row_elems = 1
    for d in row_shape:
        row_elems *= d
    # rows per chunk: bounded in the widest dtype involved, so a cast to a narrower type holds no more either
    widest = max([DTYPE_SIZES[out.dtype]] + [DTYPE_SIZES[source.info(p.source).dtype]
                                               for p in out.pieces if isinstance(p, Rows)])
    step = max(chunk_bytes // max(row_elems * widest, 1), 1)
    rows = out.shape[0] if out.shape else 1
    buffer = torch.empty(min(step, rows) * row_elems, dtype=dtype)

    def view(n: int):
        return buffer[:n * row_elems].view(n, *row_shape) if out.shape else buffer[:1].view(())

    with one_thread():
        for piece in out.pieces:
            if isinstance(piece, Rows):
                for a in range(piece.start, piece.stop, step):
                    b = min(a + step, piece.stop)
                    yield source.read(piece.source, a, b, out=view(b - a))
            elif isinstance(piece, Fill):
                filled = min(step, piece.rows)
                view(filled).fill_(piece.value)
                for a in range(0, piece.rows, step):
                    yield view(min(step, piece.rows - a))
