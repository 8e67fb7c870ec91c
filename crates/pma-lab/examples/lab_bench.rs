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
    // As `pma` does, before any thread exists.
    pma_lab::train::tune_cpu_runtime();
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
    phases(&config)?;
    Ok(())
}

/// Seconds per step spent in forward, backward and the optimizer update.
fn phases(config: &TrainConfig) -> Result<(), Box<dyn std::error::Error>> {
    use candle_core::{DType, Device, Tensor};
    use pma_lab::model::Params;
    use pma_lab::optim::{AdamW, AdamWConfig};
    let (params, model) = Params::init(&config.model, 1, DType::F32, &Device::Cpu)?;
    let mut opt = AdamW::new(AdamWConfig::default(), &params);
    let (b, t) = (config.batch_size, config.seq_len);
    let tokens = pma_lab::data::encode_bytes(&pma_lab::data::MOBY_DICK[..b * (t + 1)]);
    let x: Vec<u32> = tokens.chunks(t + 1).flat_map(|w| w[..t].to_vec()).collect();
    let y: Vec<u32> = tokens.chunks(t + 1).flat_map(|w| w[1..].to_vec()).collect();
    let x = Tensor::from_vec(x, (b, t), &Device::Cpu)?;
    let y = Tensor::from_vec(y, (b, t), &Device::Cpu)?;
    let (mut f, mut bw, mut u) = (0.0, 0.0, 0.0);
    let n = 5;
    for _ in 0..n {
        let s = Instant::now();
        let loss = model.loss(&x, &y)?;
        f += s.elapsed().as_secs_f64();
        let s = Instant::now();
        let grads = loss.total.backward()?;
        bw += s.elapsed().as_secs_f64();
        let s = Instant::now();
        opt.update(&params, &grads, 1e-3)?;
        u += s.elapsed().as_secs_f64();
    }
    let n = n as f64;
    println!(
        "per step: forward {:.3}s backward {:.3}s update {:.3}s",
        f / n,
        bw / n,
        u / n
    );
    Ok(())
}
