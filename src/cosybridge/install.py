"""Putting a converted llm.pt into a CosyVoice model directory, and taking it back out.

Upstream's README says to overwrite llm.pt by hand. `install_into` does it safely: the conversion is
written to a staging file inside MODEL_DIR and checked against MODEL_DIR's yaml and BlankEN config (the
strict key set and shapes CosyVoice will load); then the current llm.pt is hard-linked to
llm.pt.bak-<UTC time> and the staging file is renamed over llm.pt. `restore` pops the newest backup back
into place and keeps the llm.pt it replaces as llm.pt.replaced-<UTC time>, so restoring twice walks back
two installs instead of toggling between the last two, and no file is ever lost.

At every instant llm.pt is one complete file, the old one or the new one: both steps are renames (or
links) within one directory, and Ctrl-C/SIGTERM are held between them.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import stat
import time
from dataclasses import dataclass

from .errors import CheckpointError
from .hfdir import SIDECAR
from .io.atomic import WriteError, atomic_file, fsync_dir, signals_held, write_error
from .keyset import compare_keys, expected_pt_shapes
from .modeldir import LLM_PT, read_model_dir

log = logging.getLogger(__name__)

BACKUP_PREFIX = LLM_PT + ".bak-"
REPLACED_PREFIX = LLM_PT + ".replaced-"
_STAMP = "%Y%m%dT%H%M%SZ"             # UTC, so names sort in time order across DST changes and machines
_BACKUP_NAME = re.compile(re.escape(BACKUP_PREFIX) + r"\d{8}T\d{6}Z$")
# the staging file (and to_pt's temporary beside it) carry the installing process's id
_STAGING = re.compile(r"^\.+" + re.escape(LLM_PT) + r"\.install-(\d+)\.partial")
VLLM_DIR = "vllm"


def _stamp() -> str:
    return time.strftime(_STAMP, time.gmtime())


def list_backups(model_dir: str) -> list[str]:
    """Backup file names in MODEL_DIR, oldest first."""
    try:
        names = os.listdir(model_dir)
    except OSError as e:
        raise CheckpointError(f"{model_dir}: cannot list ({e.strerror})") from None
    return sorted(n for n in names if _BACKUP_NAME.match(n) and os.path.isfile(os.path.join(model_dir, n)))


def _warn_stale_vllm(model_dir: str) -> str | None:
    vllm = os.path.join(model_dir, VLLM_DIR)
    if not os.path.isdir(vllm):
        return None
    msg = (f"{vllm} was exported from the previous llm.pt and CosyVoice (load_vllm=True) reuses it without "
           f"checking: delete it (rm -r {vllm}) so CosyVoice exports the new weights, or rewrite it with "
           f"`cosybridge to-vllm {model_dir} --force`")
    log.warning(msg)
    return msg


def _keep(src: str, dst: str) -> None:
    """dst becomes another name for src's bytes: a hard link (instant, no space), else an atomic copy
    on file systems without links. Never overwrites dst."""
    try:
        os.link(src, dst)
        return
    except FileExistsError:
        raise CheckpointError(f"{dst}: already exists; a backup is never overwritten: move it away, or wait "
                              "a second and retry") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EXDEV, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise write_error(e, dst) from None
    if os.path.lexists(dst):
        raise CheckpointError(f"{dst}: already exists; a backup is never overwritten")
    with open(src, "rb") as fin, atomic_file(dst) as fout:
        shutil.copyfileobj(fin, fout, 16 << 20)


def _remove_stale_staging(model_dir: str) -> None:
    """An install killed by SIGKILL or a power cut leaves its hidden staging file (as large as llm.pt);
    remove those whose process is gone. A live process's file is left alone."""
    for name in os.listdir(model_dir):
        m = _STAGING.match(name)
        if not m:
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # still running (or the id was reused): not ours to touch
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(model_dir, name))
            log.info("removed %s, left by an install that was killed", os.path.join(model_dir, name))


@dataclass
class Installed:
    llm_pt: str
    backup: str | None
    vllm_warning: str | None


def _swap_in(model_dir: str, staged: str, backup_name: str) -> Installed:
    """Keep the current llm.pt under backup_name, then rename `staged` (a converted file, or a backup being
    restored) over llm.pt."""
    llm_pt = os.path.join(model_dir, LLM_PT)
    backup = os.path.join(model_dir, backup_name)
    made = None
    with signals_held():  # the backup and the replacement happen together or not at all
        try:
            if os.path.lexists(llm_pt):
                with contextlib.suppress(OSError):  # keep the file's mode: CosyVoice may run as another user
                    os.chmod(staged, stat.S_IMODE(os.stat(llm_pt).st_mode))
                _keep(llm_pt, backup)
                made = backup
            os.replace(staged, llm_pt)
            fsync_dir(model_dir)
        except BaseException as e:
            if made:
                with contextlib.suppress(OSError):
                    os.unlink(made)
            if isinstance(e, OSError):
                raise write_error(e, llm_pt, "llm.pt was left unchanged") from None
            raise
    return Installed(llm_pt, made, _warn_stale_vllm(model_dir))


def install_into(hf_dir: str, model_dir: str, *, dtype: str = "keep", base: str | None = None,
                 family: str = "auto", progress=None, strict: bool = False):
    """Convert hf_dir to llm.pt and install it into model_dir, keeping the old llm.pt as a backup.

    Rows the HF layout cannot hold come from hf_dir's sidecar, else from `base`, else from model_dir's
    current llm.pt. Returns the conversion's Report (output = model_dir/llm.pt, backup in notes)."""
    from .convert import to_pt
    from .io.pt_io import PtFile

    md = read_model_dir(model_dir)
    if not os.access(model_dir, os.W_OK):
        why = ("is on a read-only file system" if os.statvfs(model_dir).f_flag & os.ST_RDONLY
               else "is not writable (permission denied)")
        raise CheckpointError(f"{model_dir}: {why}; install-into writes llm.pt and its backup there: make it "
                              "writable, or convert with -o to another place")
    if family not in ("auto", md.family.name):
        raise CheckpointError(f"{md.yaml_path} is {md.family.name}, but --family {family} was given")
    backup_name = BACKUP_PREFIX + _stamp()
    if os.path.lexists(os.path.join(model_dir, backup_name)):
        raise CheckpointError(f"{os.path.join(model_dir, backup_name)}: already exists; a backup is never "
                              "overwritten: move it away, or wait a second and retry")
    if base is None and not os.path.exists(os.path.join(hf_dir, SIDECAR)):
        base = model_dir
        log.info("no %s in %s: rows the HF layout cannot hold come from %s", SIDECAR, hf_dir, md.llm_pt)
    _remove_stale_staging(model_dir)
    staged = os.path.join(model_dir, f".{LLM_PT}.install-{os.getpid()}.partial")
    try:
        report = to_pt(hf_dir, staged, dtype=dtype, base=base, family=family, progress=progress, strict=strict)
        if report.family != md.family.name:
            raise CheckpointError(f"{hf_dir} is a {report.family} checkpoint but {md.yaml_path} is "
                                  f"{md.family.name}; install it into a {report.family} model directory")
        with PtFile(staged) as pt:
            found = {n: pt.info(n).shape for n in pt.names()}
        keys = compare_keys(found, expected_pt_shapes(md.family, md.qwen_config, md.llm.speech_token_size))
        if not keys.ok:
            lines = keys.lines(limit=len(found) + len(keys.missing) + 1)
            raise CheckpointError(f"{hf_dir} does not fit {model_dir}: the converted llm.pt does not match "
                                  f"{os.path.basename(md.yaml_path)} + CosyVoice-BlankEN/config.json "
                                  f"({'; '.join(lines)}); llm.pt was left unchanged")
        done = _swap_in(model_dir, staged, backup_name)
    except BaseException as e:
        with signals_held(), contextlib.suppress(OSError):
            os.unlink(staged)
        if isinstance(e, WriteError):  # name llm.pt, not the staging file
            raise write_error(e.os_error, md.llm_pt, "llm.pt was left unchanged") from None
        raise
    report.output = done.llm_pt
    report.notes.append(f"previous llm.pt kept as {done.backup}; `cosybridge restore {model_dir}` puts it back"
                        if done.backup else "there was no previous llm.pt")
    log.info(report.notes[-1])
    if done.vllm_warning:
        report.notes.append(done.vllm_warning)
    return report


@dataclass
class Restored:
    llm_pt: str
    restored_from: str
    replaced_kept_as: str | None
    backups_left: list[str]
    vllm_warning: str | None


def restore(model_dir: str) -> Restored:
    """Put the newest llm.pt.bak-* back as llm.pt; keep the llm.pt it replaces as llm.pt.replaced-<time>."""
    if not os.path.isdir(model_dir):
        raise CheckpointError(f"{model_dir}: not a directory (expected a CosyVoice model directory)")
    names = list_backups(model_dir)
    if not names:
        raise CheckpointError(f"{model_dir}: no {BACKUP_PREFIX}* backup to restore (to-pt --install-into "
                              "makes one each time it replaces llm.pt)")
    latest = os.path.join(model_dir, names[-1])
    llm_pt = os.path.join(model_dir, LLM_PT)
    replaced = os.path.join(model_dir, REPLACED_PREFIX + _stamp())
    n = 1
    while os.path.lexists(replaced):  # restoring twice within a second: a new name, never an overwrite
        n += 1
        replaced = os.path.join(model_dir, f"{REPLACED_PREFIX}{_stamp()}-{n}")
    swapped = _swap_in(model_dir, latest, os.path.basename(replaced))
    return Restored(llm_pt, latest, swapped.backup, names[:-1], swapped.vllm_warning)
