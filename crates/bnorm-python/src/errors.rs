//! `bnorm.Error`: every [`bnorm::Error`] as a Python `ValueError` subclass whose `kind`
//! attribute names the variant (`"ChannelMismatch"`, `"BatchTooSmall"`, ...).

use pyo3::create_exception;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

create_exception!(
    _bnorm,
    Error,
    PyValueError,
    "An error of bnorm (a ValueError). `kind` names the Rust error variant \
     (\"ChannelMismatch\", \"BatchTooSmall\", ...). A call that raises it changed nothing."
);

/// The variant's name of a core error, from its `Debug` form (`ChannelMismatch { .. }`
/// gives `ChannelMismatch`).
pub fn kind(e: &bnorm::Error) -> String {
    let debug = format!("{e:?}");
    let end = debug
        .find(|c: char| !c.is_alphanumeric() && c != '_')
        .unwrap_or(debug.len());
    debug[..end].to_string()
}

/// A Python `bnorm.Error` with the error's message and `kind`.
pub fn raise(e: bnorm::Error) -> PyErr {
    error_of_kind(&kind(&e), e.to_string())
}

/// A Python `bnorm.Error` of a given kind (for the checks this crate makes itself:
/// `"NotContiguous"`, `"DType"`, `"Setting"`).
pub fn error_of_kind(kind: &str, message: String) -> PyErr {
    Python::attach(|py| {
        let err = Error::new_err(message);
        match err.value(py).setattr("kind", kind) {
            Ok(()) => err,
            Err(e) => e,
        }
    })
}

/// A `RuntimeWarning` when a training step left the running statistics of channels with
/// non-finite batch statistics unchanged (the core's default `NonFinitePolicy::SkipChannel`;
/// PyTorch would write NaN into them). The output carries the NaN either way.
pub fn warn_skipped(py: Python<'_>, report: &bnorm::StepReport) -> PyResult<()> {
    if report.skipped_channels.is_empty() {
        return Ok(());
    }
    let message = format!(
        "bnorm: non-finite batch statistics in channels {:?}; their running statistics \
         were left unchanged",
        report.skipped_channels
    );
    let message = std::ffi::CString::new(message).unwrap_or_default();
    let category = py.get_type::<pyo3::exceptions::PyRuntimeWarning>();
    PyErr::warn(py, &category, &message, 1)
}

/// Converts core results.
pub trait IntoPy<T> {
    /// The result with a core error raised as `bnorm.Error`.
    fn py_err(self) -> PyResult<T>;
}

impl<T> IntoPy<T> for bnorm::Result<T> {
    fn py_err(self) -> PyResult<T> {
        self.map_err(raise)
    }
}

#[cfg(test)]
mod tests {
    use super::kind;

    #[test]
    fn kind_is_the_variant_name() {
        let e = bnorm::Error::ChannelMismatch {
            expected: 3,
            got: 4,
        };
        assert_eq!(kind(&e), "ChannelMismatch");
        assert_eq!(
            kind(&bnorm::Error::NoRunningStatistics),
            "NoRunningStatistics"
        );
        let e = bnorm::Error::BatchTooSmall { channel_values: 1 };
        assert_eq!(kind(&e), "BatchTooSmall");
    }
}
