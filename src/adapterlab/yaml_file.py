"""YAML from an untrusted file, bounded: a regular file of at most `MAX_BYTES`, nesting at most
`MAX_DEPTH` deep, at most `MAX_ALIASES` aliases and none to a list or mapping (so a few hundred
bytes cannot expand into gigabytes: the "billion laughs"). Every failure is a `ConfigError` whose
message quotes at most a short excerpt of the file. Used by `adapterlab combine CONFIG.yaml`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from .errors import AdapterFileError, ConfigError
from .files.fs import read_regular
from .text import excerpt, printable

MAX_BYTES = 2**20
MAX_DEPTH = 64
MAX_ALIASES = 100


def read_text(path: Path, what: str) -> str:
    """The text of `path`, a regular file of at most `MAX_BYTES` bytes (UTF-8), else `ConfigError`.
    A FIFO or device is refused before anything is read (`files.fs.read_regular`)."""
    try:
        data = read_regular(path, what, limit=MAX_BYTES)
    except AdapterFileError as e:  # not there, not a regular file, too long, unreadable
        raise ConfigError(str(e)) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        where = excerpt(str(path))
        raise ConfigError(f"{what} {where} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None


_QUOTED_OR_COMMENT = re.compile(r"'[^'\n]*'|\"(?:[^\"\\\n]|\\.)*\"|#[^\n]*")


def _flow_depth(text: str) -> int:
    """The deepest nesting of [ ] and { } outside quotes and comments, counted in one pass before
    PyYAML sees the text: its scanner reads a run of openers ahead of the parser (costly
    per level), so a deep flow is refused first."""
    depth = deepest = 0
    for match in re.finditer(r"[\[\]{}]", _QUOTED_OR_COMMENT.sub("", text)):
        depth = depth + 1 if match.group() in "[{" else max(0, depth - 1)
        deepest = max(deepest, depth)
    return deepest


def _loader_class() -> type:
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        """SafeLoader that counts nesting depth and aliases while composing the node graph."""

        def __init__(self, stream: str) -> None:
            super().__init__(stream)
            self.depth = 0
            self.aliases = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                target = self.anchors.get(event.anchor)
                if isinstance(target, (yaml.SequenceNode, yaml.MappingNode)):
                    raise ConfigError(
                        f"alias *{excerpt(event.anchor, 40)} at line {event.start_mark.line + 1} refers to a "
                        "list or mapping; write the values out (aliases may name single values only)"
                    )
                self.aliases += 1
                if self.aliases > MAX_ALIASES:
                    raise ConfigError(f"more than {MAX_ALIASES} aliases; write the values out")
                return super().compose_node(parent, index)
            self.depth += 1
            try:
                if self.depth > MAX_DEPTH:
                    mark = self.peek_event().start_mark
                    raise ConfigError(
                        f"nesting deeper than {MAX_DEPTH} levels at line {mark.line + 1}; "
                        "a config is a flat mapping of options"
                    )
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    return BoundedLoader


def load(path: str | os.PathLike, what: str = "config file") -> Any:
    """The YAML document in `path`, read within the bounds above."""
    import yaml

    file = Path(path)
    where = excerpt(str(file))
    text = read_text(file, what)
    if _flow_depth(text) > MAX_DEPTH:
        raise ConfigError(
            f"{where}: nesting deeper than {MAX_DEPTH} levels; a config is a flat mapping of options"
        )
    loader = None
    try:
        loader = _loader_class()(text)  # the reader checks the characters here already
        return loader.get_single_data()
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where} is not valid YAML: {printable(problem)[:120]}{at}") from None
    except Exception as e:  # PyYAML's converters on odd input: int('9'*5000), bad dates, empty !!timestamp
        raise ConfigError(f"{where} holds a value YAML cannot convert ({excerpt(str(e), 120)})") from None
    finally:
        if loader is not None:
            loader.dispose()
