"""What a full disk, a folder turned read-only and a lost object store say, in one paragraph.

:func:`storage_fault` recognises them behind an exception (its ``errno``, or the text of the
Rust engines' errors, Icechunk and obstore, which reach Python as other exception types)
and names the place and what to do; the runner records a stage failed with it, and the CLI
prints it (exit 2).
"""

from __future__ import annotations

import errno
import re
from pathlib import Path

from agriland_scale.errors import OutputError
from agriland_scale.files import cache_dir, is_object_url, run_storage_options, s3_settings, short_error

__all__ = ["storage_fault"]

# what a failing disk or object store says, as the exception (errno) or as the text of the Rust
# engines' errors (Icechunk, obstore), which reach Python as other exception types
_FULL = (errno.ENOSPC, errno.EDQUOT)
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)
_FULL_TEXT = re.compile(r"No space left on device|os error 28\b|Disk quota exceeded|os error 122\b")
_READ_ONLY_TEXT = re.compile(r"Read-only file system|os error 30\b|Permission denied|os error 13\b")
_GONE_TEXT = re.compile(
    r"error sending request|[Cc]onnection refused|tcp connect error|dispatch failure|"
    r"connection (?:closed|reset)|[Bb]roken pipe|timed out|os error 111\b"
)


def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and the exceptions it was raised from (``__cause__``/``__context__``), at most 10."""
    found: list[BaseException] = []
    e: BaseException | None = err
    while e is not None and e not in found and len(found) < 10:
        found.append(e)
        e = e.__cause__ or e.__context__
    return found


def storage_fault(err: BaseException, out: str | Path | None = None) -> OutputError | None:
    """Describe a full disk, a folder turned read-only or a lost object store behind ``err``.

    ``out`` is the run's location (``--out``). Returns an :class:`OutputError` whose message
    names the place (the file the error names, else ``out``; the cache folder when the error
    is there), what happened and what to do, or ``None`` when ``err`` is none of these.
    Finished work is kept in every case: a rerun continues where the run stopped.
    """
    chain = _chain(err)
    text = " | ".join(str(e) for e in chain)
    codes = {getattr(e, "errno", None) for e in chain if isinstance(e, OSError)}
    named = next((str(e.filename) for e in chain if isinstance(e, OSError) and e.filename), None)
    where = named or (str(out) if out is not None else "the output folder")
    cache = str(cache_dir())
    if named and named.startswith(cache) or not named and cache in text:
        where = f"{named or cache} (this machine's agriland cache, $AGRILAND_CACHE)"
    again = "then rerun the same command: it continues where it stopped, and nothing finished is lost"
    if codes & set(_FULL) or _FULL_TEXT.search(text):
        return OutputError(
            f"the disk holding {where} is full (no space left on device): free space there, "
            f"or move the run to a disk with room (or point AGRILAND_CACHE elsewhere), {again}"
        )
    if codes & set(_READ_ONLY) or _READ_ONLY_TEXT.search(text):
        return OutputError(
            f"{where} can no longer be written (its file system or folder turned read-only, or "
            f"its permissions changed during the run): make it writable again (or copy the run to "
            f"a writable folder and give that as --out), {again}"
        )
    if out is not None and is_object_url(out) and _GONE_TEXT.search(text):
        endpoint = (
            s3_settings(run_storage_options(out))["endpoint_url"] if str(out).startswith("s3://") else None
        )
        at = f" at {endpoint}" if endpoint else ""
        return OutputError(
            f"the object store{at} holding {out} stopped answering during the run "
            f"({short_error(next(e for e in chain if _GONE_TEXT.search(str(e))))}): check that it runs "
            f"and that this machine reaches it, {again}"
        )
    return None
