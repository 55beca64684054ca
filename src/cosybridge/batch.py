"""Many checkpoints at once: `to-pt` of every saved step of a training run into one directory.

Each input is converted on its own (one failure never stops the others) and each output is named after
the part of its input path that differs from the other inputs, so `ckpt/global_step_100/merged_hf_model`
and `ckpt/global_step_200/merged_hf_model` become `global_step_100.pt` and `global_step_200.pt`.
With jobs > 1 the conversions run in worker processes (spawned, so no state or threads are inherited):
a crash or a Ctrl-C in one is contained, and every worker removes its own half-written output.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

from .errors import CheckpointError, error_line

log = logging.getLogger(__name__)


def output_names(paths: list[str]) -> list[str]:
    """A distinct file stem per input: its path with the leading and trailing components that every
    input shares removed, the rest joined with '-'."""
    parts = [os.path.abspath(p).strip(os.sep).split(os.sep) for p in paths]
    seen: dict[tuple, str] = {}
    for path, p in zip(paths, parts):
        if tuple(p) in seen:
            raise CheckpointError(f"{path} is given twice (also as {seen[tuple(p)]}); give each HF_DIR once")
        seen[tuple(p)] = path
    if len(parts) == 1:
        return [parts[0][-1]]
    pre = 0
    while all(len(p) > pre + 1 for p in parts) and len({p[pre] for p in parts}) == 1:
        pre += 1
    suf = 0
    while all(len(p) - pre - suf > 1 for p in parts) and len({p[-1 - suf] for p in parts}) == 1:
        suf += 1
    names = ["-".join(p[pre:len(p) - suf]) for p in parts]
    if len(set(names)) < len(names):
        clash = sorted(n for n in names if names.count(n) > 1)[0]
        raise CheckpointError(f"two inputs would both be written as {clash}.pt; convert them in separate runs "
                              "with -o naming each file")
    return names


@dataclass
class Outcome:
    hf_dir: str
    output: str
    report: object = None           # convert.Report when it worked
    error: str | None = None        # the one error line when it did not

    @property
    def ok(self) -> bool:
        return self.error is None


def _convert(hf_dir: str, output: str, options: dict, progress=None) -> Outcome:
    from .convert import to_pt

    try:
        return Outcome(hf_dir, output, report=to_pt(hf_dir, output, progress=progress, **options))
    except Exception as e:  # noqa: BLE001 - any failure is this input's, reported in one line
        log.debug("%s failed", hf_dir, exc_info=True)
        line = error_line(e)
        if hf_dir not in line:  # the line must say which input it is about
            kind, _, rest = line.partition(": ")
            line = f"{kind}: {hf_dir}: {rest}"
        return Outcome(hf_dir, output, error=line)


def _worker_init(level: int) -> None:
    from .cli import _install_signal_handlers  # SIGTERM → an exception, so the temporary output is removed

    logging.basicConfig(level=level, format="cosybridge: %(message)s", force=True)
    _install_signal_handlers()


def to_pt_many(hf_dirs: list[str], out_dir: str, *, jobs: int = 1, progress_for: Callable | None = None,
               on_done: Callable[[Outcome], None] | None = None, **options) -> list[Outcome]:
    """Convert every HF dir to OUT_DIR/<name>.pt; returns one Outcome per input, in input order.

    progress_for(name) gives a progress object for a conversion run in this process (jobs == 1);
    on_done(outcome) is called as each one finishes. `options` are to_pt's keyword arguments."""
    names = output_names(hf_dirs)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise CheckpointError(f"{out_dir}: not a directory; with several HF_DIRs, -o names the directory "
                              "the llm.pt files are written to")
    os.makedirs(out_dir, exist_ok=True)
    outputs = [os.path.join(out_dir, f"{n}.pt") for n in names]
    on_done = on_done or (lambda outcome: None)
    results: list[Outcome | None] = [None] * len(hf_dirs)
    if jobs <= 1 or len(hf_dirs) == 1:
        for i, (hf_dir, output) in enumerate(zip(hf_dirs, outputs)):
            results[i] = _convert(hf_dir, output, options, progress_for(names[i]) if progress_for else None)
            on_done(results[i])
        return results
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=min(jobs, len(hf_dirs)), mp_context=ctx, initializer=_worker_init,
                               initargs=(logging.getLogger("cosybridge").getEffectiveLevel(),))
    try:
        futures = {pool.submit(_convert, h, o, options): i for i, (h, o) in enumerate(zip(hf_dirs, outputs))}
        for future in as_completed(futures):
            i = futures[future]
            try:
                results[i] = future.result()
            except Exception as e:  # noqa: BLE001 - the worker died (killed, out of memory)
                results[i] = Outcome(hf_dirs[i], outputs[i], error=f"{hf_dirs[i]}: the worker converting it "
                                                                    f"died ({error_line(e)})")
            on_done(results[i])
    except BaseException:
        # Ctrl-C reaches every worker by itself; SIGTERM to us alone is passed on, so each removes its temporary
        for process in list(getattr(pool, "_processes", {}).values()):
            if process.is_alive():
                process.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return results


def summary(outcomes: list[Outcome], seconds: float) -> str:
    """One line for the whole batch: how many converted, the bytes and rate, and which inputs failed."""
    done = [o for o in outcomes if o.ok]
    nbytes = sum(o.report.bytes for o in done)
    tensors = sum(o.report.tensors for o in done)
    rate = nbytes / 1e6 / seconds if seconds else 0.0
    line = (f"to-pt: {len(done)} of {len(outcomes)} converted: {tensors} tensors, {nbytes / 1e6:,.1f} MB in "
            f"{seconds:.2f} s ({rate:,.0f} MB/s)")
    failed = [o.hf_dir for o in outcomes if not o.ok]
    return line + (f"; FAILED: {', '.join(failed)}" if failed else "")


__all__ = ["Outcome", "output_names", "summary", "to_pt_many"]
