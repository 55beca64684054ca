"""The command line. Imports only argparse at start-up: torch and friends load inside each command.

Exit codes: 0 success, 1 bad input or a failed check (one line on stderr), 2 usage error.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

log = logging.getLogger("cosybridge")

DTYPES = ("keep", "bf16", "fp16", "fp32")
FAMILY_CHOICES = ("auto", "cosyvoice2", "cosyvoice3")


class _Progress:
    """A byte progress bar (tqdm) on a terminal, nothing otherwise."""

    def __init__(self, enabled: bool, label: str):
        self.enabled, self.label, self.bar = enabled, label, None

    def start(self, total: int) -> None:
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=self.label,
                            file=sys.stderr, leave=False, mininterval=0.5, delay=1.0)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _progress(args, label: str) -> _Progress:
    return _Progress(not args.quiet and sys.stderr.isatty(), label)


def _convert(args, convert, label: str, *paths, **options) -> int:
    """Run one conversion with the options every converter shares, then print its summary line."""
    report = convert(*paths, dtype=args.dtype, family=args.family, strict=args.strict,
                     progress=_progress(args, label), **options)
    log.warning(report.summary())
    return 0


def _cmd_to_hf(args) -> int:
    from .convert import to_hf

    return _convert(args, to_hf, "to-hf", args.model_dir, args.output, max_shard_size=args.max_shard_size,
                    force=args.force)


def _cmd_to_pt(args) -> int:
    if args.install_into:
        from .install import install_into

        return _convert(args, install_into, "to-pt", args.hf_dirs[0], args.install_into, base=args.base)
    if len(args.hf_dirs) > 1 or args.output.endswith(os.sep) or os.path.isdir(args.output):
        return _to_pt_many(args)  # -o is a directory: also for one HF_DIR, as when a glob matches only one
    from .convert import to_pt

    return _convert(args, to_pt, "to-pt", args.hf_dirs[0], args.output, base=args.base, force=args.force)


def _to_pt_many(args) -> int:
    """Every HF_DIR into the directory -o: a line per input as it finishes, then one for the batch; exit 1
    if any failed."""
    import time

    from .batch import summary, to_pt_many

    t0 = time.perf_counter()
    bar = None
    if args.jobs > 1 and not args.quiet and sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(args.hf_dirs), unit="checkpoint", desc="to-pt", file=sys.stderr, leave=False)

    def done(outcome) -> None:
        if bar is not None:
            bar.update(1)
        if outcome.ok:
            log.warning(outcome.report.summary())
        else:
            print(f"cosybridge: {outcome.error}", file=sys.stderr)

    try:
        outcomes = to_pt_many(args.hf_dirs, args.output, jobs=args.jobs, on_done=done,
                              progress_for=lambda name: _progress(args, name),
                              dtype=args.dtype, base=args.base, family=args.family, force=args.force,
                              strict=args.strict)
    finally:
        if bar is not None:
            bar.close()
    log.warning(summary(outcomes, time.perf_counter() - t0))
    return 0 if all(o.ok for o in outcomes) else 1


def _cmd_to_vllm(args) -> int:
    from .vllm_export import to_vllm

    return _convert(args, to_vllm, "to-vllm", args.model_dir, args.output, max_shard_size=args.max_shard_size,
                    force=args.force)


def _cmd_restore(args) -> int:
    from .install import restore

    done = restore(args.model_dir)
    kept = f"; the llm.pt it replaced is kept as {done.replaced_kept_as}" if done.replaced_kept_as else ""
    left = f"{len(done.backups_left)} older backup(s) left" if done.backups_left else "no older backups left"
    log.warning(f"restored {done.llm_pt} from {done.restored_from}{kept} ({left})")
    return 0


def _cmd_inspect(args) -> int:
    import json

    from .inspect import inspect_path, render

    report = inspect_path(args.path, scan=args.scan)
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


def _cmd_verify(args) -> int:
    import json

    from .verification import render, verify

    result = verify(args.a, args.b, steps=args.steps, tolerance=args.tolerance)
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0 if result["equivalent"] else 1


def _cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(keep=args.keep)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number ≥ 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cosybridge",
        description="Exact, streaming conversion of CosyVoice2/3 speech-LLM checkpoints: "
                    "llm.pt <-> Hugging Face <-> vLLM.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings, errors and the summary")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp, *, dtype_default="keep"):
        sp.add_argument("--dtype", choices=DTYPES, default=dtype_default,
                        help=f"output precision (default {dtype_default}: the source's own)")
        sp.add_argument("--family", choices=FAMILY_CHOICES, default="auto",
                        help="model family (default: detected from yaml, keys and tokenizer)")
        sp.add_argument("--force", action="store_true", help="replace an existing output")
        sp.add_argument("--strict", action="store_true",
                        help="refuse weights with NaN or Inf (default: convert them and warn)")

    sp = sub.add_parser("to-hf", help="CosyVoice model dir (llm.pt) → merged Hugging Face dir",
                        description="Convert a CosyVoice model directory (llm.pt, cosyvoice2/3.yaml, "
                                    "CosyVoice-BlankEN/) to the merged Hugging Face layout.")
    sp.add_argument("model_dir", nargs="?", metavar="MODEL_DIR")
    sp.add_argument("--pretrained-cosyvoice2-path", dest="model_dir_alias", metavar="MODEL_DIR",
                    help="alias of MODEL_DIR (upstream pretrained_to_huggingface.py)")
    sp.add_argument("-o", "--output", "--save-path", dest="output", metavar="OUT_DIR", required=True)
    sp.add_argument("--max-shard-size", default="5GB", help="split weights into shards (default 5GB)")
    common(sp)
    sp.set_defaults(func=_cmd_to_hf)

    sp = sub.add_parser("to-pt", help="merged Hugging Face dir(s) → CosyVoice llm.pt",
                        description="Convert a merged Hugging Face directory back to CosyVoice's llm.pt. "
                                    "Given several HF_DIRs (e.g. checkpoints/*/merged_hf_model), -o names a "
                                    "directory (created if missing) and each output is named after the part of "
                                    "its path that differs from the others' (checkpoints/global_step_100/"
                                    "merged_hf_model → OUT/global_step_100.pt); a failed input does not stop "
                                    "the others, and the exit code is 1 if any failed.")
    sp.add_argument("hf_dirs", nargs="*", metavar="HF_DIR")
    sp.add_argument("--hf-cosyvoice2-llm-path", dest="hf_dir_alias", metavar="HF_DIR",
                    help="alias of HF_DIR (upstream huggingface_to_pretrained.py)")
    sp.add_argument("-o", "--output", "--output-path", dest="output", metavar="OUT",
                    help="the llm.pt to write; with several HF_DIRs (or OUT an existing directory or ending "
                         "in /), the directory to write them to")
    sp.add_argument("-j", "--jobs", type=_positive_int, default=1, metavar="N",
                    help="with several HF_DIRs, convert up to N at once in worker processes (default 1; "
                         "each holds ~300 MB, and more than the number of cores rarely helps)")
    sp.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                    help="only warnings, errors and the summary lines")
    sp.add_argument("--install-into", metavar="MODEL_DIR",
                    help="instead of -o: check the result against MODEL_DIR's yaml and BlankEN config, keep the "
                         "old llm.pt as llm.pt.bak-<time> and replace it atomically (undo: cosybridge restore)")
    sp.add_argument("--base", metavar="MODEL_DIR",
                    help="original CosyVoice model dir: rows the HF layout cannot hold come from it")
    common(sp)
    sp.set_defaults(func=_cmd_to_pt)

    sp = sub.add_parser("to-vllm", help="CosyVoice model dir → speech-only export for vLLM",
                        description="Write the speech-only Hugging Face model CosyVoice serves with vLLM "
                                    "(embed_tokens = speech_embedding, lm_head = llm_decoder), recording a "
                                    "fingerprint of llm.pt so a stale export can be detected.")
    sp.add_argument("model_dir", metavar="MODEL_DIR")
    sp.add_argument("-o", "--output", metavar="OUT_DIR", help="default: MODEL_DIR/vllm, where CosyVoice looks")
    sp.add_argument("--max-shard-size", default="5GB", help="split weights into shards (default 5GB)")
    common(sp, dtype_default="bf16")
    sp.set_defaults(func=_cmd_to_vllm)

    sp = sub.add_parser("restore", help="put back the llm.pt that to-pt --install-into replaced",
                        description="Put the newest MODEL_DIR/llm.pt.bak-* back as llm.pt (atomically); the "
                                    "llm.pt it replaces is kept as llm.pt.replaced-<time>. Run it again to go "
                                    "back one more install.")
    sp.add_argument("model_dir", metavar="MODEL_DIR")
    sp.set_defaults(func=_cmd_restore)

    sp = sub.add_parser("inspect", help="what a CosyVoice LLM checkpoint is, and what will trip CosyVoice",
                        description="Detect the format and family of a CosyVoice model dir, llm.pt, training "
                                    "checkpoint, merged Hugging Face dir or vLLM export, and print its layout, "
                                    "token ids, tensors and warnings.")
    sp.add_argument("path", metavar="PATH")
    sp.add_argument("--json", action="store_true", help="print the report as one JSON object")
    sp.add_argument("--scan", action="store_true",
                    help="also read every tensor once to count NaN/Inf (~1.5 s per 2.5 GB from the page cache); "
                         "without it inspect reads headers and JSON only")
    sp.set_defaults(func=_cmd_inspect)

    sp = sub.add_parser("verify", help="prove two checkpoints are the same model (keys, weights, logits)",
                        description="Check both against the key set CosyVoice expects, compare every weight, and "
                                    "run both through transformers' Qwen2 on fixed inputs: max |Δ logit| over the "
                                    "speech rows, top-1 agreement, greedy decoding. Exit 0 equivalent, 1 not.")
    sp.add_argument("a", metavar="A", help="CosyVoice model dir or llm.pt, merged HF dir, or vLLM export")
    sp.add_argument("b", metavar="B")
    sp.add_argument("--json", action="store_true", help="print the result as one JSON object")
    sp.add_argument("--steps", type=_positive_int, default=20, help="greedy decoding steps (default 20)")
    sp.add_argument("--tolerance", type=_non_negative_float, default=None,
                    help="max |Δ logit| allowed once both sides' weights are at their common precision "
                         "(default 1e-5; both are computed in fp32)")
    sp.set_defaults(func=_cmd_verify)

    sp = sub.add_parser("demo", help="convert a small embedded model both ways and check it")
    sp.add_argument("--keep", metavar="DIR", help="keep the demo's files in DIR")
    sp.set_defaults(func=_cmd_demo)
    return p


def _normalise(p: argparse.ArgumentParser, args) -> None:
    if args.command == "to-hf":
        if bool(args.model_dir) == bool(args.model_dir_alias):
            p.error("to-hf needs exactly one MODEL_DIR (or --pretrained-cosyvoice2-path)")
        args.model_dir = args.model_dir or args.model_dir_alias
    if args.command == "to-pt":
        if args.hf_dir_alias:
            args.hf_dirs.append(args.hf_dir_alias)
        if not args.hf_dirs:
            p.error("to-pt needs an HF_DIR (or --hf-cosyvoice2-llm-path)")
        real = [os.path.realpath(d) for d in args.hf_dirs]
        if len(set(real)) != len(real):
            p.error("to-pt: the same HF_DIR is given twice; give each once")
        if bool(args.output) == bool(args.install_into):
            p.error("to-pt needs exactly one of -o OUT and --install-into MODEL_DIR")
        if args.install_into and (len(args.hf_dirs) > 1 or args.force):
            p.error("--install-into takes one HF_DIR and no --force (the old llm.pt is always kept as a backup)")


class _Terminated(BaseException):
    """SIGTERM/SIGHUP as an exception: their default action kills Python without running the clean-up
    that removes a half-written output."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, frame):
    raise _Terminated(signum)


def _install_signal_handlers() -> dict:
    old = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        old[sig] = signal.signal(sig, _raise_terminated)
    # over a file-size limit (ulimit -f) the kernel sends SIGXFSZ, which kills by default; ignored, the
    # write fails with EFBIG instead and the temporary output is removed
    old[signal.SIGXFSZ] = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return old


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    _normalise(p, args)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="cosybridge: %(message)s", stream=sys.stderr, force=True)
    import threading

    in_main = threading.current_thread() is threading.main_thread()
    old_handlers = _install_signal_handlers() if in_main else {}
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("cosybridge: interrupted (Ctrl-C); nothing half-written was left behind, inputs are unchanged",
              file=sys.stderr)
        return 130
    except _Terminated as e:
        if args.debug:
            raise
        print(f"cosybridge: stopped by {signal.Signals(e.signum).name}; nothing half-written was left behind, "
              "inputs are unchanged", file=sys.stderr)
        return 128 + e.signum
    except Exception as e:  # noqa: BLE001 - one line for the user, traceback with --debug
        from .errors import error_line

        if args.debug:
            raise
        print(f"cosybridge: {error_line(e)}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
