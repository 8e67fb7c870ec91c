//! The Llama / Mixtral decoder, written with differentiable candle ops only.
//!
//! Struct fields mirror the HF checkpoint keys (`model.layers.{i}.self_attn.q_proj.weight` lives
//! in `Llama::layers[i].self_attn.q_proj`), so a key seen in a file can be found by grepping.
//!
//! candle-nn's fused `rms_norm`, `softmax_last_dim`, `rope` and `sdpa` have no backward pass, and
//! gradients silently stop at them. Every op here is a primitive with a backward in candle's
//! autograd (matmul, broadcast arithmetic, exp/log/sqrt, narrow/cat, index_select/index_add,
//! gather), so the same forward serves training and evaluation. The model holds plain
//! [`Tensor`]s: built from [`Var`]s (see [`Params`]) it records a graph for `backward`; built from
//! loaded tensors it does not, which is what evaluation wants.
//!
//! The maths, per block, with `x` of shape `[B*T, H]`:
//! - `rms(x) = x / sqrt(mean(x^2) + eps) * w`
//! - attention: `q, k, v = x Wq^T, x Wk^T, x Wv^T`, RoPE on q and k (HF `rotate_half` layout:
//!   `q' = q cos + [-q2, q1] sin`), `p = softmax(q k^T / sqrt(d) + causal mask)`, `o = (p v) Wo^T`;
//!   grouped KV heads are repeated `n_heads / n_kv_heads` times, head `h` reading KV head
//!   `h / rep`.
//! - dense MLP: `down(silu(gate x) * up x)`.
//! - MoE (Mixtral): `p = softmax(x Wg^T)` over all E experts; keep the top k; renormalise them to
//!   sum to one; `y = sum_e w_e * w2_e(silu(w1_e x) * w3_e x)` over the chosen experts.

use candle_core::{DType, Device, Tensor, Var, D};

use crate::config::{ModelConfig, ModelKind};
use crate::error::Result;
use crate::rng::Rng;

/// Std of the normal init of every matrix (HF `initializer_range`).
pub const INIT_STD: f64 = 0.02;

/// A SwiGLU feed-forward (Llama `mlp` or a Mixtral expert, whose `w1/w3/w2` are
/// `gate/up/down`).
#[derive(Debug, Clone)]
pub struct SwiGlu {
    /// `gate_proj` / `w1`, `[I, H]`.
    pub gate_proj: Tensor,
    /// `up_proj` / `w3`, `[I, H]`.
    pub up_proj: Tensor,
    /// `down_proj` / `w2`, `[H, I]`.
    pub down_proj: Tensor,
}

impl SwiGlu {
    fn forward(&self, x: &Tensor, fused: bool) -> Result<Tensor> {
        let g = linear(x, &self.gate_proj)?;
        let u = linear(x, &self.up_proj)?;
        let act = if fused {
            g.apply_op2(&u, crate::fused::SiluMul)?
        } else {
            (silu(&g)? * u)?
        };
        linear(&act, &self.down_proj)
    }
}

/// Mixtral's `block_sparse_moe`.
#[derive(Debug, Clone)]
pub struct SparseMoe {
    /// Router, `gate.weight`, `[E, H]`.
    pub gate: Tensor,
    /// `experts.{e}`.
    pub experts: Vec<SwiGlu>,
    /// Experts per token.
    pub top_k: usize,
}

/// What one MoE block's router did, for the load-balancing loss.
#[derive(Debug, Clone)]
pub struct Routing {
    /// Router probabilities over all experts, `[N, E]` (part of the graph).
    pub probs: Tensor,
    /// Per token, the chosen experts, best first.
    pub chosen: Vec<Vec<usize>>,
}

impl SparseMoe {
    fn forward(&self, x: &Tensor, fused: bool) -> Result<(Tensor, Routing)> {
        let (n, h) = x.dims2()?;
        let n_experts = self.experts.len();
        let probs = softmax_last(&linear(x, &self.gate)?)?;
        let host: Vec<Vec<f64>> = probs.detach().to_dtype(DType::F64)?.to_vec2()?;
        let chosen: Vec<Vec<usize>> = host.iter().map(|p| top_k(p, self.top_k)).collect();
        let mut mask = vec![0f64; n * n_experts];
        let mut rows: Vec<Vec<u32>> = vec![Vec::new(); n_experts];
        for (t, c) in chosen.iter().enumerate() {
            for &e in c {
                mask[t * n_experts + e] = 1.0;
                rows[e].push(t as u32);
            }
        }
        let mask = Tensor::from_vec(mask, (n, n_experts), x.device())?.to_dtype(x.dtype())?;
        // w = p * mask / sum(p * mask): Mixtral's top-k renormalisation, differentiable in p.
        let kept = (&probs * mask)?;
        let weights = kept.broadcast_div(&kept.sum_keepdim(D::Minus1)?)?;
        // [E, N], so each expert's column is one contiguous row for index_select.
        let weights = weights.t()?.contiguous()?;
        let mut out = Tensor::zeros((n, h), x.dtype(), x.device())?;
        for (e, expert) in self.experts.iter().enumerate() {
            if rows[e].is_empty() {
                continue;
            }
            let idx = Tensor::new(rows[e].as_slice(), x.device())?;
            let xe = x.index_select(&idx, 0)?;
            let we = weights.get(e)?.index_select(&idx, 0)?.unsqueeze(1)?;
            let ye = expert.forward(&xe, fused)?.broadcast_mul(&we)?;
            out = out.index_add(&idx, &ye, 0)?;
        }
        Ok((out, Routing { probs, chosen }))
    }
}

/// Indices of the `k` largest values, largest first; ties go to the lower index.
pub fn top_k(p: &[f64], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..p.len()).collect();
    idx.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// The feed-forward half of a block.
#[derive(Debug, Clone)]
pub enum FeedForward {
    /// Llama `mlp`.
    Mlp(SwiGlu),
    /// Mixtral `block_sparse_moe`.
    Moe(SparseMoe),
}

/// `self_attn`.
#[derive(Debug, Clone)]
pub struct Attention {
    /// `[H, H]`.
    pub q_proj: Tensor,
    /// `[KV*D, H]`.
    pub k_proj: Tensor,
    /// `[KV*D, H]`.
    pub v_proj: Tensor,
    /// `[H, H]`.
    pub o_proj: Tensor,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn forward(
        &self,
        x: &Tensor,
        b: usize,
        t: usize,
        rope: &Rope,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (nh, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let scale = 1.0 / (hd as f64).sqrt();
        if let (None, Some((cos, sin))) = (mask, &rope.host) {
            // One fused op from the projections to the heads' outputs, in their [B*T, N*D]
            // layout: no per-head copies and no T x T tensors in the graph.
            let op = crate::fused::CausalAttention {
                cos: cos.clone(),
                sin: sin.clone(),
                batch: b,
                seq: t,
                n_heads: nh,
                n_kv_heads: nkv,
                head_dim: hd,
                scale,
            };
            let (q, k, v) = (
                linear(x, &self.q_proj)?,
                linear(x, &self.k_proj)?,
                linear(x, &self.v_proj)?,
            );
            let o = q
                .contiguous()?
                .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?;
            return linear(&o, &self.o_proj);
        }
        let heads = |w: &Tensor, n: usize| -> Result<Tensor> {
            Ok(linear(x, w)?
                .reshape((b, t, n, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = rope.apply(&heads(&self.q_proj, nh)?)?;
        let k = repeat_kv(rope.apply(&heads(&self.k_proj, nkv)?)?, nh / nkv)?;
        let v = repeat_kv(heads(&self.v_proj, nkv)?, nh / nkv)?;
        let scores = q.matmul(&k.t()?)?;
        let mask = match mask {
            Some(mask) => mask.clone(),
            None => causal_mask(t, x.dtype(), x.device())?,
        };
        let p = softmax_last(&(scores * scale)?.broadcast_add(&mask)?)?;
        let o = p.matmul(&v)?.transpose(1, 2)?.reshape((b * t, nh * hd))?;
        linear(&o, &self.o_proj)
    }
}

/// `[B, KV, T, D]` → `[B, KV*rep, T, D]`, each KV head repeated `rep` times in place (HF
/// `repeat_kv`).
fn repeat_kv(x: Tensor, rep: usize) -> Result<Tensor> {
    if rep == 1 {
        return Ok(x);
    }
    let (b, nkv, t, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .broadcast_as((b, nkv, rep, t, d))?
        .contiguous()?
        .reshape((b, nkv * rep, t, d))?)
}

/// One decoder block, `model.layers.{i}`.
#[derive(Debug, Clone)]
pub struct Block {
    /// RMSNorm before attention.
    pub input_layernorm: Tensor,
    /// Attention.
    pub self_attn: Attention,
    /// RMSNorm before the feed-forward.
    pub post_attention_layernorm: Tensor,
    /// `mlp` or `block_sparse_moe`.
    pub feed_forward: FeedForward,
}

impl Block {
    /// `model.layers.{i}`: norms, `self_attn`, then `mlp` or `block_sparse_moe`.
    fn build(config: &ModelConfig, vb: &mut ParamPath<'_, '_>) -> Result<Block> {
        let h = config.hidden_size;
        let input_layernorm = vb.get("input_layernorm.weight", &[h])?;
        let self_attn = Attention::build(config, &mut vb.pp("self_attn"))?;
        let post_attention_layernorm = vb.get("post_attention_layernorm.weight", &[h])?;
        let feed_forward = match config.kind {
            ModelKind::Dense => FeedForward::Mlp(SwiGlu::build_mlp(config, &mut vb.pp("mlp"))?),
            ModelKind::Moe => {
                FeedForward::Moe(SparseMoe::build(config, &mut vb.pp("block_sparse_moe"))?)
            }
        };
        Ok(Block {
            input_layernorm,
            self_attn,
            post_attention_layernorm,
            feed_forward,
        })
    }
}

impl Attention {
    /// `self_attn.{q,k,v,o}_proj`.
    fn build(config: &ModelConfig, vb: &mut ParamPath<'_, '_>) -> Result<Attention> {
        let h = config.hidden_size;
        let kv = config.num_kv_heads * config.head_dim();
        Ok(Attention {
            q_proj: vb.get("q_proj.weight", &[h, h])?,
            k_proj: vb.get("k_proj.weight", &[kv, h])?,
            v_proj: vb.get("v_proj.weight", &[kv, h])?,
            o_proj: vb.get("o_proj.weight", &[h, h])?,
            n_heads: config.num_heads,
            n_kv_heads: config.num_kv_heads,
            head_dim: config.head_dim(),
        })
    }
}

impl SwiGlu {
    /// Llama's `mlp.{gate,up,down}_proj`.
    fn build_mlp(config: &ModelConfig, vb: &mut ParamPath<'_, '_>) -> Result<SwiGlu> {
        let (h, i) = (config.hidden_size, config.intermediate_size);
        Ok(SwiGlu {
            gate_proj: vb.get("gate_proj.weight", &[i, h])?,
            up_proj: vb.get("up_proj.weight", &[i, h])?,
            down_proj: vb.get("down_proj.weight", &[h, i])?,
        })
    }

    /// A Mixtral expert, `experts.{e}.w{1,2,3}`: `w1` is the gate, `w3` the up and `w2` the
    /// down projection. Mixtral stores them w1, w2, w3, so they are asked for in that order.
    fn build_expert(config: &ModelConfig, vb: &mut ParamPath<'_, '_>) -> Result<SwiGlu> {
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let gate_proj = vb.get("w1.weight", &[i, h])?;
        let down_proj = vb.get("w2.weight", &[h, i])?;
        let up_proj = vb.get("w3.weight", &[i, h])?;
        Ok(SwiGlu {
            gate_proj,
            up_proj,
            down_proj,
        })
    }
}

impl SparseMoe {
    /// `block_sparse_moe.gate` and `block_sparse_moe.experts.{e}`.
    fn build(config: &ModelConfig, vb: &mut ParamPath<'_, '_>) -> Result<SparseMoe> {
        let gate = vb.get("gate.weight", &[config.num_experts, config.hidden_size])?;
        let mut experts = Vec::with_capacity(config.num_experts);
        for e in 0..config.num_experts {
            experts.push(SwiGlu::build_expert(config, &mut vb.pp("experts").pp(e))?);
        }
        Ok(SparseMoe {
            gate,
            experts,
            top_k: config.top_k,
        })
    }
}

/// A dotted key prefix and the source of parameters, as candle's `VarBuilder`: `pp` descends
/// one key segment, `get` asks for `prefix.name`.
pub(crate) struct ParamPath<'a, 'f> {
    prefix: String,
    get: &'a mut (dyn FnMut(&str, &[usize]) -> Result<Tensor> + 'f),
}

impl<'a, 'f> ParamPath<'a, 'f> {
    fn root(get: &'a mut (dyn FnMut(&str, &[usize]) -> Result<Tensor> + 'f)) -> Self {
        ParamPath {
            prefix: String::new(),
            get,
        }
    }

    /// The path one segment further down (`model` → `model.layers`).
    fn pp(&mut self, segment: impl std::fmt::Display) -> ParamPath<'_, 'f> {
        ParamPath {
            prefix: self.key(&segment.to_string()),
            get: &mut *self.get,
        }
    }

    /// The parameter `prefix.name` of `shape`.
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let key = self.key(name);
        (self.get)(&key, shape)
    }

    fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }
}

impl std::fmt::Debug for ParamPath<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParamPath")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// Every parameter's HF name and shape, in checkpoint order, read off [`Llama::build`] itself.
///
/// The walk hands out zero-stride views of one scalar, so it allocates nothing per parameter.
pub fn param_shapes(config: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let scalar = Tensor::new(0f32, &Device::Cpu).expect("a CPU scalar always builds");
    let mut out = Vec::new();
    let mut record = |name: &str, shape: &[usize]| -> Result<Tensor> {
        out.push((name.to_string(), shape.to_vec()));
        Ok(scalar.broadcast_as(shape)?)
    };
    Llama::build_unchecked(config, &mut ParamPath::root(&mut record))
        .expect("broadcasting a scalar to any shape cannot fail");
    out
}

/// RoPE tables for one sequence length, `[T, D]` each (HF layout: the frequencies repeated twice).
#[derive(Debug)]
struct Rope {
    cos: Tensor,
    sin: Tensor,
    /// The `[T, D/2]` halves for the fused attention, when it is in use.
    host: Option<(Vec<f64>, Vec<f64>)>,
}

impl Rope {
    fn new(
        head_dim: usize,
        t: usize,
        theta: f64,
        dtype: DType,
        device: &Device,
        fused: bool,
    ) -> Result<Rope> {
        let half = head_dim / 2;
        let mut cos_half = Vec::with_capacity(t * half);
        let mut sin_half = Vec::with_capacity(t * half);
        for pos in 0..t {
            for i in 0..half {
                // inv_freq_i = theta^(-2i/D), computed in f32 as HF does, then the angle in f32.
                let inv_freq = 1.0f32 / (theta as f32).powf((2 * i) as f32 / head_dim as f32);
                let angle = pos as f32 * inv_freq;
                cos_half.push(f64::from(angle.cos()));
                sin_half.push(f64::from(angle.sin()));
            }
        }
        let twice = |v: &[f64]| -> Vec<f64> {
            v.chunks(half)
                .flat_map(|r| r.iter().chain(r.iter()).copied())
                .collect()
        };
        Ok(Rope {
            cos: Tensor::from_vec(twice(&cos_half), (t, head_dim), device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(twice(&sin_half), (t, head_dim), device)?.to_dtype(dtype)?,
            host: fused.then_some((cos_half, sin_half)),
        })
    }

    /// `x cos + rotate_half(x) sin` on `[B, N, T, D]`, with `rotate_half(x) = [-x2, x1]`.
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let d = x.dim(D::Minus1)?;
        let x1 = x.narrow(D::Minus1, 0, d / 2)?;
        let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        Ok((x.broadcast_mul(&self.cos)? + rotated.broadcast_mul(&self.sin)?)?)
    }
}

/// The whole model, `LlamaForCausalLM` or `MixtralForCausalLM`.
#[derive(Debug, Clone)]
pub struct Llama {
    /// The config it was built from.
    pub config: ModelConfig,
    /// `model.embed_tokens.weight`, `[V, H]`.
    pub embed_tokens: Tensor,
    /// `model.layers`.
    pub layers: Vec<Block>,
    /// `model.norm.weight`.
    pub norm: Tensor,
    /// `lm_head.weight`, or `None` when tied to the embedding.
    pub lm_head: Option<Tensor>,
    /// Use the fused CPU kernels of [`crate::fused`] (set when the weights are on the CPU; the
    /// primitive-op path computes the same function on any device).
    pub fused_kernels: bool,
}

/// Logits and router decisions of one forward pass.
#[derive(Debug)]
pub struct ForwardOutput {
    /// `[B*T, V]`.
    pub logits: Tensor,
    /// One entry per MoE block (empty for dense models).
    pub routing: Vec<Routing>,
}

/// The training objective of one batch.
#[derive(Debug)]
pub struct LossOutput {
    /// `ce + router_aux_loss_coef * aux`, the scalar to differentiate.
    pub total: Tensor,
    /// Mean next-token cross-entropy (nats).
    pub ce: Tensor,
    /// Load-balancing loss (MoE only).
    pub aux: Option<Tensor>,
}

impl Llama {
    /// Builds the model, asking `get(name, shape)` for each parameter by its HF name, in
    /// checkpoint order.
    ///
    /// Each name is given where its field is built (`vb.pp("self_attn").get("q_proj.weight")`),
    /// as candle's own models do, so the key and the field cannot drift apart. The order of the
    /// calls is the order of [`Params::vars`], of the init RNG draws and of the checkpoint files.
    pub fn build(
        config: &ModelConfig,
        get: &mut dyn FnMut(&str, &[usize]) -> Result<Tensor>,
    ) -> Result<Llama> {
        config.validate()?;
        Llama::build_unchecked(config, &mut ParamPath::root(get))
    }

    /// [`Llama::build`] without validating `config`; [`param_shapes`] walks it for any config.
    fn build_unchecked(config: &ModelConfig, vb: &mut ParamPath<'_, '_>) -> Result<Llama> {
        let (h, v) = (config.hidden_size, config.vocab_size);
        let mut model = vb.pp("model");
        let embed_tokens = model.get("embed_tokens.weight", &[v, h])?;
        let mut layers = Vec::with_capacity(config.num_layers);
        for l in 0..config.num_layers {
            layers.push(Block::build(config, &mut model.pp("layers").pp(l))?);
        }
        let norm = model.get("norm.weight", &[h])?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(vb.get("lm_head.weight", &[v, h])?)
        };
        Ok(Llama {
            config: config.clone(),
            fused_kernels: embed_tokens.device().is_cpu(),
            embed_tokens,
            layers,
            norm,
            lm_head,
        })
    }

    /// Logits for `tokens` of shape `[B, T]` (u32).
    pub fn forward(&self, tokens: &Tensor) -> Result<ForwardOutput> {
        let (b, t) = tokens.dims2()?;
        let dtype = self.embed_tokens.dtype();
        let device = self.embed_tokens.device();
        let c = &self.config;
        let rope = Rope::new(
            c.head_dim(),
            t,
            c.rope_theta,
            dtype,
            device,
            self.fused_kernels,
        )?;
        let fused = self.fused_kernels;
        let mask = if fused {
            None
        } else {
            Some(causal_mask(t, dtype, device)?)
        };
        let mut x = self.embed_tokens.index_select(&tokens.flatten_all()?, 0)?;
        let mut routing = Vec::new();
        for layer in &self.layers {
            let h = rms_norm(&x, &layer.input_layernorm, c.rms_norm_eps, fused)?;
            x = (x + layer.self_attn.forward(&h, b, t, &rope, mask.as_ref())?)?;
            let h = rms_norm(&x, &layer.post_attention_layernorm, c.rms_norm_eps, fused)?;
            let y = match &layer.feed_forward {
                FeedForward::Mlp(mlp) => mlp.forward(&h, fused)?,
                FeedForward::Moe(moe) => {
                    let (y, r) = moe.forward(&h, fused)?;
                    routing.push(r);
                    y
                }
            };
            x = (x + y)?;
        }
        let x = rms_norm(&x, &self.norm, c.rms_norm_eps, fused)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        Ok(ForwardOutput {
            logits: linear(&x, head)?,
            routing,
        })
    }

    /// The training objective for `inputs` and `targets`, both `[B, T]` u32.
    pub fn loss(&self, inputs: &Tensor, targets: &Tensor) -> Result<LossOutput> {
        let out = self.forward(inputs)?;
        let targets = targets.flatten_all()?;
        let ce = if self.fused_kernels {
            out.logits
                .apply_op2(&targets, crate::fused::RowNll)?
                .mean_all()?
        } else {
            cross_entropy(&out.logits, &targets)?
        };
        if out.routing.is_empty() {
            return Ok(LossOutput {
                total: ce.clone(),
                ce,
                aux: None,
            });
        }
        let aux = load_balancing_loss(&out.routing, self.config.num_experts)?;
        let total = (&ce + (&aux * self.config.router_aux_loss_coef)?)?;
        Ok(LossOutput {
            total,
            ce,
            aux: Some(aux),
        })
    }
}

/// Mixtral's load-balancing loss over all MoE blocks at once (HF `load_balancing_loss_func`,
/// the router outputs of every layer concatenated):
/// `aux = E * sum_e f_e * P_e`, with `f_e` the fraction of (token, layer) pairs that chose expert
/// `e` among their top k (so `sum_e f_e = k`) and `P_e` the mean router probability of `e`.
/// Uniform routing gives `aux = k`.
pub fn load_balancing_loss(routing: &[Routing], n_experts: usize) -> Result<Tensor> {
    let probs: Vec<&Tensor> = routing.iter().map(|r| &r.probs).collect();
    let probs = Tensor::cat(&probs, 0)?;
    let n_rows = probs.dim(0)?;
    let mut counts = vec![0f64; n_experts];
    for r in routing {
        for c in &r.chosen {
            for &e in c {
                counts[e] += 1.0;
            }
        }
    }
    let frac: Vec<f64> = counts.iter().map(|c| c / n_rows as f64).collect();
    let frac = Tensor::from_vec(frac, n_experts, probs.device())?.to_dtype(probs.dtype())?;
    let mean_p = probs.mean(0)?;
    Ok(((mean_p * frac)?.sum_all()? * n_experts as f64)?)
}

/// `x W^T` for `x` of shape `[N, in]` and `W` of shape `[out, in]`.
fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(x.matmul(&w.t()?)?)
}

/// `x / sqrt(mean(x^2) + eps) * w` over the last dim.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, fused: bool) -> Result<Tensor> {
    if fused {
        return Ok(x
            .contiguous()?
            .apply_op2(w, crate::fused::RmsNorm { eps })?);
    }
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (ms + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&inv)?.broadcast_mul(w)?)
}

/// `x * sigmoid(x)`.
fn silu(x: &Tensor) -> Result<Tensor> {
    Ok(x.silu()?)
}

/// Softmax over the last dim: `exp(x - m) / sum(exp(x - m))`. The shift `m` is the row max with
/// the gradient stopped; softmax does not depend on it, so the gradient is unchanged.
fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// `log_softmax(x) = x - m - log(sum(exp(x - m)))`, `m` the detached row max.
fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&m)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// Mean of `-log_softmax(logits)[target]` over rows; `logits [N, V]`, `targets [N]` u32.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logp = log_softmax_last(logits)?;
    let picked = logp.gather(&targets.unsqueeze(1)?, 1)?;
    Ok(picked.mean_all()?.neg()?)
}

/// Per-row `-log p(target)` and whether the argmax is the target, in f64, for evaluation.
pub fn token_losses(logits: &Tensor, targets: &Tensor) -> Result<(Vec<f64>, Vec<bool>)> {
    let logp = log_softmax_last(&logits.to_dtype(DType::F32)?)?;
    let picked = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    let nll: Vec<f64> = picked.to_dtype(DType::F64)?.neg()?.to_vec1()?;
    let argmax: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
    let t: Vec<u32> = targets.to_vec1()?;
    Ok((nll, argmax.iter().zip(&t).map(|(a, b)| a == b).collect()))
}

/// `[T, T]`: 0 on and below the diagonal, -inf above.
fn causal_mask(t: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(mask, (t, t), device)?.to_dtype(dtype)?)
}

/// The trainable parameters of a model, by HF name, in checkpoint order.
#[derive(Debug)]
pub struct Params {
    /// `(name, var)` pairs.
    pub vars: Vec<(String, Var)>,
}

impl Params {
    /// Fresh parameters: matrices `N(0, INIT_STD)`, norm weights 1. Deterministic in `seed`.
    pub fn init(
        config: &ModelConfig,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<(Params, Llama)> {
        let mut rng = Rng::new(seed);
        let mut vars = Vec::new();
        let model = Llama::build(config, &mut |name, shape| {
            let n: usize = shape.iter().product();
            let values: Vec<f64> = if shape.len() == 1 {
                vec![1.0; n]
            } else {
                (0..n)
                    .map(|_| (rng.normal() * INIT_STD) as f32 as f64)
                    .collect()
            };
            let t = Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?;
            let var = Var::from_tensor(&t)?;
            let t = var.as_tensor().clone();
            vars.push((name.to_string(), var));
            Ok(t)
        })?;
        Ok((Params { vars }, model))
    }

    /// Parameters holding copies of `tensors` (in checkpoint order, as [`Llama::build`] asks).
    pub fn from_values(
        config: &ModelConfig,
        get: &mut dyn FnMut(&str, &[usize]) -> Result<Tensor>,
    ) -> Result<(Params, Llama)> {
        let mut vars = Vec::new();
        let model = Llama::build(config, &mut |name, shape| {
            let var = Var::from_tensor(&get(name, shape)?)?;
            let t = var.as_tensor().clone();
            vars.push((name.to_string(), var));
            Ok(t)
        })?;
        Ok((Params { vars }, model))
    }

    /// Number of scalar parameters.
    pub fn n_params(&self) -> usize {
        self.vars.iter().map(|(_, v)| v.elem_count()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(kind: ModelKind) -> ModelConfig {
        ModelConfig {
            kind,
            vocab_size: 32,
            hidden_size: 16,
            intermediate_size: 24,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            max_position_embeddings: 8,
            num_experts: 4,
            top_k: 2,
            ..ModelConfig::default()
        }
    }

    fn batch(config: &ModelConfig, b: usize, t: usize, seed: u64) -> (Tensor, Tensor) {
        let mut rng = Rng::new(seed);
        let v = config.vocab_size as u64;
        let x: Vec<u32> = (0..b * t).map(|_| rng.below(v) as u32).collect();
        let y: Vec<u32> = (0..b * t).map(|_| rng.below(v) as u32).collect();
        (
            Tensor::from_vec(x, (b, t), &Device::Cpu).unwrap(),
            Tensor::from_vec(y, (b, t), &Device::Cpu).unwrap(),
        )
    }

    #[test]
    fn every_parameter_gets_a_finite_nonzero_gradient() {
        for kind in [ModelKind::Dense, ModelKind::Moe] {
            let config = tiny(kind);
            let (params, model) = Params::init(&config, 1, DType::F32, &Device::Cpu).unwrap();
            let (x, y) = batch(&config, 4, 8, 2);
            let loss = model.loss(&x, &y).unwrap();
            let grads = loss.total.backward().unwrap();
            assert_eq!(params.vars.len(), config.param_shapes().len());
            for (name, var) in &params.vars {
                let g = grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("{kind:?}: no gradient for {name}"));
                let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
                assert!(
                    g.iter().all(|v| v.is_finite()),
                    "{kind:?}: non-finite gradient for {name}"
                );
                assert!(
                    g.iter().any(|&v| v != 0.0),
                    "{kind:?}: zero gradient for {name}"
                );
            }
        }
    }

    /// Central differences in f64: `dL/dp ~ (L(p + h) - L(p - h)) / 2h`, error O(h^2).
    fn gradcheck(kind: ModelKind) {
        let config = tiny(kind);
        let (params, model) = Params::init(&config, 3, DType::F64, &Device::Cpu).unwrap();
        let (x, y) = batch(&config, 2, 6, 4);
        let loss_of =
            |m: &Llama| -> f64 { m.loss(&x, &y).unwrap().total.to_scalar::<f64>().unwrap() };
        let grads = model.loss(&x, &y).unwrap().total.backward().unwrap();
        let mut rng = Rng::new(5);
        let h = 1e-6;
        let mut checked = 0;
        for (name, var) in &params.vars {
            let analytic: Vec<f64> = grads
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let base: Vec<f64> = var.flatten_all().unwrap().to_vec1().unwrap();
            for _ in 0..3 {
                let i = rng.below(base.len() as u64) as usize;
                let at = |delta: f64| {
                    let mut p = base.clone();
                    p[i] += delta;
                    var.set(&Tensor::from_vec(p, var.shape(), &Device::Cpu).unwrap())
                        .unwrap();
                    loss_of(&model)
                };
                let numeric = (at(h) - at(-h)) / (2.0 * h);
                let a = analytic[i];
                let err = (numeric - a).abs() / (numeric.abs().max(a.abs()).max(1e-6));
                assert!(
                    err < 1e-4 || (numeric - a).abs() < 1e-9,
                    "{kind:?} {name}[{i}]: analytic {a:e} vs numeric {numeric:e}"
                );
                checked += 1;
            }
            var.set(&Tensor::from_vec(base, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
        assert!(checked >= 3 * config.param_shapes().len());
    }

    #[test]
    fn gradient_matches_finite_differences_dense() {
        gradcheck(ModelKind::Dense);
    }

    #[test]
    fn gradient_matches_finite_differences_moe() {
        gradcheck(ModelKind::Moe);
    }

    /// The fused CPU kernels and the primitive-op path compute the same loss and gradients.
    #[test]
    fn fused_kernels_match_primitive_ops() {
        for kind in [ModelKind::Dense, ModelKind::Moe] {
            let config = tiny(kind);
            let (params, fused) = Params::init(&config, 9, DType::F64, &Device::Cpu).unwrap();
            assert!(fused.fused_kernels);
            let plain = Llama {
                fused_kernels: false,
                ..fused.clone()
            };
            let (x, y) = batch(&config, 3, 7, 10);
            let (lf, lp) = (fused.loss(&x, &y).unwrap(), plain.loss(&x, &y).unwrap());
            let (a, b) = (
                lf.total.to_scalar::<f64>().unwrap(),
                lp.total.to_scalar::<f64>().unwrap(),
            );
            assert!((a - b).abs() < 1e-12, "{kind:?}: loss {a} vs {b}");
            let (gf, gp) = (lf.total.backward().unwrap(), lp.total.backward().unwrap());
            for (name, var) in &params.vars {
                let f: Vec<f64> = gf
                    .get(var.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let p: Vec<f64> = gp
                    .get(var.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                for (u, v) in f.iter().zip(&p) {
                    assert!(
                        (u - v).abs() < 1e-10 * (1.0 + v.abs()),
                        "{kind:?} {name}: {u} vs {v}"
                    );
                }
            }
        }
    }

    /// Every field holds the tensor of its own HF key. `gate_proj`/`up_proj`, `w1`/`w3` and
    /// `q_proj`/`o_proj` have equal shapes, so only the names can catch a swap.
    #[test]
    fn every_field_holds_the_tensor_of_its_own_name() {
        for kind in [ModelKind::Dense, ModelKind::Moe] {
            let config = tiny(kind);
            let mut ids = std::collections::HashMap::new();
            let model = Llama::build(&config, &mut |name, shape| {
                let id = ids.len() as f64 + 1.0;
                assert!(
                    ids.insert(name.to_string(), id).is_none(),
                    "{name} asked twice"
                );
                Ok(Tensor::full(id, shape, &Device::Cpu)?)
            })
            .unwrap();
            assert_eq!(ids.len(), config.param_shapes().len());
            let check = |t: &Tensor, name: &str| {
                let v: Vec<f64> = t.flatten_all().unwrap().to_vec1().unwrap();
                let want = ids
                    .get(name)
                    .unwrap_or_else(|| panic!("{name} never asked"));
                assert_eq!(v[0], *want, "{kind:?}: field does not hold {name}");
            };
            check(&model.embed_tokens, "model.embed_tokens.weight");
            check(&model.norm, "model.norm.weight");
            check(model.lm_head.as_ref().unwrap(), "lm_head.weight");
            for (l, b) in model.layers.iter().enumerate() {
                let p = format!("model.layers.{l}");
                check(&b.input_layernorm, &format!("{p}.input_layernorm.weight"));
                check(
                    &b.post_attention_layernorm,
                    &format!("{p}.post_attention_layernorm.weight"),
                );
                let a = &b.self_attn;
                check(&a.q_proj, &format!("{p}.self_attn.q_proj.weight"));
                check(&a.k_proj, &format!("{p}.self_attn.k_proj.weight"));
                check(&a.v_proj, &format!("{p}.self_attn.v_proj.weight"));
                check(&a.o_proj, &format!("{p}.self_attn.o_proj.weight"));
                match &b.feed_forward {
                    FeedForward::Mlp(m) => {
                        check(&m.gate_proj, &format!("{p}.mlp.gate_proj.weight"));
                        check(&m.up_proj, &format!("{p}.mlp.up_proj.weight"));
                        check(&m.down_proj, &format!("{p}.mlp.down_proj.weight"));
                    }
                    FeedForward::Moe(moe) => {
                        let m = format!("{p}.block_sparse_moe");
                        check(&moe.gate, &format!("{m}.gate.weight"));
                        assert_eq!(moe.experts.len(), config.num_experts);
                        for (e, x) in moe.experts.iter().enumerate() {
                            check(&x.gate_proj, &format!("{m}.experts.{e}.w1.weight"));
                            check(&x.down_proj, &format!("{m}.experts.{e}.w2.weight"));
                            check(&x.up_proj, &format!("{m}.experts.{e}.w3.weight"));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn top_k_picks_largest_first() {
        assert_eq!(top_k(&[0.1, 0.5, 0.2, 0.2], 2), vec![1, 2]);
        assert_eq!(top_k(&[0.3, 0.3, 0.4], 1), vec![2]);
    }

    /// The MoE block against a per-token f64 reference of Mixtral's routing:
    /// `p = softmax(g x)`, keep top k, `w = p_top / sum p_top`, `y = sum w_e expert_e(x)`.
    #[test]
    fn moe_block_matches_per_token_reference() {
        let config = tiny(ModelKind::Moe);
        let (_, model) = Params::init(&config, 7, DType::F64, &Device::Cpu).unwrap();
        let FeedForward::Moe(moe) = &model.layers[0].feed_forward else {
            panic!("moe model has a moe block");
        };
        let mut rng = Rng::new(8);
        let (n, h) = (10, config.hidden_size);
        let xs: Vec<f64> = (0..n * h).map(|_| rng.normal()).collect();
        let x = Tensor::from_vec(xs.clone(), (n, h), &Device::Cpu).unwrap();
        let (y, routing) = moe.forward(&x, true).unwrap();
        let y: Vec<Vec<f64>> = y.to_vec2().unwrap();
        let mat = |t: &Tensor| -> Vec<Vec<f64>> { t.to_vec2().unwrap() };
        let matvec = |w: &[Vec<f64>], v: &[f64]| -> Vec<f64> {
            w.iter()
                .map(|row| row.iter().zip(v).map(|(a, b)| a * b).sum())
                .collect()
        };
        let gate = mat(&moe.gate);
        for t in 0..n {
            let xt = &xs[t * h..(t + 1) * h];
            let logits = matvec(&gate, xt);
            let mx = logits.iter().cloned().fold(f64::MIN, f64::max);
            let e: Vec<f64> = logits.iter().map(|l| (l - mx).exp()).collect();
            let s: f64 = e.iter().sum();
            let p: Vec<f64> = e.iter().map(|v| v / s).collect();
            let chosen = top_k(&p, 2);
            assert_eq!(routing.chosen[t], chosen);
            let norm: f64 = chosen.iter().map(|&c| p[c]).sum();
            let mut want = vec![0f64; h];
            for &c in &chosen {
                let ex = &moe.experts[c];
                let g = matvec(&mat(&ex.gate_proj), xt);
                let u = matvec(&mat(&ex.up_proj), xt);
                let act: Vec<f64> = g
                    .iter()
                    .zip(&u)
                    .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                    .collect();
                let out = matvec(&mat(&ex.down_proj), &act);
                for (w, o) in want.iter_mut().zip(out) {
                    *w += p[c] / norm * o;
                }
            }
            for (a, b) in y[t].iter().zip(&want) {
                assert!((a - b).abs() < 1e-12, "token {t}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn aux_loss_is_k_when_balanced_and_grows_when_not() {
        let dev = Device::Cpu;
        let (e, k) = (4, 2);
        // Uniform probabilities, every expert chosen equally often: aux = E * sum_e (k/E)(1/E) = k.
        let uniform = Routing {
            probs: Tensor::full(0.25f64, (4, e), &dev).unwrap(),
            chosen: vec![vec![0, 1], vec![2, 3], vec![0, 1], vec![2, 3]],
        };
        let aux = load_balancing_loss(&[uniform], e)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!((aux - k as f64).abs() < 1e-12, "{aux}");
        // Everything on experts 0 and 1 with most of the mass there: aux > k.
        let probs = Tensor::from_vec([0.45, 0.45, 0.05, 0.05].repeat(4), (4, e), &dev).unwrap();
        let skewed = Routing {
            probs,
            chosen: vec![vec![0, 1]; 4],
        };
        let aux = load_balancing_loss(&[skewed], e)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        // f = (1, 1, 0, 0), P = (.45, .45, .05, .05): aux = 4 * 0.9 = 3.6.
        assert!((aux - 3.6).abs() < 1e-12, "{aux}");
    }
}
