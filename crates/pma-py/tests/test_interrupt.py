"""The GIL is released while pma works, Ctrl-C stops a merge with KeyboardInterrupt and leaves no
output, and a cancel event stops it with pma.Interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from safetensors.numpy import save_file

import pma

# 64 checkpoints of 16M float32 (64 MB, hard links of one file): a merge reads 4 GB from the
# page cache, which takes seconds on one thread, yet the run costs 64 MB of disk.
N_CHECKPOINTS = 64
N_ELEMS = 16 << 20


@pytest.fixture(scope="module")
def big_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    first = root / "run" / "step-0000001"
    first.mkdir(parents=True)
    values = (np.arange(N_ELEMS, dtype=np.float32) % 1000) / 1000
    save_file({"w": values}, str(first / "model.safetensors"), metadata={"format": "pt"})
    for i in range(2, N_CHECKPOINTS + 1):
        ckpt = root / "run" / f"step-{i:07d}"
        ckpt.mkdir()
        os.link(first / "model.safetensors", ckpt / "model.safetensors")
    return root / "run"


def assert_nothing_written(out):
    assert not out.exists(), f"{out} exists after an interrupted merge"
    leftovers = [p.name for p in out.parent.iterdir() if "pma-tmp" in p.name]
    assert leftovers == [], f"staging left behind: {leftovers}"


def test_gil_is_released_during_a_merge(tmp_path, big_run):
    out = tmp_path / "m.safetensors"
    result = {}

    def work():
        result["report"] = pma.merge(run=big_run, method="sma", last=None, out=out, threads=1)

    thread = threading.Thread(target=work)
    ticks = 0
    started = time.monotonic()
    thread.start()
    while thread.is_alive():
        ticks += 1
        time.sleep(0.005)
    elapsed = time.monotonic() - started
    thread.join()
    assert result["report"].steps == list(range(1, N_CHECKPOINTS + 1))
    assert elapsed > 0.3, f"the merge took only {elapsed:.2f}s: the run is too small to tell"
    # With the GIL held this thread could not run at all until the merge returned.
    assert ticks > 0.3 * elapsed / 0.005, f"{ticks} ticks in {elapsed:.2f}s"


def test_ctrl_c_interrupts_a_merge_and_writes_nothing(tmp_path, big_run):
    out = tmp_path / "m"
    script = textwrap.dedent(
        """
        import sys, time, pma
        print("merging", flush=True)
        started = time.monotonic()
        try:
            pma.merge(run=sys.argv[1], method="sma", last=None, out=sys.argv[2], threads=1)
        except KeyboardInterrupt:
            print(f"KeyboardInterrupt after {time.monotonic() - started:.2f}s", flush=True)
            sys.exit(0)
        print("completed", flush=True)
        sys.exit(1)
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(big_run), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() == "merging"
    time.sleep(0.3)  # well inside the merge, which takes seconds on one thread
    child.send_signal(signal.SIGINT)
    stdout, stderr = child.communicate(timeout=60)
    assert child.returncode == 0, f"{stdout}\n{stderr}"
    assert stdout.startswith("KeyboardInterrupt after"), stdout
    assert_nothing_written(out)


def test_cancel_event_raises_interrupted(tmp_path, big_run):
    out = tmp_path / "m"
    cancel = threading.Event()
    timer = threading.Timer(0.3, cancel.set)
    timer.start()
    try:
        with pytest.raises(pma.Interrupted, match="interrupted; the output was not written"):
            pma.merge(run=big_run, method="sma", last=None, out=out, threads=1, cancel=cancel)
    finally:
        timer.cancel()
    assert_nothing_written(out)
