"""Writing files safely: checked destinations, one run per output, unique temporaries, clear OS errors.

Every file the tool writes appears only when complete: it is written under a hidden name of its own
beside the destination (`.NAME.qroarPID.XXXXXXXX.TAG`, created exclusively, so a user's file is never
taken for ours) and renamed over the destination. A run holds a lock on each destination for as long as it
works on it, so a second run to the same file fails at once instead of publishing over the first
one's file (or having its own report describe the other's file).
"""

from __future__ import annotations

import errno
import fcntl
import glob
import hashlib
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from qroar_gguf.errors import QroarError
from qroar_gguf.paths import cache_dir

_HINTS = {
    errno.ENOSPC: "the disk is full: free space or write elsewhere",
    errno.EDQUOT: "the disk quota is used up: free space or write elsewhere",
    errno.ENAMETOOLONG: "the name is too long: choose a shorter one",
    errno.EACCES: "permission denied: choose a folder you can write to",
    errno.EPERM: "permission denied: choose a folder you can write to",
    errno.EROFS: "the file system is read-only: choose another folder",
}


def describe_os_error(exc: OSError, verb: str, path: Path | str) -> str:
    """One line for an OSError: what could not be done to which file, why, and what to do."""
    target = exc.filename or path
    reason = exc.strerror or str(exc) or type(exc).__name__
    hint = _HINTS.get(exc.errno)
    if hint is None and exc.errno is None and "written" in str(exc):  # numpy's short write: "N requested and M written"
        hint = "the disk is probably full: free space or write elsewhere"
    return f"could not {verb} {target}: {reason}" + (f" ({hint})" if hint else "")


def check_destination(path: Path, *, force: bool, what: str, inputs: Iterable[Path] = ()) -> None:
    """Refuse, in one line, a destination that is an input, a directory, a special file, an existing
    file without `force`, or in a folder that is missing or not writable."""
    path = Path(path)
    try:
        resolved = path.resolve()
        if any(resolved == Path(f).resolve() for f in inputs):
            raise QroarError(f"{what} {path} is one of the input files: choose another output path")
        if path.is_dir():
            raise QroarError(f"{what} {path} is a directory: give a file name such as {path / 'model.gguf'}")
        if path.exists():
            if not path.is_file():
                raise QroarError(f"{what} {path} is not a regular file (a device, pipe or socket): it is never "
                                 "replaced, choose a file name")
            if not force:
                raise QroarError(f"{what} {path} already exists: pass --force to overwrite it")
        parent = resolved.parent
        devices = {_device(Path(os.path.abspath(path)).parent), _device(parent)} if path.is_symlink() else set()
        if len(devices) == 2 and None not in devices:
            raise QroarError(f"{what} {path} is a symbolic link to {resolved}, on another file system: the file is "
                             f"written in {parent} and renamed onto the link, which cannot cross file systems; "
                             f"give {resolved} itself")
        if parent.exists() and not parent.is_dir():
            raise QroarError(f"{what} {path}: {parent} is a file, not a folder: choose another path")
        if not parent.is_dir():
            raise QroarError(f"{what} directory {parent} does not exist: create it first")
        try:  # os.access says yes to root even on read-only mounts: try for real
            tempfile.TemporaryFile(dir=parent).close()
        except OSError as exc:
            raise QroarError(f"{what} directory {parent} is not writable ({exc.strerror}): choose another "
                             "output path") from None
    except OSError as exc:  # e.g. a name too long to stat
        raise QroarError(describe_os_error(exc, "write", path)) from None


def check_free_space(path: Path, needed: int, what: str) -> None:
    """Refuse before writing ``needed`` bytes at ``path`` where its folder has less free (``what``: the file)."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return
    if free < needed:
        raise QroarError(f"{path.parent} has {free / 2**20:.0f} MiB free but {what} needs "
                         f"{needed / 2**20:.0f} MiB: free space or write elsewhere")


@contextmanager
def exclusive(key: Path | str, *, wait: str | None = None) -> Iterator[None]:
    """Hold a lock under the cache (never in the user's folder) for as long as the block runs. `key` is an
    output's path (the lock is keyed by its absolute path: the right to write that file) or a lock's own
    name (``"llama-tools-build"``). Another run asking for it meanwhile fails at once with one line; with
    `wait`, it prints `wait` on stderr and waits for the holder instead."""
    if isinstance(key, str):
        name, what = key, key
    else:
        name, what = hashlib.sha256(str(Path(key).resolve()).encode()).hexdigest()[:32], None
    locks = cache_dir() / "locks"
    locks.mkdir(exist_ok=True)
    fd = os.open(locks / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if wait is None:
                if what is not None:
                    raise QroarError(f"another qroar-gguf run is holding {what} right now: wait for it to "
                                     "finish") from None
                raise QroarError(f"another qroar-gguf run is writing {key} right now: wait for it to finish or "
                                 "choose another output") from None
            print(wait, file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def temporary_beside(path: Path, tag: str) -> Iterator[Path]:
    """A new empty file `.NAME.qroarPID.XXXXXXXX.TAG` next to `path`, unique to this run; removed on the
    way out unless it was renamed (published) meanwhile. The process id lets a later run recognise the
    leftovers of a run that was killed outright (SIGKILL, a power cut), which are removed first."""
    path = Path(path)
    remove_stale_temporaries(path)
    fd, name = tempfile.mkstemp(prefix=f".{_stem(path)}.qroar{os.getpid()}.", suffix=f".{tag}",
                                dir=path.resolve().parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the published file gets the usual mode
    finally:
        os.close(fd)
    temporary = Path(name)
    try:
        yield temporary
    finally:
        temporary.unlink(missing_ok=True)


@contextmanager
def temporary_folder_beside(path: Path, tag: str) -> Iterator[Path]:
    """A new empty folder `.NAME.qroarPID.XXXXXXXX.TAG` next to `path`, unique to this run, for a result
    made of several files (or a download) that appears whole or not at all: fill it, then
    :func:`publish_folder` it (or move a file out of it). Removed with what it holds on the way out
    unless it was renamed meanwhile; a killed run's folder is removed by the next one, as files are."""
    path = Path(path)
    remove_stale_temporaries(path)
    temporary = Path(tempfile.mkdtemp(prefix=f".{_stem(path)}.qroar{os.getpid()}.", suffix=f".{tag}",
                                      dir=path.resolve().parent))
    try:
        os.chmod(temporary, 0o777 & ~_umask())  # mkdtemp makes 0700; the published folder gets the usual mode
        yield temporary
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def publish_folder(folder: Path, path: Path) -> None:
    """Put the finished `folder` (from :func:`temporary_folder_beside`) at `path` by rename, replacing a
    folder there (moved aside under a temporary name first, then removed)."""
    path = Path(path)
    if path.exists():
        with temporary_folder_beside(path, "old") as old:
            os.replace(path, old / "previous")
            try:
                os.replace(folder, path)
            except BaseException:
                os.replace(old / "previous", path)  # the previous folder stays where it was
                raise
    else:
        os.replace(folder, path)


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporaries (files and folders) that runs no longer alive left beside `path`. Only names
    of exactly our pattern whose process is gone are touched: a user's file, or a running run's
    temporary, never is."""
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(_stem(path))}\.qroar(\d+)\.[A-Za-z0-9_]{{8}}\.[A-Za-z0-9_.]+$")
    removed = []
    for candidate in path.resolve().parent.glob(f".{glob.escape(_stem(path))}.qroar*"):
        match = pattern.match(candidate.name)
        if match and not candidate.is_symlink() and not _alive(int(match.group(1))):
            if candidate.is_file():
                candidate.unlink(missing_ok=True)
            elif candidate.is_dir():
                shutil.rmtree(candidate, ignore_errors=True)
            else:
                continue
            removed.append(candidate)
    return removed


def _stem(path: Path) -> str:
    """The destination's name as its temporaries start: the name itself, or where that would not leave
    room for the temporary's own part within a file name's 255 bytes, its start and a hash of the whole."""
    name = path.name
    if len(name.encode("utf-8", "surrogateescape")) <= _LONGEST_STEM:
        return name
    start = name.encode("utf-8", "surrogateescape")[:_LONGEST_STEM - 20].decode("utf-8", "ignore")
    return f"{start}~{hashlib.sha256(name.encode('utf-8', 'surrogateescape')).hexdigest()[:16]}"


#: NAME_MAX (255) less the temporary's own part: ".", ".qroar" and a process id, "." and 8 random
#: characters, "." and a tag.
_LONGEST_STEM = 255 - 64


def _device(folder: Path) -> int | None:
    try:
        return folder.stat().st_dev
    except OSError:
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def publish_text(path: Path, text: str) -> None:
    """Write a small text file (JSON, a report) completely or not at all."""
    path = Path(path)
    try:
        with temporary_beside(path, "tmp") as temporary:
            temporary.write_text(text, encoding="utf-8")
            os.replace(temporary, path)
    except OSError as exc:
        raise QroarError(describe_os_error(exc, "write", path)) from None


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
