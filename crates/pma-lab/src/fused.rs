//! Fused CPU kernels with backward passes, for the element-wise hot spots of training.
//!
//! candle's CPU backend runs each primitive op as its own pass over memory, and autograd keeps
//! every intermediate. For a model this small that, not the matmuls, is most of the time. These
//! `CustomOp`s do RMSNorm, the causal softmax of attention, SiLU·mul and per-row cross-entropy
//! in one pass each, rows in parallel, with hand-written gradients. They run on the CPU only;
//! [`crate::model`] falls back to the primitive-op versions on other devices, and the tests check
//! that both paths agree and that the gradients match finite differences.
//!
//! Inputs must be contiguous (callers make them so). Arithmetic is done in the tensor's own dtype.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::{IndexedParallelIterator, ParallelIterator, ParallelSlice, ParallelSliceMut};

fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, name: &'static str) -> Result<&'a [T]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{name}: input must be contiguous")))?;
    Ok(&s.as_slice::<T>()?[start..end])
}

fn host<T: WithDType>(t: &Tensor) -> Result<Vec<T>> {
    t.flatten_all()?.to_vec1::<T>()
}

fn unsupported(name: &'static str, dtype: DType) -> candle_core::Error {
    candle_core::Error::Msg(format!("{name}: dtype {dtype:?} not supported (f32, f64)"))
}

/// The float types the kernels run in, natively (f32 math for f32 tensors).
pub(crate) trait Real: WithDType {
    fn exp(self) -> Self;
    fn sqrt(self) -> Self;
    fn ln(self) -> Self;
    fn neg_infinity() -> Self;
    fn maximum(self, other: Self) -> Self;
}

macro_rules! real {
    ($t:ty) => {
        impl Real for $t {
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            fn neg_infinity() -> Self {
                <$t>::NEG_INFINITY
            }
            fn maximum(self, other: Self) -> Self {
                <$t>::max(self, other)
            }
        }
    };
}
real!(f32);
real!(f64);

/// Rows of at least this many elements are worth a rayon task each.
fn rows_per_task(row_len: usize) -> usize {
    (4096 / row_len.max(1)).max(1)
}

// ---------------------------------------------------------------------------------------------
// RMSNorm: y = x * r * w, r = 1 / sqrt(mean(x^2) + eps), over the last dim.
// Backward, with g = dy * w:  dx = r * (g - x * r^2 * mean(g * x)),  dw = sum_rows dy * x * r.

/// `rms_norm(x, w)` over the last dim.
pub(crate) struct RmsNorm {
    pub(crate) eps: f64,
}

fn rms_fwd<T: Real>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
    let h = w.len();
    let (inv_h, eps) = (T::from_f64(1.0 / h as f64), T::from_f64(eps));
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(h * rows_per_task(h))
        .zip(x.par_chunks(h * rows_per_task(h)))
        .for_each(|(ys, xs)| {
            for (yr, xr) in ys.chunks_mut(h).zip(xs.chunks(h)) {
                let ms = xr.iter().fold(T::zero(), |a, &v| a + v * v) * inv_h;
                let r = T::one() / (ms + eps).sqrt();
                for ((o, &v), &wv) in yr.iter_mut().zip(xr).zip(w) {
                    *o = v * r * wv;
                }
            }
        });
    y
}

fn rms_bwd<T: Real>(x: &[T], w: &[T], dy: &[T], eps: f64) -> (Vec<T>, Vec<T>) {
    let h = w.len();
    let (inv_h, eps) = (T::from_f64(1.0 / h as f64), T::from_f64(eps));
    let mut dx = vec![T::zero(); x.len()];
    let chunk = h * rows_per_task(h);
    let dw_parts: Vec<Vec<T>> = dx
        .par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk).zip(dy.par_chunks(chunk)))
        .map(|(dxs, (xs, dys))| {
            let mut dw = vec![T::zero(); h];
            for ((dxr, xr), dyr) in dxs.chunks_mut(h).zip(xs.chunks(h)).zip(dys.chunks(h)) {
                let ms = xr.iter().fold(T::zero(), |a, &v| a + v * v) * inv_h;
                let r = T::one() / (ms + eps).sqrt();
                let mut gx = T::zero();
                for i in 0..h {
                    gx += dyr[i] * w[i] * xr[i];
                    dw[i] += dyr[i] * xr[i] * r;
                }
                let c = r * r * gx * inv_h;
                for i in 0..h {
                    dxr[i] = r * (dyr[i] * w[i] - xr[i] * c);
                }
            }
            dw
        })
        .collect();
    let mut dw = vec![T::zero(); h];
    for part in dw_parts {
        for (a, b) in dw.iter_mut().zip(part) {
            *a += b;
        }
    }
    (dx, dw)
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "pma-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match s1.dtype() {
            DType::F32 => f32::to_cpu_storage_owned(rms_fwd(
                slice::<f32>(s1, l1, "rms")?,
                slice(s2, l2, "rms")?,
                self.eps,
            )),
            DType::F64 => f64::to_cpu_storage_owned(rms_fwd(
                slice::<f64>(s1, l1, "rms")?,
                slice(s2, l2, "rms")?,
                self.eps,
            )),
            d => return Err(unsupported("rms", d)),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = match x.dtype() {
            DType::F32 => {
                let (dx, dw) = rms_bwd(&host::<f32>(x)?, &host(w)?, &host(dy)?, self.eps);
                (
                    Tensor::from_vec(dx, x.shape(), x.device())?,
                    Tensor::from_vec(dw, w.shape(), w.device())?,
                )
            }
            DType::F64 => {
                let (dx, dw) = rms_bwd(&host::<f64>(x)?, &host(w)?, &host(dy)?, self.eps);
                (
                    Tensor::from_vec(dx, x.shape(), x.device())?,
                    Tensor::from_vec(dw, w.shape(), w.device())?,
                )
            }
            d => return Err(unsupported("rms", d)),
        };
        Ok((Some(dx), Some(dw)))
    }
}

// ---------------------------------------------------------------------------------------------
// Causal softmax over the last dim of [.., T, T] scores: y = softmax(scale * x) over j <= i
// (row i of each T x T block), 0 above the diagonal.
// Backward: dx_j = scale * y_j * (dy_j - sum_k dy_k y_k).

/// Scaled, causally masked softmax.
pub(crate) struct CausalSoftmax {
    pub(crate) scale: f64,
}

fn csm_fwd<T: Real>(x: &[T], t: usize, scale: f64) -> Vec<T> {
    let scale = T::from_f64(scale);
    let mut y = vec![T::zero(); x.len()];
    let chunk = t * t;
    y.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(yb, xb)| {
            for i in 0..t {
                let (xr, yr) = (&xb[i * t..i * t + i + 1], &mut yb[i * t..i * t + i + 1]);
                let m = xr
                    .iter()
                    .fold(T::neg_infinity(), |a, &v| a.maximum(v * scale));
                let mut s = T::zero();
                for (o, &v) in yr.iter_mut().zip(xr) {
                    *o = (v * scale - m).exp();
                    s += *o;
                }
                let inv = T::one() / s;
                for o in yr.iter_mut() {
                    *o *= inv;
                }
            }
        });
    y
}

fn csm_bwd<T: Real>(y: &[T], dy: &[T], t: usize, scale: f64) -> Vec<T> {
    let scale = T::from_f64(scale);
    let mut dx = vec![T::zero(); y.len()];
    let chunk = t * t;
    dx.par_chunks_mut(chunk)
        .zip(y.par_chunks(chunk).zip(dy.par_chunks(chunk)))
        .for_each(|(dxb, (yb, dyb))| {
            for i in 0..t {
                let r = i * t..i * t + i + 1;
                let dot = yb[r.clone()]
                    .iter()
                    .zip(&dyb[r.clone()])
                    .fold(T::zero(), |a, (&p, &d)| a + p * d);
                for j in r {
                    dxb[j] = scale * yb[j] * (dyb[j] - dot);
                }
            }
        });
    dx
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "pma-causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let t = *l.dims().last().unwrap_or(&0);
        let out = match s.dtype() {
            DType::F32 => {
                f32::to_cpu_storage_owned(csm_fwd(slice::<f32>(s, l, "softmax")?, t, self.scale))
            }
            DType::F64 => {
                f64::to_cpu_storage_owned(csm_fwd(slice::<f64>(s, l, "softmax")?, t, self.scale))
            }
            d => return Err(unsupported("softmax", d)),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let t = x.dim(candle_core::D::Minus1)?;
        let dx = match x.dtype() {
            DType::F32 => Tensor::from_vec(
                csm_bwd(&host::<f32>(y)?, &host(dy)?, t, self.scale),
                x.shape(),
                x.device(),
            )?,
            DType::F64 => Tensor::from_vec(
                csm_bwd(&host::<f64>(y)?, &host(dy)?, t, self.scale),
                x.shape(),
                x.device(),
            )?,
            d => return Err(unsupported("softmax", d)),
        };
        Ok(Some(dx))
    }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU gate: y = silu(g) * u, silu(g) = g * s, s = sigmoid(g).
// Backward: dg = dy * u * s * (1 + g * (1 - s)),  du = dy * g * s.

/// `silu(g) * u`.
pub(crate) struct SiluMul;

fn sig<T: Real>(g: T) -> T {
    T::one() / (T::one() + (T::zero() - g).exp())
}

fn silu_mul_fwd<T: Real>(g: &[T], u: &[T]) -> Vec<T> {
    let mut y = vec![T::zero(); g.len()];
    y.par_chunks_mut(4096)
        .zip(g.par_chunks(4096).zip(u.par_chunks(4096)))
        .for_each(|(ys, (gs, us))| {
            for ((o, &g), &u) in ys.iter_mut().zip(gs).zip(us) {
                *o = g * sig(g) * u;
            }
        });
    y
}

fn silu_mul_bwd<T: Real>(g: &[T], u: &[T], dy: &[T]) -> (Vec<T>, Vec<T>) {
    let mut dg = vec![T::zero(); g.len()];
    let mut du = vec![T::zero(); g.len()];
    dg.par_chunks_mut(4096)
        .zip(du.par_chunks_mut(4096))
        .zip(
            g.par_chunks(4096)
                .zip(u.par_chunks(4096))
                .zip(dy.par_chunks(4096)),
        )
        .for_each(|((dgs, dus), ((gs, us), dys))| {
            for i in 0..gs.len() {
                let (g, u, d) = (gs[i], us[i], dys[i]);
                let s = sig(g);
                dgs[i] = d * u * s * (T::one() + g * (T::one() - s));
                dus[i] = d * g * s;
            }
        });
    (dg, du)
}

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "pma-silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match s1.dtype() {
            DType::F32 => f32::to_cpu_storage_owned(silu_mul_fwd(
                slice::<f32>(s1, l1, "silu")?,
                slice(s2, l2, "silu")?,
            )),
            DType::F64 => f64::to_cpu_storage_owned(silu_mul_fwd(
                slice::<f64>(s1, l1, "silu")?,
                slice(s2, l2, "silu")?,
            )),
            d => return Err(unsupported("silu", d)),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = match g.dtype() {
            DType::F32 => {
                let (a, b) = silu_mul_bwd(&host::<f32>(g)?, &host(u)?, &host(dy)?);
                (
                    Tensor::from_vec(a, g.shape(), g.device())?,
                    Tensor::from_vec(b, u.shape(), u.device())?,
                )
            }
            DType::F64 => {
                let (a, b) = silu_mul_bwd(&host::<f64>(g)?, &host(u)?, &host(dy)?);
                (
                    Tensor::from_vec(a, g.shape(), g.device())?,
                    Tensor::from_vec(b, u.shape(), u.device())?,
                )
            }
            d => return Err(unsupported("silu", d)),
        };
        Ok((Some(dg), Some(du)))
    }
}

// ---------------------------------------------------------------------------------------------
// Per-row cross-entropy: nll_n = logsumexp(z_n) - z_n[t_n], for logits z [N, V], targets t [N].
// Backward: dz_n = dnll_n * (softmax(z_n) - onehot(t_n)); targets get no gradient.

/// Per-row negative log-likelihood; the targets (u32) are the second argument.
pub(crate) struct RowNll;

/// `(max, sum exp(z - max))` of a row.
fn row_lse<T: Real>(zr: &[T]) -> (T, T) {
    let m = zr.iter().fold(T::neg_infinity(), |a, &v| a.maximum(v));
    (m, zr.iter().fold(T::zero(), |a, &v| a + (v - m).exp()))
}

fn nll_fwd<T: Real>(z: &[T], t: &[u32], v: usize) -> Vec<T> {
    let mut out = vec![T::zero(); t.len()];
    let per = rows_per_task(v);
    out.par_chunks_mut(per)
        .zip(z.par_chunks(v * per).zip(t.par_chunks(per)))
        .for_each(|(os, (zs, ts))| {
            for ((o, zr), &tv) in os.iter_mut().zip(zs.chunks(v)).zip(ts) {
                let (m, s) = row_lse(zr);
                *o = m + s.ln() - zr[tv as usize];
            }
        });
    out
}

fn nll_bwd<T: Real>(z: &[T], t: &[u32], dnll: &[T], v: usize) -> Vec<T> {
    let mut dz = vec![T::zero(); z.len()];
    let per = rows_per_task(v);
    dz.par_chunks_mut(v * per)
        .zip(
            z.par_chunks(v * per)
                .zip(t.par_chunks(per).zip(dnll.par_chunks(per))),
        )
        .for_each(|(dzs, (zs, (ts, ds)))| {
            for (((dzr, zr), &tv), &d) in dzs.chunks_mut(v).zip(zs.chunks(v)).zip(ts).zip(ds) {
                let (m, s) = row_lse(zr);
                let scale = d / s;
                for (o, &x) in dzr.iter_mut().zip(zr) {
                    *o = scale * (x - m).exp();
                }
                dzr[tv as usize] -= d;
            }
        });
    dz
}

impl CustomOp2 for RowNll {
    fn name(&self) -> &'static str {
        "pma-row-nll"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, v) = l1.shape().dims2()?;
        let t = slice::<u32>(s2, l2, "nll")?;
        if t.len() != n || t.iter().any(|&x| x as usize >= v) {
            return Err(candle_core::Error::Msg(format!(
                "nll: {} targets for {n} rows of {v} logits, or a target out of range",
                t.len()
            )));
        }
        let out = match s1.dtype() {
            DType::F32 => f32::to_cpu_storage_owned(nll_fwd(slice::<f32>(s1, l1, "nll")?, t, v)),
            DType::F64 => f64::to_cpu_storage_owned(nll_fwd(slice::<f64>(s1, l1, "nll")?, t, v)),
            d => return Err(unsupported("nll", d)),
        };
        Ok((out, Shape::from(n)))
    }

    fn bwd(
        &self,
        z: &Tensor,
        t: &Tensor,
        _res: &Tensor,
        dnll: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let v = z.dim(1)?;
        let targets = host::<u32>(t)?;
        let dz = match z.dtype() {
            DType::F32 => Tensor::from_vec(
                nll_bwd(&host::<f32>(z)?, &targets, &host(dnll)?, v),
                z.shape(),
                z.device(),
            )?,
            DType::F64 => Tensor::from_vec(
                nll_bwd(&host::<f64>(z)?, &targets, &host(dnll)?, v),
                z.shape(),
                z.device(),
            )?,
            d => return Err(unsupported("nll", d)),
        };
        Ok((Some(dz), None))
    }
}

// ---------------------------------------------------------------------------------------------
// RoPE on [B, N, T, D] in HF's rotate_half layout, with c = cos[t, i], s = sin[t, i], h = D/2:
//   y_i = x_i c - x_{i+h} s,   y_{i+h} = x_{i+h} c + x_i s            (i < h)
// The map is a rotation R of each (x_i, x_{i+h}) pair, so the backward is R^T:
//   dx_i = dy_i c + dy_{i+h} s,   dx_{i+h} = dy_{i+h} c - dy_i s.

/// Rotary position embedding with precomputed `[T, D/2]` tables.
pub(crate) struct Rotary {
    pub(crate) cos: Vec<f64>,
    pub(crate) sin: Vec<f64>,
    pub(crate) t: usize,
    pub(crate) half: usize,
}

impl Rotary {
    fn apply<T: Real>(&self, x: &[T], inverse: bool) -> Vec<T> {
        let (t, h) = (self.t, self.half);
        let mut y = vec![T::zero(); x.len()];
        let chunk = t * 2 * h;
        y.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk))
            .for_each(|(yb, xb)| {
                for p in 0..t {
                    let (yr, xr) = (
                        &mut yb[p * 2 * h..(p + 1) * 2 * h],
                        &xb[p * 2 * h..(p + 1) * 2 * h],
                    );
                    for i in 0..h {
                        let c = T::from_f64(self.cos[p * h + i]);
                        let s = T::from_f64(self.sin[p * h + i]);
                        let (a, b) = (xr[i], xr[i + h]);
                        if inverse {
                            yr[i] = a * c + b * s;
                            yr[i + h] = b * c - a * s;
                        } else {
                            yr[i] = a * c - b * s;
                            yr[i + h] = b * c + a * s;
                        }
                    }
                }
            });
        y
    }

    fn check(&self, l: &Layout) -> Result<()> {
        let dims = l.dims();
        let ok = dims.len() == 4 && dims[2] == self.t && dims[3] == 2 * self.half;
        if ok {
            Ok(())
        } else {
            Err(candle_core::Error::Msg(format!(
                "rope: expected [B, N, {}, {}], got {dims:?}",
                self.t,
                2 * self.half
            )))
        }
    }
}

impl CustomOp1 for Rotary {
    fn name(&self) -> &'static str {
        "pma-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.check(l)?;
        let out = match s.dtype() {
            DType::F32 => f32::to_cpu_storage_owned(self.apply(slice::<f32>(s, l, "rope")?, false)),
            DType::F64 => f64::to_cpu_storage_owned(self.apply(slice::<f64>(s, l, "rope")?, false)),
            d => return Err(unsupported("rope", d)),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let dx = match x.dtype() {
            DType::F32 => {
                Tensor::from_vec(self.apply(&host::<f32>(dy)?, true), x.shape(), x.device())?
            }
            DType::F64 => {
                Tensor::from_vec(self.apply(&host::<f64>(dy)?, true), x.shape(), x.device())?
            }
            d => return Err(unsupported("rope", d)),
        };
        Ok(Some(dx))
    }
}
