//! Evaluation: validation loss, perplexity, bits per byte and next-token accuracy.
//!
//! The token stream is cut into consecutive non-overlapping windows of `seq_len` tokens, the
//! last partial window dropped. In each window, positions `1..seq_len` are predicted from their
//! prefix, so a window contributes `seq_len - 1` predictions. `val_loss` is the mean of
//! `-ln p(target)` over every prediction, summed in f64 so the result does not depend on
//! batching. With byte tokens one prediction is one byte, so `bpb = val_loss / ln 2`.
//!
//! Without explicit files the data is the validation split of the embedded corpus (its last 5%);
//! with files it is their whole concatenation. Any checkpoint with a Llama or Mixtral
//! `config.json` is accepted, in any float dtype, single-file or sharded.

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::checkpoint;
use crate::data::{encode_bytes, eval_windows, split_tokens, DataSource};
use crate::error::{Error, Result};
use crate::model::{token_losses, Llama};
use crate::train::default_device;

/// What to evaluate on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalConfig {
    /// `Embedded`: the validation split; `Files`: all of them.
    pub data: DataSource,
    /// Window length; `None` is the model's `max_position_embeddings` (its training length).
    pub seq_len: Option<usize>,
    /// Windows per forward pass (affects speed only).
    pub batch_size: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            data: DataSource::Embedded,
            seq_len: None,
            batch_size: 16,
        }
    }
}

/// The numbers for one checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// The checkpoint evaluated.
    pub checkpoint: PathBuf,
    /// Mean next-token cross-entropy, nats per token.
    pub val_loss: f64,
    /// `exp(val_loss)`.
    pub ppl: f64,
    /// Bits per byte of predicted text.
    pub bpb: f64,
    /// Fraction of predictions whose argmax is the target.
    pub accuracy: f64,
    /// Predictions counted.
    pub tokens: u64,
}

/// The token stream an [`EvalConfig`] selects.
pub fn eval_tokens(data: &DataSource) -> Result<Vec<u32>> {
    let tokens = encode_bytes(&data.load()?);
    Ok(match data {
        DataSource::Embedded => split_tokens(&tokens).validation,
        DataSource::Files(_) => tokens,
    })
}

/// Evaluates one checkpoint.
pub fn evaluate(checkpoint: &Path, config: &EvalConfig) -> Result<EvalReport> {
    let tokens = eval_tokens(&config.data)?;
    evaluate_on(checkpoint, &tokens, config)
}

/// Evaluates one checkpoint on an already tokenised stream (to share it across checkpoints).
pub fn evaluate_on(checkpoint: &Path, tokens: &[u32], config: &EvalConfig) -> Result<EvalReport> {
    let device = default_device();
    let model = checkpoint::load_model(checkpoint, DType::F32, &device)?;
    let seq_len = config
        .seq_len
        .unwrap_or(model.config.max_position_embeddings);
    let (sum_nll, n_correct, n) = score(&model, tokens, seq_len, config.batch_size.max(1))?;
    let val_loss = sum_nll / n as f64;
    Ok(EvalReport {
        checkpoint: checkpoint.to_path_buf(),
        val_loss,
        ppl: val_loss.exp(),
        bpb: val_loss / std::f64::consts::LN_2,
        accuracy: n_correct as f64 / n as f64,
        tokens: n,
    })
}

/// Sum of `-ln p`, correct argmaxes and prediction count over all windows.
pub fn score(
    model: &Llama,
    tokens: &[u32],
    seq_len: usize,
    batch_size: usize,
) -> Result<(f64, u64, u64)> {
    if seq_len < 2 || tokens.len() < seq_len {
        return Err(Error::CorpusTooSmall {
            what: "eval data",
            n_tokens: tokens.len(),
            window_tokens: seq_len.max(2),
        });
    }
    let device = model.embed_tokens.device().clone();
    let windows: Vec<&[u32]> = eval_windows(tokens, seq_len).collect();
    let (mut sum_nll, mut n_correct, mut n) = (0f64, 0u64, 0u64);
    for batch in windows.chunks(batch_size) {
        let b = batch.len();
        let inputs: Vec<u32> = batch
            .iter()
            .flat_map(|w| w[..seq_len - 1].iter().copied())
            .collect();
        let targets: Vec<u32> = batch.iter().flat_map(|w| w[1..].iter().copied()).collect();
        let inputs = Tensor::from_vec(inputs, (b, seq_len - 1), &device)?;
        let targets = Tensor::from_vec(targets, b * (seq_len - 1), &device)?;
        let logits = model.forward(&inputs)?.logits;
        let (nll, correct) = token_losses(&logits, &targets)?;
        sum_nll += nll.iter().sum::<f64>();
        n_correct += correct.iter().filter(|&&c| c).count() as u64;
        n += nll.len() as u64;
    }
    Ok((sum_nll, n_correct, n))
}
