"""`cosybridge demo`: the main job on an embedded default, end to end, with a table of what happened."""
from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time

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
    root = keep or tempfile.mkdtemp(prefix="cosybridge-demo-")
    os.makedirs(root, exist_ok=True)
    try:
        return _run(root, families, keep is not None)
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)


def _run(root: str, families: tuple[str, ...], kept: bool) -> int:
    from .convert import to_hf, to_pt

    rows, ok = [], True
    for name in families:
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
        verdict = _verify(model, os.path.join(base, "hf"))
        if verdict:
            rows.append(("  verify llm.pt vs hf", None, "", verdict[0], verdict[1]))
            ok &= verdict[2]
    out = sys.stdout
    out.write(f"{'step':<26}{'tensors':>8}{'bytes':>11}{'time':>9}  result\n")
    for step, n, size, secs, result in rows:
        out.write(f"{step:<26}{'' if n is None else n:>8}{size:>11}"
                  f"{'' if secs is None else f'{secs:.2f} s':>9}  {result}\n")
    out.write(f"files kept in {root}\n" if kept else "(pass --keep DIR to keep the files)\n")
    return 0 if ok else 1


def _verify(model_dir: str, hf_dir: str):
    """(seconds, summary, passed) from `verify` (real forward passes), or None without transformers."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return None
    from .verification import verify

    t = time.perf_counter()
    r = verify(model_dir, hf_dir)
    g = r["greedy"] or {}
    summary = (f"max |Δ logit| {r['logits']['max_abs_diff']:g}, top-1 {r['top1']['agree']}/{r['top1']['of']}, "
               f"greedy {g.get('steps', 0) if g.get('equal') else 'differs'}/{g.get('steps', 0)} equal"
               if r["logits"] else "; ".join(r["reasons"]))
    return time.perf_counter() - t, summary, r["equivalent"]
