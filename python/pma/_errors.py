"""The exceptions pma raises.

Every error of the Rust library arrives as one of these, with the message the ``pma`` command
prints after ``error:``. They are plain Python classes (not created in Rust) so that some can also
be the matching built-in: a :class:`ConfigError` is a ``ValueError``, an :class:`IoError` an
``OSError`` and an :class:`OutputExistsError` a ``FileExistsError``, and code that already catches
those keeps working. ``pma._pma`` looks them up here by name when it converts an error.

Ctrl-C during a call raises the ordinary ``KeyboardInterrupt``, never a ``PmaError``: catch-all
``except Exception`` handlers in training loops must not swallow it.
"""

from __future__ import annotations

__all__ = [
    "PmaError",
    "InputError",
    "FormatError",
    "MismatchError",
    "NonFiniteError",
    "ConfigError",
    "OutputExistsError",
    "NoSpaceError",
    "IoError",
    "WatchStateError",
    "Interrupted",
    "PmaWarning",
]


class PmaError(Exception):
    """Base class of every error pma raises."""


class InputError(PmaError):
    """The checkpoints cannot be used as asked: none found, too few qualify, no step in a name."""


class FormatError(InputError):
    """A checkpoint is malformed: bad safetensors header, truncated file, missing shard, ..."""


class MismatchError(InputError):
    """The checkpoints disagree (missing tensor, shape or dtype) or hold a dtype pma cannot average."""


class NonFiniteError(InputError):
    """An input holds NaN or Inf values (pass ``allow_nonfinite=True`` to merge anyway)."""


class ConfigError(PmaError, ValueError):
    """The arguments are invalid: weights, selection, dtype, size or watch settings."""


class OutputExistsError(PmaError, FileExistsError):
    """The output exists and is not empty (pass ``overwrite=True`` to replace it)."""


class NoSpaceError(PmaError, OSError):
    """Not enough free disk space for the output."""


class IoError(PmaError, OSError):
    """The operating system refused a read or write."""


class WatchStateError(PmaError):
    """A watcher's state directory is locked by another watcher, corrupt, or made with other settings."""


class Interrupted(PmaError):
    """The operation was cancelled through its ``cancel`` event; nothing was written."""


class PmaWarning(UserWarning):
    """What ``pma merge`` prints as ``warning:``: skipped incomplete checkpoints, merged NaN/Inf."""
