"""Test helper (not part of the product): run `cosybridge` commands in forked children of one process, so
torch is imported once, and interrupt them while they write.

    python crash_driver.py RUNS.json  →  one JSON object per run on stdout

Each run: {"argv": [...], "watch": DIR, "stderr": FILE, and optionally
  "signal": "KILL"|"TERM"|"INT"   sent once a `.partial` appears in DIR, after "delay" seconds, or after a
                                  random fraction (up to 0.7) of the write time of the run named in "delay_of";
  "freeze": true                  SIGSTOP first, check the child is still mid-write, signal, SIGCONT, so the
                                  signal lands inside the write for certain;
  "fsize": BYTES                  RLIMIT_FSIZE for the child (what `ulimit -f` sets);
  "no_dac": true                  drop CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH, so root meets file modes too;
  "name": str, "seed": int}
Children run `cosybridge.cli.main(argv)`, exactly what `python -m cosybridge` runs.
"""
from __future__ import annotations

import ctypes
import json
import os
import random
import resource
import signal
import sys
import time

import torch  # noqa: F401 - imported once here; children inherit it

import cosybridge.cli  # noqa: F401
import cosybridge.convert  # noqa: F401
import cosybridge.install  # noqa: F401
import cosybridge.tokens  # noqa: F401


def drop_dac_capabilities() -> None:
    """capset(2) without CAP_DAC_OVERRIDE (1) and CAP_DAC_READ_SEARCH (2) in any set."""
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    libc = ctypes.CDLL(None, use_errno=True)
    header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    for d in data[:1]:
        for field in ("effective", "permitted", "inheritable"):
            setattr(d, field, getattr(d, field) & ~0b110)
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def child(run: dict) -> None:
    fd = os.open(run["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    if run.get("no_dac"):
        drop_dac_capabilities()
    if run.get("fsize"):
        resource.setrlimit(resource.RLIMIT_FSIZE, (run["fsize"], run["fsize"]))
    torch.set_num_threads(1)
    from cosybridge.cli import main

    try:
        rc = main(run["argv"])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 2
    os._exit(rc)


def partials(d: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(d):
        found += [os.path.join(root, n) for n in dirs + files if n.endswith(".partial")]
    return found


def run_one(run: dict, write_seconds: dict, rng: random.Random) -> dict:
    pid = os.fork()
    if pid == 0:
        try:
            child(run)
        finally:
            os._exit(99)
    sig = getattr(signal, "SIG" + run["signal"]) if run.get("signal") else None
    t0 = time.monotonic()
    seen = deadline = sent = None
    partial_at_signal = mid_write = None
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        now = time.monotonic()
        if seen is None and partials(run["watch"]):
            seen = now
            delay = run.get("delay", 0.0)
            if "delay_of" in run:
                # within the first 70% of the measured write, so a run a little faster than the first still
                # meets the kill mid-write
                delay = rng.uniform(0.0, 0.7) * write_seconds.get(run["delay_of"], 0.5)
            deadline = now + delay
        if sig is not None and sent is None and seen is not None and now >= deadline:
            if run.get("freeze"):
                os.kill(pid, signal.SIGSTOP)
                mid_write = bool(partials(run["watch"]))
                os.kill(pid, sig)
                os.kill(pid, signal.SIGCONT)
            else:
                os.kill(pid, sig)
            sent = now - t0
            partial_at_signal = bool(partials(run["watch"]))
        if now - t0 > 120:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.0005)
    end = time.monotonic()
    if seen is not None and sent is None:
        write_seconds[run.get("name", "")] = end - seen
    with open(run["stderr"], encoding="utf-8", errors="replace") as f:
        stderr = f.read()
    return {"name": run.get("name"), "exit": os.waitstatus_to_exitcode(status), "seconds": end - t0,
            "signal_sent_at": sent, "partial_at_signal": partial_at_signal, "mid_write": mid_write,
            "write_seconds": None if seen is None else end - seen, "stderr": stderr}


def listing(d: str) -> dict:
    """relative path → sha256 of every file under d (hidden temporaries included)."""
    import hashlib

    out = {}
    for root, _, files in os.walk(d):
        for n in files:
            path = os.path.join(root, n)
            with open(path, "rb") as f:
                out[os.path.relpath(path, d)] = hashlib.sha256(f.read()).hexdigest()
    return out


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        runs = json.load(f)
    write_seconds: dict = {}
    for run in runs:
        if "inspect" in run:  # list directories that vanish with the namespace (tmpfs mounts)
            print(json.dumps({"inspect": {d: listing(d) for d in run["inspect"]}}), flush=True)
            continue
        rng = random.Random(run.get("seed", 0))
        print(json.dumps(run_one(run, write_seconds, rng)), flush=True)


if __name__ == "__main__":
    main()
