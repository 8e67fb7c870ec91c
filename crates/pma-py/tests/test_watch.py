"""pma.Watcher: driven from a loop that writes checkpoints, and iterated on a thread."""

from __future__ import annotations

import json
import shutil
import threading
import time

import pytest

import pma
from conftest import FIXTURES, age, assert_same_tensors, run_cli

STEPS = [100, 200, 300, 400]


def name(step: int) -> str:
    return f"step-{step:07d}"


def test_poll_once_after_each_save(tmp_path, bf16_run):
    run, out = tmp_path / "run", tmp_path / "merged"
    run.mkdir()
    watcher = pma.Watcher(run, out, method="sma", last=2, settle=0, threads=1)
    assert watcher.run == run and watcher.out == out
    assert watcher.poll_once() == []  # nothing yet, and an empty run is no error
    merged = []
    for step in STEPS:
        shutil.copytree(bf16_run / name(step), run / name(step))  # "the trainer saves"
        events = watcher.poll_once()
        kinds = [e.kind for e in events]
        assert "seen" in kinds and "pinned" in kinds, kinds
        if step == 100:
            counted = [e for e in events if e.kind == "counted"]
            assert counted and counted[0].to_dict()["needed"] == 2
        else:
            (m,) = [e for e in events if e.kind == "merged"]
            assert m.step == step and m.output == out / name(step)
            assert m.members == [step - 100, step] and m.weights == [0.5, 0.5]
            merged.append(m.output)
    assert_same_tensors(out / name(400), bf16_run / "expected" / "sma-last2.safetensors")
    # Bit-identical to `pma merge` of the same window, as the library promises.
    cli_out = tmp_path / "cli"
    run_cli("merge", bf16_run / name(200), bf16_run / name(300), "--method", "sma", "--quiet",
            "--out", cli_out)
    assert_same_tensors(out / name(300), cli_out)
    # Nothing new: no events, no error; a new watcher resumes from the committed state.
    assert watcher.poll_once() == []
    resumed = pma.Watcher(run, out, method="sma", last=2, settle=0).poll_once()
    assert [e.kind for e in resumed] == ["resumed"]
    assert resumed[0].to_dict()["last_step"] == 400


def test_settle_and_ready_file_hold_a_checkpoint_back(tmp_path, bf16_run):
    run, out = tmp_path / "run", tmp_path / "merged"
    run.mkdir()
    # Files settle once this watcher has seen them unchanged for `settle` seconds (its own
    # clock, not their mtimes); poll_once waits that out for a checkpoint that is otherwise
    # complete, like `pma watch --once`.
    watcher = pma.Watcher(run, out, method="sma", last=1, settle=1)
    shutil.copytree(bf16_run / name(100), run / name(100))
    started = time.monotonic()
    kinds = [e.kind for e in watcher.poll_once() if e.kind != "seen"]
    assert time.monotonic() - started >= 1.0
    assert kinds[0] == "waiting" and "merged" in kinds, kinds
    assert (out / name(100)).is_dir()
    # A missing ready marker is not worth waiting for: the poll returns, the checkpoint waits.
    run2, out2 = tmp_path / "run2", tmp_path / "merged2"
    run2.mkdir()
    watcher = pma.Watcher(run2, out2, method="sma", last=1, settle=0, ready_file="DONE")
    shutil.copytree(bf16_run / name(100), run2 / name(100))
    assert [e.kind for e in watcher.poll_once() if e.kind != "seen"] == ["waiting"]
    assert not (out2 / name(100)).exists()
    (run2 / name(100) / "DONE").touch()
    assert "merged" in [e.kind for e in watcher.poll_once()]
    assert (out2 / name(100)).is_dir()


def test_ema_stream_and_keep(tmp_path, bf16_run):
    run, out = tmp_path / "run", tmp_path / "merged"
    run.mkdir()
    watcher = pma.Watcher(run, out, method="ema-stream", alpha=0.5, keep=2, settle=0)
    kinds = []
    for step in STEPS:
        shutil.copytree(bf16_run / name(step), run / name(step))
        kinds += [e.kind for e in watcher.poll_once()]
    assert kinds.count("merged") == 4 and kinds.count("pruned") == 2
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [name(300), name(400)]


def test_iterating_on_a_thread_follows_the_run(tmp_path, bf16_run):
    run, out = tmp_path / "run", tmp_path / "merged"
    run.mkdir()
    watcher = pma.Watcher(run, out, method="sma", last=2, settle=0, interval=0.1)
    events = []
    done = threading.Event()

    def follow():
        for event in watcher:
            events.append(event)
            if event.kind == "merged" and event.step == 400:
                done.set()
        done.set()

    thread = threading.Thread(target=follow)
    thread.start()
    try:
        for step in STEPS:
            shutil.copytree(bf16_run / name(step), run / name(step))
            time.sleep(0.05)
        assert done.wait(30), [e.kind for e in events]
        with pytest.raises(RuntimeError, match="being iterated"):
            watcher.poll_once()
    finally:
        watcher.stop()
        thread.join(30)
    assert not thread.is_alive()
    assert [e.step for e in events if e.kind == "merged"] == [200, 300, 400]
    assert_same_tensors(out / name(400), bf16_run / "expected" / "sma-last2.safetensors")
    # The iteration released the state dir's lock when it ended.
    assert pma.Watcher(run, out, method="sma", last=2, settle=0).poll_once()[0].kind == "resumed"


def test_context_manager_closes_the_loop(tmp_path, bf16_run):
    run, out = tmp_path / "run", tmp_path / "merged"
    run.mkdir()
    shutil.copytree(bf16_run / name(100), run / name(100))
    with pma.Watcher(run, out, method="sma", last=1, settle=0, interval=0.1) as watcher:
        first = next(iter(watcher))
        assert first.kind == "seen"
    # close() waited for the loop (stopped before its first update): the lock is free, and
    # the iteration is over.
    assert list(watcher) == []
    events = pma.Watcher(run, out, method="sma", last=1, settle=0).poll_once()
    assert "merged" in [e.kind for e in events]


def test_lock_held_by_a_running_loop_is_a_watch_state_error(tmp_path, bf16_run):
    run, out = tmp_path / "run", tmp_path / "merged"
    run.mkdir()
    shutil.copytree(bf16_run / name(100), run / name(100))
    with pma.Watcher(run, out, method="sma", last=1, settle=0, interval=0.1) as following:
        next(iter(following))
        with pytest.raises(pma.WatchStateError, match="lock held"):
            pma.Watcher(run, out, method="sma", last=1, settle=0).poll_once()


def test_event_records_match_the_cli_log(tmp_path, bf16_run):
    # The CLI logs the same records (plus time and schema_version) to events.jsonl.
    run = tmp_path / "run"
    run.mkdir()
    for step in (100, 200):
        shutil.copytree(bf16_run / name(step), run / name(step))
        age(run / name(step), 10)
    api = pma.Watcher(run, tmp_path / "api", method="sma", last=2).poll_once()
    run_cli("watch", run, "--out", tmp_path / "cli", "--method", "sma", "--last", 2, "--once",
            "--quiet")
    log = (tmp_path / "cli" / ".pma-watch" / "events.jsonl").read_text().splitlines()
    cli = [json.loads(line) for line in log]
    assert [e.kind for e in api] == [r["event"] for r in cli]
    for event, record in zip(api, cli):
        mine = event.to_dict()
        for key in ("step", "members", "weights", "needed", "kind"):
            assert mine.get(key) == record.get(key)


def test_exec_runs_on_each_merged_output_like_pma_watch(tmp_path, bf16_run):
    run, out = tmp_path / "run", tmp_path / "merged"
    run.mkdir()
    seen = tmp_path / "seen.txt"
    # {} becomes the quoted output path; a failing command is recorded and the watcher goes on.
    watcher = pma.Watcher(run, out, method="sma", last=2, settle=0,
                          exec=f"echo {{}} >> '{seen}'; test -e {{}}/done")
    for step in STEPS[:3]:
        shutil.copytree(bf16_run / name(step), run / name(step))
        watcher.poll_once()
    shutil.copytree(bf16_run / name(400), run / name(400))
    (out / name(300) / "done").touch()  # makes no difference: exec runs on the NEW output
    events = watcher.poll_once()
    kinds = [e.kind for e in events]
    assert kinds.index("exec") == kinds.index("merged") + 1, kinds
    (done,) = [e for e in events if e.kind == "exec"]
    record = done.to_dict()
    assert done.output == out / name(400)
    assert record["success"] is False and record["code"] == 1
    assert record["command"] == f"echo '{out / name(400)}' >> '{seen}'; test -e '{out / name(400)}'/done"
    assert seen.read_text().split() == [str(out / name(s)) for s in (200, 300, 400)]
