"""Writing files and directories so that a crash leaves the old version or the new one, never a mix.

``write_atomic(path, data)``: the bytes go to a hidden temporary file next to ``path``
(``.<name>.tmp-XXXX``), are flushed and fsynced, and the file is renamed over ``path``; then
the directory is fsynced so that the rename itself is on disk.

``write_dir(final, fill)``: ``fill(tmp)`` builds the whole directory in a hidden temporary
sibling (``.<name>.tmp-XXXX``); with ``carry=True`` the entries of an existing ``final`` that
``fill`` did not write are carried over (hard links where the file system allows, else copies).
Every file and directory in it is fsynced, and it is put in place as a whole: on Linux by
exchanging it with the old directory in one step (``renameat2(RENAME_EXCHANGE)``), elsewhere by
renaming the old one aside (``.<name>.old-XXXX``) and the new one in; a crash between those two
renames is repaired by the next ``write_dir`` of the same directory. The parent is fsynced,
then the old directory is removed. On any error the temporary directory is removed and
``final`` is left as it was; an ``OSError`` names the file it was writing, under its final path.

Leftover temporary directories of a killed process are hidden (a leading dot) and never have
the name of the directory they were to become; ``write_dir(..., clean=True)`` removes those of
the same directory (only for directories a single writer owns, such as a run's checkpoints).

Fault injection: every writer calls ``fault(label, path)`` at each point where a crash or an
error matters (``FAULT_POINTS``). It does nothing; a test replaces it (``set_fault``) with a
function that raises (a full disk) or ends the process (a crash) at a chosen call.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Callable

FAULT_POINTS = (
    "file:open",  # a temporary file was created, nothing written
    "file:written",  # the data was written, not yet fsynced
    "file:synced",  # the temporary file is on disk, not yet renamed
    "file:renamed",  # the file is in place, its directory not yet fsynced
    "file:done",
    "dir:created",  # the empty temporary directory exists
    "dir:filled",  # fill() returned
    "dir:carried",  # the old directory's other entries are in the new one
    "fsync:before",  # about to fsync one file or directory of the tree (path: that entry)
    "fsync:after",
    "dir:renaming",  # the new directory is complete and on disk, not yet in place
    "dir:aside",  # (fallback only) the old directory renamed aside, the new one not yet in place
    "dir:renamed",  # the new directory is in place (the old one, if any, beside it)
    "dir:parent-synced",  # the parent directory is fsynced
    "dir:removing-old",  # about to remove the old directory
    "dir:done",
)


def _no_fault(label: str, path: str) -> None:
    """The default fault hook: nothing."""


fault: Callable[[str, str], None] = _no_fault


def set_fault(hook: Callable[[str, str], None] | None) -> Callable[[str, str], None]:
    """Install ``hook`` (None: the no-op) as the fault hook; returns the previous one."""
    global fault
    previous = fault
    fault = hook or _no_fault
    return previous


def point(label: str, path: str | os.PathLike) -> None:
    fault(label, os.fspath(path))


# -- files -----------------------------------------------------------------------------------


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def new_file_mode() -> int:
    """The mode ``open`` gives a new file under the current umask."""
    return 0o666 & ~_umask()


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the entries of directory ``path`` (new names, renames) durable."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - a platform without directory handles (Windows)
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # pragma: no cover - some file systems refuse fsync on a directory
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _named(exc: OSError, path: str | os.PathLike) -> OSError:
    """``exc`` naming ``path`` (an error from ``write`` or ``fsync`` names no file)."""
    return OSError(exc.errno, exc.strerror or str(exc), os.fspath(path))


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    path = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(path)
    mode = stat.S_IMODE(os.stat(path).st_mode) if os.path.isfile(path) else new_file_mode()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-", dir=directory)
    except OSError as exc:
        raise _named(exc, path) from exc
    try:
        os.chmod(tmp, mode)  # mkstemp makes 0600 files; others may need to read ours
        with os.fdopen(fd, "wb") as f:
            point("file:open", path)
            f.write(data)
            f.flush()
            point("file:written", path)
            os.fsync(f.fileno())
        point("file:synced", path)
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename in (None, tmp):
            raise _named(exc, path) from exc
        raise
    point("file:renamed", path)
    try:
        fsync_dir(directory)
    except OSError as exc:
        raise _named(exc, directory) from exc
    point("file:done", path)


# -- directories -----------------------------------------------------------------------------


def _default_dir_mode() -> int:
    """The mode ``mkdir`` gives a new directory under the current umask (mkdtemp's is 0700)."""
    return 0o777 & ~_umask()


def _tmp_prefix(final: Path) -> str:
    return f".{final.name}.tmp-"


def _old_prefix(final: Path) -> str:
    return f".{final.name}.old-"


def leftovers(final: Path) -> list[Path]:
    """The temporary and set-aside siblings of ``final`` that earlier writers left behind."""
    if not final.parent.is_dir():
        return []
    prefixes = (_tmp_prefix(final), _old_prefix(final))
    return sorted(p for p in final.parent.iterdir() if p.name.startswith(prefixes))


def _recover(final: Path) -> None:
    """After a crash between the two renames of the fallback: put the old directory back."""
    if final.exists() or final.is_symlink():
        return
    olds = [p for p in leftovers(final) if p.name.startswith(_old_prefix(final)) and p.is_dir()]
    if olds:
        newest = max(olds, key=lambda p: p.stat().st_mtime_ns)
        os.rename(newest, final)
        fsync_dir(final.parent)


def make_dirs(path: Path) -> None:
    """``mkdir -p`` with each new directory's entry made durable."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            continue
        fsync_dir(d.parent)


def write_dir(final: str | os.PathLike, fill: Callable[[Path], None], carry: bool = False,
              clean: bool = False) -> Path:
    """Build a directory with ``fill(tmp)`` in a temporary sibling, then put it at ``final``.

    ``carry``: entries of an existing ``final`` that ``fill`` did not write are kept (hard
    linked, or copied). ``clean``: first remove what earlier, killed writers of ``final`` left.
    On any error the temporary directory is removed and ``final`` is left as it was."""
    final = Path(final)
    if final.is_symlink() and final.is_dir():  # write through a link; keep the user's layout
        final = Path(os.path.realpath(final))
    final = Path(os.path.abspath(final))
    if final.exists() and not final.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(final))
    make_dirs(final.parent)
    _recover(final)
    if clean:
        for path in leftovers(final):
            _remove(path)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(final), dir=final.parent))
    try:
        os.chmod(tmp, stat.S_IMODE(final.stat().st_mode) if final.is_dir() else _default_dir_mode())
        point("dir:created", tmp)
        fill(tmp)
        point("dir:filled", tmp)
        if carry and final.is_dir():
            for entry in sorted(final.iterdir()):
                if not os.path.lexists(tmp / entry.name):
                    _link_tree(entry, tmp / entry.name)
            point("dir:carried", tmp)
        _fsync_tree(tmp)
        point("dir:renaming", final)
        old = _put_in_place(tmp, final)
    except BaseException as exc:
        _remove(tmp)
        if isinstance(exc, OSError):
            raise _in_final(exc, tmp, final) from exc
        raise
    point("dir:renamed", final)
    fsync_dir(final.parent)
    point("dir:parent-synced", final)
    if old is not None:
        point("dir:removing-old", old)
        _remove(old)
    point("dir:done", final)
    return final


def _in_final(exc: OSError, tmp: Path, final: Path) -> OSError:
    """``exc`` naming the file under ``final`` it was writing in ``tmp`` (or ``final`` itself)."""
    name = os.fspath(exc.filename) if exc.filename is not None else None
    if name is None:
        return _named(exc, final)
    try:
        rel = os.path.relpath(name, tmp)
    except ValueError:  # pragma: no cover - another drive (Windows)
        return exc
    if rel == "." or not rel.startswith(".."):
        return _named(exc, final if rel == "." else final / rel)
    return exc


def _put_in_place(tmp: Path, final: Path) -> Path | None:
    """Move ``tmp`` to ``final``; returns where the old ``final`` now is (to be removed), if any."""
    if not final.exists():
        os.rename(tmp, final)
        return None
    if _exchange(tmp, final):
        return tmp  # the old directory, under the temporary name
    old = Path(tempfile.mkdtemp(prefix=_old_prefix(final), dir=final.parent))
    os.rmdir(old)
    os.rename(final, old)
    point("dir:aside", final)  # the crash window of the fallback: final missing, old aside
    os.rename(tmp, final)
    return old


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux); False where the system cannot."""
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # pragma: no cover - no glibc >= 2.28
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # the file system does not support it: use the fallback
    raise OSError(code, os.strerror(code), os.fspath(b))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def link_or_copy(source: Path, target: Path) -> None:
    """``target`` as a hard link to the file ``source``, or a copy where links are impossible."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _link_tree(source: Path, target: Path) -> None:
    if source.is_symlink():
        os.symlink(os.readlink(source), target)
    elif source.is_dir():
        target.mkdir()
        shutil.copystat(source, target)
        for entry in sorted(source.iterdir()):
            _link_tree(entry, target / entry.name)
    elif source.is_file():
        link_or_copy(source, target)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (directories after their contents)."""
    for directory, dirs, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(directory, name)
            if os.path.islink(path):
                continue
            point("fsync:before", path)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            point("fsync:after", path)
        point("fsync:before", directory)
        fsync_dir(directory)
        point("fsync:after", directory)
