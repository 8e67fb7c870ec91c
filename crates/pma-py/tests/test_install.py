"""The installed wheel: the module comes from site-packages, the `pma` command works and is the
merge-only build, and the typing files are shipped."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pma
from conftest import FIXTURES, REPO, assert_same_tensors, pma_command, run_cli


def test_module_is_the_installed_wheel_not_the_source_tree():
    installed = Path(pma.__file__).resolve()
    assert REPO not in installed.parents, f"pma imported from the source tree: {installed}"
    assert "site-packages" in installed.parts, installed


def test_version_matches_the_workspace():
    cargo = (REPO / "Cargo.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', cargo, re.M).group(1)
    assert pma.__version__ == version


def test_typing_files_are_shipped():
    package = Path(pma.__file__).parent
    assert (package / "py.typed").is_file()
    stub = (package / "_pma.pyi").read_text()
    for name in ["def merge(", "def inspect(", "def diff(", "def weights(", "class Watcher"]:
        assert name in stub


def test_cli_help_lists_the_merge_commands_only():
    out = run_cli("--help").stdout
    for command in ["merge", "inspect", "diff", "watch"]:
        assert re.search(rf"^\s+{command}\s", out, re.M), out
    # The wheel ships the merge-only build: the candle lab is not compiled in.
    for command in ["train", "eval", "demo"]:
        assert not re.search(rf"^\s+{command}\s", out, re.M), out


def test_cli_merges_the_fixtures(tmp_path):
    out = tmp_path / "merged"
    run_cli("merge", "--run", FIXTURES / "run-bf16", "--method", "sma", "--quiet", "--out", out)
    assert_same_tensors(out, FIXTURES / "run-bf16" / "expected" / "sma-n4.safetensors")


def test_cli_is_on_path_of_the_environment():
    # pip put the binary into the environment's scripts dir, so `python -m` is not needed.
    proc = subprocess.run([str(pma_command()), "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("pma "), proc
