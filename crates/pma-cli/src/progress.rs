//! Terminal progress: the one `indicatif` bar behind the libraries' `Progress` trait, and the
//! one rule for when a bar is drawn.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Whether a progress bar is drawn: only on a terminal, never under `--quiet`, never when the
/// output is for machines (`--json`), where a bar would only be noise in a log.
pub fn shown(quiet: bool, machine_output: bool) -> bool {
    !quiet && !machine_output && std::io::stderr().is_terminal()
}

/// A byte-count progress bar on stderr, drawn only when [`shown`] says so.
pub struct ByteBar {
    bar: ProgressBar,
}

impl ByteBar {
    /// Creates a bar with `label` in front; hidden unless `visible`.
    pub fn new(label: &str, visible: bool) -> ByteBar {
        let bar = ProgressBar::hidden();
        if visible {
            bar.set_draw_target(ProgressDrawTarget::stderr());
        }
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
            .expect("static template is valid")
            .progress_chars("=> "),
        );
        bar.set_prefix(label.to_string());
        ByteBar { bar }
    }
}

impl pma_merge::Progress for ByteBar {
    fn start(&self, total_bytes: u64) {
        self.bar.set_length(total_bytes);
    }
    fn advance(&self, bytes: u64) {
        self.bar.inc(bytes);
    }
    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
