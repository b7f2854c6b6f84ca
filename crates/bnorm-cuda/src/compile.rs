//! Compiling the kernels with NVRTC, with no driver and no device needed: to a cubin for
//! one architecture (`sm_XY`, what [`Gpu::new`](crate::Gpu::new) loads, so a driver older
//! than the NVRTC still accepts it), or to PTX (`compute_XY`, the fallback when this NVRTC
//! does not know the device's architecture). Also where NVRTC is found:
//! the loader path, or the library named by `BNORM_NVRTC` (a file, or a folder holding
//! `libnvrtc.so.*`, e.g. the `nvidia/cu13/lib` folder of the `nvidia-cuda-nvrtc` wheel).
//!
//! ```
//! use bnorm_cuda::compile::{compile, nvrtc_available, Target};
//! if nvrtc_available().is_ok() {
//!     let out = compile((9, 0), Target::Cubin).unwrap();
//!     assert!(!out.image.is_empty());
//! }
//! ```

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use cudarc::nvrtc::{result, sys};

use crate::{kernels, CudaError, Result};

/// What to compile to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Machine code for exactly this architecture (`--gpu-architecture=sm_XY`), read with
    /// `nvrtcGetCUBIN`. Loads on any driver that supports the architecture.
    Cubin,
    /// PTX for the virtual architecture (`compute_XY`), JIT-compiled by the driver at load
    /// time; the driver must be at least as new as this NVRTC.
    Ptx,
}

/// One compilation of the whole kernel source.
#[derive(Debug, Clone)]
pub struct Compiled {
    /// Compute capability compiled for.
    pub arch: (i32, i32),
    /// Cubin or PTX.
    pub target: Target,
    /// The image: cubin bytes, or PTX text with its terminating NUL (what
    /// `cuModuleLoadData` takes either way).
    pub image: Vec<u8>,
    /// NVRTC's log (with `verbose`, ptxas's register and spill report per kernel).
    pub log: String,
    /// Milliseconds the compilation took.
    pub ms: f64,
}

/// Per-kernel resource use, parsed from ptxas's verbose report (`-v`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelUsage {
    /// Entry point.
    pub name: String,
    /// Registers per thread.
    pub registers: u32,
    /// Bytes of spill stores.
    pub spill_stores: u32,
    /// Bytes of spill loads.
    pub spill_loads: u32,
    /// Bytes of stack frame.
    pub stack: u32,
}

/// The NVRTC version, `(major, minor)`.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    nvrtc_available()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC is loaded (checked above); the pointers are valid for writes.
    let r = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
    check(r, "nvrtcVersion")?;
    Ok((major, minor))
}

/// Makes NVRTC loadable, without calling into it: found on the loader path, or else
/// loaded from `BNORM_NVRTC` (a library file, or a folder searched for `libnvrtc.so*`)
/// so that cudarc's later `dlopen("libnvrtc.so.13")` resolves to it by its soname.
pub fn nvrtc_available() -> Result<()> {
    static FOUND: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            // SAFETY: only tries dlopen on candidate names; calls no NVRTC function.
            if unsafe { sys::is_culib_present() } {
                return Ok(());
            }
            let Some(hint) = std::env::var_os("BNORM_NVRTC") else {
                return Err(
                    "the NVRTC library (libnvrtc.so) cannot be loaded: not on the \
                            loader path and BNORM_NVRTC is not set"
                        .into(),
                );
            };
            let file = nvrtc_file(Path::new(&hint)).ok_or_else(|| {
                format!("BNORM_NVRTC={hint:?} names no libnvrtc.so* file or folder holding one")
            })?;
            // SAFETY: loading NVRTC runs its initializers, which have no preconditions.
            let lib = unsafe { libloading::Library::new(&file) }
                .map_err(|e| format!("loading {}: {e}", file.display()))?;
            // Kept loaded for the life of the process: cudarc resolves its symbols later.
            std::mem::forget(lib);
            // SAFETY: as above; now finds the already loaded library by its soname.
            if unsafe { sys::is_culib_present() } {
                Ok(())
            } else {
                Err(format!(
                    "{} loaded, but not under a name cudarc looks for",
                    file.display()
                ))
            }
        })
        .clone()
        .map_err(|reason| CudaError::Unavailable { reason })
}

/// The NVRTC library `hint` names: the file itself, or the highest-versioned
/// `libnvrtc.so*` in the folder (not the `-builtins` helper).
fn nvrtc_file(hint: &Path) -> Option<PathBuf> {
    if hint.is_file() {
        return Some(hint.to_path_buf());
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(hint)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libnvrtc.so"))
        })
        .collect();
    found.sort();
    found.pop()
}

fn check(r: sys::nvrtcResult, what: &str) -> Result<()> {
    if r == sys::nvrtcResult::NVRTC_SUCCESS {
        Ok(())
    } else {
        Err(CudaError::Compile {
            log: format!("{what}: {r:?}"),
        })
    }
}

/// The NVRTC options for one architecture and target.
pub fn options(arch: (i32, i32), target: Target, verbose: bool) -> Vec<String> {
    let prefix = match target {
        Target::Cubin => "sm",
        Target::Ptx => "compute",
    };
    let mut o = vec![format!("--gpu-architecture={prefix}_{}{}", arch.0, arch.1)];
    if verbose && target == Target::Cubin {
        o.push("--ptxas-options=-v".into());
    }
    o
}

/// Compiles [`kernels::source`] for `arch`. A compile error carries NVRTC's log.
pub fn compile(arch: (i32, i32), target: Target) -> Result<Compiled> {
    compile_with(arch, target, false)
}

/// [`compile`], with ptxas's verbose report in the log when `verbose` (cubin only).
pub fn compile_with(arch: (i32, i32), target: Target, verbose: bool) -> Result<Compiled> {
    compile_source(&kernels::source(), arch, target, verbose)
}

/// Compiles `source` (all of [`kernels::source`] or a part of it, [`kernels::source_for`]).
pub fn compile_source(
    source: &str,
    arch: (i32, i32),
    target: Target,
    verbose: bool,
) -> Result<Compiled> {
    nvrtc_available()?;
    let src = CString::new(source).map_err(|_| CudaError::Compile {
        log: "kernel source holds a NUL".into(),
    })?;
    let name = c"bnorm_cuda.cu";
    let opts = options(arch, target, verbose);
    let t = Instant::now();
    let prog = result::create_program(&src, Some(name)).map_err(|e| CudaError::Compile {
        log: format!("nvrtcCreateProgram: {e:?}"),
    })?;
    // SAFETY: `prog` was created above and is destroyed once, below; `src` and `name`
    // outlive it.
    let out = unsafe { compile_program(prog, &opts, target) };
    // SAFETY: as above; destroyed exactly once.
    let _ = unsafe { result::destroy_program(prog) };
    let (image, log) = out?;
    Ok(Compiled {
        arch,
        target,
        image,
        log,
        ms: t.elapsed().as_secs_f64() * 1e3,
    })
}

/// # Safety
/// `prog` must be a live program from `create_program`.
unsafe fn compile_program(
    prog: sys::nvrtcProgram,
    opts: &[String],
    target: Target,
) -> Result<(Vec<u8>, String)> {
    let compiled = result::compile_program(prog, opts);
    let log = result::get_program_log(prog)
        .map(|l| {
            // SAFETY: NVRTC's log is NUL-terminated.
            unsafe { CStr::from_ptr(l.as_ptr()) }
                .to_string_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    if let Err(e) = compiled {
        return Err(CudaError::Compile {
            log: format!("{e:?} with {opts:?}: {log}"),
        });
    }
    let image = match target {
        Target::Ptx => result::get_ptx(prog)
            .map_err(|e| CudaError::Compile {
                log: format!("nvrtcGetPTX: {e:?}"),
            })?
            .into_iter()
            .map(|c| c as u8)
            .collect(),
        Target::Cubin => {
            let mut size = 0usize;
            check(sys::nvrtcGetCUBINSize(prog, &mut size), "nvrtcGetCUBINSize")?;
            let mut buf = vec![0u8; size];
            check(
                sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr().cast()),
                "nvrtcGetCUBIN",
            )?;
            buf
        }
    };
    Ok((image, log))
}

/// Compiles `source` for the device's architecture: a cubin if this NVRTC knows `sm_XY`,
/// else PTX for the newest virtual architecture it knows that is not newer than the device
/// (which the driver JIT-compiles, and which needs a driver at least as new as NVRTC).
pub fn compile_for_device(source: &str, arch: (i32, i32)) -> Result<Compiled> {
    match compile_source(source, arch, Target::Cubin, false) {
        Ok(c) => Ok(c),
        Err(cubin_err) => {
            let fallback = [(arch.0, arch.1), (10, 0), (9, 0), (8, 0)]
                .into_iter()
                .filter(|&a| a <= arch)
                .find_map(|a| compile_source(source, a, Target::Ptx, false).ok());
            fallback.ok_or(cubin_err)
        }
    }
}

/// Parses ptxas's `-v` report (NVRTC's log with `--ptxas-options=-v`): one entry per
/// kernel, in the order reported. A "Function properties for NAME" block belongs to NAME:
/// a called device function's block (its own stack and spills) is not the kernel's.
pub fn parse_ptxas_report(log: &str) -> Vec<KernelUsage> {
    let mut out: Vec<KernelUsage> = Vec::new();
    let mut props_for: Option<String> = None;
    let number_before = |line: &str, unit: &str| -> Option<u32> {
        let at = line.find(unit)?;
        line[..at].split_whitespace().last()?.parse().ok()
    };
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or("").to_string();
            out.push(KernelUsage {
                name,
                registers: 0,
                spill_stores: 0,
                spill_loads: 0,
                stack: 0,
            });
            props_for = None;
        } else if let Some(rest) = line.split("Function properties for ").nth(1) {
            props_for = Some(rest.trim().to_string());
        } else if line.contains("bytes stack frame") {
            let owner = props_for.take();
            if let Some(k) = out
                .iter_mut()
                .rev()
                .find(|k| Some(&k.name) == owner.as_ref())
            {
                k.stack = number_before(line, "bytes stack frame").unwrap_or(0);
                k.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
                k.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
            }
        } else if line.contains("Used ") && line.contains("registers") {
            if let Some(k) = out.last_mut() {
                let at = line.find("Used ").map(|i| i + 5).unwrap_or(0);
                k.registers = line[at..]
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_name_the_architecture() {
        assert_eq!(
            options((9, 0), Target::Cubin, true),
            ["--gpu-architecture=sm_90", "--ptxas-options=-v"]
        );
        assert_eq!(
            options((8, 0), Target::Ptx, true),
            ["--gpu-architecture=compute_80"]
        );
    }

    #[test]
    fn ptxas_report_is_parsed() {
        let log = "ptxas info    : 0 bytes gmem\n\
            ptxas info    : Compiling entry function 'bn_norm_f32' for 'sm_90'\n\
            ptxas info    : Function properties for bn_norm_f32\n\
            \x20   8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
            ptxas info    : Used 40 registers, used 0 barriers, 380 bytes cmem[0]\n\
            ptxas info    : Function properties for _Z8callee\n\
            \x20   0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
            ptxas info    : Compiling entry function 'bn_stats_f32' for 'sm_90'\n\
            ptxas info    : Function properties for bn_stats_f32\n\
            \x20   88 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
            ptxas info    : Used 32 registers, used 1 barriers, 512 bytes smem\n\
            ptxas info    : Function properties for _Z8callee\n\
            \x20   0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n";
        let r = parse_ptxas_report(log);
        assert_eq!(r.len(), 2);
        assert_eq!(
            r[0],
            KernelUsage {
                name: "bn_norm_f32".into(),
                registers: 40,
                spill_stores: 4,
                spill_loads: 12,
                stack: 8
            }
        );
        // a called function's properties, before or after, are not the kernel's
        assert_eq!((r[1].registers, r[1].spill_stores, r[1].stack), (32, 0, 88));
    }

    #[test]
    fn nvrtc_hint_finds_the_library_in_a_folder() {
        let dir = std::env::temp_dir().join(format!("bnorm-nvrtc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["libnvrtc-builtins.so.13.2", "libnvrtc.so.13", "README"] {
            std::fs::write(dir.join(f), b"").unwrap();
        }
        assert_eq!(nvrtc_file(&dir), Some(dir.join("libnvrtc.so.13")));
        assert_eq!(
            nvrtc_file(&dir.join("libnvrtc.so.13")),
            Some(dir.join("libnvrtc.so.13"))
        );
        assert_eq!(nvrtc_file(&dir.join("missing")), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
