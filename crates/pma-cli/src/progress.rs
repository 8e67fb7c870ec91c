//! Terminal progress: an `indicatif` bar behind the libraries' `Progress` trait.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A byte-count progress bar on stderr; hidden when stderr is not a TTY or when `quiet`.
pub struct ByteBar {
    bar: ProgressBar,
}

impl ByteBar {
    /// Creates a bar with `label` in front.
    pub fn new(label: &str, quiet: bool) -> ByteBar {
        let bar = ProgressBar::hidden();
        if !quiet && std::io::stderr().is_terminal() {
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
