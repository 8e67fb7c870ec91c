//! Model configs and their HF `config.json` form.
//!
//! [`ModelConfig`] is the one description of a lab model. It writes and reads the config that
//! `transformers` expects beside the weights: `LlamaForCausalLM` (model_type `llama`) for the
//! dense model and `MixtralForCausalLM` (model_type `mixtral`) for the MoE, so a lab checkpoint
//! loads with `AutoModelForCausalLM.from_pretrained(dir)`. [`ModelConfig::param_shapes`] lists
//! every parameter by its HF name, in the order checkpoints store them, as the model names them.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{Error, Result};

/// Dense Llama or Mixtral-style mixture of experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// Llama: every block has one SwiGLU MLP.
    #[default]
    Dense,
    /// Mixtral: every block routes each token to `top_k` of `num_experts` SwiGLU experts.
    Moe,
}

impl ModelKind {
    /// The `architectures[0]` string of the HF config.
    pub const fn architecture(self) -> &'static str {
        match self {
            ModelKind::Dense => "LlamaForCausalLM",
            ModelKind::Moe => "MixtralForCausalLM",
        }
    }
}

impl std::str::FromStr for ModelKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "dense" => Ok(ModelKind::Dense),
            "moe" => Ok(ModelKind::Moe),
            other => Err(format!("unknown model '{other}' (expected dense or moe)")),
        }
    }
}

/// Shape and hyper-parameters of a lab model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelConfig {
    /// Dense or MoE.
    pub kind: ModelKind,
    /// Vocabulary size (256 for the byte tokenizer).
    pub vocab_size: usize,
    /// Residual stream width.
    pub hidden_size: usize,
    /// SwiGLU inner width (of each expert, for the MoE).
    pub intermediate_size: usize,
    /// Number of decoder blocks.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads; fewer than `num_heads` is grouped-query attention.
    pub num_kv_heads: usize,
    /// Longest sequence the model is meant for (the training length).
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// Share the embedding matrix with the output head (no `lm_head.weight` tensor then).
    pub tie_word_embeddings: bool,
    /// Experts per MoE block (`num_local_experts`).
    pub num_experts: usize,
    /// Experts each token is routed to (`num_experts_per_tok`).
    pub top_k: usize,
    /// Weight of the load-balancing loss in the training objective (`router_aux_loss_coef`).
    pub router_aux_loss_coef: f64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            kind: ModelKind::Dense,
            vocab_size: 256,
            hidden_size: 128,
            intermediate_size: default_intermediate_size(128),
            num_layers: 4,
            num_heads: 4,
            num_kv_heads: 4,
            max_position_embeddings: 128,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            tie_word_embeddings: false,
            num_experts: 8,
            top_k: 2,
            router_aux_loss_coef: 0.02,
        }
    }
}

/// Llama's SwiGLU width: 8/3 of the hidden size, rounded up to a multiple of 32.
pub fn default_intermediate_size(hidden_size: usize) -> usize {
    (8 * hidden_size / 3).div_ceil(32) * 32
}

impl ModelConfig {
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads.max(1)
    }

    /// Checks that the shapes fit together.
    pub fn validate(&self) -> Result<()> {
        let bad =
            |field: &'static str, reason: String| Err(Error::InvalidModelConfig { field, reason });
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return bad(field, "must be positive".into());
            }
        }
        if self.hidden_size % self.num_heads != 0 {
            return bad(
                "num_attention_heads",
                format!(
                    "{} does not divide hidden_size {}",
                    self.num_heads, self.hidden_size
                ),
            );
        }
        if self.head_dim() % 2 != 0 {
            return bad(
                "hidden_size",
                format!("head dim {} must be even for RoPE", self.head_dim()),
            );
        }
        if self.num_heads % self.num_kv_heads != 0 {
            return bad(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads {}",
                    self.num_kv_heads, self.num_heads
                ),
            );
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps.is_finite()) {
            return bad(
                "rms_norm_eps",
                format!("{} is not a positive number", self.rms_norm_eps),
            );
        }
        if !(self.rope_theta > 0.0 && self.rope_theta.is_finite()) {
            return bad(
                "rope_theta",
                format!("{} is not a positive number", self.rope_theta),
            );
        }
        if self.kind == ModelKind::Moe {
            if self.num_experts == 0 {
                return bad("num_local_experts", "must be positive".into());
            }
            if self.top_k == 0 || self.top_k > self.num_experts {
                return bad(
                    "num_experts_per_tok",
                    format!("{} is not in 1..={}", self.top_k, self.num_experts),
                );
            }
        }
        Ok(())
    }

    /// Every parameter's HF name and shape, in the order checkpoints store them. The names come
    /// from [`crate::model::Llama::build`], the one place that names parameters.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        crate::model::param_shapes(self)
    }

    /// Total number of parameters.
    pub fn n_params(&self) -> usize {
        self.param_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// The HF `config.json` object (`LlamaForCausalLM` or `MixtralForCausalLM`).
    pub fn to_hf_json(&self) -> Value {
        let mut v = json!({
            "architectures": [self.kind.architecture()],
            "model_type": match self.kind { ModelKind::Dense => "llama", ModelKind::Moe => "mixtral" },
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim(),
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": null,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": true,
            "bos_token_id": null,
            "eos_token_id": null,
            "torch_dtype": "float32",
        });
        let obj = v
            .as_object_mut()
            .expect("json! of an object literal is an object");
        match self.kind {
            ModelKind::Dense => {
                obj.insert("attention_bias".into(), json!(false));
                obj.insert("mlp_bias".into(), json!(false));
                obj.insert("pretraining_tp".into(), json!(1));
            }
            ModelKind::Moe => {
                obj.insert("num_local_experts".into(), json!(self.num_experts));
                obj.insert("num_experts_per_tok".into(), json!(self.top_k));
                obj.insert(
                    "router_aux_loss_coef".into(),
                    json!(self.router_aux_loss_coef),
                );
                obj.insert("output_router_logits".into(), json!(false));
                obj.insert("router_jitter_noise".into(), json!(0.0));
                obj.insert("sliding_window".into(), json!(null));
            }
        }
        v
    }

    /// Reads an HF config object. `path` is only used in error messages.
    pub fn from_hf_json(path: &Path, v: &Value) -> Result<ModelConfig> {
        let arch = v
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .or_else(|| v.get("model_type").and_then(Value::as_str))
            .unwrap_or("");
        let kind = match arch {
            "LlamaForCausalLM" | "llama" => ModelKind::Dense,
            "MixtralForCausalLM" | "mixtral" => ModelKind::Moe,
            other => {
                return Err(Error::UnsupportedArchitecture {
                    path: path.into(),
                    found: other.to_string(),
                })
            }
        };
        let usize_field =
            |field: &'static str| -> Result<Option<usize>> {
                match v.get(field) {
                    None | Some(Value::Null) => Ok(None),
                    Some(x) => x.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
                        Error::InvalidModelConfig {
                            field,
                            reason: format!("{x} is not a non-negative integer"),
                        }
                    }),
                }
            };
        let f64_field = |field: &'static str| -> Result<Option<f64>> {
            match v.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| Error::InvalidModelConfig {
                        field,
                        reason: format!("{x} is not a number"),
                    }),
            }
        };
        let required = |field: &'static str| -> Result<usize> {
            usize_field(field)?.ok_or(Error::InvalidModelConfig {
                field,
                reason: "missing".into(),
            })
        };
        let d = ModelConfig::default();
        let num_heads = required("num_attention_heads")?;
        let hidden_size = required("hidden_size")?;
        let c = ModelConfig {
            kind,
            vocab_size: required("vocab_size")?,
            hidden_size,
            intermediate_size: required("intermediate_size")?,
            num_layers: required("num_hidden_layers")?,
            num_heads,
            num_kv_heads: usize_field("num_key_value_heads")?.unwrap_or(num_heads),
            max_position_embeddings: usize_field("max_position_embeddings")?
                .unwrap_or(d.max_position_embeddings),
            rms_norm_eps: f64_field("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta: f64_field("rope_theta")?.unwrap_or(d.rope_theta),
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            num_experts: usize_field("num_local_experts")?.unwrap_or(d.num_experts),
            top_k: usize_field("num_experts_per_tok")?.unwrap_or(d.top_k),
            router_aux_loss_coef: f64_field("router_aux_loss_coef")?
                .unwrap_or(d.router_aux_loss_coef),
        };
        if let Some(hd) = usize_field("head_dim")? {
            if hd != c.head_dim() {
                return Err(Error::InvalidModelConfig {
                    field: "head_dim",
                    reason: format!(
                        "{hd} differs from hidden_size / num_attention_heads = {}",
                        c.head_dim()
                    ),
                });
            }
        }
        if v.get("rope_scaling").is_some_and(|r| !r.is_null()) {
            return Err(Error::InvalidModelConfig {
                field: "rope_scaling",
                reason: "RoPE scaling is not supported".into(),
            });
        }
        c.validate()?;
        Ok(c)
    }

    /// Reads `config.json` from a checkpoint directory (or the directory of a weights file).
    pub fn load(checkpoint: &Path) -> Result<ModelConfig> {
        let dir = if checkpoint.is_dir() {
            checkpoint
        } else {
            checkpoint.parent().unwrap_or(Path::new("."))
        };
        let path = dir.join("config.json");
        if !path.exists() {
            return Err(Error::MissingConfig {
                path: checkpoint.into(),
            });
        }
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, "reading", e))?;
        let v: Value = serde_json::from_slice(&bytes).map_err(|source| Error::Json {
            path: path.clone(),
            source,
        })?;
        ModelConfig::from_hf_json(&path, &v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense_names_follow_llama() {
        let c = ModelConfig {
            num_layers: 2,
            ..ModelConfig::default()
        };
        let names: Vec<String> = c.param_shapes().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names[0], "model.embed_tokens.weight");
        for n in [
            "model.layers.1.self_attn.q_proj.weight",
            "model.layers.1.self_attn.k_proj.weight",
            "model.layers.1.self_attn.v_proj.weight",
            "model.layers.1.self_attn.o_proj.weight",
            "model.layers.1.mlp.gate_proj.weight",
            "model.layers.1.mlp.up_proj.weight",
            "model.layers.1.mlp.down_proj.weight",
            "model.layers.1.input_layernorm.weight",
            "model.layers.1.post_attention_layernorm.weight",
            "model.norm.weight",
            "lm_head.weight",
        ] {
            assert!(names.iter().any(|x| x == n), "{n} missing");
        }
        assert_eq!(names.len(), 1 + 2 * 9 + 2);
    }

    #[test]
    fn moe_names_follow_mixtral_and_tied_drops_lm_head() {
        let c = ModelConfig {
            kind: ModelKind::Moe,
            num_layers: 1,
            num_experts: 4,
            tie_word_embeddings: true,
            ..ModelConfig::default()
        };
        let shapes = c.param_shapes();
        let get = |n: &str| shapes.iter().find(|(x, _)| x == n).map(|(_, s)| s.clone());
        assert_eq!(
            get("model.layers.0.block_sparse_moe.gate.weight"),
            Some(vec![4, 128])
        );
        assert_eq!(
            get("model.layers.0.block_sparse_moe.experts.3.w2.weight"),
            Some(vec![128, 352])
        );
        assert_eq!(
            get("model.layers.0.block_sparse_moe.experts.3.w1.weight"),
            Some(vec![352, 128])
        );
        assert!(get("lm_head.weight").is_none());
        assert!(get("model.layers.0.mlp.gate_proj.weight").is_none());
    }

    #[test]
    fn hf_config_round_trips() {
        for kind in [ModelKind::Dense, ModelKind::Moe] {
            let c = ModelConfig {
                kind,
                num_kv_heads: 2,
                ..ModelConfig::default()
            };
            let v = c.to_hf_json();
            assert_eq!(v["architectures"][0], kind.architecture());
            assert_eq!(v["hidden_act"], "silu");
            let back = ModelConfig::from_hf_json(Path::new("config.json"), &v).unwrap();
            assert_eq!(back, c);
        }
        let v = ModelConfig::default().to_hf_json();
        assert_eq!(v["model_type"], "llama");
        assert!(v.get("num_local_experts").is_none());
    }

    #[test]
    fn rejects_unknown_architecture_and_bad_heads() {
        let mut v = ModelConfig::default().to_hf_json();
        v["architectures"] = json!(["GPT2LMHeadModel"]);
        assert!(matches!(
            ModelConfig::from_hf_json(Path::new("c"), &v),
            Err(Error::UnsupportedArchitecture { .. })
        ));
        let c = ModelConfig {
            num_heads: 3,
            ..ModelConfig::default()
        };
        assert!(matches!(
            c.validate(),
            Err(Error::InvalidModelConfig {
                field: "num_attention_heads",
                ..
            })
        ));
    }
}
