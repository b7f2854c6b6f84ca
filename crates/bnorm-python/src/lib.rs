//! # bnorm for Python — the extension module `bnorm._bnorm`
//!
//! This crate is the Rust half of the `bnorm` Python package (the Python half is in
//! `python/bnorm/`, built together by maturin from `pyproject.toml`). It is thin on
//! purpose: every batch-norm decision is the core crate's; this crate only turns NumPy
//! buffers into slices, Python settings into a [`bnorm::Config`], and [`bnorm::Error`]
//! into the Python exception `bnorm.Error`.
//!
//! * [`layer::Layer`] — the NumPy API's stateful layer (`bnorm.BatchNorm` wraps it).
//! * [`functional::Kernel`] — a stateless step over caller-owned parameters and running
//!   statistics, for the PyTorch drop-in (`bnorm.torch`), whose state lives in the
//!   module's own parameters and buffers.
//! * [`cuda::CudaKernel`] — the drop-in's step on CUDA tensors (`bnorm-cuda`'s kernels
//!   on torch's device memory, ordered with torch's stream).
//! * [`mod@array`] — the zero-copy view of NumPy arrays as `&[T]` / `&mut [T]` for every
//!   storage type (16-bit types travel as `uint16` arrays and are reinterpreted).
//! * [`threads`] — the threads kernels run on (bnorm's pool or the process's OpenMP
//!   runtime), with the GIL released.
//! * `cli` — `python -m bnorm`: the command-line tool's [`bnorm_cli::run`] (without the
//!   `demo` feature), so the tool and the package behave alike.
//!
//! Python users read the package's docstrings; this crate documents the Rust side.

#![deny(missing_docs)]

use pyo3::prelude::*;

pub mod array;
pub mod cuda;
pub mod errors;
pub mod functional;
pub mod layer;
pub mod settings;
pub mod threads;

/// Runs the command-line tool (`bnorm_cli::run`) on `args`, the program name first, with
/// the GIL released; returns its exit status (`python -m bnorm`).
#[pyfunction]
fn cli(py: Python<'_>, args: Vec<std::ffi::OsString>) -> u8 {
    py.detach(|| bnorm_cli::run(args))
}

/// The module `bnorm._bnorm`.
#[pymodule]
fn _bnorm(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("Error", m.py().get_type::<errors::Error>())?;
    m.add_class::<layer::Layer>()?;
    m.add_class::<functional::Kernel>()?;
    m.add_class::<functional::Step>()?;
    m.add_class::<cuda::CudaKernel>()?;
    m.add_class::<cuda::CudaStep>()?;
    m.add_function(wrap_pyfunction!(threads::set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(threads::get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(threads::use_openmp, m)?)?;
    m.add_function(wrap_pyfunction!(threads::get_threading, m)?)?;
    m.add_function(wrap_pyfunction!(cli, m)?)?;
    Ok(())
}
