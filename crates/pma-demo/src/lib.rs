//! `pma-demo`: the paper's findings, end to end, on the pma lab.
//!
//! It trains small Llama-style models with `pma-lab`, merges their checkpoints with
//! `pma-merge`, evaluates everything on one fixed validation set, checks the paper's claims and
//! writes a report. `pma demo` and `pma reproduce` are thin wrappers over [`experiment::run`].
//!
//! - [`profile`]: a [`profile::Scope`] (demo or reproduction) and a [`profile::Scale`] (tiny,
//!   quick, full) become a [`profile::Profile`]: every size, step and merge point.
//! - [`experiment`]: trains the trunk, forks annealing branches, merges (SMA, EMA, WMA; N and V
//!   sweeps), runs the reproduction's extra experiments, and fills a [`results::Results`].
//! - [`results`]: the `results.json` schema, the single source of every reported number.
//! - [`ids`]: typed run names ([`ids::RunId`]) and merge tags ([`ids::Tag`]), the one spelling of
//!   each string that `results.json` holds.
//! - [`findings`]: each claim of the paper as a plain rule over the results.
//! - [`report`] and [`plot`]: `report.md`, the terminal table and the PNG plots, rendered from
//!   the results alone.
//!
//! ```no_run
//! use pma_demo::experiment::{run, DemoConfig, NoProgress};
//! use pma_demo::profile::{Profile, Scale, Scope};
//!
//! # fn main() -> pma_demo::Result<()> {
//! let config = DemoConfig {
//!     scope: Scope::Demo,
//!     profile: Profile::new(Scale::Tiny),
//!     out_dir: "demo-out".into(),
//!     ..DemoConfig::default()
//! };
//! let results = run(&config, &NoProgress, None)?;
//! for f in &results.findings {
//!     println!("{} {}", if f.held { "held" } else { "did not hold" }, f.claim);
//! }
//! print!("{}", pma_demo::report::summary_table(&results));
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

mod error;
pub mod experiment;
pub mod findings;
pub mod ids;
pub mod plot;
pub mod profile;
pub mod report;
pub mod results;

pub use error::{Error, Result};
