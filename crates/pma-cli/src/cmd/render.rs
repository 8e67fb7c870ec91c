//! Shared presentation: the JSON schema version, JSON printing and human units.
//!
//! Every `--json` object and every `pma watch` event record carries [`SCHEMA_VERSION`], so a
//! consumer can tell layouts apart; bump it when a field is renamed or removed. Each command
//! renders its own report with these helpers; none of them computes anything.

use std::io::Write;

/// Version of every JSON object pma prints (`--json`) and of the watch event log records.
pub const SCHEMA_VERSION: u32 = 1;

/// `fields` as a JSON object with `schema_version` added.
pub fn versioned(fields: serde_json::Value) -> serde_json::Value {
    let mut v = fields;
    if let serde_json::Value::Object(map) = &mut v {
        map.insert("schema_version".into(), SCHEMA_VERSION.into());
    }
    v
}

/// Pretty JSON on stdout, followed by a newline.
pub fn print_json(v: &serde_json::Value) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    // As an io::Error, so a closed pipe is recognised as one (exit 0).
    serde_json::to_writer_pretty(&mut out, v).map_err(std::io::Error::from)?;
    writeln!(out)?;
    Ok(())
}

/// One compact JSON line on stdout, flushed at once (for `tail -f`-style consumers).
pub fn print_json_line(v: &serde_json::Value) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{v}")?;
    out.flush()?;
    Ok(())
}

/// Bytes in human units (decimal, like `ls -h --si`).
pub fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units_and_versioned_objects() {
        assert_eq!(human(999), "999 B");
        assert_eq!(human(1_500_000), "1.50 MB");
        let v = versioned(serde_json::json!({"a": 1}));
        assert_eq!(v["schema_version"], SCHEMA_VERSION);
        assert_eq!(v["a"], 1);
    }
}
