//! The `pma` provenance record of a watch output: which trainer checkpoints it came from and
//! with which settings.
//!
//! Windowed outputs are made by the merge executor from the pins, so their record names the
//! pins; it is rewritten to name the trainer's paths, which are what a reader can find. Stream
//! outputs (incremental SMA, ema-stream) get the whole record built here.

use std::collections::BTreeMap;

use pma_format::FloatDtype;

use super::config::Averaging;
use super::state::{Member, WatchState};

/// Records the trainer's paths (not the pins) and the watch settings in a windowed output.
pub(super) fn rewrite_provenance(
    meta: &mut BTreeMap<String, String>,
    members: &[&Member],
    how: &Averaging,
) {
    let Some(text) = meta.get("pma") else { return };
    let Ok(serde_json::Value::Object(mut record)) = serde_json::from_str(text) else {
        return;
    };
    record.insert(
        "inputs".into(),
        members
            .iter()
            .map(|m| serde_json::json!({"path": m.source.display().to_string(), "step": m.step}))
            .collect(),
    );
    record.insert(
        "watch".into(),
        serde_json::to_value(how).expect("settings serialize"),
    );
    meta.insert("pma".into(), serde_json::Value::Object(record).to_string());
}

/// The header metadata of a stream output: format and the `pma` record.
pub(super) fn stream_provenance(
    how: &Averaging,
    out_dtype: Option<FloatDtype>,
    members: &[Member],
    next: &WatchState,
) -> BTreeMap<String, String> {
    let method = match how {
        Averaging::IncrementalSma { .. } => serde_json::json!({"name": "sma"}),
        Averaging::EmaStream { alpha, .. } => {
            serde_json::json!({"name": "ema-stream", "alpha": alpha})
        }
        Averaging::Window { method, .. } => serde_json::to_value(method).expect("serializes"),
    };
    let record = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "method": method,
        "dtype": out_dtype.map(|d| d.name()),
        "inputs": members.iter().map(|m| serde_json::json!({
            "path": m.source.display().to_string(),
            "step": m.step,
        })).collect::<Vec<_>>(),
        "checkpoints_counted": next.processed.len(),
        "first_step": next.processed.first(),
        "watch": how,
    });
    let mut m = BTreeMap::new();
    m.insert("format".to_string(), "pt".to_string());
    m.insert("pma".to_string(), record.to_string());
    m
}
