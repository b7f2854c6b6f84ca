//! The `bnorm` command-line tool as a library: [`run`] parses the arguments and runs a
//! subcommand, returning the exit status. The `bnorm` binary is `run` over the process's
//! arguments; the Python package calls the same function for `python -m bnorm`, so both
//! behave alike.
//!
//! The `demo` feature (on by default) brings the `demo` and `bench` subcommands and their
//! dependencies (candle, plotting); without it the tool has `inspect`, `fold`, `convert`
//! and `conformance`.
//!
//! ```
//! // `bnorm --version`: clap prints the version and the status is 0.
//! assert_eq!(bnorm_cli::run(["bnorm", "--version"]), 0);
//! // an unknown subcommand is a usage error (status 2)
//! assert_eq!(bnorm_cli::run(["bnorm", "frobnicate"]), 2);
//! ```

#![deny(missing_docs)]

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[macro_use]
mod output;
#[cfg(feature = "demo")]
mod bench;
mod conformance;
mod convention;
#[cfg(feature = "demo")]
mod demo;
mod interop;

/// Batch normalization done completely: replay the conformance cases, train the demo, run
/// the benchmarks, and inspect, fold or convert the batch-norm layers of checkpoints.
#[derive(Parser)]
#[command(
    name = "bnorm",
    version,
    after_help = "Without a command, bnorm runs `demo`. `bnorm help COMMAND` (or `bnorm COMMAND --help`) \
                  describes a command's options."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Replay every conformance case (*.safetensors) in DIR against bnorm.
    Conformance {
        /// Directory holding the case files.
        dir: PathBuf,
    },
    #[cfg(feature = "demo")]
    /// Train a small CNN with bnorm layers and show the train/inference switch at work
    /// (the default command).
    Demo(demo::DemoArgs),
    #[cfg(feature = "demo")]
    /// Measure bandwidth of every kernel against a plain copy and candle-nn.
    Bench(bench::BenchArgs),
    /// List the batch-norm layers of a checkpoint, their conventions and health (exit status
    /// 0: healthy, 1: problems found, 2: unreadable).
    Inspect(interop::InspectArgs),
    /// Fold batch-norm layers into the preceding convolution or linear layer.
    Fold(interop::FoldArgs),
    /// Convert batch-norm layers to another framework's names and conventions.
    Convert(interop::ConvertArgs),
}

/// Runs the tool on `args` (the program name first, as `std::env::args_os` gives them)
/// and returns the exit status: what the subcommand returns, 2 for a usage error (clap's
/// message printed), 1 for a failed command (its error printed on standard error), or
/// `inspect`'s unreadable-file status.
pub fn run<I, T>(args: I) -> u8
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            // help and version go to stdout with status 0, usage errors to stderr
            let _ = e.print();
            return u8::try_from(e.exit_code()).unwrap_or(2);
        }
    };
    // `inspect` exits like a linter: 0 healthy, 1 problems found, 2 unreadable.
    let failure = match cli.command {
        Some(Command::Inspect(_)) => interop::UNREADABLE_STATUS,
        _ => 1,
    };
    let result = match cli.command {
        Some(Command::Conformance { dir }) => conformance::run(&dir),
        #[cfg(feature = "demo")]
        Some(Command::Bench(args)) => bench::run(&args).map(|_| 0),
        #[cfg(feature = "demo")]
        Some(Command::Demo(args)) => demo::run(&args).map(|_| 0),
        Some(Command::Inspect(args)) => interop::inspect(&args),
        Some(Command::Fold(args)) => interop::fold(&args),
        Some(Command::Convert(args)) => interop::convert(&args),
        #[cfg(feature = "demo")]
        None => demo::run(&demo::DemoArgs::default()).map(|_| 0),
        #[cfg(not(feature = "demo"))]
        None => {
            let help = <Cli as clap::CommandFactory>::command().render_help();
            let _ = writeln!(std::io::stderr(), "{help}");
            return 2;
        }
    };
    let status = match result {
        Ok(code) => code,
        Err(e) => output::exit_code(&e).unwrap_or_else(|| {
            // Nothing more can be done when stderr is closed too.
            let _ = writeln!(std::io::stderr(), "bnorm: {}", output::error_text(&e));
            failure
        }),
    };
    // what the subcommand printed must be out before a host process (Python) goes on
    let _ = std::io::stdout().flush();
    status
}
