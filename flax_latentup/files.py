"""Writing files and folders so that nothing is ever half-written or lost.

Temporary names say who writes them (``.flax-latentup-tmp-<pid>@<host>@...``), so that a run
can remove what a killed run left behind without touching what a live one is writing.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import functools
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

TMP_PREFIX = ".flax-latentup-tmp-"
STALE_SECONDS = 3600  # a temporary this old is stale whoever wrote it (one takes seconds)


def _host_name() -> str:
    return socket.gethostname().replace("@", "_") or "host"


def temporary_prefix() -> str:
    """The name prefix of this process's temporary files and folders."""
    return f"{TMP_PREFIX}{os.getpid()}@{_host_name()}@"


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return False
    return True


def is_stale_temporary(name: str, mtime: float, now: float, *, own: bool = True) -> bool:
    """Whether a temporary was left by a run that is over: its writer is a process of this
    host that no longer runs (or, with ``own``, this very process, when it has written nothing
    yet), or it is over an hour old, or it does not say who wrote it. A temporary of a run
    still going on (on this host, or a recent one from another host sharing the folder) is
    kept."""
    parts = name[len(TMP_PREFIX) :].split("@")
    if len(parts) < 3 or not parts[0].isdigit():
        return True
    if now - mtime > STALE_SECONDS:
        return True
    pid, host = int(parts[0]), parts[1]
    if host != _host_name():
        return False
    if pid == os.getpid():
        return own
    return not _pid_running(pid)


def remove_stale_temporaries(folder: str, *, recursive: bool = True, own: bool = True) -> int:
    """Delete the temporary files and folders under ``folder`` (only directly in it unless
    ``recursive``) that killed runs left behind (:func:`is_stale_temporary`, ``own`` as
    there); returns how many were removed."""
    n, now = 0, time.time()
    for root, dirs, files in os.walk(folder):
        for name in files + dirs:
            if not name.startswith(TMP_PREFIX):
                continue
            path = os.path.join(root, name)
            try:
                if is_stale_temporary(name, os.path.getmtime(path), now, own=own):
                    if os.path.isdir(path) and not os.path.islink(path):
                        shutil.rmtree(path)
                    else:
                        os.remove(path)
                    n += 1
            except OSError:  # gone meanwhile (its writer renamed it)
                pass
        dirs[:] = [d for d in dirs if not d.startswith(TMP_PREFIX)] if recursive else []
    return n


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    # Read once: reading the umask means setting it for a moment (do it before threads start).
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def new_file_mode() -> int:
    """The mode a new file gets from ``open`` (0o666 less the umask)."""
    return 0o666 & ~_umask()


def new_dir_mode() -> int:
    """The mode a new folder gets from ``mkdir`` (0o777 less the umask)."""
    return 0o777 & ~_umask()


# what fsync sets where a file system cannot flush (some FUSE mounts): nothing to wait for
_CANNOT_SYNC = {
    getattr(errno, name)
    for name in ("EINVAL", "ENOTSUP", "EOPNOTSUPP", "ENOSYS")
    if hasattr(errno, name)
}


def fsync(fd: int) -> None:
    """``os.fsync(fd)``, a no-op on a file system that cannot flush (it says so with
    EINVAL or ENOTSUP); other errors, a failing or full disk's, are raised."""
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _CANNOT_SYNC:
            raise


def fsync_file(path: str) -> None:
    """Flush the file ``path`` to disk (see :func:`fsync`); opened for writing where only
    that lets it be flushed (Windows), else for reading (a read-only file too)."""
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)
    try:
        fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: str,
    write: Callable[[Any], None],
    *,
    text: bool = False,
    before_rename: Callable[[], None] | None = None,
) -> None:
    """``write(file)`` into a temporary file in ``path``'s folder, then rename it to ``path``
    (with the permissions a plain new file would get, not the temporary file's private ones).
    Nothing is left behind if ``write`` fails or the run is interrupted. ``before_rename``
    runs once the file is written and synced, just before the rename: a file that must change
    together with this one (a model's weights and its ``config.json``) is put in place there,
    and if it fails, ``path`` is left as it was."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(), suffix=suffix, dir=folder)
    try:
        os.chmod(tmp, new_file_mode())
        with os.fdopen(fd, "w" if text else "wb") as f:
            write(f)
            f.flush()
            fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def sync_folder(folder: str) -> None:
    """Flush ``folder``'s entries (names created, renamed or removed there) to disk; a no-op
    where folders cannot be synced (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # folders cannot be synced everywhere
        pass
    finally:
        os.close(fd)


def sync_tree(path: str) -> None:
    """Flush the folder ``path``, everything under it, and the folder entry that names it to
    disk, so that what was written there survives a crash or a power loss (before older
    copies are deleted, say). An OSError if a file cannot be flushed (a failing disk)."""
    for root, dirs, files in os.walk(path):
        for name in files:
            fsync_file(os.path.join(root, name))
        for name in dirs:
            sync_folder(os.path.join(root, name))
    sync_folder(path)
    sync_folder(os.path.dirname(os.path.abspath(path)))


def probe_writable(folder: str, *, create: bool = True) -> None:
    """OSError unless files can be written in ``folder``. With ``create`` the folder is made
    if needed; without, a folder that does not exist yet is judged by its nearest existing
    parent and nothing is created."""
    target = folder or "."
    if create:
        os.makedirs(target, exist_ok=True)
    else:
        target = nearest_existing(target)
        if not os.path.isdir(target):
            raise NotADirectoryError(f"{target!r} is a file, not a folder")
    with _probe_file(target):
        pass


@contextlib.contextmanager
def _probe_file(folder: str):
    """An empty temporary file in ``folder`` (its path), removed at the end; OSError if none
    can be made."""
    fd, probe = tempfile.mkstemp(prefix=temporary_prefix(), dir=folder)
    os.close(fd)
    try:
        yield probe
    finally:
        with contextlib.suppress(FileNotFoundError):  # another process may have cleaned it
            os.remove(probe)


def nearest_existing(path: str) -> str:
    """``path``, or its nearest parent that exists."""
    while not os.path.exists(path):
        parent = os.path.dirname(os.path.abspath(path))
        if parent == os.path.abspath(path):
            break
        path = parent
    return path


def make_folders(path: str) -> list[str]:
    """``os.makedirs(path, exist_ok=True)``; returns the folders it made, deepest first (none if
    ``path`` was there), for :func:`remove_made_folders`."""
    path = os.path.realpath(path)  # where makedirs makes it (a link's ".." goes from its target)
    missing, at = [], path
    while not os.path.lexists(at):
        missing.append(at)
        parent = os.path.dirname(at)
        if parent == at:
            break
        at = parent
    os.makedirs(path, exist_ok=True)
    return missing


def remove_made_folders(made: Sequence[str]) -> None:
    """Remove the folders :func:`make_folders` made (one call's or several), deepest first, as
    long as they are empty: whatever was written in them since is kept, and so are their
    parents."""
    for folder in sorted(made, key=lambda f: f.count(os.sep), reverse=True):
        try:
            os.rmdir(folder)
        except OSError:  # not empty (or gone): its parents are not empty either
            continue


def ignores_case(folder: str) -> bool:
    """Whether the file system that ``folder`` (or, not made yet, its nearest existing parent)
    is on takes names that differ only in case for one file (macOS's and Windows' by default).
    Told by writing a probe file and looking for its name in the other case; False where no
    probe can be written."""
    target = nearest_existing(folder or ".")
    try:
        with _probe_file(target) as probe:
            name = os.path.basename(probe)  # the prefix holds ASCII letters: only those swap
            other = "".join(c.swapcase() if c.isascii() else c for c in name)
            return os.path.exists(os.path.join(target, other))
    except OSError:
        return False


def check_save_folder(path: str, what: str = "path") -> str:
    """The real folder a save into ``path`` writes to (``~`` expanded, a link to a folder
    followed); NotADirectoryError if ``path`` or one of its parents is a file, OSError if it
    cannot be written. Nothing is created."""
    real = os.path.realpath(os.path.expanduser(os.fspath(path)))
    if os.path.exists(real) and not os.path.isdir(real):
        raise NotADirectoryError(f"{what} {os.fspath(path)!r} is a file; expected a folder")
    try:
        probe_writable(real, create=False)
    except NotADirectoryError:
        raise NotADirectoryError(
            f"{what} {os.fspath(path)!r} lies under a file; expected a folder"
        ) from None
    except OSError as e:
        raise PermissionError(f"{what} {os.fspath(path)!r} cannot be written: {e}") from None
    return real


@contextlib.contextmanager
def staged_entries(path: str, names: Iterable[str]):
    """Write a set of entries (files or folders) of the folder ``path`` all at once.

    Yields a staging folder inside ``path``; what the caller writes there under ``names``
    then replaces those entries of ``path``, one rename each. Other entries of ``path`` are
    left alone, ``path`` itself is never renamed (it may be a mount point, or its parent
    read-only), and an error or interruption while writing leaves ``path`` as it was. The
    staging folder is a temporary (:func:`is_stale_temporary`), removed by the next save if a
    kill leaves it behind.
    """
    real = check_save_folder(path)
    os.makedirs(real, mode=new_dir_mode(), exist_ok=True)
    remove_stale_temporaries(real, recursive=False, own=False)
    staging = tempfile.mkdtemp(prefix=temporary_prefix(), dir=real)
    keep = False  # the staging folder holds old entries that could not be put back
    try:
        yield staging
        names = list(names)
        for name in names:
            if not os.path.lexists(os.path.join(staging, name)):
                raise FileNotFoundError(f"nothing was staged as {name!r}")
        _set_modes(staging)
        old = os.path.join(staging, ".replaced")
        os.mkdir(old)
        swapped: list[tuple[str, bool]] = []  # (name, whether an entry was there)
        try:
            for name in names:  # each entry swapped by renames within one file system
                final = os.path.join(real, name)
                had = os.path.lexists(final)
                if had:
                    os.replace(final, os.path.join(old, name))
                swapped.append((name, had))
                os.replace(os.path.join(staging, name), final)
        except BaseException:  # put back what was there, newest swap first
            undo_errors = []
            for name, had in reversed(swapped):
                final, new = os.path.join(real, name), os.path.join(staging, name)
                try:
                    if not os.path.lexists(new) and os.path.lexists(final):
                        os.replace(final, new)
                    if had:
                        os.replace(os.path.join(old, name), final)
                except OSError as e:  # the others are still put back
                    undo_errors.append(e)
            if undo_errors:
                # the old entries not back in place stay on disk, under a name that no later
                # save removes (the staging folder is a temporary)
                keep = True
                with contextlib.suppress(OSError):
                    kept = tempfile.mkdtemp(prefix="flax-latentup-old-entries-", dir=real)
                    os.replace(old, kept)
                    old = kept
                raise OSError(
                    f"the save into {real} failed, and putting back its old entries failed too "
                    f"({undo_errors[0]}): those not back in place are kept in {old}"
                ) from undo_errors[0]
            raise
    finally:
        if not keep:
            shutil.rmtree(staging, ignore_errors=True)


def _set_modes(folder: str) -> None:
    """Give what was written under ``folder`` the permissions new files and folders get
    (``mkdtemp``/``mkstemp`` make them private). Files linked there from elsewhere
    (:func:`link_copy`) keep their own."""
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), new_dir_mode())
        for f in files:
            path = os.path.join(root, f)
            if os.stat(path).st_nlink == 1:
                os.chmod(path, new_file_mode())


def link_copy(src: str, dst: str, exclude: Sequence[str] = ()) -> None:
    """Make ``dst`` a copy of the file or folder ``src`` without copying data where the file
    system allows: each file is hard-linked (the same file under a second name; copied where
    links fail). Files whose names match a pattern of ``exclude`` (fnmatch) are left out."""
    if not os.path.isdir(src):
        _link_file(src, dst)
        return
    for root, _, files in os.walk(src):
        target = os.path.join(dst, os.path.relpath(root, src))
        os.makedirs(target, exist_ok=True)
        for name in files:
            if not any(fnmatch.fnmatchcase(name, p) for p in exclude):
                _link_file(os.path.join(root, name), os.path.join(target, name))


def _link_file(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(src, dst)
