"""PEP 517 build backend of the ``pma`` wheel: maturin, after staging the merge-only CLI.

The wheel carries two Rust artifacts: the extension module ``pma._pma`` (crates/pma-py, which
depends on pma-merge and pma-format only) and the ``pma`` command. maturin builds one artifact
per wheel (PyO3/maturin#368), but it copies a ``data`` directory into the wheel's ``.data/``, and
pip installs ``.data/scripts/*`` onto PATH. So this backend first builds the command from
crates/pma-cli with ``--no-default-features`` (merge, inspect, diff, watch; no candle) and stages
it as ``<data>/scripts/pma``, then hands every hook to maturin unchanged.

``pip install .`` and ``pip wheel .`` go through here. To run ``maturin build`` by hand, stage
the command first: ``python crates/pma-py/backend/pma_backend.py && maturin build --release``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import maturin

# The PEP 517 hooks maturin implements, passed through.
build_sdist = maturin.build_sdist
get_requires_for_build_wheel = maturin.get_requires_for_build_wheel
get_requires_for_build_sdist = maturin.get_requires_for_build_sdist
get_requires_for_build_editable = maturin.get_requires_for_build_editable

ROOT = Path(__file__).resolve().parents[3]


def _data_dir() -> Path:
    """``[tool.maturin] data`` from pyproject.toml, relative to the project root."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11: maturin depends on tomli there.
        import tomli as tomllib  # type: ignore[no-redef]

    with open(ROOT / "pyproject.toml", "rb") as f:
        return ROOT / tomllib.load(f)["tool"]["maturin"]["data"]


def stage_cli() -> Path:
    """Builds the merge-only ``pma`` (release) and copies it to ``<data>/scripts/``."""
    exe = "pma.exe" if sys.platform == "win32" else "pma"
    cargo = os.environ.get("CARGO", "cargo")
    subprocess.run(
        [cargo, "build", "--release", "-p", "pma-cli", "--no-default-features", "--bin", "pma"],
        cwd=ROOT,
        check=True,
    )
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    if not target.is_absolute():
        target = ROOT / target
    scripts = _data_dir() / "scripts"
    scripts.mkdir(parents=True, exist_ok=True)
    staged = scripts / exe
    shutil.copy2(target / "release" / exe, staged)
    # The release profile keeps line tables (debug = 1) for profiling; the wheel does not need
    # them (like `strip = true` for the module). Stripping is size only: skipped without `strip`.
    strip = shutil.which("strip")
    if strip and sys.platform.startswith("linux"):
        subprocess.run([strip, str(staged)], check=False)
    return staged


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    # maturin refuses a `data` directory that does not exist yet, and pip asks for the metadata
    # before it builds (in a fresh clone nothing is staged): create it, empty, first.
    (_data_dir() / "scripts").mkdir(parents=True, exist_ok=True)
    return maturin.prepare_metadata_for_build_wheel(metadata_directory, config_settings)


def prepare_metadata_for_build_editable(metadata_directory, config_settings=None):
    (_data_dir() / "scripts").mkdir(parents=True, exist_ok=True)
    return maturin.prepare_metadata_for_build_editable(metadata_directory, config_settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    stage_cli()
    return maturin.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    stage_cli()
    return maturin.build_editable(wheel_directory, config_settings, metadata_directory)


if __name__ == "__main__":
    print(stage_cli())
