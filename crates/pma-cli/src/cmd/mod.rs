//! One module per subcommand. Each exposes `Args` and `run(args) -> anyhow::Result<ExitCode>`,
//! which validates the arguments into a library config, calls the library, and renders.

use std::process::ExitCode;

use crate::cli::{Cli, Command};

#[cfg(feature = "lab")]
pub mod demo;
pub mod diff;
#[cfg(feature = "lab")]
pub mod eval;
pub mod inspect;
pub mod merge;
pub mod merge_parts;
pub mod render;
#[cfg(feature = "lab")]
pub mod train;
pub mod watch;

/// Dispatches to the subcommand.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Merge(args) => merge::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Diff(args) => diff::run(args),
        Command::Watch(args) => watch::run(args),
        #[cfg(feature = "lab")]
        Command::Train(args) => train::run(args),
        #[cfg(feature = "lab")]
        Command::Eval(args) => eval::run(args),
        #[cfg(feature = "lab")]
        Command::Demo(args) => demo::run(args),
        #[cfg(feature = "lab")]
        Command::Reproduce(args) => demo::run_reproduce(args),
    }
}

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Installs SIGINT/SIGTERM handlers that set a flag instead of killing the process, so long
/// operations stop at a safe point and leave no partial output. Returns the flag.
pub fn interrupt_flag() -> &'static std::sync::atomic::AtomicBool {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // SAFETY: the handler only performs an atomic store.
        unsafe {
            libc::signal(libc::SIGINT, handler);
            libc::signal(libc::SIGTERM, handler);
        }
    });
    &INTERRUPTED
}

/// An error in the arguments that clap cannot see (two options that exclude each other, a
/// missing input): exits 2 like clap's own usage errors, not 1 like a data error.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}
