//! `pma`: Pre-trained Model Averaging from the command line.
//!
//! The binary is thin: [`cli`] parses arguments, each module under [`cmd`] turns its `Args` into
//! a library config, calls one library entry point and renders the report. Errors are printed
//! once, with their context chain, and map to a nonzero exit.

mod cli;
mod cmd;
mod progress;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match cmd::run(cli) {
        Ok(code) => code,
        Err(err) => {
            if is_broken_pipe(&err) {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
