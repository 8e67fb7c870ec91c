"""pma.inspect and pma.diff: the same numbers as `pma inspect --json` / `pma diff --json`."""

from __future__ import annotations

import math

import pma
from conftest import cli_json, read_tensors


def test_inspect_lists_tensors_like_the_cli(bf16_run):
    sharded = bf16_run / "step-0000300"
    infos = pma.inspect(sharded)
    cli = cli_json("inspect", sharded)["inspect"]["tensors"]
    assert [t.name for t in infos] == [t["name"] for t in cli]
    for info, want in zip(infos, cli):
        assert (info.dtype, info.shape, info.n_params, info.n_bytes, info.file) == (
            want["dtype"], want["shape"], want["n_params"], want["n_bytes"], want["file"])
        assert info.stats is None
    header = read_tensors(sharded)
    assert {t.name: (t.dtype, t.shape) for t in infos} == {n: (d, s) for n, (d, s, _) in header.items()}
    assert len({t.file for t in infos}) == 3


def test_inspect_stats_match_the_cli(f32_run):
    ckpt = f32_run / "step-0002000"
    infos = pma.inspect(ckpt, stats=True)
    cli = {t["name"]: t for t in cli_json("inspect", ckpt, "--stats")["inspect"]["tensors"]}
    for info in infos:
        want = cli[info.name].get("stats")
        if want is None:
            assert info.stats is None
            continue
        s = info.stats
        assert (s.norm, s.mean, s.std, s.min, s.max, s.nonfinite) == (
            want["norm"], want["mean"], want["std"], want["min"], want["max"], want["nonfinite"])
        assert s.norm > 0 and s.min <= s.mean <= s.max


def test_inspect_a_single_file(tmp_path, bf16_run):
    out = tmp_path / "m.safetensors"
    pma.merge(run=bf16_run, method="sma", last=2, out=out)
    infos = pma.inspect(out)
    assert {t.file for t in infos} == {"m.safetensors"}


def test_diff_matches_the_cli(bf16_run):
    a, b = bf16_run / "step-0000100", bf16_run / "step-0000400"
    report = pma.diff(a, b)
    cli = cli_json("diff", a, b)["diff"]
    assert (report.a, report.b) == (a, b)
    assert [t.name for t in report.tensors] == [t["name"] for t in cli["tensors"]]
    for got, want in zip(report.tensors + [report.total], cli["tensors"] + [cli["total"]]):
        assert (got.rel_l2, got.cosine, got.norm_a, got.norm_b) == (
            want["rel_l2"], want["cosine"], want["norm_a"], want["norm_b"])
    assert 0 < report.total.rel_l2 < math.inf and -1 <= report.total.cosine <= 1
    assert report.only_in_a == cli["only_in_a"] and report.only_in_b == cli["only_in_b"]
    assert report.shape_mismatch == cli["shape_mismatch"]
    assert [list(x) for x in report.non_float] == cli["non_float"]


def test_diff_of_a_checkpoint_with_itself_is_zero(bf16_run):
    a = bf16_run / "step-0000200"
    report = pma.diff(a, a)
    assert report.total.rel_l2 == 0.0
    assert all(t.rel_l2 == 0.0 for t in report.tensors)
