//! The crash test: SIGKILL `pma watch` at random instants, restart it, and check that the state
//! is never torn, nothing is counted twice or skipped, and the final outputs and state are
//! byte-identical to an uninterrupted run. Runs for windowed SMA, incremental SMA and ema-stream
//! (with a separate output, and with the output linked to the state).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{f32_bytes, write_ckpt};
use pma_format::{Checkpoint, Dtype, SafetensorsFile};

const N_CKPTS: usize = 8;
const ELEMS: usize = 300_000;

fn make_run(run: &Path) -> Vec<u64> {
    (0..N_CKPTS)
        .map(|i| {
            let step = 100 * (i as u64 + 1);
            let w: Vec<f32> = (0..ELEMS)
                .map(|j| ((j * 7 + i * 13) % 1000) as f32 * 1e-3 - 0.5 + i as f32 * 0.01)
                .collect();
            let b: Vec<f32> = (0..1000)
                .map(|j| (j as f32 * 0.37 + i as f32).sin())
                .collect();
            write_ckpt(
                &run.join(format!("step-{step:07}")),
                &[
                    ("w", Dtype::F32, vec![ELEMS as u64], f32_bytes(&w)),
                    ("b", Dtype::F32, vec![10, 100], f32_bytes(&b)),
                ],
            );
            step
        })
        .collect()
}

fn pma_bin() -> PathBuf {
    assert_cmd::cargo::cargo_bin("pma")
}

fn watch_cmd(run: &Path, out: &Path, mode: &[&str]) -> std::process::Command {
    let mut c = std::process::Command::new(pma_bin());
    c.arg("watch").arg(run).arg("--out").arg(out);
    c.args(["--once", "--settle", "0", "--quiet", "--threads", "2"]);
    c.args(mode);
    c
}

/// Every file under `dir` except the state dir's lock and log, with its bytes.
fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(dir).unwrap().display().to_string();
            // Pin manifests record file times, which differ from run to run by nature.
            if rel.ends_with("lock")
                || rel.ends_with("events.jsonl")
                || rel.ends_with("pma-pin.json")
            {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((rel, std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// The committed state must always be whole: parseable, a prefix of the steps, and every file
/// it names present and valid.
fn check_not_torn(out: &Path, steps: &[u64], context: &str) {
    let sd = out.join(".pma-watch");
    let Ok(bytes) = std::fs::read(sd.join("state.json")) else {
        return; // nothing committed yet
    };
    let state: serde_json::Value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("{context}: state.json torn: {e}"));
    let processed: Vec<u64> = state["processed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(
        processed,
        steps[..processed.len()],
        "{context}: processed steps skip or repeat"
    );
    assert_eq!(
        state["generation"].as_u64().unwrap(),
        processed.len() as u64
    );
    if let Some(f) = state["tensor_file"].as_str() {
        let file = SafetensorsFile::open(&sd.join("tensors").join(f))
            .unwrap_or_else(|e| panic!("{context}: tensor state {f}: {e}"));
        let meta: serde_json::Value =
            serde_json::from_str(&file.header().metadata["pma_watch_state"]).unwrap();
        assert_eq!(meta["generation"], state["generation"], "{context}");
    }
    for m in state["members"].as_array().unwrap() {
        let pin = sd
            .join("pins")
            .join(format!("step-{:07}", m["step"].as_u64().unwrap()));
        Checkpoint::open(&pin).unwrap_or_else(|e| panic!("{context}: pin: {e}"));
    }
    for o in state["outputs"].as_array().unwrap() {
        Checkpoint::open(&out.join(o.as_str().unwrap()))
            .unwrap_or_else(|e| panic!("{context}: output {o}: {e}"));
    }
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// Runs trials until `want_kills` SIGKILLs have landed (or `4 * want_kills` trials have run),
/// returning how many landed. The kill instant is uniform over the shortest uninterrupted run
/// seen so far: a loaded machine can make the reference run slow and the trials fast, and a
/// window longer than a trial's run would let the trials finish unharmed.
fn kill_trials(mode: &[&str], want_kills: usize, rng: &mut Rng) -> usize {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    let steps = make_run(&run);
    let reference = d.path().join("reference");
    let started = Instant::now();
    let status = watch_cmd(&run, &reference, mode).status().unwrap();
    assert!(status.success());
    let mut window_ms = started.elapsed().as_millis() as u64;
    let want = tree(&reference);
    assert!(want.iter().any(|(p, _)| p.starts_with("step-0000800")));
    let mut kills = 0;
    let mut trial = 0;
    while kills < want_kills && trial < 4 * want_kills {
        let out = d.path().join(format!("trial-{trial}"));
        for attempt in 0.. {
            let context = format!("{mode:?} trial {trial} attempt {attempt}");
            let started = Instant::now();
            let mut child = watch_cmd(&run, &out, mode).spawn().unwrap();
            // Uniform over an uninterrupted run's length: the first attempt of a trial is
            // almost always killed, later ones (with less left to do) sometimes finish.
            std::thread::sleep(Duration::from_millis(rng.below(window_ms)));
            let killed = child.try_wait().unwrap().is_none();
            if killed {
                // SAFETY: killing our own child by pid.
                unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
                kills += 1;
            }
            let status = child.wait().unwrap();
            if !killed && attempt == 0 {
                window_ms = window_ms.min(started.elapsed().as_millis() as u64);
            }
            check_not_torn(&out, &steps, &context);
            if status.success() || attempt > 40 {
                break;
            }
        }
        // Finish whatever the last kill left.
        assert!(watch_cmd(&run, &out, mode).status().unwrap().success());
        let got = tree(&out);
        let names = |t: &[(String, Vec<u8>)]| t.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>();
        assert_eq!(names(&got), names(&want), "{mode:?} trial {trial}: files");
        for ((p, a), (_, b)) in got.iter().zip(&want) {
            assert!(
                a == b,
                "{mode:?} trial {trial}: {p} differs from the uninterrupted run"
            );
        }
        trial += 1;
    }
    kills
}

#[test]
fn sigkill_at_random_points_never_tears_double_counts_or_skips() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("kill test seed {seed}");
    let mut rng = Rng(seed);
    let mut kills = Vec::new();
    let ema = |state_dtype| {
        [
            "--method",
            "ema-stream",
            "--alpha",
            "0.3",
            "--state-dtype",
            state_dtype,
        ]
    };
    let (ema64, ema32) = (ema("f64"), ema("f32"));
    for (mode, want_kills) in [
        (&["--method", "sma", "--last", "3"][..], 8),
        (&["--method", "sma", "--incremental", "--last", "3"], 8),
        // f64 state, f32 output: state and output written separately.
        (&ema64[..], 6),
        // f32 state = f32 output: the output is a hard link to the state file.
        (&ema32[..], 6),
    ] {
        kills.push((mode[1..].join(" "), kill_trials(mode, want_kills, &mut rng)));
    }
    eprintln!("SIGKILLs delivered: {kills:?}");
    for (mode, k) in &kills {
        assert!(*k >= 4, "{mode}: only {k} kills landed (seed {seed})");
    }
}
