//! `bnorm`: the command-line tool (see the library, [`bnorm_cli::run`]).

use std::process::ExitCode;

fn main() -> ExitCode {
    ExitCode::from(bnorm_cli::run(std::env::args_os()))
}
