//! The one finder of a Python with torch for the test crates that run torch (`pma-format`'s
//! DCP writer tests and `pma-cli`'s format tests include this file by path).

use std::process::Command;

/// The interpreter tests run: `PMA_PYTHON`, else `python3`.
pub fn python() -> String {
    std::env::var("PMA_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// [`python`] when it imports torch (with its DCP module), numpy and safetensors. Otherwise
/// `test` prints SKIPPED and gets `None`, unless `PMA_REQUIRE_TORCH=1` (as CI sets), where this
/// panics: a test that needs torch never skips in CI.
pub fn torch_python(test: &str) -> Option<String> {
    let py = python();
    let ok = Command::new(&py)
        .args([
            "-c",
            "import torch, torch.distributed.checkpoint, numpy, safetensors",
        ])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(py);
    }
    if std::env::var("PMA_REQUIRE_TORCH").is_ok_and(|v| v == "1") {
        panic!(
            "{test}: PMA_REQUIRE_TORCH=1 but '{py}' cannot import torch, numpy and safetensors \
             (set PMA_PYTHON)"
        );
    }
    eprintln!("SKIPPED {test}: '{py}' cannot import torch (set PMA_PYTHON to a venv with torch)");
    None
}
