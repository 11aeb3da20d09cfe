"""The identity of a training run or a count job: what it computes, its folder name, and its lock.

A run's (or job's) *identity* is every resolved setting that changes what it computes, as a flat mapping
``{"optimizer.lr": 0.001, ...}``. The settings that do not (devices, logging, checkpoint cadence, compile, ...)
are an explicit allow-list given by each app, so a new setting is part of the identity until someone decides
otherwise. The folder of a run is ``<readable part>-<hash>``: the readable part shows what users sweep most
(``name=`` replaces it), the hash is the first 8 hex digits of the identity's SHA-256. Resuming or rerunning
a folder with another identity is refused, naming each differing key with its two values.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from biasamp.errors import UsageError

HASH_LENGTH = 8
LOCK_NAME = ".lock"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` -> ``{"a.b": 1, "c": [1, 2]}`` (lists stay values; empty mappings
    stay as ``{}`` so that their presence counts)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = dict(value) if isinstance(value, Mapping) else value
    return flat


def allowed(key: str, allow: Iterable[str]) -> bool:
    """True when ``key`` is an allow-listed key or lies under one (``trainer.devices`` under ``trainer.devices``,
    ``logger.save_dir`` under ``logger``)."""
    return any(key == a or key.startswith(f"{a}.") for a in allow)


def identity(settings: Mapping[str, Any], allow: Iterable[str]) -> dict[str, Any]:
    """The flat identity of ``settings`` (plain, resolved data): every key but the allow-listed ones."""
    allow = tuple(allow)
    return {k: v for k, v in sorted(flatten(settings).items()) if not allowed(k, allow)}


def _canonical(value: Any) -> Any:
    """JSON-stable form: floats that are whole stay floats (1.0 != 1 would change nothing but the hash
    otherwise), NaN/inf as strings, tuples as lists."""
    if isinstance(value, float):
        return repr(value) if not math.isfinite(value) else value
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def identity_hash(ident: Mapping[str, Any], length: int = HASH_LENGTH) -> str:
    """The first ``length`` hex digits of the SHA-256 of the identity's canonical JSON."""
    blob = json.dumps(_canonical(dict(ident)), sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) of every key whose values differ (a missing key has value ``<unset>``)."""
    missing = "<unset>"
    keys = sorted(set(old) | set(new))
    return [(k, old.get(k, missing), new.get(k, missing)) for k in keys
            if _canonical(old.get(k, missing)) != _canonical(new.get(k, missing))]


def describe(diffs: list[tuple[str, Any, Any]], old_name: str, new_name: str, limit: int = 4) -> str:
    """``optimizer.lr is 0.001 in <old_name> but 0.0001 in <new_name>; ...`` (at most ``limit`` keys)."""
    parts = [f"{k} is {a!r} in {old_name} but {b!r} in {new_name}" for k, a, b in diffs[:limit]]
    more = f" (and {len(diffs) - limit} more)" if len(diffs) > limit else ""
    return "; ".join(parts) + more


def check_folder_name(key: str, value: Any) -> str:
    """A user-given folder name part (``name=``, ``sweep_name=``): non-empty, one path component, no leading dot.
    Raises UsageError otherwise."""
    text = "" if value is None else str(value)
    bad = (not text.strip() or "/" in text or "\\" in text or text.startswith(".") or "\0" in text
           or len(text) > 200)
    if bad:
        raise UsageError(f"{key}={value!r} is not allowed: a folder name is one non-empty path component (no '/', "
                         f"not starting with '.', at most 200 characters), e.g. {key}=my_run")
    return text


def safe_folder_part(value: Any) -> str:
    """``value`` made harmless as one path component (used while Hydra names a folder, before validation can
    refuse the value: the refused folder is then removed)."""
    text = str(value).replace("/", "_").replace("\\", "_").replace("\0", "_").lstrip(".")
    return text[:200] or "unnamed"


def folder_name(readable: str, ident: Mapping[str, Any]) -> str:
    """``<readable>-<hash of the identity>``."""
    return f"{safe_folder_part(readable)}-{identity_hash(ident)}"


def remove_released_lock(folder: Path) -> bool:
    """Delete ``folder``'s lock file if no process holds it (checked by taking it); False when one does."""
    path = Path(folder) / LOCK_NAME
    try:
        handle = open(path, "a+")
    except FileNotFoundError:
        return True
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        path.unlink(missing_ok=True)  # while holding it: nobody can take this file from now on
        fcntl.flock(handle, fcntl.LOCK_UN)
    return True


@contextlib.contextmanager
def folder_lock(folder: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (its ``.lock`` file) for the ``with`` block. A second process gets a
    UsageError at once, naming the folder and the process holding it; the lock dies with its process."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise UsageError(f"{folder} is in use by {holder} ({what}); wait for it to finish, or stop it "
                             "first") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {os.uname().nodename}\n")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)
