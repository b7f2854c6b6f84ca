//! `bnorm`: the command-line tool.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod conformance;

/// Batch normalization done completely: conformance replay, demo, benchmarks.
#[derive(Parser)]
#[command(name = "bnorm", version, about)]
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Conformance { dir }) => conformance::run(&dir),
        None => conformance::run(&PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../conformance/cases"
        ))),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bnorm: {e:#}");
            ExitCode::FAILURE
        }
    }
}
