//! Fused CPU kernels with backward passes, for the element-wise hot spots of training.
//!
//! candle's CPU backend runs each primitive op as its own pass over memory, and autograd keeps
//! every intermediate. For a model this small that, not the matmuls, is most of the time. These
//! `CustomOp`s do RMSNorm, SiLU·mul and per-row cross-entropy in one pass each, rows in
//! parallel, and causal attention (RoPE, grouped KV heads, softmax, both matmuls) in one op, one
//! (batch, head) per task, with hand-written gradients. They run on the CPU only;
//! [`crate::model`] falls back to the primitive-op versions on other devices, and the tests check
//! that both paths agree and that the gradients match finite differences.
//!
//! Inputs must be contiguous (callers make them so). Arithmetic is done in the tensor's own dtype.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::{
    IndexedParallelIterator, IntoParallelIterator, ParallelIterator, ParallelSlice,
    ParallelSliceMut,
};

fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, name: &'static str) -> Result<&'a [T]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{name}: input must be contiguous")))?;
    Ok(&s.as_slice::<T>()?[start..end])
}

fn host<T: WithDType>(t: &Tensor) -> Result<Vec<T>> {
    t.flatten_all()?.to_vec1::<T>()
}

/// `f` on the CPU buffers of `ts` (each made contiguous first), borrowed rather than copied: a
/// backward pass would otherwise spend a serial copy of every input before its parallel work.
fn with_host<T: WithDType, R>(
    ts: &[&Tensor],
    name: &'static str,
    f: impl FnOnce(&[&[T]]) -> R,
) -> Result<R> {
    let ts: Vec<Tensor> = ts.iter().map(|t| t.contiguous()).collect::<Result<_>>()?;
    let views: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let slices: Vec<&[T]> = views
        .iter()
        .map(|(s, l)| match &**s {
            candle_core::Storage::Cpu(c) => slice::<T>(c, l, name),
            _ => Err(candle_core::Error::Msg(format!("{name}: CPU only"))),
        })
        .collect::<Result<_>>()?;
    Ok(f(&slices))
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

/// `e^x` in f32 without a libm call, so loops over it vectorise: `x = n ln2 + r` with
/// `|r| <= ln2/2`, `e^r` by Cephes' `expf` polynomial (about 1 ulp), times `2^n` built in the
/// exponent bits. `x` is clamped to `[-87.3, 88]`, where `2^n` stays a normal float: below, the
/// result is about 1e-38 rather than a subnormal or 0, which no softmax or sigmoid here can
/// tell apart. NaN stays NaN, so a diverged step is still seen.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer, branch-free.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.33, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_2e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    er * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

macro_rules! real {
    ($t:ty, $exp:expr) => {
        impl Real for $t {
            #[inline(always)]
            fn exp(self) -> Self {
                $exp(self)
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
// f64 keeps libm's exp: it is the reference precision the tests check the kernels in.
real!(f32, exp_f32);
real!(f64, f64::exp);

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
                let (dx, dw) = with_host::<f32, _>(&[x, w, dy], "rms", |s| {
                    rms_bwd(s[0], s[1], s[2], self.eps)
                })?;
                (
                    Tensor::from_vec(dx, x.shape(), x.device())?,
                    Tensor::from_vec(dw, w.shape(), w.device())?,
                )
            }
            DType::F64 => {
                let (dx, dw) = with_host::<f64, _>(&[x, w, dy], "rms", |s| {
                    rms_bwd(s[0], s[1], s[2], self.eps)
                })?;
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
                let (a, b) =
                    with_host::<f32, _>(&[g, u, dy], "silu", |s| silu_mul_bwd(s[0], s[1], s[2]))?;
                (
                    Tensor::from_vec(a, g.shape(), g.device())?,
                    Tensor::from_vec(b, u.shape(), u.device())?,
                )
            }
            DType::F64 => {
                let (a, b) =
                    with_host::<f64, _>(&[g, u, dy], "silu", |s| silu_mul_bwd(s[0], s[1], s[2]))?;
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
                with_host::<f32, _>(&[z, dnll], "nll", |s| nll_bwd(s[0], &targets, s[1], v))?,
                z.shape(),
                z.device(),
            )?,
            DType::F64 => Tensor::from_vec(
                with_host::<f64, _>(&[z, dnll], "nll", |s| nll_bwd(s[0], &targets, s[1], v))?,
                z.shape(),
                z.device(),
            )?,
            d => return Err(unsupported("nll", d)),
        };
        Ok((Some(dz), None))
    }
}

// ---------------------------------------------------------------------------------------------
// Causal self-attention with RoPE and grouped KV heads, on the projections' own [B*T, N*D]
// layout, so no transposes, `contiguous` copies or [B, N, T, T] tensors enter the graph.
// Per (batch, head), with c = scale and rows taken in tiles of ATTN_TILE:
//   Qr, Kr = rope(Q), rope(K);  S = c Qr Kr^T (j <= i);  P = softmax(S);  O = P V
// Backward (P recomputed per tile rather than kept, as flash attention does):
//   dV += P^T dO;  dP = dO V^T;  dS = c P (dP - rowsum(P dP));  dQr = dS Kr;  dKr += dS^T Qr
// and dQ, dK are dQr, dKr rotated back (RoPE is a rotation, so its backward is its transpose).
// A task owns one (batch, KV head) in the backward, so the heads sharing it add into dK and dV
// in a fixed order and no two tasks write the same element: results do not depend on threads.

/// Rows of scores computed at once; a tile needs only `ATTN_TILE x T` scratch per task.
const ATTN_TILE: usize = 64;

/// `o = attention(rope(q), rope(k), v)`, causal, on `[B*T, N*D]` inputs.
pub(crate) struct CausalAttention {
    /// RoPE tables, `[T, D/2]`.
    pub(crate) cos: Vec<f64>,
    pub(crate) sin: Vec<f64>,
    pub(crate) batch: usize,
    pub(crate) seq: usize,
    pub(crate) n_heads: usize,
    pub(crate) n_kv_heads: usize,
    pub(crate) head_dim: usize,
    pub(crate) scale: f64,
}

/// A pointer tasks write through at disjoint offsets (each task owns its (batch, head) slots).
#[derive(Clone, Copy)]
struct SharedMut<T>(*mut T);
// SAFETY: every user writes only the rows and columns of its own task, so no element is
// written by two threads, and nothing reads those elements until the parallel loop ends.
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// The pointer; a method, so closures capture the whole (Sync) wrapper, not its field.
    fn ptr(&self) -> *mut T {
        self.0
    }
}

/// `dst[m x n] (+)= lhs[m x k] rhs[k x n]`, single-threaded (the caller is already one rayon
/// task of many), with element strides `(row, col)` for each matrix.
///
/// # Safety
/// Every pointer must address the whole matrix its strides describe.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul_into<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const T,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const T,
    (rhs_rs, rhs_cs): (usize, usize),
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        T::one(),
        T::one(),
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// `D`-wide rows `0..T` of `src` (row stride `src_rs`) rotated by RoPE into `dst` (row stride
/// `dst_rs`); `inverse` applies the transpose rotation (the backward).
///
/// # Safety
/// `src` and `dst` must address `T` rows of their strides.
#[allow(clippy::too_many_arguments)]
unsafe fn rotate_rows<T: Real>(
    src: *const T,
    src_rs: usize,
    dst: *mut T,
    dst_rs: usize,
    (cos, sin): (&[T], &[T]),
    seq: usize,
    half: usize,
    inverse: bool,
) {
    for p in 0..seq {
        let x = std::slice::from_raw_parts(src.add(p * src_rs), 2 * half);
        let y = std::slice::from_raw_parts_mut(dst.add(p * dst_rs), 2 * half);
        let (cr, sr) = (
            &cos[p * half..(p + 1) * half],
            &sin[p * half..(p + 1) * half],
        );
        for i in 0..half {
            let (a, b, c, s) = (x[i], x[i + half], cr[i], sr[i]);
            if inverse {
                y[i] = a * c + b * s;
                y[i + half] = b * c - a * s;
            } else {
                y[i] = a * c - b * s;
                y[i + half] = b * c + a * s;
            }
        }
    }
}

/// Rows `r0..r0 + rows` of `P = softmax(c S)`, causal: `s` holds the tile's raw scores
/// (row stride `seq`, columns `0..r0 + rows`) and is overwritten by `P` (0 above the diagonal).
fn causal_softmax_tile<T: Real>(s: &mut [T], seq: usize, r0: usize, rows: usize, scale: T) {
    let width = r0 + rows;
    for (r, row) in s.chunks_mut(seq).take(rows).enumerate() {
        let i = r0 + r;
        let (live, dead) = row[..width].split_at_mut(i + 1);
        let m = live
            .iter()
            .fold(T::neg_infinity(), |a, &v| a.maximum(v * scale));
        // Exponentials first, then the (ordered, so unvectorised) sum in a loop of its own.
        for o in live.iter_mut() {
            *o = (*o * scale - m).exp();
        }
        let sum = live.iter().fold(T::zero(), |a, &v| a + v);
        let inv = T::one() / sum;
        for o in live.iter_mut() {
            *o *= inv;
        }
        dead.fill(T::zero());
    }
}

impl CausalAttention {
    fn check(&self, l: &Layout, heads: usize, what: &str) -> Result<()> {
        let want = (self.batch * self.seq, heads * self.head_dim);
        match l.dims() {
            &[r, c] if (r, c) == want => Ok(()),
            dims => Err(candle_core::Error::Msg(format!(
                "attention: {what} must be [{}, {}], got {dims:?}",
                want.0, want.1
            ))),
        }
    }

    fn tables<T: Real>(&self) -> (Vec<T>, Vec<T>) {
        let conv = |v: &[f64]| v.iter().map(|&x| T::from_f64(x)).collect();
        (conv(&self.cos), conv(&self.sin))
    }

    fn forward<T: Real>(&self, q: &[T], k: &[T], v: &[T]) -> Vec<T> {
        let (t, d, nh, nkv) = (self.seq, self.head_dim, self.n_heads, self.n_kv_heads);
        let (q_rs, kv_rs, rep, half) = (nh * d, nkv * d, nh / nkv, d / 2);
        let (cos, sin) = self.tables::<T>();
        let scale = T::from_f64(self.scale);
        let mut out = vec![T::zero(); q.len()];
        let dst = SharedMut(out.as_mut_ptr());
        (0..self.batch * nh).into_par_iter().for_each(|task| {
            let (b, h) = (task / nh, task % nh);
            let g = h / rep;
            let mut qr = vec![T::zero(); t * d];
            let mut kr = vec![T::zero(); t * d];
            let mut s = vec![T::zero(); ATTN_TILE.min(t) * t];
            // SAFETY: the offsets stay inside [B*T, N*D] inputs the caller checked; this task
            // writes only batch b's rows of head h's columns of `out`.
            unsafe {
                let (qp, kp) = (q.as_ptr().add(b * t * q_rs + h * d), k.as_ptr());
                rotate_rows(qp, q_rs, qr.as_mut_ptr(), d, (&cos, &sin), t, half, false);
                let kp = kp.add(b * t * kv_rs + g * d);
                rotate_rows(kp, kv_rs, kr.as_mut_ptr(), d, (&cos, &sin), t, half, false);
                let vp = v.as_ptr().add(b * t * kv_rs + g * d);
                for r0 in (0..t).step_by(ATTN_TILE) {
                    let rows = ATTN_TILE.min(t - r0);
                    let width = r0 + rows;
                    let tile = (rows, width, d);
                    let qt = qr.as_ptr().add(r0 * d);
                    matmul_into(
                        tile,
                        s.as_mut_ptr(),
                        t,
                        false,
                        qt,
                        (d, 1),
                        kr.as_ptr(),
                        (1, d),
                    );
                    causal_softmax_tile(&mut s, t, r0, rows, scale);
                    let op = dst.ptr().add((b * t + r0) * q_rs + h * d);
                    matmul_into(
                        (rows, d, width),
                        op,
                        q_rs,
                        false,
                        s.as_ptr(),
                        (t, 1),
                        vp,
                        (kv_rs, 1),
                    );
                }
            }
        });
        out
    }

    fn backward<T: Real>(&self, q: &[T], k: &[T], v: &[T], dout: &[T]) -> (Vec<T>, Vec<T>, Vec<T>) {
        let (t, d, nh, nkv) = (self.seq, self.head_dim, self.n_heads, self.n_kv_heads);
        let (q_rs, kv_rs, rep, half) = (nh * d, nkv * d, nh / nkv, d / 2);
        let (cos, sin) = self.tables::<T>();
        let scale = T::from_f64(self.scale);
        let mut dq = vec![T::zero(); q.len()];
        let mut dk = vec![T::zero(); k.len()];
        let mut dv = vec![T::zero(); v.len()];
        let (dqp, dkp, dvp) = (
            SharedMut(dq.as_mut_ptr()),
            SharedMut(dk.as_mut_ptr()),
            SharedMut(dv.as_mut_ptr()),
        );
        (0..self.batch * nkv).into_par_iter().for_each(|task| {
            let (b, g) = (task / nkv, task % nkv);
            let tile_len = ATTN_TILE.min(t) * t;
            let (mut qr, mut kr) = (vec![T::zero(); t * d], vec![T::zero(); t * d]);
            let (mut dqr, mut dkr) = (vec![T::zero(); t * d], vec![T::zero(); t * d]);
            let (mut p, mut dp) = (vec![T::zero(); tile_len], vec![T::zero(); tile_len]);
            // SAFETY: offsets stay inside the checked [B*T, N*D] buffers; this task writes only
            // batch b's rows of KV head g's columns of dk, dv and of its heads' columns of dq.
            unsafe {
                let kv_off = b * t * kv_rs + g * d;
                let kp = k.as_ptr().add(kv_off);
                rotate_rows(kp, kv_rs, kr.as_mut_ptr(), d, (&cos, &sin), t, half, false);
                let vp = v.as_ptr().add(kv_off);
                let dv_g = dvp.ptr().add(kv_off);
                for h in g * rep..(g + 1) * rep {
                    let q_off = b * t * q_rs + h * d;
                    let qp = q.as_ptr().add(q_off);
                    rotate_rows(qp, q_rs, qr.as_mut_ptr(), d, (&cos, &sin), t, half, false);
                    let dop = dout.as_ptr().add(q_off);
                    for r0 in (0..t).step_by(ATTN_TILE) {
                        let rows = ATTN_TILE.min(t - r0);
                        let width = r0 + rows;
                        let qt = qr.as_ptr().add(r0 * d);
                        let ktr = (1, d);
                        matmul_into(
                            (rows, width, d),
                            p.as_mut_ptr(),
                            t,
                            false,
                            qt,
                            (d, 1),
                            kr.as_ptr(),
                            ktr,
                        );
                        causal_softmax_tile(&mut p, t, r0, rows, scale);
                        let do_tile = dop.add(r0 * q_rs);
                        // dV[0..width] += P^T dO[r0..]; dV starts at 0, so every add reads it.
                        matmul_into(
                            (width, d, rows),
                            dv_g,
                            kv_rs,
                            true,
                            p.as_ptr(),
                            (1, t),
                            do_tile,
                            (q_rs, 1),
                        );
                        matmul_into(
                            (rows, width, d),
                            dp.as_mut_ptr(),
                            t,
                            false,
                            do_tile,
                            (q_rs, 1),
                            vp,
                            (1, kv_rs),
                        );
                        for (pr, dpr) in p.chunks(t).zip(dp.chunks_mut(t)).take(rows) {
                            let dot = pr[..width]
                                .iter()
                                .zip(&dpr[..width])
                                .fold(T::zero(), |a, (&x, &y)| a + x * y);
                            for (o, &x) in dpr[..width].iter_mut().zip(&pr[..width]) {
                                *o = scale * x * (*o - dot);
                            }
                        }
                        let dqt = dqr.as_mut_ptr().add(r0 * d);
                        matmul_into(
                            (rows, d, width),
                            dqt,
                            d,
                            false,
                            dp.as_ptr(),
                            (t, 1),
                            kr.as_ptr(),
                            (d, 1),
                        );
                        matmul_into(
                            (width, d, rows),
                            dkr.as_mut_ptr(),
                            d,
                            true,
                            dp.as_ptr(),
                            (1, t),
                            qt,
                            (d, 1),
                        );
                    }
                    let dq_h = dqp.ptr().add(q_off);
                    rotate_rows(dqr.as_ptr(), d, dq_h, q_rs, (&cos, &sin), t, half, true);
                }
                let dk_g = dkp.ptr().add(kv_off);
                rotate_rows(dkr.as_ptr(), d, dk_g, kv_rs, (&cos, &sin), t, half, true);
            }
        });
        (dq, dk, dv)
    }
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "pma-causal-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.check(l1, self.n_heads, "q")?;
        self.check(l2, self.n_kv_heads, "k")?;
        self.check(l3, self.n_kv_heads, "v")?;
        let out = match s1.dtype() {
            DType::F32 => f32::to_cpu_storage_owned(self.forward(
                slice::<f32>(s1, l1, "attention")?,
                slice(s2, l2, "attention")?,
                slice(s3, l3, "attention")?,
            )),
            DType::F64 => f64::to_cpu_storage_owned(self.forward(
                slice::<f64>(s1, l1, "attention")?,
                slice(s2, l2, "attention")?,
                slice(s3, l3, "attention")?,
            )),
            d => return Err(unsupported("attention", d)),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dout = dout.contiguous()?;
        let views = [q, k, v, &dout].map(|t| t.storage_and_layout());
        macro_rules! run {
            ($t:ty) => {{
                let s: Vec<&[$t]> = views
                    .iter()
                    .map(|(s, l)| match &**s {
                        candle_core::Storage::Cpu(c) => slice::<$t>(c, l, "attention"),
                        _ => Err(candle_core::Error::Msg("attention: CPU only".into())),
                    })
                    .collect::<Result<_>>()?;
                let (dq, dk, dv) = self.backward(s[0], s[1], s[2], s[3]);
                (
                    Tensor::from_vec(dq, q.shape(), q.device())?,
                    Tensor::from_vec(dk, k.shape(), k.device())?,
                    Tensor::from_vec(dv, v.shape(), v.device())?,
                )
            }};
        }
        let (dq, dk, dv) = match q.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            d => return Err(unsupported("attention", d)),
        };
        drop(views);
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    /// The same attention through candle's primitive ops (autograd gives its gradients).
    fn reference(op: &CausalAttention, q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        let (b, t, nh, nkv, d) = (op.batch, op.seq, op.n_heads, op.n_kv_heads, op.head_dim);
        let half = d / 2;
        let twice = |v: &[f64]| -> Vec<f64> {
            v.chunks(half)
                .flat_map(|r| r.iter().chain(r.iter()).copied())
                .collect()
        };
        let cos = Tensor::from_vec(twice(&op.cos), (t, d), &Device::Cpu).unwrap();
        let sin = Tensor::from_vec(twice(&op.sin), (t, d), &Device::Cpu).unwrap();
        let heads = |x: &Tensor, n: usize| {
            x.reshape((b, t, n, d))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let rope = |x: &Tensor| {
            let x1 = x.narrow(D::Minus1, 0, half).unwrap();
            let x2 = x.narrow(D::Minus1, half, half).unwrap();
            let rotated = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
            (x.broadcast_mul(&cos).unwrap() + rotated.broadcast_mul(&sin).unwrap()).unwrap()
        };
        let repeat = |x: Tensor| {
            let rep = nh / nkv;
            x.unsqueeze(2)
                .unwrap()
                .broadcast_as((b, nkv, rep, t, d))
                .unwrap()
                .contiguous()
                .unwrap()
                .reshape((b, nh, t, d))
                .unwrap()
        };
        let (qh, kh, vh) = (
            rope(&heads(q, nh)),
            repeat(rope(&heads(k, nkv))),
            repeat(heads(v, nkv)),
        );
        let mask: Vec<f64> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j > i { f64::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu).unwrap();
        let s = ((qh.matmul(&kh.t().unwrap()).unwrap() * op.scale).unwrap())
            .broadcast_add(&mask)
            .unwrap();
        let m = s.max_keepdim(D::Minus1).unwrap().detach();
        let e = s.broadcast_sub(&m).unwrap().exp().unwrap();
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
        p.matmul(&vh)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b * t, nh * d))
            .unwrap()
    }

    /// Two batches, grouped heads, and a length over one tile with a partial last tile.
    fn setup() -> (CausalAttention, Var, Var, Var, Tensor) {
        let (b, t, nh, nkv, d) = (2, ATTN_TILE + 9, 4, 2, 8);
        let half = d / 2;
        let mut rng = crate::rng::Rng::new(11);
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for p in 0..t {
            for i in 0..half {
                let angle = p as f64 * 10000f64.powf(-((2 * i) as f64) / d as f64);
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let op = CausalAttention {
            cos,
            sin,
            batch: b,
            seq: t,
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: d,
            scale: 1.0 / (d as f64).sqrt(),
        };
        let mut rand = |n: usize| -> Tensor {
            let v: Vec<f64> = (0..b * t * n * d).map(|_| rng.normal()).collect();
            Tensor::from_vec(v, (b * t, n * d), &Device::Cpu).unwrap()
        };
        let (q, k, v) = (rand(nh), rand(nkv), rand(nkv));
        let r = rand(nh);
        (
            op,
            Var::from_tensor(&q).unwrap(),
            Var::from_tensor(&k).unwrap(),
            Var::from_tensor(&v).unwrap(),
            r,
        )
    }

    fn fused(op: &CausalAttention, q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        let op = CausalAttention {
            cos: op.cos.clone(),
            sin: op.sin.clone(),
            ..*op
        };
        q.apply_op3(k, v, op).unwrap()
    }

    fn flat(t: &Tensor) -> Vec<f64> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn attention_matches_primitive_ops_and_their_gradients() {
        let (op, q, k, v, r) = setup();
        let (a, b) = (fused(&op, &q, &k, &v), reference(&op, &q, &k, &v));
        for (x, y) in flat(&a).iter().zip(flat(&b)) {
            assert!((x - y).abs() < 1e-12, "output {x} vs {y}");
        }
        let ga = (a * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (b * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
            let (x, y) = (ga.get(var).unwrap(), gb.get(var).unwrap());
            for (x, y) in flat(x).iter().zip(flat(y)) {
                assert!((x - y).abs() < 1e-11, "d{name}: {x} vs {y}");
            }
        }
    }

    /// Central differences of `sum(o * r)` in f64 against the fused backward.
    #[test]
    fn attention_gradient_matches_finite_differences() {
        let (op, q, k, v, r) = setup();
        let loss = |q: &Tensor, k: &Tensor, v: &Tensor| -> f64 {
            (fused(&op, q, k, v) * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        let grads = (fused(&op, &q, &k, &v) * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let mut rng = crate::rng::Rng::new(12);
        let h = 1e-6;
        for which in 0..3 {
            let var = [&q, &k, &v][which];
            let analytic = flat(grads.get(var).unwrap());
            let base = flat(var);
            for _ in 0..8 {
                let i = rng.below(base.len() as u64) as usize;
                let at = |delta: f64| {
                    let mut p = base.clone();
                    p[i] += delta;
                    let p = Tensor::from_vec(p, var.shape(), &Device::Cpu).unwrap();
                    let mut args = [
                        q.as_tensor().clone(),
                        k.as_tensor().clone(),
                        v.as_tensor().clone(),
                    ];
                    args[which] = p;
                    loss(&args[0], &args[1], &args[2])
                };
                let numeric = (at(h) - at(-h)) / (2.0 * h);
                let a = analytic[i];
                assert!(
                    (numeric - a).abs() < 1e-6 * (1.0 + a.abs()),
                    "arg {which} [{i}]: analytic {a:e} vs numeric {numeric:e}"
                );
            }
        }
    }

    /// The f32 kernels' `exp` against f64 libm, over the range the kernels use, at the clamp
    /// ends, and for NaN.
    #[test]
    fn exp_f32_is_within_two_ulp_of_libm() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * f64::from(i) / 200_000.0;
            let x = x as f32;
            let want = f64::from(x).exp();
            let got = f64::from(exp_f32(x));
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(
            worst < 2.0 * f64::from(f32::EPSILON),
            "max rel error {worst:e}"
        );
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(f32::NEG_INFINITY) < 2e-38);
        assert!(exp_f32(f32::INFINITY).is_finite());
        assert!(exp_f32(f32::NAN).is_nan());
    }
}
