"""Crashes and a hostile environment: SIGKILL at random moments while the converter writes, SIGTERM and Ctrl-C
mid-write, a file-size limit (`ulimit -f`), a full disk, a read-only file system, a directory without write
permission. Afterwards the target is absent or complete and loadable; refusals are one line, nothing
half-written is left (SIGKILL aside, which can only leave a hidden `.partial`), and inputs are untouched.

All runs happen in one campaign (tests/crash_driver.py forks a child per run, so torch is imported once);
the disk-full and read-only cases run inside `unshare -rm` with a small tmpfs and a read-only bind mount, and
are skipped where user namespaces are not available.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO, SRC, copy_tree, tree_bytes

KILL_TO_PT, KILL_INSTALL, KILL_TO_HF = 5, 4, 1
MB = 1 << 20


def _unshare_works(tmp: Path) -> bool:
    probe = tmp / "probe"
    probe.mkdir()
    try:
        proc = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {probe} && "
                               f"mount --bind {tmp} {tmp} && mount -o remount,bind,ro {tmp}"],
                              capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


class Campaign:
    def __init__(self, root: Path, cv2_dir: Path, cv2_hf: Path):
        self.root, self.cv2_dir = root, cv2_dir
        self.hf = copy_tree(cv2_hf, root / "hf")
        self.trained = copy_tree(cv2_hf, root / "trained")
        tensors = load_file(self.trained / "model.safetensors")
        tensors["model.norm.weight"] = tensors["model.norm.weight"] * 2
        save_file(tensors, self.trained / "model.safetensors", metadata={"format": "pt"})
        self.model = copy_tree(cv2_dir, root / "model")
        self.original_pt = (cv2_dir / "llm.pt").read_bytes()
        self.inputs = {p: tree_bytes(p) for p in (self.hf, self.trained, self.model)}
        self.runs: list[dict] = []
        self.mounts = _unshare_works(root)

    def add(self, name: str, argv: list, watch: Path, **extra) -> None:
        stderr = self.root / "stderr" / f"{name}.txt"
        stderr.parent.mkdir(exist_ok=True)
        self.runs.append({"name": name, "argv": ["-q", *map(str, argv)], "watch": str(watch), "stderr": str(stderr),
                          **extra})

    def out(self, name: str) -> Path:
        d = self.root / "out" / name
        d.mkdir(parents=True)
        return d

    def model_copy(self, name: str) -> Path:
        return copy_tree(self.cv2_dir, self.root / "models" / name)


@pytest.fixture(scope="module")
def campaign(cv2_dir, cv2_hf, tmp_path_factory):
    c = Campaign(tmp_path_factory.mktemp("crash"), cv2_dir, cv2_hf)
    # SIGKILL at a random moment of the write, the write time measured by a first uninterrupted run
    d = c.out("to-pt-ref")
    c.add("to-pt", ["to-pt", c.hf, "-o", d / "llm.pt"], d)
    for i in range(KILL_TO_PT):
        d = c.out(f"kill-to-pt-{i}")
        c.add(f"kill-to-pt-{i}", ["to-pt", c.hf, "-o", d / "llm.pt"], d, signal="KILL", delay_of="to-pt", seed=i)
    m = c.model_copy("install-ref")
    c.add("install", ["to-pt", c.trained, "--install-into", m], m)
    for i in range(KILL_INSTALL):
        m = c.model_copy(f"kill-install-{i}")
        c.add(f"kill-install-{i}", ["to-pt", c.trained, "--install-into", m], m, signal="KILL",
              delay_of="install", seed=100 + i)
    d = c.out("to-hf-ref")
    c.add("to-hf", ["to-hf", c.model, "-o", d / "hf"], d)
    for i in range(KILL_TO_HF):
        d = c.out(f"kill-to-hf-{i}")
        c.add(f"kill-to-hf-{i}", ["to-hf", c.model, "-o", d / "hf"], d, signal="KILL", delay_of="to-hf", seed=200 + i)
    # SIGTERM / Ctrl-C delivered while the output is still a temporary file
    for sig in ("TERM", "INT"):
        d = c.out(f"sig-{sig}")
        c.add(f"sig-{sig}-to-pt", ["to-pt", c.hf, "-o", d / "llm.pt"], d, signal=sig, freeze=True, delay=0.02)
    d = c.out("sig-TERM-to-hf")
    c.add("sig-TERM-to-hf", ["to-hf", c.model, "-o", d / "hf"], d, signal="TERM", freeze=True, delay=0.05)
    m = c.model_copy("sig-install")
    c.add("sig-TERM-install", ["to-pt", c.trained, "--install-into", m], m, signal="TERM", freeze=True, delay=0.02)
    # a file-size limit, as `ulimit -f 4096` sets it; the CLI must turn SIGXFSZ into a clean EFBIG
    d = c.out("fsize")
    c.add("fsize-to-pt", ["to-pt", c.hf, "-o", d / "llm.pt"], d, fsize=4 * MB)
    m = c.model_copy("fsize-install")
    c.add("fsize-install", ["to-pt", c.trained, "--install-into", m], m, fsize=4 * MB)
    # no write permission (root too: the child drops CAP_DAC_OVERRIDE)
    d = c.out("denied")
    os.chmod(d, 0o555)
    c.add("denied-to-pt", ["to-pt", c.hf, "-o", d / "llm.pt"], d, no_dac=True)
    m = c.model_copy("denied-install")
    os.chmod(m, 0o555)
    c.add("denied-install", ["to-pt", c.trained, "--install-into", m], m, no_dac=True)
    script = ""
    inspect = []
    if c.mounts:
        small, medium, ro, ro_model = c.out("enospc"), c.out("enospc-install"), c.out("rofs"), c.model_copy("rofs")
        script = (f"mount -t tmpfs -o size=8m tmpfs {small} && mount -t tmpfs -o size=30m tmpfs {medium} && "
                  f"cp -r {c.model} {medium}/model && "
                  f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} && "
                  f"mount --bind {ro_model} {ro_model} && mount -o remount,bind,ro {ro_model} && ")
        c.add("enospc-to-pt", ["to-pt", c.hf, "-o", small / "llm.pt"], small)
        c.add("enospc-install", ["to-pt", c.trained, "--install-into", medium / "model"], medium)
        c.add("rofs-to-pt", ["to-pt", c.hf, "-o", ro / "llm.pt"], ro)
        c.add("rofs-install", ["to-pt", c.trained, "--install-into", ro_model], ro_model)
        inspect = [str(small), str(medium)]
    spec = c.root / "runs.json"
    spec.write_text(json.dumps(c.runs + [{"inspect": inspect}]))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(REPO / "tests")])}
    driver = [sys.executable, str(REPO / "tests" / "crash_driver.py"), str(spec)]
    cmd = ["unshare", "-rm", "sh", "-c", script + "exec " + " ".join(map(str, driver))] if c.mounts else driver
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    c.results = {r["name"]: r for r in lines if "name" in r}
    c.inspected = next((r["inspect"] for r in lines if "inspect" in r), {})
    for d in (c.root / "out" / "denied", c.root / "models" / "denied-install"):
        os.chmod(d, 0o755)
    return c


def one_line(result: dict) -> str:
    lines = result["stderr"].splitlines()
    assert len(lines) == 1, result["stderr"]
    return lines[0]


def partials(root: Path) -> list[str]:
    return sorted(str(p) for p in Path(root).rglob("*") if p.name.endswith(".partial"))


def load_pt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_inputs_are_untouched(campaign):
    for path, before in campaign.inputs.items():
        assert tree_bytes(path) == before, path


def test_sigkill_mid_write_never_leaves_a_broken_llm_pt(campaign, capsys):
    ref = campaign.root / "out" / "to-pt-ref" / "llm.pt"
    assert campaign.results["to-pt"]["exit"] == 0 and ref.read_bytes() == campaign.original_pt
    runs = [campaign.results[f"kill-to-pt-{i}"] for i in range(KILL_TO_PT)]
    absent = complete = corrupted = 0
    for i, r in enumerate(runs):
        target = campaign.root / "out" / f"kill-to-pt-{i}" / "llm.pt"
        if not target.exists():
            absent += 1
        elif target.read_bytes() == ref.read_bytes():
            load_pt(target)
            complete += 1
        else:
            corrupted += 1
    mid = sum(bool(r["partial_at_signal"]) and r["exit"] == -9 for r in runs)
    with capsys.disabled():
        print(f"\n[crash] to-pt: {len(runs)} SIGKILL runs ({mid} mid-write): {absent} absent, {complete} complete, "
              f"{corrupted} corrupted")
    assert corrupted == 0
    assert mid >= 2, runs  # kills did land inside the write (a run that finishes first is fine too)


def test_sigkill_during_install_keeps_a_complete_llm_pt(campaign, capsys):
    assert campaign.results["install"]["exit"] == 0, campaign.results["install"]["stderr"]
    new = (campaign.root / "models" / "install-ref" / "llm.pt").read_bytes()
    assert new != campaign.original_pt
    old_count = new_count = corrupted = stale = 0
    for i in range(KILL_INSTALL):
        m = campaign.root / "models" / f"kill-install-{i}"
        data = (m / "llm.pt").read_bytes()  # never missing
        if data == campaign.original_pt:
            old_count += 1
            stale += any(p.name.startswith("llm.pt.bak-") for p in m.iterdir())  # killed between link and rename
        elif data == new:
            new_count += 1
            backups = [p for p in m.iterdir() if p.name.startswith("llm.pt.bak-")]
            assert len(backups) == 1 and backups[0].read_bytes() == campaign.original_pt
        else:
            corrupted += 1
        load_pt(m / "llm.pt")
    with capsys.disabled():
        print(f"[crash] install-into: {KILL_INSTALL} SIGKILL runs: llm.pt old {old_count}, new {new_count}, "
              f"corrupted {corrupted} (extra backup of the unchanged llm.pt left: {stale}; hidden staging files "
              f"left: {len(partials(campaign.root / 'models'))})")
    assert corrupted == 0


def test_sigkill_during_to_hf(campaign, capsys):
    ref = campaign.root / "out" / "to-hf-ref" / "hf"
    assert campaign.results["to-hf"]["exit"] == 0
    corrupted = 0
    for i in range(KILL_TO_HF):
        out = campaign.root / "out" / f"kill-to-hf-{i}" / "hf"
        if out.exists() and tree_bytes(out) != tree_bytes(ref):
            corrupted += 1
    with capsys.disabled():
        print(f"[crash] to-hf: {KILL_TO_HF} SIGKILL runs, {corrupted} corrupted")
    assert corrupted == 0


@pytest.mark.parametrize("name, code, words", [
    ("sig-TERM-to-pt", 143, "stopped by SIGTERM"),
    ("sig-INT-to-pt", 130, "interrupted (Ctrl-C)"),
    ("sig-TERM-to-hf", 143, "stopped by SIGTERM"),
    ("sig-TERM-install", 143, "stopped by SIGTERM"),
])
def test_sigterm_and_ctrl_c_mid_write_remove_the_temporary(campaign, name, code, words):
    r = campaign.results[name]
    assert r["mid_write"], r  # the signal arrived while the temporary existed and the target did not
    assert r["exit"] == code, r
    line = one_line(r)
    assert words in line and "nothing half-written was left behind" in line
    watch = Path(next(x["watch"] for x in campaign.runs if x["name"] == name))
    assert not partials(watch)
    if name.endswith("install"):
        assert (watch / "llm.pt").read_bytes() == campaign.original_pt
        assert sorted(p.name for p in watch.iterdir()) == ["CosyVoice-BlankEN", "cosyvoice2.yaml", "llm.pt"]
    else:
        assert not list(watch.iterdir())


@pytest.mark.parametrize("name, words", [
    ("fsize-to-pt", ["llm.pt: cannot write", "file too large", "ulimit -f", "nothing was written"]),
    ("fsize-install", ["/llm.pt: cannot write", "file too large", "llm.pt was left unchanged"]),
    ("denied-to-pt", ["denied: is not writable (permission denied)"]),
    ("denied-install", ["denied-install: is not writable (permission denied)", "make it writable"]),
])
def test_file_size_limit_and_permission_denied(campaign, name, words):
    r = campaign.results[name]
    assert r["exit"] == 1, r
    line = one_line(r)
    assert line.startswith("cosybridge: error: ")
    for w in words:
        assert w in line, line
    watch = Path(next(x["watch"] for x in campaign.runs if x["name"] == name))
    if name.endswith("install"):
        assert (watch / "llm.pt").read_bytes() == campaign.original_pt
        assert sorted(p.name for p in watch.iterdir()) == ["CosyVoice-BlankEN", "cosyvoice2.yaml", "llm.pt"]
    else:
        assert not list(watch.iterdir())


@pytest.mark.parametrize("name, words", [
    ("enospc-to-pt", ["cannot write", "no space left on the device", "nothing was written"]),
    ("enospc-install", ["/llm.pt: cannot write", "no space left on the device", "llm.pt was left unchanged"]),
    ("rofs-to-pt", ["read-only file system"]),
    ("rofs-install", ["read-only file system", "install-into"]),
])
def test_full_disk_and_read_only_file_system(campaign, name, words):
    if not campaign.mounts:
        pytest.skip("needs `unshare -rm` (user and mount namespaces) for a small tmpfs and a read-only bind mount")
    r = campaign.results[name]
    assert r["exit"] == 1, r
    line = one_line(r)
    for w in words:
        assert w in line, line
    watch = next(x["watch"] for x in campaign.runs if x["name"] == name)
    if name.startswith("enospc"):  # the tmpfs is gone with the namespace: the driver listed it before leaving
        listing = campaign.inspected[watch]
        if name == "enospc-install":
            assert sorted(listing) == sorted(f"model/{k}" for k in tree_bytes(campaign.model))
            assert listing["model/llm.pt"] == hashlib.sha256(campaign.original_pt).hexdigest()
        else:
            assert listing == {}
    elif name == "rofs-install":
        assert (Path(watch) / "llm.pt").read_bytes() == campaign.original_pt
        assert not partials(Path(watch))
    else:
        assert not list(Path(watch).iterdir())
