//! Annealing forks of the trunk, and whether a merge at constant LR predicts them.

use crate::results::{PredictionRecord, Results};

/// For every annealed model, the best trunk merge ending at the same step.
pub(super) fn predictions(results: &Results) -> Vec<PredictionRecord> {
    let mut out = Vec::new();
    for a in &results.annealed {
        let Some(raw) = results.checkpoint(&a.base_run, a.step) else {
            continue;
        };
        let k = if a.base_run == "moe" {
            results.config.moe.save_every
        } else {
            results.config.save_every
        };
        let best = results
            .merges
            .iter()
            .filter(|m| m.run == a.base_run && m.step == a.step && m.interval == k)
            .min_by(|x, y| x.val_loss.total_cmp(&y.val_loss));
        if let Some(m) = best {
            let improvement = raw.val_loss - a.val_loss;
            out.push(PredictionRecord {
                run: a.base_run.clone(),
                step: a.step,
                tokens: a.tokens,
                annealed_loss: a.val_loss,
                raw_loss: raw.val_loss,
                merge_id: m.id.clone(),
                merge_loss: m.val_loss,
                gap: m.val_loss - a.val_loss,
                recovered_fraction: if improvement.abs() > 0.0 {
                    (raw.val_loss - m.val_loss) / improvement
                } else {
                    f64::NAN
                },
            });
        }
    }
    out
}
