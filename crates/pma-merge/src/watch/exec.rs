//! The hook a watcher's caller runs on each new output (`pma watch --exec`, the Python
//! `Watcher(exec=...)`): one shell command per `merged` event, reported as an [`ExecDone`]
//! record. The watcher itself never runs it; its event sinks do, so both front ends share this.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

/// One run of the hook on one output, logged as an `exec` event.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename = "exec")]
pub struct ExecDone {
    /// The command as run.
    pub command: String,
    /// The output it ran on.
    pub output: PathBuf,
    /// Whether it exited 0.
    pub success: bool,
    /// Its exit code (`None` if killed by a signal or not started).
    pub code: Option<i32>,
    /// Why it could not start, if it did not.
    pub error: Option<String>,
    /// How long it ran, in seconds.
    pub elapsed_secs: f64,
}

impl ExecDone {
    /// One line for a terminal.
    pub fn render(&self) -> String {
        match (self.success, &self.error) {
            (true, _) => format!("exec ok ({:.1}s): {}", self.elapsed_secs, self.command),
            (false, Some(e)) => format!("exec could not start: {}: {e}", self.command),
            (false, None) => format!(
                "exec failed (exit {}): {}",
                self.code.map_or("signal".into(), |c| c.to_string()),
                self.command
            ),
        }
    }
}

/// Runs `cmd` through `sh -c`, `{}` replaced by the quoted output path (appended when the
/// command has no `{}`). Its stdout goes to this process's stderr, keeping stdout for data; a
/// failure is reported in the record, never as an error, so the watcher goes on.
pub fn run_exec(cmd: &str, output: &Path) -> ExecDone {
    let quoted = shell_quote(&output.display().to_string());
    let command = if cmd.contains("{}") {
        cmd.replace("{}", &quoted)
    } else {
        format!("{cmd} {quoted}")
    };
    let started = Instant::now();
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(&command)
        .stdin(std::process::Stdio::null())
        .stdout(std::io::stderr())
        .status();
    let elapsed_secs = started.elapsed().as_secs_f64();
    let (success, code, error) = match status {
        Ok(s) => (s.success(), s.code(), None),
        Err(e) => (false, None, Some(e.to_string())),
    };
    ExecDone {
        command,
        output: output.into(),
        success,
        code,
        error,
        elapsed_secs,
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quoting_survives_quotes() {
        assert_eq!(shell_quote("a'b"), "'a'\\''b'");
    }

    #[test]
    fn output_path_is_quoted_into_the_command_and_failures_are_recorded() {
        let done = run_exec("test -n {} && exit 3", Path::new("/x/it's here"));
        assert_eq!(done.command, "test -n '/x/it'\\''s here' && exit 3");
        assert!(!done.success);
        assert_eq!(done.code, Some(3));
        let done = run_exec("true", Path::new("/out"));
        assert_eq!(done.command, "true '/out'");
        assert!(done.success, "{}", done.render());
    }
}
