"""Type stubs of the native module ``pma._pma`` (crates/pma-py); everything is re-exported by ``pma``."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Sequence, Union

__version__: str

StrPath = Union[str, "os.PathLike[str]"]
Count = Union[int, str]
"""A step count, or with ``tokens_per_step`` a token count: ``8_000_000_000`` or ``"8B"``."""
ByteSize = Union[int, str]
"""Bytes, or a size such as ``"5GB"`` (10**9, as transformers reads it) or ``"2GiB"``."""
Method = Literal["sma", "ema", "wma"]
DType = Literal["bf16", "f16", "f32", "f64"]

class Member:
    """One checkpoint of a merge."""

    @property
    def path(self) -> Path:
        """The checkpoint (HF directory or .safetensors file)."""
    @property
    def step(self) -> Optional[int]:
        """Its training step, when its name carries one."""
    @property
    def weight(self) -> float:
        """Its weight in the average."""
    @property
    def bytes(self) -> int:
        """Tensor bytes read from it."""

class MergeReport:
    """What a merge did, or on a dry run what it would do."""

    @property
    def dry_run(self) -> bool:
        """Whether this is a plan only: nothing was read or written."""
    @property
    def output(self) -> Path:
        """The output path."""
    @property
    def method(self) -> str:
        """The averaging method: ``sma``, ``ema0.2``, ``wma`` or ``weights``."""
    @property
    def members(self) -> list[Member]:
        """The merged checkpoints, oldest first."""
    @property
    def weights(self) -> list[float]:
        """The members' weights, oldest first."""
    @property
    def steps(self) -> list[Optional[int]]:
        """The members' steps, oldest first."""
    @property
    def files(self) -> list[str]:
        """Output files (shards, or the single file)."""
    @property
    def single_file(self) -> bool:
        """Whether the output is one bare .safetensors file."""
    @property
    def n_tensors(self) -> int: ...
    @property
    def n_params(self) -> int: ...
    @property
    def output_dtypes(self) -> dict[str, int]:
        """Output dtypes and how many tensors get each (``{"bf16": 12, "copy (I64)": 1}``)."""
    @property
    def bytes_read(self) -> int:
        """Tensor bytes read across all members."""
    @property
    def bytes_written(self) -> int:
        """Bytes written, headers included."""
    @property
    def memory_bytes(self) -> int:
        """Working memory of the merge."""
    @property
    def sidecars(self) -> list[str]:
        """Config/tokenizer files copied from the newest member (empty on a dry run)."""
    @property
    def elapsed_secs(self) -> Optional[float]:
        """Wall time of the merge (``None`` on a dry run)."""
    @property
    def read_bytes_per_sec(self) -> Optional[float]:
        """Tensor bytes read per second (``None`` on a dry run)."""
    @property
    def nonfinite(self) -> list[tuple[Path, str, int]]:
        """``(path, tensor, count)`` of NaN/Inf values merged with ``allow_nonfinite=True``."""
    @property
    def skipped(self) -> list[tuple[Path, str]]:
        """``(path, reason)`` of incomplete checkpoints of the run that were passed over."""
    def to_dict(self) -> dict[str, Any]:
        """The object ``pma merge --json`` prints."""

class TensorStats:
    """Statistics of one float tensor over its finite values."""

    @property
    def norm(self) -> float: ...
    @property
    def mean(self) -> float: ...
    @property
    def std(self) -> float: ...
    @property
    def min(self) -> float: ...
    @property
    def max(self) -> float: ...
    @property
    def nonfinite(self) -> int:
        """Number of NaN/Inf values."""

class TensorInfo:
    """One tensor of a checkpoint."""

    @property
    def name(self) -> str: ...
    @property
    def dtype(self) -> str:
        """As safetensors spells it: ``BF16``, ``F32``, ``I64``, ..."""
    @property
    def shape(self) -> list[int]: ...
    @property
    def n_params(self) -> int: ...
    @property
    def n_bytes(self) -> int: ...
    @property
    def file(self) -> str:
        """The .safetensors file holding it."""
    @property
    def stats(self) -> Optional[TensorStats]:
        """With ``stats=True``, for float tensors."""

class TensorDiff:
    """Distance between one tensor (or all, for ``DiffReport.total``) in two checkpoints."""

    @property
    def name(self) -> str: ...
    @property
    def rel_l2(self) -> float:
        """||a - b|| / ||a||."""
    @property
    def cosine(self) -> float:
        """a.b / (||a|| ||b||)."""
    @property
    def norm_a(self) -> float: ...
    @property
    def norm_b(self) -> float: ...

class DiffReport:
    """How far apart two checkpoints are (``pma diff``)."""

    @property
    def a(self) -> Path: ...
    @property
    def b(self) -> Path: ...
    @property
    def tensors(self) -> list[TensorDiff]: ...
    @property
    def total(self) -> TensorDiff: ...
    @property
    def only_in_a(self) -> list[str]: ...
    @property
    def only_in_b(self) -> list[str]: ...
    @property
    def shape_mismatch(self) -> list[str]: ...
    @property
    def non_float(self) -> list[tuple[str, bool]]:
        """``(name, identical)`` for integer/BOOL tensors."""

class WatchEvent:
    """One thing a watcher did: a record of ``pma watch``'s ``events.jsonl``."""

    @property
    def kind(self) -> Literal[
        "resumed", "seen", "waiting", "skipped-incomplete", "pinned", "counted", "merged",
        "pin-damaged", "update-retried", "unpinned", "pruned", "exec",
    ]: ...
    @property
    def step(self) -> Optional[int]: ...
    @property
    def output(self) -> Optional[Path]:
        """The merged checkpoint written (``merged``), deleted (``pruned``) or run on (``exec``)."""
    @property
    def members(self) -> list[int]:
        """For ``merged``: the members' steps, oldest first."""
    @property
    def weights(self) -> list[float]:
        """For ``merged``: the members' weights, oldest first (empty for ema-stream)."""
    def to_dict(self) -> dict[str, Any]: ...

def merge(
    checkpoints: Optional[Sequence[StrPath]] = None,
    *,
    run: Optional[StrPath] = None,
    method: Optional[Method] = "ema",
    alpha: float = 0.2,
    weights: Optional[Sequence[float]] = None,
    normalize: bool = False,
    last: Optional[int] = 10,
    every: Optional[Count] = None,
    at: Optional[Count] = None,
    min: Optional[int] = None,
    tokens_per_step: Optional[Count] = None,
    out: StrPath,
    dtype: Optional[DType] = None,
    max_shard_size: Optional[ByteSize] = None,
    threads: Optional[int] = None,
    allow_nonfinite: bool = False,
    overwrite: bool = False,
    dry_run: bool = False,
    cancel: Optional[threading.Event] = None,
    format: Optional[Literal["hf", "dcp"]] = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> MergeReport:
    """Merges checkpoints into one, bit-identical to ``pma merge``.

    Args:
        checkpoints: Checkpoints to merge, oldest first (HF directories or .safetensors files).
            Merged as given: ``last`` only guards against a longer list.
        run: Instead, a run directory of step-named checkpoints (step-1000, checkpoint-1000,
            iter_0001000, global_step1000); incomplete ones are skipped with a ``PmaWarning``.
        method: ``"sma"``, ``"ema"`` or ``"wma"``; ignored when ``weights`` are given.
        alpha: EMA smoothing, the newest checkpoint's weight, in (0, 1].
        weights: Explicit weights, oldest first, one per merged checkpoint.
        normalize: Rescale ``weights`` to sum to 1.
        last: With ``run``, merge the newest N (``None``: all); fewer is an error unless ``min``.
        every: Keep checkpoints this many steps apart, counting back from the newest.
        at: End the window at this step.
        min: Accept as few as this many checkpoints.
        tokens_per_step: Makes ``every`` and ``at`` token counts (``"8B"``).
        out: An HF checkpoint directory, or a path ending in ``.safetensors`` for one file.
        dtype: Output dtype of float tensors (default: the newest checkpoint's).
        max_shard_size: Largest output shard (default ``"5GB"``).
        threads: Worker threads (default or 0: all cores; more than 4096 is a ``ConfigError``).
            The bytes never depend on it.
        allow_nonfinite: Merge through NaN/Inf inputs (reported in ``nonfinite`` and as warnings).
        overwrite: Replace an existing output.
        dry_run: Plan only: validate headers, report members, weights and sizes; write nothing.
        cancel: A ``threading.Event``; setting it stops the merge (``Interrupted``, no output).
        format: ``"hf"`` (safetensors) or ``"dcp"`` (a torch.distributed.checkpoint directory);
            default: ``"dcp"`` when the newest checkpoint is DCP and ``out`` does not end in
            ``.safetensors``, ``"hf"`` otherwise (``pma merge --format``).
        include: Also merge float tensors matching these globs (``*`` crosses dots); optimizer
            state only by a glob that names it (``pma merge --include``).
        exclude: Leave out entries matching these globs, whatever else matches them
            (``pma merge --exclude``).

    Raises:
        InputError, FormatError, MismatchError, NonFiniteError, ConfigError,
        OutputExistsError, NoSpaceError, IoError, Interrupted; KeyboardInterrupt on Ctrl-C
        (the output is not written).
    """

def inspect(path: StrPath, *, stats: bool = False) -> list[TensorInfo]:
    """The tensors of a checkpoint in file order; ``stats=True`` adds norm/mean/std/min/max."""

def diff(a: StrPath, b: StrPath) -> DiffReport:
    """Per-tensor relative L2 distance and cosine similarity of two checkpoints (``pma diff``)."""

def weights(method: Method, n: int, alpha: Optional[float] = None) -> list[float]:
    """The exact averaging weights for ``n`` checkpoints, oldest first (``alpha`` defaults to 0.2)."""

class Watcher:
    """Keeps merged checkpoints of a training run's newest checkpoints up to date (``pma watch``).

    Each update writes ``out/step-XXXXXXX/`` named after the newest member, crash-safely; the
    state in ``out/.pma-watch/`` lets a restarted watcher resume without counting anything twice.
    Call :meth:`poll_once` after each checkpoint save, or iterate over the events (on a thread,
    typically) to follow the run until :meth:`stop`.

    Args:
        run: The training run's directory.
        out: Where merged checkpoints go.
        method: ``"sma"``, ``"ema"``, ``"wma"`` over the window, or ``"ema-stream"``
            (E = (1-alpha)*E + alpha*x once per checkpoint, over the whole history).
        alpha: EMA smoothing.
        weights: Explicit weights, oldest first (``last`` must equal their count).
        normalize: Rescale ``weights`` to sum to 1.
        incremental: SMA by a running f64 sum (``method="sma"`` only).
        state_dtype: Dtype of the ema-stream state, ``"f32"`` or ``"f64"``.
        last: Window size N: required by ``sma``/``ema``/``wma``/``weights`` (a window without
            one would pin every checkpoint forever); ``None`` with ``incremental``: every
            checkpoint so far.
        every: Members this many steps apart.
        min: Write outputs once this many members exist (default: N).
        tokens_per_step: Makes ``every`` a token count.
        dtype: Output dtype of float tensors.
        max_shard_size: Largest output shard.
        threads: Worker threads (default or 0: all cores; at most 4096).
        allow_nonfinite: Merge through NaN/Inf inputs.
        keep: Keep only the newest K merged checkpoints.
        exec: A shell command run (``sh -c``) on each new output, as ``pma watch --exec``;
            ``{}`` is its quoted path (appended when absent). Its result is an ``exec`` event
            right after the ``merged`` one; a failing command is recorded, not raised.
        interval: Seconds between polls while iterating.
        settle: Seconds this watcher must see a checkpoint's files unchanged before it counts
            (its own clock, not the files' mtimes; :meth:`poll_once` waits this out for a
            checkpoint that is otherwise complete; use 0 when calling it right after a save
            has returned).
        ready_file: A marker that must exist first (``trainer_state.json`` inside the
            checkpoint, or ``latest_checkpointed_iteration.txt`` in the run directory).
    """

    def __init__(
        self,
        run: StrPath,
        out: StrPath,
        *,
        method: Optional[Union[Method, Literal["ema-stream"]]] = "ema",
        alpha: float = 0.2,
        weights: Optional[Sequence[float]] = None,
        normalize: bool = False,
        incremental: bool = False,
        state_dtype: Literal["f32", "f64"] = "f32",
        last: Optional[int] = None,
        every: Optional[Count] = None,
        min: Optional[int] = None,
        tokens_per_step: Optional[Count] = None,
        dtype: Optional[DType] = None,
        max_shard_size: Optional[ByteSize] = None,
        threads: Optional[int] = None,
        allow_nonfinite: bool = False,
        keep: Optional[int] = None,
        exec: Optional[str] = None,
        interval: float = 30.0,
        settle: float = 5.0,
        ready_file: Optional[str] = None,
    ) -> None: ...
    @property
    def run(self) -> Path: ...
    @property
    def out(self) -> Path: ...
    def poll_once(self) -> list[WatchEvent]:
        """Processes every checkpoint ready now, in step order, and returns what happened."""
    def stop(self) -> None:
        """Ends an iteration after the update in progress; safe from any thread."""
    def close(self) -> None:
        """Stops iterating and waits for the update in progress to commit."""
    def __iter__(self) -> Iterator[WatchEvent]: ...
    def __next__(self) -> WatchEvent: ...
    def __enter__(self) -> Watcher: ...
    def __exit__(self, *exc: object) -> None: ...
