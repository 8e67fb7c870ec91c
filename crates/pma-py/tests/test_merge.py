"""pma.merge: bit-identical to the expected fixture merges and to the `pma merge` command."""

from __future__ import annotations

import json
import math
import struct

import pytest

import pma
from conftest import (
    FIXTURES,
    assert_same_tensors,
    cli_json,
    read_tensors,
    run_cli,
    safetensors_files,
)

# (run, API keywords, the same as CLI flags, expected file)
CASES = [
    ("run-bf16", dict(method="sma", last=None), ["--method", "sma"], "sma-n4"),
    ("run-bf16", dict(method="ema", alpha=0.2, last=4), ["--method", "ema", "--alpha", "0.2"], "ema0.2-n4"),
    ("run-bf16", dict(method="ema", alpha=0.1, last=4), ["--method", "ema", "--alpha", "0.1"], "ema0.1-n4"),
    ("run-bf16", dict(method="wma", last=4), ["--method", "wma"], "wma-n4"),
    ("run-bf16", dict(method="sma", last=2), ["--method", "sma", "--last", "2"], "sma-last2"),
    ("run-bf16", dict(method="sma", every=200, last=None), ["--method", "sma", "--every", "200"], "sma-every200"),
    ("run-bf16", dict(method="sma", last=4, dtype="f32"), ["--method", "sma", "--dtype", "f32"], "sma-n4-f32out"),
    ("run-f32", dict(method="sma", last=3), ["--method", "sma"], "sma-n3"),
    ("run-f32", dict(method="sma", last=3, dtype="bf16"), ["--method", "sma", "--dtype", "bf16"], "sma-n3-bf16out"),
    ("run-f32", dict(weights=[0.5, 0.3, 0.2], last=3), ["--weights", "0.5,0.3,0.2"], "w-0.5-0.3-0.2"),
]


@pytest.mark.parametrize("run,kwargs,flags,expected", CASES, ids=[c[3] for c in CASES])
def test_matches_expected_and_cli(tmp_path, run, kwargs, flags, expected):
    want = FIXTURES / run / "expected" / f"{expected}.safetensors"
    outputs = []
    for threads in (1, 2):
        out = tmp_path / f"api-{threads}"
        report = pma.merge(run=FIXTURES / run, out=out, threads=threads, **kwargs)
        assert report.output == out and not report.dry_run
        assert_same_tensors(out, want)
        outputs.append(out)
    cli_out = tmp_path / "cli"
    run_cli("merge", "--run", FIXTURES / run, *flags, "--threads", 2, "--quiet", "--out", cli_out)
    # Not just the tensors: every file the CLI writes (shards, index, sidecars) is the same.
    for api_out in outputs:
        api_files = sorted(p.name for p in api_out.iterdir())
        assert api_files == sorted(p.name for p in cli_out.iterdir())
        for name in api_files:
            assert (api_out / name).read_bytes() == (cli_out / name).read_bytes(), name


def test_report_describes_the_merge(tmp_path, bf16_run):
    out = tmp_path / "merged"
    report = pma.merge(run=bf16_run, method="ema", alpha=0.2, last=4, out=out, threads=1)
    assert report.method == "ema0.2"
    assert report.steps == [100, 200, 300, 400]
    assert [m.step for m in report.members] == report.steps
    assert report.weights == pma.weights("ema", 4, alpha=0.2)
    assert [m.path for m in report.members] == [bf16_run / f"step-{s:07d}" for s in report.steps]
    assert all(m.bytes > 0 for m in report.members)
    assert report.bytes_read == sum(m.bytes for m in report.members)
    assert report.bytes_written == sum(f.stat().st_size for f in safetensors_files(out))
    assert report.files == ["model.safetensors"] and not report.single_file
    assert report.n_tensors == len(read_tensors(out))
    assert "config.json" in report.sidecars and "generation_config.json" in report.sidecars
    assert report.elapsed_secs > 0 and report.read_bytes_per_sec > 0
    assert report.nonfinite == [] and report.skipped == []
    d = report.to_dict()
    assert d["schema_version"] == 1 and d["dry_run"] is False
    assert d["report"]["plan"]["inputs"][0]["step"] == 100


def test_dry_run_matches_cli_plan_and_writes_nothing(tmp_path, bf16_run):
    out = tmp_path / "merged"
    report = pma.merge(run=bf16_run, method="wma", last=3, out=out, threads=2, dry_run=True)
    assert report.dry_run and not out.exists()
    assert report.steps == [200, 300, 400]
    assert report.weights == pma.weights("wma", 3)
    assert report.elapsed_secs is None and report.sidecars == []
    cli = cli_json("merge", "--run", bf16_run, "--method", "wma", "--last", 3, "--threads", 2,
                   "--dry-run", "--out", out)
    assert report.to_dict() == cli
    assert report.bytes_written == cli["plan"]["bytes_written"]


def test_explicit_checkpoints_and_single_file_output(tmp_path, bf16_run):
    members = [bf16_run / "step-0000300", bf16_run / "step-0000400"]
    out = tmp_path / "merged.safetensors"
    report = pma.merge(members, method="sma", out=out)
    assert report.single_file and out.is_file()
    assert report.steps == [300, 400]
    assert_same_tensors(out, bf16_run / "expected" / "sma-last2.safetensors")


def test_explicit_list_longer_than_last_is_refused(tmp_path, bf16_run):
    members = sorted(bf16_run.glob("step-*"))
    with pytest.raises(pma.ConfigError, match="4 checkpoints given but last=2"):
        pma.merge(members, method="sma", last=2, out=tmp_path / "m")
    report = pma.merge(members, method="sma", last=None, out=tmp_path / "m")
    assert report.steps == [100, 200, 300, 400]


def test_token_counts_select_like_steps(tmp_path, bf16_run):
    # 200 steps of 1000 tokens: the same members as every=200.
    out = tmp_path / "m"
    report = pma.merge(run=bf16_run, method="sma", last=None, every="200k", tokens_per_step=1000, out=out)
    assert report.steps == [200, 400]
    assert_same_tensors(out, bf16_run / "expected" / "sma-every200.safetensors")


def test_at_and_min_select_a_window(tmp_path, bf16_run):
    report = pma.merge(run=bf16_run, method="sma", last=3, min=2, at=250, out=tmp_path / "m", dry_run=True)
    assert report.steps == [100, 200]


def test_max_shard_size_shards_the_output(tmp_path, bf16_run):
    out = tmp_path / "m"
    report = pma.merge(run=bf16_run, method="sma", last=4, out=out, max_shard_size=2000)
    assert len(report.files) > 1 and (out / "model.safetensors.index.json").is_file()
    assert_same_tensors(out, bf16_run / "expected" / "sma-n4.safetensors")


def test_overwrite_replaces_the_output(tmp_path, bf16_run):
    out = tmp_path / "m"
    pma.merge(run=bf16_run, method="sma", last=2, out=out)
    pma.merge(run=bf16_run, method="wma", last=4, out=out, overwrite=True)
    assert_same_tensors(out, bf16_run / "expected" / "wma-n4.safetensors")


def test_incomplete_checkpoint_is_skipped_with_a_warning(tmp_path, bf16_run):
    run = tmp_path / "run"
    run.mkdir()
    for s in (300, 400):
        (run / f"step-{s:07d}").symlink_to(bf16_run / f"step-{s:07d}")
    broken = run / "step-0000500"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.warns(pma.PmaWarning, match="skipping incomplete checkpoint .*step-0000500"):
        report = pma.merge(run=run, method="sma", last=2, out=tmp_path / "m")
    assert report.steps == [300, 400]
    assert [p.name for p, _ in report.skipped] == ["step-0000500"]


def test_weights_function(bf16_run):
    a = 0.2
    assert pma.weights("ema", 4, alpha=a) == [(1 - a) ** 3, a * (1 - a) ** 2, a * (1 - a), a]
    assert pma.weights("ema", 3) == pma.weights("ema", 3, 0.2)
    assert pma.weights("sma", 4) == [0.25] * 4
    assert pma.weights("wma", 4) == [0.1, 0.2, 0.3, 0.4]
    # The same floats a merge uses, as the CLI plan shows them.
    plan = cli_json("merge", "--run", bf16_run, "--method", "ema", "--alpha", "0.3", "--dry-run",
                    "--out", "/nonexistent/out")["plan"]
    assert [i["weight"] for i in plan["inputs"]] == pma.weights("ema", 4, alpha=0.3)
    # Decay-emulating weights (WSM): checkpoint j weighs the drop of the LR factor f(j/N).
    f = lambda x: 0.5 * (1 + math.cos(math.pi * x))
    cos = pma.weights("decay-cosine", 4)
    assert cos[1:] == [f(1 / 4) - f(2 / 4), f(2 / 4) - f(3 / 4), f(3 / 4)]
    assert cos[0] == 1 - sum(cos[1:])
    assert pma.weights("decay-linear", 8) == [0.125] * 8
    assert pma.weights("decay-minus-sqrt", 5) == pma.weights("decay-1-sqrt", 5)
    plan = cli_json("merge", "--run", bf16_run, "--method", "decay-1-sqrt", "--dry-run",
                    "--out", "/nonexistent/out")["plan"]
    assert [i["weight"] for i in plan["inputs"]] == pma.weights("decay-1-sqrt", 4)
    with pytest.raises(pma.ConfigError, match="unknown method"):
        pma.weights("median", 3)
    with pytest.raises(pma.ConfigError, match="alpha"):
        pma.weights("ema", 3, alpha=1.5)


def test_include_exclude_and_format_match_the_cli(tmp_path, bf16_run):
    names = sorted(read_tensors(bf16_run / "step-0000400"))
    excluded = names[0]
    out = tmp_path / "api"
    pma.merge(run=bf16_run, method="sma", last=2, out=out, format="hf", include=["*"],
              exclude=[excluded])
    cli_out = tmp_path / "cli"
    run_cli("merge", "--run", bf16_run, "--method", "sma", "--last", 2, "--format", "hf",
            "--include", "*", "--exclude", excluded, "--quiet", "--out", cli_out)
    got = read_tensors(out)
    assert sorted(got) == [n for n in names if n != excluded]
    assert_same_tensors(out, cli_out)
    with pytest.raises(pma.ConfigError, match="format 'onnx' is not 'hf' or 'dcp'"):
        pma.merge(run=bf16_run, method="sma", last=2, out=tmp_path / "x", format="onnx")


def test_dcp_format_writes_what_the_cli_writes(tmp_path, bf16_run):
    out = tmp_path / "api-dcp"
    pma.merge(run=bf16_run, method="sma", last=2, out=out, format="dcp")
    assert (out / ".metadata").is_file()
    cli_out = tmp_path / "cli-dcp"
    run_cli("merge", "--run", bf16_run, "--method", "sma", "--last", 2, "--format", "dcp",
            "--quiet", "--out", cli_out)
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(p.name for p in cli_out.iterdir())
    for name in files:
        assert (out / name).read_bytes() == (cli_out / name).read_bytes(), name
