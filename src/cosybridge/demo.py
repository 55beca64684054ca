"""`cosybridge demo`: the main job on an embedded default, end to end, with a table of what happened."""
from __future__ import annotations

import logging
import os
import sys
import tempfile
import time

from .families import FAMILIES
from .synth import TINY, build_model_dir

log = logging.getLogger(__name__)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def compare_pt(a_path: str, b_path: str) -> tuple[int, float, bool]:
    """(tensors, max |a - b|, bit-identical incl. dtype and key order) of two llm.pt files."""
    import torch

    a = torch.load(a_path, map_location="cpu", weights_only=True, mmap=True)
    b = torch.load(b_path, map_location="cpu", weights_only=True, mmap=True)
    same = list(a) == list(b)
    worst = 0.0
    for k in a:
        if k not in b or a[k].shape != b[k].shape:
            return len(a), float("inf"), False
        same &= a[k].dtype == b[k].dtype and torch.equal(a[k], b[k])
        worst = max(worst, (a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0)
    return len(a), worst, same


def run_demo(keep: str | None = None, families: tuple[str, ...] = ("cosyvoice2", "cosyvoice3")) -> int:
    from .convert import to_hf, to_pt

    root = keep or tempfile.mkdtemp(prefix="cosybridge-demo-")
    os.makedirs(root, exist_ok=True)
    rows, ok = [], True
    for name in families:
        fam = FAMILIES[name]
        base = os.path.join(root, name)
        t = time.perf_counter()
        model = build_model_dir(os.path.join(base, "model"), name, TINY)
        built = time.perf_counter() - t
        src = os.path.join(model, "llm.pt")
        hf = to_hf(model, os.path.join(base, "hf"), force=True)
        back = to_pt(os.path.join(base, "hf"), os.path.join(base, "llm.roundtrip.pt"), force=True)
        n, worst, same = compare_pt(src, back.output)
        ok &= same
        lay = hf.layout
        rows += [
            (f"{name}: build llm.pt", n, _mb(os.path.getsize(src)), built,
             f"hidden {TINY.hidden}, {TINY.layers} layers, real Qwen2 vocabulary"),
            ("  to-hf", hf.tensors, _mb(hf.bytes), hf.seconds,
             f"<|s_0|>={lay['speech_token_offset']} sos={lay['sos_id']} eos={lay['eos_id']} "
             f"vocab={lay['vocab_size']}"),
            ("  to-pt", back.tensors, _mb(back.bytes), back.seconds, ""),
            ("  round trip", n, "", None,
             f"max |diff| {worst:g}, " + ("bit-identical" if same else "NOT IDENTICAL")),
        ]
        verdict = _verify(src, os.path.join(base, "hf"))
        if verdict:
            rows.append(("  verify pt vs hf", None, "", verdict[0], verdict[1]))
            ok &= verdict[2]
    out = sys.stdout
    out.write(f"{'step':<26}{'tensors':>8}{'bytes':>11}{'time':>9}  result\n")
    for step, n, size, secs, result in rows:
        out.write(f"{step:<26}{'' if n is None else n:>8}{size:>11}"
                  f"{'' if secs is None else f'{secs:.2f} s':>9}  {result}\n")
    out.write(f"files in {root}\n")
    return 0 if ok else 1


def _verify(pt_path: str, hf_dir: str):
    """(seconds, summary, passed) from `verify`, or None where transformers is not installed."""
    try:
        from .verify import verify
    except ImportError:
        return None
    t = time.perf_counter()
    result = verify(os.path.dirname(pt_path), hf_dir)
    return time.perf_counter() - t, result.summary(), result.passed
