"""pma: Pre-trained Model Averaging, from Python.

Merge checkpoints of a pre-training run (SMA, EMA, WMA or explicit weights) with exact f64
arithmetic, streaming, bit-identical to the ``pma`` command installed with this package. The
functions are thin wrappers over the same Rust library calls the command makes:

- :func:`merge` -> :class:`MergeReport` (``pma merge``);
- :func:`inspect` -> list of :class:`TensorInfo` (``pma inspect``);
- :func:`diff` -> :class:`DiffReport` (``pma diff``);
- :func:`weights` -> the averaging weights of a method;
- :class:`Watcher` keeps merges of a running job's newest checkpoints up to date (``pma watch``).

Work runs without the GIL, and Ctrl-C stops a merge cleanly (nothing is written) with
``KeyboardInterrupt``. Errors are :class:`PmaError` subclasses carrying the command's messages.

>>> import pma
>>> report = pma.merge(run="checkpoints/", method="ema", alpha=0.2, last=4, out="merged/")
>>> [m.step for m in report.members], report.weights
"""

from pma import _errors
from pma._errors import *  # noqa: F403  (the exception classes, listed in _errors.__all__)
from pma._pma import (
    DiffReport,
    Member,
    MergeReport,
    TensorDiff,
    TensorInfo,
    TensorStats,
    WatchEvent,
    Watcher,
    __version__,
    diff,
    inspect,
    merge,
    weights,
)

__all__ = [
    "merge",
    "inspect",
    "diff",
    "weights",
    "Watcher",
    "MergeReport",
    "Member",
    "TensorInfo",
    "TensorStats",
    "DiffReport",
    "TensorDiff",
    "WatchEvent",
    "__version__",
    *_errors.__all__,
]
