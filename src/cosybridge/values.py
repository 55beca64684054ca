"""Reading tensor values in bounded chunks: counting inf/NaN, and comparing rows of two sources."""
from __future__ import annotations

CHUNK_BYTES = 16 << 20


def _steps(info, start: int, stop: int, chunk_bytes: int):
    row_bytes = max(info.nbytes // max(info.rows, 1), 1)
    step = max(chunk_bytes // row_bytes, 1)
    for a in range(start, stop, step):
        yield a, min(a + step, stop)


def count_nonfinite(source, name: str, start: int = 0, stop: int | None = None,
                    chunk_bytes: int = CHUNK_BYTES) -> int:
    """inf and NaN entries among rows [start, stop) of a tensor (0 for integer tensors), chunk by chunk with
    the converters' own check (numerics.count_nonfinite), so inspect and the converters count alike."""
    from .numerics import count_nonfinite as count_chunk

    info = source.info(name)
    total = 0
    for a, b in _steps(info, start, info.rows if stop is None else stop, chunk_bytes):
        found = count_chunk(source.read(name, a, b))
        total += found.total if found else 0
    return total


def compare_rows(a_source, a_name: str, b_source, b_name: str, *, dtype: str, a_start: int = 0, b_start: int = 0,
                 rows: int | None = None, chunk_bytes: int = CHUNK_BYTES) -> dict:
    """Rows [a_start, a_start + rows) of a against b's rows from b_start, both cast to `dtype` (the lower
    precision of the two, so an exact conversion compares equal): rows that differ, the first one, max |a - b|."""
    import torch

    from .io.dtypes import to_torch

    info = a_source.info(a_name)
    rows = info.rows - a_start if rows is None else rows
    out = {"rows_differing": 0, "first_row": None, "max_abs_diff": 0.0}
    target = to_torch(dtype)
    for a, b in _steps(info, 0, rows, chunk_bytes):
        x = a_source.read(a_name, a_start + a, a_start + b).to(target)
        y = b_source.read(b_name, b_start + a, b_start + b).to(target)
        differ = (x != y).reshape(b - a, -1).any(dim=1) if x.dim() else (x != y).reshape(1)
        n = int(differ.sum())
        if n:
            if out["first_row"] is None:
                out["first_row"] = a + int(differ.nonzero()[0])
            out["rows_differing"] += n
            d = (x.double() - y.double()).abs().nan_to_num(nan=float("inf"))
            d = torch.where(x == y, torch.zeros((), dtype=d.dtype), d)  # equal -inf entries: 0, not NaN
            out["max_abs_diff"] = max(out["max_abs_diff"], float(d.max()))
    return out


def rows_equal(a_source, a_name: str, b_source, b_name: str) -> bool:
    """True when b's tensor has a's shape and equals it after casting b to a's dtype."""
    info = a_source.info(a_name)
    if b_source.info(b_name).shape != info.shape:
        return False
    return compare_rows(a_source, a_name, b_source, b_name, dtype=info.dtype)["rows_differing"] == 0
