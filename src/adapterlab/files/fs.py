"""The file system, defensively: only regular files are opened for reading (a FIFO, a device, a
socket or a directory where a file belongs is an error, never a hang or an endless read), reads of
JSON and YAML are bounded, OSErrors become `StorageError`s naming the path and errno, sibling names
(`.NAME.tmp-*`, `.NAME.old-*`) fit in 255 bytes, and outputs are checked against the inputs before
anything is touched. docs/reliability.md#round-2-files-bases-outputs.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import os
import shutil
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import AdapterFileError, AdapterlabError, ConfigError, StorageError

MAX_JSON_BYTES = 64 * 2**20  # adapter_config.json, a shard index, a YAML config: far below this
NAME_MAX = 255  # bytes in one path component (ext4, xfs, btrfs, tmpfs)
RANDOM_CHARS = 8  # what mkdtemp and the uuid suffixes add after the prefix
_RANDOM_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")
_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)
_HINTS = {
    errno.ENOSPC: "free some disk space or write elsewhere",
    errno.EDQUOT: "the disk quota is used up; free some space or write elsewhere",
    errno.EROFS: "the file system is read-only; write elsewhere",
    errno.EACCES: "check the permissions or write elsewhere",
    errno.EPERM: "check the permissions or write elsewhere",
    errno.ENAMETOOLONG: "use a shorter name",
    errno.EBUSY: "the path is in use (a mount point?); write elsewhere",
    errno.EXDEV: "keep the output on one file system",
}


def kind(mode: int) -> str:
    """'a FIFO (named pipe)', 'a directory', … for a stat mode that is not a regular file."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def storage_error(e: OSError, path: str | os.PathLike[str], doing: str) -> StorageError:
    """`e` as a one-line `StorageError`: what was done, the path, the errno's name and a hint."""
    if isinstance(e, shutil.Error):  # copytree's list of (src, dst, why)
        first = e.args[0][0] if e.args and isinstance(e.args[0], list) and e.args[0] else e
        why = f"copying failed: {str(first)[:200]}"
        code = ""
    else:
        why = e.strerror or str(e)
        code = errno.errorcode.get(e.errno or 0, "")
    name = f" at {str(e.filename)!r}" if getattr(e, "filename", None) else ""
    hint = _HINTS.get(e.errno or 0, "check the path and the disk")
    return StorageError(
        f"cannot {doing} {str(path)!r}: {why}{f' ({code})' if code else ''}{name}; {hint}. "
        "What was there before is unchanged"
    )


@contextmanager
def storage_errors(path: str | os.PathLike[str], doing: str) -> Iterator[None]:
    """Turn an OSError (shutil.Error included) raised inside into a `StorageError`; adapterlab's
    own errors (some of which are OSErrors too) pass through unchanged."""
    try:
        yield
    except AdapterlabError:
        raise
    except OSError as e:
        raise storage_error(e, path, doing) from e


def not_a_directory(path: str | os.PathLike[str], what: str) -> str:
    """The end of a message for a `path` that should be a directory and is not: what it is."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist" if not os.path.lexists(path) else "is a dangling symlink"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    return f"is {'a regular file' if stat.S_ISREG(mode) else kind(mode)}, not a {what}"


def open_regular(path: str | os.PathLike[str], what: str = "file") -> io.BufferedReader:
    """`path` opened for binary reading if it is a regular file (a symlink to one is fine), else an
    `AdapterFileError` saying what it is. Opened non-blocking and checked on the open descriptor,
    so a FIFO never blocks and a file swapped for one after a check is caught too."""
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path, what, mode)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise AdapterFileError(f"{what} {str(path)!r} does not exist") from None
    except AdapterlabError:
        raise
    except OSError as e:
        raise storage_error(e, path, f"read {what}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path, what, mode)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _not_regular(path: str | os.PathLike[str], what: str, mode: int) -> AdapterFileError:
    return AdapterFileError(
        f"{what} {str(path)!r} is {kind(mode)}, not a regular file; adapterlab reads regular files only"
    )


def read_regular(
    path: str | os.PathLike[str], what: str = "file", limit: int | None = MAX_JSON_BYTES
) -> bytes:
    """The bytes of the regular file `path`, refusing files over `limit` bytes (None: no limit)."""
    with open_regular(path, what) as f:
        try:
            data = f.read() if limit is None else f.read(limit + 1)
        except OSError as e:
            raise storage_error(e, path, f"read {what}") from None
    if limit is not None and len(data) > limit:
        raise AdapterFileError(
            f"{what} {str(path)!r} is over {limit} bytes; that is not a file adapterlab wrote or reads"
        )
    return data


def is_regular(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a regular file (following symlinks); False for anything unreadable."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def sibling_prefix(name: str, suffix: str) -> str:
    """`.NAME.{suffix}-`, the prefix of the hidden siblings of `NAME`; when NAME is so long that
    the prefix plus the random part would pass 255 bytes, NAME is cut and a hash of the whole name
    added (`.NAM~<hash>.{suffix}-`), so each name keeps its own siblings."""
    full = f".{name}.{suffix}-"
    if len(full.encode()) + RANDOM_CHARS <= NAME_MAX:
        return full
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    room = NAME_MAX - RANDOM_CHARS - len(f".~{digest}.{suffix}-".encode())
    short = name.encode()[:room].decode(errors="ignore")
    return f".{short}~{digest}.{suffix}-"


def is_sibling(entry: str, prefix: str) -> bool:
    """Whether directory entry `entry` is `prefix` + a random part (lower-case letters, digits, `_`;
    no `.`, so `.m.old-a.old-*`, a sibling of `m.old-a`, is not one of `m`'s). An exact listing
    matched by prefix: no glob, so `[`, `*` and `?` in a name are plain characters."""
    rest = entry[len(prefix) :]
    return entry.startswith(prefix) and bool(rest) and set(rest) <= _RANDOM_ALPHABET


def real_target(path: str | os.PathLike[str]) -> Path:
    """Where a write to `path` goes: a symlink (to a directory or a file, also dangling) is
    followed, so the link stays a link and its target is replaced; `.` and `..` are resolved (so
    the siblings get a name); else `path` itself."""
    path = Path(path)
    if path.is_symlink() or path.name in ("", ".", ".."):  # ".", "..", "/x/..": name the directory
        return Path(os.path.realpath(path))
    return path


def _identities(path: Path) -> set[tuple[int, int]]:
    """(st_dev, st_ino) of `path` and every existing ancestor, so bind mounts compare equal."""
    found = set()
    for p in (path, *path.parents):
        try:
            st = os.stat(p)
        except OSError:
            continue
        found.add((st.st_dev, st.st_ino))
    return found


def check_output(
    out: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]], is_file: bool = False
) -> None:
    """Refuse an output path that would destroy an input or is the wrong kind of thing, before
    anything is written: OUT may not be an input, contain one, or lie inside one (compared after
    resolving symlinks, and by device and inode), and it must be nothing or a directory (a regular
    file, for `is_file` outputs) — never a device node, a FIFO or a socket."""
    where = str(out)
    real = Path(os.path.realpath(out))
    try:
        mode: int | None = os.stat(real).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as e:
        raise storage_error(e, where, "use the output path") from None
    want = "a regular file" if is_file else "a directory"
    if mode is not None and not (stat.S_ISREG(mode) if is_file else stat.S_ISDIR(mode)):
        raise ConfigError(
            f"the output {where!r} is {kind(mode) if not stat.S_ISREG(mode) else 'a regular file'}; "
            f"it must be {want} or not exist yet. Choose another path"
        )
    out_id, out_ids = _identity(real), _identities(real)
    for given in inputs:
        source_id = _identity(Path(os.path.realpath(given)))
        if source_id is None:
            continue  # a missing input is reported by its reader
        if source_id == out_id:
            relation = "is"
        elif source_id in out_ids:
            relation = "lies inside"
        elif out_id is not None and out_id in _identities(Path(os.path.realpath(given))):
            relation = "contains"
        else:
            continue
        raise ConfigError(
            f"the output {where!r} {relation} the input {str(given)!r}; writing there would "
            "destroy the input. Choose an output outside every input"
        )


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino
