//! `pma`: Pre-trained Model Averaging from the command line.
//!
//! The binary is thin: [`cli`] parses arguments, each module under [`cmd`] turns its `Args` into
//! a library config, calls one library entry point and renders the report. Errors are printed
//! once, with their context chain, and map to an exit code chosen here, in one place:
//!
//! | code | meaning |
//! |------|---------|
//! | 0    | success; also when a reader closed our stdout early (`pma inspect X \| head`) |
//! | 1    | a data or runtime error: bad checkpoint, I/O error, full disk, lock held, ... |
//! | 2    | a usage error: bad arguments (clap) or settings that make no sense together |
//! | 130  | interrupted by SIGINT/SIGTERM before the output was committed (128 + SIGINT) |
//!
//! Output to stdout goes through [`outln!`], which returns the write error instead of
//! panicking as `println!` does; a `BrokenPipe` anywhere in an error chain ends the process
//! quietly with 0, as ripgrep does.

/// `writeln!` to a locked stdout, returning `std::io::Result<()>` (never panics on EPIPE).
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
    }};
}

/// `write!` to a locked stdout, returning `std::io::Result<()>`.
#[allow(unused_macros)] // used by the lab's commands only
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout().lock(), $($arg)*)
    }};
}

mod cli;
mod cmd;
mod progress;
mod text;

use std::process::ExitCode;

use clap::Parser;

/// Exit code of a data or runtime error.
const EXIT_ERROR: u8 = 1;
/// Exit code of a usage error (the one clap uses).
const EXIT_USAGE: u8 = 2;
/// Exit code of an operation stopped by SIGINT/SIGTERM (128 + SIGINT, as shells report).
const EXIT_INTERRUPTED: u8 = 130;

fn main() -> ExitCode {
    // Before any thread exists (it sets an environment variable): keeps candle's element-wise
    // pool from spinning against the lab's rayon workers.
    #[cfg(feature = "lab")]
    pma_lab::train::tune_cpu_runtime();
    quiet_on_closed_stdio();
    let cli = cli::Cli::parse();
    match cmd::run(cli) {
        Ok(code) => code,
        Err(err) => {
            if is_broken_pipe(&err) {
                return ExitCode::SUCCESS;
            }
            // A closed stderr is no reason to panic either.
            let _ = {
                use std::io::Write as _;
                writeln!(std::io::stderr().lock(), "error: {err:#}")
            };
            ExitCode::from(exit_code(&err))
        }
    }
}

/// The exit code of a failed command: see the table in the crate docs.
fn exit_code(err: &anyhow::Error) -> u8 {
    for e in err.chain() {
        if let Some(e) = e.downcast_ref::<pma_merge::Error>() {
            match e {
                pma_merge::Error::Interrupted => return EXIT_INTERRUPTED,
                pma_merge::Error::InvalidWeights(_)
                | pma_merge::Error::InvalidSelection(_)
                | pma_merge::Error::InvalidWatchConfig(_)
                | pma_merge::Error::TooManyThreads { .. }
                | pma_merge::Error::OutputOverlapsInput { .. }
                | pma_merge::Error::InvalidGlob { .. }
                | pma_merge::Error::IncludeSelectsNothing { .. } => return EXIT_USAGE,
                _ => {}
            }
        }
        if e.downcast_ref::<cmd::UsageError>().is_some() {
            return EXIT_USAGE;
        }
    }
    EXIT_ERROR
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// A safety net for output that does not go through [`outln!`] (an `eprintln!` of a
/// diagnostic, a third-party crate's `println!`): the standard library panics with "failed
/// printing to stdout/stderr" when the stream is closed. That panic becomes a quiet exit 0
/// instead of a backtrace; every other panic keeps the default report.
fn quiet_on_closed_stdio() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failed printing to std") && msg.contains("Broken pipe") {
            std::process::exit(0);
        }
        default(info);
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_separate_usage_data_and_interrupt() {
        let interrupted = anyhow::Error::from(pma_merge::Error::Interrupted).context("merging");
        assert_eq!(exit_code(&interrupted), EXIT_INTERRUPTED);
        let usage = anyhow::Error::from(pma_merge::Error::InvalidWeights("x".into()));
        assert_eq!(exit_code(&usage), EXIT_USAGE);
        let ours = anyhow::Error::from(cmd::UsageError("give --run".into()));
        assert_eq!(exit_code(&ours), EXIT_USAGE);
        let data = anyhow::Error::from(pma_merge::Error::EmptyRun { path: "r".into() });
        assert_eq!(exit_code(&data), EXIT_ERROR);
        let pipe = anyhow::Error::from(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
            .context("printing");
        assert!(is_broken_pipe(&pipe));
    }
}
