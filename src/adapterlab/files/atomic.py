"""Atomic writes: fsync'd files, a `flock` per parent directory, and one swap-in + repair scheme
for directories (adapter saves, merged checkpoints, exports, combined adapters). docs/reliability.md
has the tests.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import AdapterFileError
from .fs import is_sibling, real_target, sibling_prefix, storage_errors


def fsync_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` and fsync it."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory: so the renames inside it are durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def locked(parent: Path, shared: bool = False) -> Iterator[None]:
    """A `flock` on the directory `parent`: exclusive for a write, shared for a read, so a read
    never sees a write's swap half done. Locking the directory itself leaves no lock file behind;
    the kernel releases the lock if the process dies. Where the directory cannot be opened or the
    file system has no flock, it goes on unlocked. Not reentrant: take it once per operation."""
    try:
        fd: int | None = os.open(parent, os.O_RDONLY)
    except OSError:
        fd = None
    try:
        if fd is not None:
            _flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing the last descriptor releases the lock


def _flock(fd: int, how: int) -> None:
    try:
        fcntl.flock(fd, how)
    except OSError as e:
        if e.errno not in (
            errno.ENOLCK,
            errno.EOPNOTSUPP,
            errno.EINVAL,
            errno.EBADF,
        ):  # no flock here (e.g. NFS)
            raise


def _siblings(target: Path, kind: str) -> list[Path]:
    """The `.NAME.tmp-*` or `.NAME.old-*` entries beside `target`: an exact listing matched by
    prefix and random part (no glob, so `[`, `*` and `?` in NAME are plain characters)."""
    prefix = sibling_prefix(target.name, kind)
    if not target.parent.is_dir():
        return []
    return [p for p in target.parent.iterdir() if is_sibling(p.name, prefix)]


def interrupted_hint(target: Path) -> str:
    """A hint for a reader of a missing `target` that an interrupted write left beside it."""
    if not _siblings(target, "old"):
        return ""
    return (
        f"; an interrupted save left the previous version in {target.parent}/"
        f"{sibling_prefix(target.name, 'old')}* "
        "(the next al.save to this path puts it back, or rename it yourself)"
    )


def repair(target: Path, temps: bool = False) -> None:
    """Undo what an interrupted `swap_in` left: killed between its two renames (no `target`), the
    newest complete `.NAME.old-*` goes back in place; other `.NAME.old-*` remains are removed, and
    with `temps` (only under the exclusive lock, when no other write can be filling one) the
    `.NAME.tmp-*` ones too."""
    olds = _siblings(target, "old")
    if olds and not target.exists():
        newest = max(olds, key=lambda p: p.stat().st_mtime_ns)
        os.rename(newest, target)
        olds.remove(newest)
    for path in olds + (_siblings(target, "tmp") if temps else []):
        shutil.rmtree(path, ignore_errors=True)


def temp_dir(target: Path, private: bool = False) -> Path:
    """A fresh `.NAME.tmp-*` directory beside `target`: owner-only if `private` (as adapter
    directories have always been written), else with the permissions of a plain mkdir."""
    tmp = Path(tempfile.mkdtemp(prefix=sibling_prefix(target.name, "tmp"), dir=target.parent))
    if not private:
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it private; a model directory is not
    return tmp


def swap_in(tmp: Path, target: Path) -> None:
    """Rename the finished directory `tmp` to `target`; an existing `target` is moved aside to
    `.NAME.old-*` first and removed after. Killed between the two renames, the old version is
    complete beside `target`, and the next write puts it back (`repair`)."""
    repair(target)
    old = target.parent / f"{sibling_prefix(target.name, 'old')}{uuid.uuid4().hex[:8]}"
    if target.exists():
        os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        if old.exists() and not target.exists():
            os.rename(old, target)  # the second rename failed: put the old version back
        raise
    fsync_path(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def write_dir_atomic(target: Path, files: dict[str, bytes], replaces: frozenset[str] = frozenset()) -> Path:
    """Replace directory `target` with one holding `files` (other entries already in `target` are
    kept, but for the names in `replaces`: another format's files that `files` supersede; symlinks
    among them are kept as symlinks): filled beside it, fsync'd, swapped in. A
    symlink at `target` is followed: its target is replaced and the link stays. Concurrent writers
    (threads or processes) take turns under an exclusive `flock` on the parent, so the result is
    one writer's complete directory (the last one's). OSErrors are `StorageError`s."""
    given, target = target, real_target(target)
    if target.exists() and not target.is_dir():
        raise AdapterFileError(f"{str(given)!r} exists and is not a directory; choose a directory path")
    with storage_errors(given, "write"):
        target.parent.mkdir(parents=True, exist_ok=True)
        with locked(target.parent):
            repair(target, temps=True)
            tmp = temp_dir(target, private=True)
            try:
                for name, data in files.items():
                    fsync_write(tmp / name, data)
                if target.exists():
                    _keep_others(target, tmp, set(files) | replaces)
                fsync_path(tmp)
                swap_in(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    return given


def _keep_others(old: Path, new: Path, ours: set[str]) -> None:
    """Copy the entries of `old` that are not `ours` into `new`; symlinks as symlinks (never
    followed: a link to /dev/zero would otherwise be read forever), special files not at all."""
    for entry in old.iterdir():
        if entry.name in ours:
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), new / entry.name)
        elif entry.is_dir():
            shutil.copytree(entry, new / entry.name, symlinks=True)
        elif entry.is_file():
            shutil.copy2(entry, new / entry.name)


def write_files_atomic(directory: Path, files: dict[str, bytes]) -> None:
    """Write `files` into `directory` (created if missing), each through a fsync'd temp file and a
    rename, so a reader sees every file whole, old or new; the directory's other entries stay."""
    if directory.exists() and not directory.is_dir():
        raise AdapterFileError(f"{str(directory)!r} exists and is not a directory; choose a directory path")
    with storage_errors(directory, "write"):
        directory.mkdir(parents=True, exist_ok=True)
        with locked(directory.parent):
            for name, data in files.items():
                write_file_atomic(
                    directory / name,
                    functools.partial(fsync_write, data=data),
                    sync_parent=False,
                    follow=False,
                )
            fsync_path(directory)


def write_file_atomic(
    target: Path, fill: Callable[[Path], None], sync_parent: bool = True, follow: bool = True
) -> Path:
    """Create `target` by `fill(tmp)` on a temp file beside it (which `fill` fsyncs) and a rename.
    A symlink at `target` is followed (its target is replaced, the link stays) if `follow` — the
    user named it as the output; files written inside a directory replace a link there instead,
    never writing through it. OSErrors are `StorageError`s; the old file stays as it was."""
    given, target = target, (real_target(target) if follow else target)
    tmp = target.parent / f"{sibling_prefix(target.name, 'tmp')}{uuid.uuid4().hex[:8]}"
    with storage_errors(given, "write"):
        try:
            fill(tmp)
            os.chmod(tmp, 0o666 & ~umask())
            os.replace(tmp, target)
            if sync_parent:
                fsync_path(target.parent)
        finally:
            tmp.unlink(missing_ok=True)
    return given
