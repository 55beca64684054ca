"""Outputs that appear complete or not at all, and never replace an input.

Every output is written under a temporary name in its target directory, fsynced, and renamed into place
only after the last byte; any exception (including Ctrl-C, and SIGTERM once the CLI turns it into one)
removes the temporary name. Only SIGKILL or a power cut can leave a `.partial` behind, and never a
half-written file under the real name.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import tempfile
import threading

from ..errors import CheckpointError

# mkstemp/mkdtemp create 0600/0700; a finished output gets the permissions a plain open() would give it.
# Read once here: os.umask can only be read by setting it, which is racy once threads run.
_UMASK = os.umask(0o022)
os.umask(_UMASK)

# failures that belong to the output (its disk, its directory), not to an input being read
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT}


class WriteError(CheckpointError):
    """An output could not be written; the message names the final path, never a temporary one."""

    def __init__(self, message: str, os_error: OSError):
        super().__init__(message)
        self.os_error = os_error


def write_error(e: OSError, path: str, outcome: str = "nothing was written") -> WriteError:
    parent = os.path.dirname(os.path.abspath(path))
    fixes = {
        errno.ENOSPC: "no space left on the device; free space or choose an output on another disk",
        errno.EDQUOT: "disk quota exceeded; free space or choose an output on another disk",
        errno.EFBIG: "file too large (a file-size limit, `ulimit -f`, or the file system's maximum); "
                     "raise the limit or choose another output path",
        errno.EROFS: f"{parent} is on a read-only file system; choose another output path",
        errno.EACCES: f"permission denied in {parent}; choose a directory you can write to",
        errno.EPERM: f"operation not permitted in {parent}; choose a directory you can write to",
        errno.ENOENT: f"{parent} disappeared while writing; create it and retry",
    }
    return WriteError(f"{path}: cannot write: {fixes.get(e.errno, e.strerror)}; {outcome}", e)


def _ours(e: OSError, tmp: str) -> bool:
    """Is this OSError about writing the output (not about reading an input)?"""
    if e.errno not in _WRITE_ERRNOS:
        return False
    return e.filename is None or os.path.abspath(str(e.filename)).startswith(os.path.abspath(tmp))


def _same_or_inside(a: str, b: str) -> bool:
    a, b = os.path.realpath(a), os.path.realpath(b)
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep) or b.startswith(a.rstrip(os.sep) + os.sep)


def check_output(path: str, inputs: list[str], force: bool) -> None:
    """Refuse an output that is (or holds, or sits inside) an input, or that exists without --force."""
    for src in inputs:
        if src and os.path.exists(src) and _same_or_inside(path, src):
            raise CheckpointError(f"{path}: output would overwrite the input {src}; choose another output path")
    if os.path.lexists(path) and not force:
        raise CheckpointError(f"{path}: already exists; pass --force to replace it")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise CheckpointError(f"{parent}: output directory does not exist; create it first (mkdir -p) "
                              "or choose another output path")
    if not os.access(parent, os.W_OK):
        try:
            readonly = bool(os.statvfs(parent).f_flag & os.ST_RDONLY)
        except OSError:
            readonly = False
        why = "is on a read-only file system" if readonly else "is not writable (permission denied)"
        raise CheckpointError(f"{parent}: {why}; choose another output directory")


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def signals_held():
    """Hold Ctrl-C/SIGTERM while a temporary output is removed, so a second signal cannot cut the clean-up
    short; they are delivered right after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def atomic_file(path: str):
    """Yield an open binary file at a temporary name beside `path`; rename into place only on success."""
    parent = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=parent)
    except OSError as e:
        raise write_error(e, path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(parent)
    except BaseException as e:
        with signals_held():
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(e, OSError) and _ours(e, tmp):
            raise write_error(e, path) from None
        raise


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE), so a --force replacement never leaves
    the target missing; False where the kernel, libc or file system lacks it (then two renames)."""
    import ctypes
    import errno

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


@contextlib.contextmanager
def atomic_dir(path: str):
    """Yield a temporary directory beside `path`; on success it replaces `path` in one rename."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    try:
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=parent)
    except OSError as e:
        raise write_error(e, path) from None
    try:
        yield tmp
        for name in os.listdir(tmp):
            fd = os.open(os.path.join(tmp, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.chmod(tmp, 0o777 & ~_UMASK)
        fsync_dir(tmp)
        if os.path.lexists(path) and _exchange(tmp, path):
            fsync_dir(parent)
            shutil.rmtree(tmp, ignore_errors=True)  # now the previous output
            return
        old = None
        if os.path.lexists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".old", dir=parent)
            os.rename(path, os.path.join(old, "x"))
        os.rename(tmp, path)
        fsync_dir(parent)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        with signals_held():
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, WriteError):  # from an atomic_file inside: name this output, not its temporary path
            raise write_error(e.os_error, path) from None
        if isinstance(e, OSError) and _ours(e, tmp):
            raise write_error(e, path) from None
        raise
