//! `pma-lab`: a small but real pre-training lab for Llama-style language models on candle.
//!
//! It trains dense (Llama) and mixture-of-experts (Mixtral) decoders on bytes of text, writes
//! HF-layout checkpoints that `transformers` and `pma merge` read as they are, and evaluates any
//! such checkpoint. It is the only pma crate that depends on candle.
//!
//! - [`config::ModelConfig`]: model shape; writes and reads HF `config.json`.
//! - [`model::Llama`]: the decoder, built only from differentiable ops; [`model::Params`] holds
//!   its trainable variables by HF name.
//! - [`data`]: the embedded *Moby-Dick* corpus, byte tokens, the 95/5 split, seeded windows.
//! - [`schedule`]: constant, WSD (linear / cosine / 1-sqrt decay) and cosine LR schedules.
//! - [`optim::AdamW`]: AdamW with global-norm clipping and savable moments.
//! - [`checkpoint`]: `step-XXXXXXX/` directories and loading from any merge output.
//! - [`train::train`] runs a [`train::TrainConfig`] and reports through a [`train::Progress`];
//!   [`eval::evaluate`] scores a checkpoint.
//!
//! ```no_run
//! use pma_lab::eval::{evaluate, EvalConfig};
//! use pma_lab::schedule::ScheduleKind;
//! use pma_lab::train::{train, NoProgress, TrainConfig};
//!
//! # fn main() -> pma_lab::Result<()> {
//! // A constant-LR run that checkpoints every 100 steps.
//! let base = TrainConfig {
//!     steps: 1000,
//!     schedule: ScheduleKind::Constant,
//!     save_every: 100,
//!     out_dir: "runs/base".into(),
//!     ..TrainConfig::default()
//! };
//! let report = train(&base, &NoProgress)?;
//! // Fork an annealing run from step 500: a pure 1-sqrt decay over 200 steps.
//! let anneal = TrainConfig {
//!     init: Some("runs/base/step-0000500".into()),
//!     steps: 200,
//!     schedule: ScheduleKind::Wsd,
//!     warmup_steps: Some(0),
//!     decay_steps: Some(200),
//!     out_dir: "runs/anneal-500".into(),
//!     ..base.clone()
//! };
//! train(&anneal, &NoProgress)?;
//! let last = report.checkpoints.last().expect("a run always saves its last step");
//! println!("{}", evaluate(last, &EvalConfig::default())?.val_loss);
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

pub mod checkpoint;
pub mod config;
pub mod data;
mod error;
pub mod eval;
mod fused;
pub mod model;
pub mod optim;
pub mod rng;
pub mod schedule;
pub mod train;

pub use error::{Error, Result};
