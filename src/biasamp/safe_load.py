"""Loading torch files safely: ``torch.load(..., weights_only=True)``, with one plain line for each way it fails.

Every checkpoint, oracle, head or group file biasamp reads goes through :func:`load_weights_only`, so a shared file
can never run code: torch's weights-only unpickler refuses any file that names a Python object to import.
"""

from __future__ import annotations

import errno
import pickle
from pathlib import Path
from typing import Any

import torch

from biasamp.errors import UsageError, reason

# errors of the disk, the network file system or the machine: a good file may read after all, so never "corrupt"
DISK_ERRNOS = (errno.EIO, errno.EACCES, errno.EPERM, errno.ESTALE, errno.ENOMEM, errno.EAGAIN, errno.ENOSPC)


def holds_code(err: BaseException) -> bool:
    """Whether the weights-only unpickler refused the file because it names a Python object to import (a class or
    function: code). Random bytes fail in the same unpickler, but on an unknown opcode instead."""
    return isinstance(err, pickle.UnpicklingError) and "unsupported global" in str(err).lower()


def load_weights_only(path: str | Path, what: str, hint: str, mmap: bool = False) -> Any:
    """The content of a torch file, on the CPU. UsageError naming ``what`` (e.g. "checkpoint") and the file when it
    is missing, holds code (refused and never run: ``hint`` says what to use instead), or cannot be read."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"{what} {path} does not exist; {hint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - truncated or foreign files raise many types
        if isinstance(err, OSError) and err.errno in DISK_ERRNOS:  # the disk or the machine, not the file's
            raise  # content: keep the traceback (other OSErrors, e.g. EINVAL from mmap of a truncated file, are)
        if holds_code(err):
            raise UsageError(f"{what} {path} holds pickled Python objects (code), not only weights and plain data; "
                             f"biasamp refuses to load such a file for safety: {hint}") from err
        raise UsageError(f"{what} {path} could not be read ({reason(err)}); it may be truncated or not a biasamp file: "
                         f"{hint}") from err


def load_format_file(path: str | Path, what: str, title: str, fmt: str, hint: str, fields: set[str],
                     optional: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
    """The plain dict of a weights-only file written with ``{"format": fmt, **fields}``, without its "format" entry.
    UsageError (one line) for another file (``title``: what it should be, e.g. "biasamp h-space heads file") or a
    dict that lacks one of ``fields`` (``optional`` ones may be absent)."""
    data = load_weights_only(path, what, hint)
    if not isinstance(data, dict) or data.get("format") != fmt:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise UsageError(f"{what} {path} is not a {title} (format {found!r}, expected {fmt!r}); {hint}")
    data = dict(data)
    data.pop("format")
    missing = sorted(set(fields) - set(data) - set(optional))
    if missing:
        raise UsageError(f"{what} {path} lacks {missing}; {hint}")
    return data
