"""Each kind of error raises its exception class, with the message the `pma` command prints."""

from __future__ import annotations

import shutil
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

import pma
from conftest import FIXTURES, cli_error


def ckpt(dir, tensors):
    """An HF checkpoint dir holding `tensors` (name -> numpy array)."""
    dir.mkdir(parents=True)
    save_file(tensors, str(dir / "model.safetensors"), metadata={"format": "pt"})
    return dir


def test_hierarchy():
    for cls in [pma.InputError, pma.ConfigError, pma.OutputExistsError, pma.NoSpaceError,
                pma.IoError, pma.WatchStateError, pma.Interrupted]:
        assert issubclass(cls, pma.PmaError)
    for cls in [pma.FormatError, pma.MismatchError, pma.NonFiniteError]:
        assert issubclass(cls, pma.InputError)
    assert issubclass(pma.ConfigError, ValueError)
    assert issubclass(pma.OutputExistsError, FileExistsError)
    assert issubclass(pma.IoError, OSError)
    assert not issubclass(pma.PmaError, KeyboardInterrupt)


def test_empty_run_is_an_input_error(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(pma.InputError) as e:
        pma.merge(run=run, method="sma", out=tmp_path / "out")
    assert type(e.value) is pma.InputError
    assert str(e.value) == cli_error("merge", "--run", run, "--method", "sma", "--out", tmp_path / "out")
    assert "no checkpoints found" in str(e.value)


def test_too_few_checkpoints_is_an_input_error(tmp_path, bf16_run):
    # The default last=10 on a run of 4.
    with pytest.raises(pma.InputError) as e:
        pma.merge(run=bf16_run, method="sma", out=tmp_path / "out")
    assert str(e.value) == cli_error("merge", "--run", bf16_run, "--method", "sma", "--last", 10,
                                     "--out", tmp_path / "out")
    assert "asked for 10 checkpoints but only 4 qualify" in str(e.value)
    assert pma.merge(run=bf16_run, method="sma", min=4, out=tmp_path / "out").steps == [100, 200, 300, 400]


def test_malformed_header_is_a_format_error(tmp_path, bf16_run):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 5000) + b"{}")
    good = bf16_run / "step-0000100"
    out = tmp_path / "out"
    with pytest.raises(pma.FormatError) as e:
        pma.merge([good, bad], method="sma", out=out)
    assert str(e.value) == cli_error("merge", good, bad, "--method", "sma", "--out", out)
    assert "bad.safetensors" in str(e.value) and "truncated" in str(e.value)
    assert not out.exists()
    with pytest.raises(pma.FormatError):
        pma.inspect(bad)


def test_missing_shard_is_a_format_error(tmp_path, bf16_run):
    sharded = tmp_path / "step-0000300"
    shutil.copytree(bf16_run / "step-0000300", sharded)
    (sharded / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(pma.FormatError, match="model-00002-of-00003.safetensors"):
        pma.inspect(sharded)


def test_shape_mismatch_is_a_mismatch_error(tmp_path):
    a = ckpt(tmp_path / "step-1", {"w": np.zeros((2, 3), np.float32)})
    b = ckpt(tmp_path / "step-2", {"w": np.zeros((3, 2), np.float32)})
    out = tmp_path / "out"
    with pytest.raises(pma.MismatchError) as e:
        pma.merge([a, b], method="sma", out=out)
    assert str(e.value) == cli_error("merge", a, b, "--method", "sma", "--out", out)
    assert "'w'" in str(e.value) and "shape" in str(e.value)


def test_nan_is_a_nonfinite_error_unless_allowed(tmp_path):
    a = ckpt(tmp_path / "step-1", {"w": np.array([1.0, 2.0], np.float32)})
    b = ckpt(tmp_path / "step-2", {"w": np.array([np.nan, 4.0], np.float32)})
    out = tmp_path / "out"
    with pytest.raises(pma.NonFiniteError) as e:
        pma.merge([a, b], method="sma", out=out)
    assert str(e.value) == cli_error("merge", a, b, "--method", "sma", "--out", out)
    with pytest.warns(pma.PmaWarning, match="non-finite"):
        report = pma.merge([a, b], method="sma", out=out, allow_nonfinite=True)
    assert [(p.name, t, n) for p, t, n in report.nonfinite] == [("step-2", "w", 1)]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(method="sma", alpha=0.2, weights=[1.0]), "not both"),
        (dict(method="median"), "unknown method 'median'"),
        (dict(method="ema", alpha=0.0), "alpha must be in (0, 1]"),
        (dict(method="sma", dtype="f8"), "unknown dtype 'f8'"),
        (dict(method="sma", normalize=True), "normalize needs explicit weights"),
        (dict(method="sma", max_shard_size="lots"), "cannot read 'lots' as a size"),
        (dict(method="sma", every="8B"), "not a step number"),
        (dict(method="sma", every="8B", tokens_per_step="3"), "not a whole number"),
        (dict(method=None), "give method or weights"),
        (dict(weights=[1.0, 0.0, -1.0], normalize=True), "sum to 0"),
    ],
)
def test_bad_arguments_are_config_errors(tmp_path, bf16_run, kwargs, message):
    with pytest.raises(pma.ConfigError) as e:
        pma.merge(run=bf16_run, last=3, out=tmp_path / "out", **kwargs)
    assert message in str(e.value)
    assert isinstance(e.value, ValueError)
    assert not (tmp_path / "out").exists()


def test_checkpoints_and_run_together_or_neither(tmp_path, bf16_run):
    with pytest.raises(pma.ConfigError, match="not both"):
        pma.merge([bf16_run / "step-0000100"], run=bf16_run, out=tmp_path / "o")
    with pytest.raises(pma.ConfigError, match="nothing to merge"):
        pma.merge(out=tmp_path / "o")


def test_existing_output_is_refused(tmp_path, bf16_run):
    out = tmp_path / "out"
    pma.merge(run=bf16_run, method="sma", last=2, out=out)
    with pytest.raises(pma.OutputExistsError) as e:
        pma.merge(run=bf16_run, method="sma", last=2, out=out)
    assert isinstance(e.value, FileExistsError)
    assert str(e.value) == cli_error("merge", "--run", bf16_run, "--method", "sma", "--last", 2,
                                     "--out", out)


def test_unreadable_path_is_an_io_error(tmp_path):
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(pma.IoError) as e:
        pma.inspect(missing)
    assert isinstance(e.value, OSError)
    assert str(e.value) == cli_error("inspect", missing)


def test_watch_state_of_other_settings_is_a_watch_state_error(tmp_path, bf16_run):
    run, out = tmp_path / "run", tmp_path / "merged"
    run.mkdir()
    shutil.copytree(bf16_run / "step-0000100", run / "step-0000100")
    pma.Watcher(run, out, method="sma", last=2, settle=0).poll_once()
    with pytest.raises(pma.WatchStateError, match="watch state was made with"):
        pma.Watcher(run, out, method="wma", last=2, settle=0).poll_once()


def test_bad_watch_settings_are_config_errors(tmp_path):
    with pytest.raises(pma.ConfigError, match="ema-stream averages the whole history"):
        pma.Watcher(tmp_path, tmp_path / "o", method="ema-stream", last=3)
    with pytest.raises(pma.ConfigError, match="keep must be at least 1"):
        pma.Watcher(tmp_path, tmp_path / "o", method="sma", keep=0)
    with pytest.raises(pma.ConfigError, match="incremental works with method='sma' only"):
        pma.Watcher(tmp_path, tmp_path / "o", method="wma", incremental=True)
    with pytest.raises(pma.ConfigError, match="needs a window size"):
        pma.Watcher(tmp_path, tmp_path / "o", weights=[0.5, 0.5])
    with pytest.raises(pma.ConfigError, match="explicit weights need a window size equal"):
        pma.Watcher(tmp_path, tmp_path / "o", weights=[0.5, 0.5], last=3)
    with pytest.raises(pma.ConfigError, match="worker threads asked for"):
        pma.Watcher(tmp_path, tmp_path / "o", method="sma", last=2, threads=10**9)


def test_watch_output_inside_the_run_is_a_config_error(tmp_path):
    with pytest.raises(pma.ConfigError, match="pma never writes inside a run directory"):
        pma.Watcher(tmp_path, tmp_path / "merged", method="sma", last=2)


def test_output_placement_and_threads_are_config_errors_like_the_cli(tmp_path, bf16_run):
    run = tmp_path / "run"
    shutil.copytree(bf16_run, run)
    out = run / "merged"
    with pytest.raises(pma.ConfigError) as e:
        pma.merge(run=run, method="sma", last=2, out=out)
    assert str(e.value) == cli_error("merge", "--run", run, "--method", "sma", "--last", 2,
                                     "--out", out)
    assert not out.exists()
    with pytest.raises(pma.ConfigError) as e:
        pma.merge(run=bf16_run, method="sma", last=2, out=tmp_path / "o", threads=10**9)
    assert str(e.value) == cli_error("merge", "--run", bf16_run, "--method", "sma", "--last", 2,
                                     "--threads", 10**9, "--out", tmp_path / "o")
