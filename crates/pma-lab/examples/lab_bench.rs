//! Train and eval throughput of the lab on the embedded corpus.
//!
//! `cargo run --release -p pma-lab --example lab_bench -- [LAYERS HIDDEN HEADS BATCH SEQ STEPS [moe]]`
//! prints train tokens/s (steps after the first, which warms caches) and eval tokens/s.
use std::time::Instant;

use pma_lab::config::{default_intermediate_size, ModelConfig, ModelKind};
use pma_lab::eval::{evaluate, EvalConfig};
use pma_lab::schedule::ScheduleKind;
use pma_lab::train::{train, Progress, StepMetrics, TrainConfig};

struct Timer {
    started: std::cell::Cell<Option<Instant>>,
    tokens_after_first: std::cell::Cell<u64>,
    first_tokens: std::cell::Cell<u64>,
    last_loss: std::cell::Cell<f64>,
}

impl Progress for Timer {
    fn step(&self, m: &StepMetrics) {
        if self.started.get().is_none() {
            self.started.set(Some(Instant::now()));
            self.first_tokens.set(m.tokens);
        }
        self.tokens_after_first
            .set(m.tokens - self.first_tokens.get());
        self.last_loss.set(m.loss);
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, d: usize| a.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (layers, hidden, heads, batch, seq, steps) = (
        num(0, 4),
        num(1, 128),
        num(2, 4),
        num(3, 16),
        num(4, 128),
        num(5, 20),
    );
    let moe = a.get(6).is_some_and(|s| s == "moe");
    let out = std::env::temp_dir().join(format!("pma-lab-bench-{}", std::process::id()));
    let config = TrainConfig {
        model: ModelConfig {
            kind: if moe {
                ModelKind::Moe
            } else {
                ModelKind::Dense
            },
            num_layers: layers,
            hidden_size: hidden,
            intermediate_size: default_intermediate_size(hidden),
            num_heads: heads,
            num_kv_heads: heads,
            ..ModelConfig::default()
        },
        steps: steps as u64,
        batch_size: batch,
        seq_len: seq,
        schedule: ScheduleKind::Constant,
        save_every: 0,
        out_dir: out.clone(),
        ..TrainConfig::default()
    };
    let timer = Timer {
        started: Default::default(),
        tokens_after_first: Default::default(),
        first_tokens: Default::default(),
        last_loss: Default::default(),
    };
    let report = train(&config, &timer)?;
    let secs = timer
        .started
        .get()
        .map_or(0.0, |s| s.elapsed().as_secs_f64());
    println!(
        "model {} params {} L{layers} H{hidden} A{heads} B{batch} T{seq}: train {:.0} tokens/s (loss {:.4} after {steps} steps)",
        if moe { "moe" } else { "dense" },
        report.n_params,
        timer.tokens_after_first.get() as f64 / secs,
        timer.last_loss.get()
    );
    let started = Instant::now();
    let r = evaluate(
        &report.checkpoints[0],
        &EvalConfig {
            batch_size: batch,
            ..EvalConfig::default()
        },
    )?;
    println!(
        "eval {:.0} tokens/s ({} tokens, val_loss {:.4})",
        r.tokens as f64 / started.elapsed().as_secs_f64(),
        r.tokens,
        r.val_loss
    );
    std::fs::remove_dir_all(&out)?;
    Ok(())
}
