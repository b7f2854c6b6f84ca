//! Writing to standard output without panicking when the reader has gone away.
//!
//! `println!` panics when a write fails, and a write to a pipe whose reader has exited
//! (`bnorm inspect --json FILE | head -c 10`) fails with `BrokenPipe` (Rust ignores
//! SIGPIPE). Every subcommand writes through [`outln!`] instead: a failed write becomes an
//! error that the `?` operator carries up to `main`, which exits quietly on
//! [`StdoutClosed`] (see [`exit_code`]) and reports any other write error once.

use std::fmt;
use std::io::Write;

/// The exit status after standard output was closed by its reader: what a shell reports
/// for a program killed by SIGPIPE (128 + 13), as `cat` or `yes` would exit there.
pub const BROKEN_PIPE_STATUS: u8 = 141;

/// Standard output was closed by its reader (`BrokenPipe`): nobody reads what follows, so
/// the command stops without a message.
#[derive(Debug)]
pub struct StdoutClosed;

impl fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("standard output was closed")
    }
}

impl std::error::Error for StdoutClosed {}

/// Writes `args` to standard output. A closed pipe gives [`StdoutClosed`]; any other
/// failure (a full disk behind a redirection, ...) an error naming standard output.
pub fn write(args: fmt::Arguments<'_>) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_fmt(args) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        Err(e) => Err(anyhow::Error::new(e).context("writing to standard output")),
    }
}

/// The exit code for a failed command, or `None` when the error should be reported:
/// [`BROKEN_PIPE_STATUS`] when standard output was closed by its reader.
pub fn exit_code(e: &anyhow::Error) -> Option<u8> {
    e.chain()
        .any(|c| c.is::<StdoutClosed>())
        .then_some(BROKEN_PIPE_STATUS)
}

/// The text of an error and its causes, each said once: `outer: cause: root cause`,
/// leaving out a cause whose text is already part of what precedes it (an error whose
/// own message includes its source, as `bnorm_interop::InteropError::Io` does, would
/// otherwise print the OS error twice).
pub fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if part.is_empty() || text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

/// `println!` that returns `anyhow::Result<()>` instead of panicking when standard output
/// is closed (see the module documentation); use it with `?`.
macro_rules! outln {
    () => {
        $crate::output::write(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::output::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_text_says_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        #[derive(Debug)]
        struct Wraps(std::io::Error);
        impl fmt::Display for Wraps {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "cannot access x: {}", self.0)
            }
        }
        impl std::error::Error for Wraps {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = anyhow::Error::new(Wraps(io)).context("reading x");
        assert_eq!(error_text(&e), "reading x: cannot access x: no such file");
        let plain = anyhow::anyhow!("root").context("outer");
        assert_eq!(error_text(&plain), "outer: root");
    }

    #[test]
    fn closed_stdout_is_recognised_through_context() {
        let e = anyhow::Error::new(StdoutClosed).context("printing the table");
        assert!(exit_code(&e).is_some());
        assert!(exit_code(&anyhow::anyhow!("other")).is_none());
    }
}
