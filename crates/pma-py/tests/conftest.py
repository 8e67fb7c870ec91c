"""Shared helpers of the pma wheel's tests.

These tests run against the INSTALLED wheel (``.ci/run`` builds it, installs it into a fresh
venv and runs pytest from outside the source tree), so they import ``pma`` and call the ``pma``
command that the wheel put next to the interpreter. Fixtures are the CLI's committed merge
fixtures, read in place.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
FIXTURES = REPO / "crates" / "pma-cli" / "tests" / "fixtures"


def pma_command() -> Path:
    """The `pma` command installed by the wheel into this interpreter's environment."""
    exe = Path(sys.executable).parent / ("pma.exe" if os.name == "nt" else "pma")
    assert exe.is_file(), f"the wheel did not install the pma command at {exe}"
    return exe


def run_cli(*args: object, check: bool = True) -> subprocess.CompletedProcess:
    """Runs the installed `pma` with `args`; returns the completed process (text mode)."""
    proc = subprocess.run(
        [str(pma_command()), *map(str, args)], capture_output=True, text=True, timeout=120
    )
    if check:
        assert proc.returncode == 0, f"pma {args} failed ({proc.returncode}): {proc.stderr}"
    return proc


def cli_json(*args: object) -> dict:
    """`pma ... --json` parsed."""
    return json.loads(run_cli(*args, "--json").stdout)


def cli_error(*args: object) -> str:
    """The message `pma ...` prints after `error: `, for a command that must fail."""
    proc = run_cli(*args, check=False)
    # 2 for usage errors, 1 for data and runtime errors (the CLI's exit-code table).
    assert proc.returncode in (1, 2), f"expected failure, got {proc.returncode}: {proc.stdout}"
    assert proc.stderr.startswith("error: "), proc.stderr
    return proc.stderr[len("error: ") :].rstrip("\n")


def safetensors_files(path: Path) -> list[Path]:
    """The .safetensors files of a checkpoint: the file itself, or every one in the directory."""
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(path.glob("*.safetensors"))


def read_tensors(path: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """name -> (dtype, shape, raw bytes) of every tensor of a checkpoint, parsed by hand so that
    BF16 bytes are compared exactly (numpy has no bfloat16)."""
    tensors: dict[str, tuple[str, list[int], bytes]] = {}
    for f in safetensors_files(path):
        data = f.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        header.pop("__metadata__", None)
        base = 8 + n
        for name, info in header.items():
            begin, end = info["data_offsets"]
            assert name not in tensors, f"{name} twice in {path}"
            tensors[name] = (info["dtype"], info["shape"], data[base + begin : base + end])
    assert tensors, f"no tensors in {path}"
    return tensors


def assert_same_tensors(got: Path, want: Path) -> None:
    """Bit-for-bit equality of two checkpoints' tensors (names, dtypes, shapes, bytes)."""
    g, w = read_tensors(got), read_tensors(want)
    assert sorted(g) == sorted(w), f"tensor names differ: {sorted(g)} vs {sorted(w)}"
    for name in w:
        assert g[name][0] == w[name][0], f"{name}: dtype {g[name][0]} != {w[name][0]}"
        assert g[name][1] == w[name][1], f"{name}: shape {g[name][1]} != {w[name][1]}"
        assert g[name][2] == w[name][2], f"{name}: bytes differ ({got} vs {want})"


def copy_checkpoint(src: Path, dst: Path) -> None:
    """Copies a checkpoint directory (as a trainer would write it)."""
    shutil.copytree(src, dst)


def age(path: Path, seconds: float) -> None:
    """Sets the modification time of every file of a checkpoint `seconds` into the past."""
    import time

    t = time.time() - seconds
    for f in [path] if Path(path).is_file() else Path(path).iterdir():
        os.utime(f, (t, t))


@pytest.fixture
def bf16_run() -> Path:
    return FIXTURES / "run-bf16"


@pytest.fixture
def f32_run() -> Path:
    return FIXTURES / "run-f32"
