"""Errors a user can fix: each message names the key, argument or file, the bad value and the fix.

Entry points (`train.py`, `moe-plugin ...`) print a `UserError` as one line and exit with status 2, without a
traceback. Anything else is a bug or an environment failure and keeps its traceback.
This module is a leaf (standard library only): every package may raise these.
"""

from __future__ import annotations

import errno

USER_ERROR_EXIT = 2


class UserError(Exception):
    """Bad input the user can fix (config value, command-line argument, file); printed as one line."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work; the message names the key, the value and the fix."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file that cannot be used; the message names the file and what to do."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that holds pickled Python objects beyond tensors and plain data (it could run code)."""


class StorageError(UserError, OSError):
    """Writing failed because of the storage (no space left, read-only, permission denied)."""


_STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def storage_reason(err: BaseException) -> str | None:
    """'no space left on device' etc. when `err` (or an error it wraps) is a storage failure, else None.

    torch.save reports a full disk as "unexpected pos ..." (a RuntimeError from its zip writer) with the OSError
    lost; those are recognised by their text.
    """
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _STORAGE_ERRNOS:
            return _STORAGE_ERRNOS[e.errno]
        text = str(e)
        for reason in _STORAGE_ERRNOS.values():
            if reason in text.lower():
                return reason
        e = e.__cause__ or e.__context__
    return None


def one_line(err: BaseException) -> str:
    """The first line of an error message (a user error is meant to fit on one line)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
