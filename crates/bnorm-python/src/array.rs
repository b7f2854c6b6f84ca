//! NumPy arrays as slices, without copying.
//!
//! f32 and f64 arrays are read as they are. The 16-bit types travel as `uint16` arrays —
//! NumPy's `float16`, `ml_dtypes.bfloat16` and torch's `float16`/`bfloat16` tensors are all
//! viewed as `uint16` by the Python side — and are reinterpreted here as [`half::f16`] or
//! [`half::bf16`] with `bytemuck` (same size, every bit pattern valid: no `unsafe`). The
//! dtype tag says which. Arrays must be C-contiguous; the Python side picks the layout
//! whose order matches the memory (`NHWC` for a channels-last tensor) so that nothing is
//! copied.

use bytemuck::Pod;
use numpy::{PyReadonlyArrayDyn, PyReadwriteArrayDyn};
use pyo3::prelude::*;

use crate::errors::error_of_kind;

/// Calls `$body` with `$t` the bnorm element type and `$s` the NumPy storage type of a
/// [`bnorm::element::DType`].
#[macro_export]
macro_rules! dispatch {
    ($dtype:expr, |$t:ident, $s:ident| $body:expr) => {
        match $dtype {
            bnorm::element::DType::F32 => {
                type $t = f32;
                type $s = f32;
                $body
            }
            bnorm::element::DType::F64 => {
                type $t = f64;
                type $s = f64;
                $body
            }
            bnorm::element::DType::F16 => {
                type $t = bnorm::element::f16;
                type $s = u16;
                $body
            }
            bnorm::element::DType::BF16 => {
                type $t = bnorm::element::bf16;
                type $s = u16;
                $body
            }
        }
    };
}

fn wrong_dtype(what: &str, storage: &str) -> PyErr {
    error_of_kind(
        "DType",
        format!("{what} must be a NumPy array of {storage} (16-bit floats viewed as uint16)"),
    )
}

fn not_contiguous(what: &str) -> PyErr {
    error_of_kind(
        "NotContiguous",
        format!("{what} must be C-contiguous (bnorm does not copy it)"),
    )
}

/// A read-only view of `a` as a NumPy array of storage type `S`.
pub fn read<'py, S: numpy::Element>(
    a: &Bound<'py, PyAny>,
    what: &str,
) -> PyResult<PyReadonlyArrayDyn<'py, S>> {
    a.extract::<PyReadonlyArrayDyn<'py, S>>()
        .map_err(|_| wrong_dtype(what, std::any::type_name::<S>()))
}

/// A writable view of `a` as a NumPy array of storage type `S`.
pub fn write<'py, S: numpy::Element>(
    a: &Bound<'py, PyAny>,
    what: &str,
) -> PyResult<PyReadwriteArrayDyn<'py, S>> {
    a.extract::<PyReadwriteArrayDyn<'py, S>>()
        .map_err(|_| wrong_dtype(what, std::any::type_name::<S>()))
}

/// The elements of a read-only view, reinterpreted as `T`.
pub fn slice<'a, S: numpy::Element + Pod, T: Pod>(
    a: &'a PyReadonlyArrayDyn<'_, S>,
    what: &str,
) -> PyResult<&'a [T]> {
    let s = a.as_slice().map_err(|_| not_contiguous(what))?;
    bytemuck::try_cast_slice(s).map_err(|_| wrong_dtype(what, std::any::type_name::<S>()))
}

/// The elements of a writable view, reinterpreted as `T`.
pub fn slice_mut<'a, S: numpy::Element + Pod, T: Pod>(
    a: &'a mut PyReadwriteArrayDyn<'_, S>,
    what: &str,
) -> PyResult<&'a mut [T]> {
    let s = a.as_slice_mut().map_err(|_| not_contiguous(what))?;
    bytemuck::try_cast_slice_mut(s).map_err(|_| wrong_dtype(what, std::any::type_name::<S>()))
}
