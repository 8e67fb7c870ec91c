//! Keyword arguments shared by `merge` and `Watcher`, turned into library values the way the
//! CLI turns its flags into them (`crates/pma-cli/src/cmd/merge.rs`: `SelectArgs::selection`,
//! `OutputArgs`), with the same messages where the CLI has them.

use pma_format::FloatDtype;
use pma_merge::{parse_byte_size, parse_token_count, Selection};
use pyo3::prelude::*;

use crate::errors::config_error;

/// A step or token count: an int, or a string such as `"8B"` or `"500M"`.
#[derive(Debug, Clone, FromPyObject)]
pub(crate) enum Count {
    /// A plain number.
    Int(u64),
    /// A number with an optional k/M/B/T suffix.
    Text(String),
}

impl Count {
    fn text(&self) -> String {
        match self {
            Count::Int(n) => n.to_string(),
            Count::Text(s) => s.clone(),
        }
    }
}

/// A byte size: an int, or a string such as `"5GB"` or `"2GiB"`.
#[derive(Debug, Clone, FromPyObject)]
pub(crate) enum ByteSize {
    /// Bytes.
    Int(u64),
    /// A number with a unit.
    Text(String),
}

/// The checkpoint-selection keywords.
#[derive(Debug, Clone, Default)]
pub(crate) struct SelectOptions {
    pub last: Option<usize>,
    pub every: Option<Count>,
    pub at: Option<Count>,
    pub min: Option<usize>,
    pub tokens_per_step: Option<Count>,
}

impl SelectOptions {
    /// The library selection, token counts converted to steps (the CLI's `selection()`).
    pub(crate) fn selection(&self) -> PyResult<Selection> {
        let tokens_per_step =
            match &self.tokens_per_step {
                Some(k) => Some(parse_token_count(&k.text()).filter(|&k| k > 0).ok_or_else(
                    || {
                        config_error(format!(
                            "tokens_per_step '{}' is not a positive token count",
                            k.text()
                        ))
                    },
                )?),
                None => None,
            };
        let steps = |v: &Option<Count>, name: &str| {
            v.as_ref()
                .map(|v| steps(&v.text(), tokens_per_step, name))
                .transpose()
        };
        Ok(Selection {
            last: self.last,
            every: steps(&self.every, "every")?,
            at: steps(&self.at, "at")?,
            min: self.min,
        })
    }
}

/// A step count, or a token count divided by tokens-per-step (the CLI's `steps()`).
fn steps(value: &str, tokens_per_step: Option<u64>, name: &str) -> PyResult<u64> {
    match tokens_per_step {
        None => value.trim().parse().map_err(|_| {
            config_error(format!(
                "{name} '{value}' is not a step number (give tokens_per_step for token counts)"
            ))
        }),
        Some(k) => {
            let tokens = parse_token_count(value)
                .ok_or_else(|| config_error(format!("{name} '{value}' is not a token count")))?;
            if tokens % k != 0 {
                return Err(config_error(format!(
                    "{name} {value} = {tokens} tokens is not a whole number of {k}-token steps"
                )));
            }
            Ok(tokens / k)
        }
    }
}

/// An output dtype name (the CLI's `parse_dtype`).
pub(crate) fn dtype(name: Option<&str>) -> PyResult<Option<FloatDtype>> {
    name.map(|s| {
        FloatDtype::parse(s).ok_or_else(|| {
            config_error(format!(
                "unknown dtype '{s}' (expected bf16, f16, f32 or f64)"
            ))
        })
    })
    .transpose()
}

/// The largest output shard in bytes (`None`: the CLI's default, 5GB).
pub(crate) fn max_shard_bytes(size: Option<&ByteSize>) -> PyResult<u64> {
    match size {
        None => Ok(pma_merge::DEFAULT_MAX_SHARD_BYTES),
        Some(ByteSize::Int(n)) => Ok(*n),
        Some(ByteSize::Text(s)) => parse_byte_size(s).ok_or_else(|| {
            config_error(format!(
                "cannot read '{s}' as a size (e.g. 5GB, 500MB, 2GiB)"
            ))
        }),
    }
}

/// Worker threads, `None` or 0 resolved to all cores; an absurd count is a `ConfigError` (the
/// CLI's `OutputArgs::threads`).
pub(crate) fn threads(threads: Option<usize>) -> PyResult<usize> {
    pma_merge::resolve_threads(threads.unwrap_or(0)).map_err(crate::errors::to_py_err)
}
