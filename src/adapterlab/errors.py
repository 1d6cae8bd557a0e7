"""Errors raised by adapterlab.

Every error says what was wrong and what would be right. Catch `AdapterlabError` to catch them all.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class AdapterlabError(Exception):
    """Base class of every error adapterlab raises on purpose."""


class ConfigError(AdapterlabError, ValueError):
    """A configuration value is out of range, of the wrong type, or unknown."""


class UnknownMethodError(ConfigError):
    """`inject` or a file named a method that is not registered."""


class TargetError(AdapterlabError, ValueError):
    """The target specification matched nothing, or matched a module that cannot be adapted."""


class UnsupportedModuleError(TargetError):
    """A targeted module has a type (or layout) the method cannot wrap."""


class AdapterNameError(AdapterlabError, KeyError):
    """An adapter name is unknown, taken already, or malformed."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class MergeError(AdapterlabError, RuntimeError):
    """Merging or unmerging is impossible in the current state (already merged, NaN, not mergeable)."""


class RoutingError(AdapterlabError, ValueError):
    """Per-sample routing ids do not fit the batch or name unknown adapters."""


class HotswapError(AdapterlabError, ValueError):
    """`hotswap` cannot write a saved adapter into an existing one in place (another method, other
    targets or shapes, a rank above the prepared maximum)."""


class AdapterFileError(AdapterlabError, OSError):
    """An adapter directory is missing, corrupted, unsafe (pickle), or from a newer format."""


class StorageError(AdapterFileError):
    """The file system refused a read or write (no space, read-only, permission, name too long,
    busy, a special file where a regular one belongs): names the path and the errno. What was
    there before is left as it was."""


class FingerprintMismatchError(AdapterFileError):
    """An adapter file was made for a base model whose target modules differ from this one."""


def closest(name: str, candidates: Iterable[str], n: int = 5) -> str:
    """A short 'did you mean' list for error messages."""
    pool = list(candidates)
    found = difflib.get_close_matches(name, pool, n=n, cutoff=0.4)
    if not found:
        leaf = name.rsplit(".", 1)[-1]
        found = difflib.get_close_matches(leaf, sorted({c.rsplit(".", 1)[-1] for c in pool}), n=n, cutoff=0.4)
    return ", ".join(repr(f) for f in found) if found else "(no close names)"
