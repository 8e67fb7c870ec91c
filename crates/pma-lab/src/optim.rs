//! AdamW with global gradient-norm clipping, on host `f32` buffers.
//!
//! The update is PyTorch's `AdamW` (decoupled weight decay, Loshchilov & Hutter 2019):
//! ```text
//! p <- p - lr * wd * p                      (matrices only; norm weights are not decayed)
//! m <- b1 m + (1 - b1) g
//! v <- b2 v + (1 - b2) g^2
//! p <- p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
//! ```
//! with `g` first scaled by `min(1, clip / ||g||)`, `||g||` the global L2 norm over all
//! parameters. The moments live on the host so they can be saved and restored bit-exactly; the
//! update is a tight loop over a few million floats, cheap next to the forward and backward.

use candle_core::{backprop::GradStore, Tensor};
use rayon::prelude::{
    IndexedParallelIterator, IntoParallelRefIterator, IntoParallelRefMutIterator, ParallelIterator,
};

use crate::error::Result;
use crate::model::Params;

/// `t` (a gradient, or zeros where it is `None`) as a flat host `f32` vector of `var`'s size.
fn host_f32(t: Option<&Tensor>, var: &candle_core::Var) -> Result<Vec<f32>> {
    Ok(match t {
        Some(t) => t
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1()?,
        None => vec![0.0; var.elem_count()],
    })
}

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Global gradient-norm clip (0 disables).
    pub grad_clip: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: 1.0,
        }
    }
}

/// Optimizer state: the step count and both moments of every parameter, in [`Params`] order.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamW {
    /// Hyper-parameters.
    pub config: AdamWConfig,
    /// Updates taken so far (bias correction uses it).
    pub step: u64,
    /// First moments.
    pub exp_avg: Vec<Vec<f32>>,
    /// Second moments.
    pub exp_avg_sq: Vec<Vec<f32>>,
}

/// What one update saw.
#[derive(Debug, Clone, Copy)]
pub struct UpdateStats {
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

impl AdamW {
    /// Zero moments for `params`.
    pub fn new(config: AdamWConfig, params: &Params) -> AdamW {
        let zeros: Vec<Vec<f32>> = params
            .vars
            .iter()
            .map(|(_, v)| vec![0.0; v.elem_count()])
            .collect();
        AdamW {
            config,
            step: 0,
            exp_avg: zeros.clone(),
            exp_avg_sq: zeros,
        }
    }

    /// Applies one update with learning rate `lr`.
    ///
    /// Parameters are independent, so on the CPU they are read, updated and written back in
    /// parallel (one rayon task per parameter). Every float operation is the same, in the same
    /// order, as a sequential loop: each parameter's squared-gradient sum is taken alone, and
    /// those sums are added in [`Params`] order, so the result does not depend on the thread
    /// count.
    pub fn update(&mut self, params: &Params, grads: &GradStore, lr: f64) -> Result<UpdateStats> {
        // Device backends are not asked to serve several host threads at once: off the CPU the
        // same per-parameter steps run in order on this thread.
        let on_cpu = params.vars.iter().all(|(_, v)| v.device().is_cpu());
        let read_grad =
            |(_, var): &(String, candle_core::Var)| host_f32(grads.get(var.as_tensor()), var);
        let host_grads: Vec<Vec<f32>> = if on_cpu {
            params
                .vars
                .par_iter()
                .map(read_grad)
                .collect::<Result<_>>()?
        } else {
            params.vars.iter().map(read_grad).collect::<Result<_>>()?
        };
        let sq_sums: Vec<f64> = host_grads
            .par_iter()
            .map(|g| g.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>())
            .collect();
        let mut sq_sum = 0f64;
        for s in sq_sums {
            sq_sum += s;
        }
        let grad_norm = sq_sum.sqrt();
        let c = self.config;
        let clip = if c.grad_clip > 0.0 && grad_norm > c.grad_clip {
            (c.grad_clip / (grad_norm + 1e-6)) as f32
        } else {
            1.0
        };
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        let (b1, b2) = (c.beta1 as f32, c.beta2 as f32);
        let step_size = (lr / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let eps = c.eps as f32;
        type Slot<'a> = (
            (
                (&'a (String, candle_core::Var), &'a mut Vec<f32>),
                &'a mut Vec<f32>,
            ),
            &'a Vec<f32>,
        );
        let update_one = |((((_, var), m), v), g): Slot<'_>| -> Result<()> {
            let decay = if var.rank() >= 2 {
                (1.0 - lr * c.weight_decay) as f32
            } else {
                1.0
            };
            let mut p = host_f32(Some(var.as_tensor()), var)?;
            for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
                let g = g * clip;
                *p *= decay;
                *m = b1 * *m + (1.0 - b1) * g;
                *v = b2 * *v + (1.0 - b2) * g * g;
                *p -= step_size * *m / (v.sqrt() / bc2_sqrt + eps);
            }
            let new = Tensor::from_vec(p, var.shape(), var.device())?.to_dtype(var.dtype())?;
            var.set(&new)?;
            Ok(())
        };
        if on_cpu {
            params
                .vars
                .par_iter()
                .zip(self.exp_avg.par_iter_mut())
                .zip(self.exp_avg_sq.par_iter_mut())
                .zip(host_grads.par_iter())
                .try_for_each(update_one)?;
        } else {
            params
                .vars
                .iter()
                .zip(self.exp_avg.iter_mut())
                .zip(self.exp_avg_sq.iter_mut())
                .zip(host_grads.iter())
                .try_for_each(update_one)?;
        }
        Ok(UpdateStats { grad_norm })
    }
}
