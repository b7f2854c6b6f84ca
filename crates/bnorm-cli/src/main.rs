//! `bnorm`: the command-line tool.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[macro_use]
mod output;
mod bench;
mod conformance;
mod convention;
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
    /// Train a small CNN with bnorm layers and show the train/inference switch at work
    /// (the default command).
    Demo(demo::DemoArgs),
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `inspect` exits like a linter: 0 healthy, 1 problems found, 2 unreadable.
    let failure = match cli.command {
        Some(Command::Inspect(_)) => ExitCode::from(interop::UNREADABLE_STATUS),
        _ => ExitCode::FAILURE,
    };
    let result = match cli.command {
        Some(Command::Conformance { dir }) => conformance::run(&dir),
        Some(Command::Bench(args)) => bench::run(&args).map(|_| ExitCode::SUCCESS),
        Some(Command::Demo(args)) => demo::run(&args).map(|_| ExitCode::SUCCESS),
        Some(Command::Inspect(args)) => interop::inspect(&args),
        Some(Command::Fold(args)) => interop::fold(&args),
        Some(Command::Convert(args)) => interop::convert(&args),
        None => demo::run(&demo::DemoArgs::default()).map(|_| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => output::exit_code(&e).unwrap_or_else(|| {
            // Nothing more can be done when stderr is closed too.
            let _ = writeln!(std::io::stderr(), "bnorm: {}", output::error_text(&e));
            failure
        }),
    }
}
