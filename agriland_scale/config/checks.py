"""Bounded checks and error text shared by the config schema and the pipeline-file loader.

Everything here does bounded work whatever the input: a pipeline file or override value is
echoed cut to about :data:`SHOW` characters, and YAML aliases are sized without expanding.
"""

from __future__ import annotations

import difflib
import re
import reprlib
from collections.abc import Callable, Iterable
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

__all__ = [
    "MAX_PIPELINE_VALUES",
    "REFERENCE",
    "Cyclic",
    "check_scheduler_address",
    "children_of_node",
    "children_of_value",
    "cut",
    "did_you_mean",
    "expanded_size",
    "format_errors",
    "short",
]


# values (scalars, lists, mappings) a pipeline file or an override may expand to, aliases
# followed: a few nested YAML aliases ("billion laughs") expand to billions otherwise
MAX_PIPELINE_VALUES = 100_000


# at most this many characters of a value found are echoed in a message
SHOW = 100


# at most this many validation errors are listed
MAX_ERRORS = 20


REFERENCE = "see the README's pipeline-file reference"


_repr = reprlib.Repr()  # bounded work and length whatever the value's size
_repr.maxlevel = 3
_repr.maxstring = _repr.maxother = SHOW + 20
_repr.maxlist = _repr.maxtuple = _repr.maxset = _repr.maxfrozenset = _repr.maxdeque = _repr.maxarray = 8
_repr.maxdict = 5
_repr.maxlong = 40


def cut(text: str, limit: int = SHOW) -> str:
    """``text`` cut to ``limit`` characters, with an ellipsis when cut."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short(value: Any, limit: int = SHOW) -> str:
    """Repr of ``value`` in at most ``limit`` characters (never builds a huge repr)."""
    try:
        return cut(_repr.repr(value), limit)
    except Exception:  # noqa: BLE001 - e.g. an int too large to convert: name its type only
        return f"<{type(value).__name__}>"


# a Dask scheduler's address: [PROTOCOL://]HOST:PORT (HOST a name, an IPv4 address or [IPv6])
_SCHEDULER = re.compile(
    r"^(?:(tcp|tls|ucx|ws|wss|inproc)://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*):(\d{1,5})$"
)


def check_scheduler_address(text: str) -> str:
    """Return ``text`` if it is a Dask scheduler's address (``tcp://HOST:PORT``), else raise.

    Checked before anything of a run is written. An ``http://`` address is most often the
    dashboard's (port 8787): the message suggests the scheduler's ``tcp://HOST:8786``.

    Raises
    ------
    ValueError
        ``text`` is not ``[tcp|tls|ucx|ws|wss|inproc://]HOST:PORT``; the message says what to write.
    """
    value = str(text).strip()
    m = _SCHEDULER.match(value)
    if m and 0 < int(m.group(3)) < 65536:
        return value
    web = re.match(r"^https?://([^/:\s]+)", value, re.I)
    host = web.group(1) if web else "HOST"
    why = (
        "is a web address (the dashboard's, at port 8787?), not the scheduler's"
        if web
        else "is not a scheduler address"
    )
    raise ValueError(
        f"{short(value)} {why}: give the Dask scheduler's address as tcp://{host}:8786 "
        f"(what `dask scheduler` or `agriland cluster` prints as 'Scheduler at')"
    )


def children_of_node(node: yaml.Node) -> Iterable[yaml.Node]:
    """Return the child nodes of a YAML node (items of a sequence, keys and values of a mapping)."""
    if isinstance(node, yaml.SequenceNode):
        return node.value
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return ()


def children_of_value(value: Any) -> Iterable[Any]:
    """Return the children of a loaded value (keys and values of a dict, items of a collection)."""
    if isinstance(value, dict):
        return [v for pair in value.items() for v in pair]
    if isinstance(value, (list, tuple, set, frozenset)):
        return value
    return ()


class Cyclic(Exception):
    """Raised by :func:`expanded_size` for a structure that contains itself."""


def expanded_size(root: Any, children: Callable[[Any], Iterable[Any]], limit: int) -> tuple[int, int]:
    """Count the values ``root`` expands to when shared parts are copied, and its distinct values.

    Memoised over the object graph: linear in distinct values, never in the expanded size.

    Parameters
    ----------
    root : Any
        The top of the structure (a YAML node or a loaded value).
    children : callable
        Gives the children of one element (:func:`children_of_node`, :func:`children_of_value`).
    limit : int
        The expanded count is capped at ``limit + 1``.

    Returns
    -------
    tuple of int
        (values ``root`` expands to, capped at ``limit + 1``; distinct values).

    Raises
    ------
    Cyclic
        For a structure that contains itself.
    """
    memo: dict[int, int] = {}
    visiting: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        obj, done = stack.pop()
        key = id(obj)
        if done:
            memo[key] = min(limit + 1, 1 + sum(memo[id(c)] for c in children(obj)))
            visiting.discard(key)
            continue
        if key in memo:
            continue
        if key in visiting:  # reached again from inside itself
            raise Cyclic
        visiting.add(key)
        stack.append((obj, True))
        stack.extend((c, False) for c in children(obj) if id(c) not in memo)
    return memo[id(root)], len(memo)


def did_you_mean(word: str, valid: Iterable[str]) -> str:
    """Return a hint naming the closest of ``valid`` to ``word`` (" (did you mean 'x'?)"), or ""."""
    close = difflib.get_close_matches(word, list(valid), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def section_keys(root: type[BaseModel], loc: tuple) -> list[str]:
    """Keys accepted in the section at ``loc`` (a pydantic error location), if it is one."""
    model: Any = root
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        sub = field.annotation if field is not None else None
        if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
            return []
        model = sub
    return list(model.model_fields)


def format_errors(
    err: ValidationError, root: type[BaseModel], source: str = "", *, header: str | None = None
) -> str:
    """Format a pydantic validation error as one line per error, each naming the key.

    At most ``MAX_ERRORS`` lines; values echoed are cut to about ``SHOW`` characters.

    Parameters
    ----------
    err : pydantic.ValidationError
        The error raised validating a pipeline file or an override.
    root : type of pydantic.BaseModel
        The model validated, to suggest the keys a section accepts.
    source : str, optional
        The file named in the default header.
    header : str, optional
        The first line, instead of ``invalid pipeline file SOURCE:``.

    Returns
    -------
    str
        The message, lines separated by newlines.
    """
    lines = [header or f"invalid pipeline file {source}:"]
    errors = err.errors(include_url=False)
    for e in errors[:MAX_ERRORS]:
        loc = tuple(e["loc"])
        path = cut(".".join(cut(str(p), 40) for p in loc)) or "(top level)"
        if e["type"] == "extra_forbidden":
            hint = did_you_mean(str(loc[-1]), section_keys(root, loc[:-1])) if loc else ""
            lines.append(f"  - unknown key '{path}'{hint}: remove it or check its spelling ({REFERENCE})")
        elif e["type"] == "missing":
            lines.append(f"  - {path}: missing: add it ({REFERENCE})")
        else:
            msg = cut(e["msg"].removeprefix("Value error, "), 400)
            found = e.get("input")
            # a section's own check (its message names the values) gets the section as input
            lines.append(
                f"  - {path}: {msg}" + ("" if isinstance(found, dict) else f" (found {short(found)})")
            )
    if len(errors) > MAX_ERRORS:
        lines.append(f"  ... and {len(errors) - MAX_ERRORS} more errors: fix the ones above first")
    return "\n".join(lines)
