//! Compiles every kernel entry point with NVRTC through the crate's own code path
//! ([`bnorm_cuda::compile`]), with no GPU and no driver: a cubin per architecture (sm_80,
//! sm_90, `nvrtcGetCUBIN`, the image [`bnorm_cuda::Gpu::new`] loads) with ptxas's verbose
//! report, and the PTX fallback (compute_80, compute_90). Fails on a compile error, a
//! missing entry point, or any register spill or stack use.
//!
//! ```text
//! nvrtc_check [--ptxas PATH] [--out DIR]
//! ```
//!
//! `--out DIR` writes the cubins (`bnorm_sm80.cubin`, ...) and PTX there, for reading the
//! SASS (`nvdisasm` from the `nvidia-cuda-nvdisasm` wheel).
//!
//! NVRTC comes from the loader path or `BNORM_NVRTC` (a libnvrtc.so* file or its folder,
//! e.g. the `nvidia-cuda-nvrtc` wheel's `nvidia/cu13/lib`). With `--ptxas` (the
//! `nvidia-cuda-nvcc` wheel's `nvidia/cu13/bin/ptxas`) the PTX is also assembled by that
//! ptxas with `-v` and checked the same way. Exit status: 0 all compiled without spills,
//! 1 a failure, 2 NVRTC not found. The last line reads
//! `compiled K kernels for sm_80, sm_90: F failed`.

use std::collections::BTreeSet;
use std::process::Command;

use bnorm_cuda::compile::{self, parse_ptxas_report, KernelUsage, Target};
use bnorm_cuda::kernels;

const ARCHS: [(i32, i32); 2] = [(8, 0), (9, 0)];

/// Failures among `usage` (compiled for `arch`): entry points missing, spills, stack.
fn judge(arch: (i32, i32), how: &str, usage: &[KernelUsage], failed: &mut BTreeSet<String>) {
    let entries = kernels::entry_points();
    for e in &entries {
        match usage.iter().find(|k| &k.name == e) {
            None => {
                println!(
                    "FAIL sm_{}{} {how}: {e} not in ptxas's report",
                    arch.0, arch.1
                );
                failed.insert(e.clone());
            }
            Some(k) if k.spill_stores > 0 || k.spill_loads > 0 || k.stack > 0 => {
                println!(
                    "FAIL sm_{}{} {how}: {e} spills ({} B stores, {} B loads, {} B stack)",
                    arch.0, arch.1, k.spill_stores, k.spill_loads, k.stack
                );
                failed.insert(e.clone());
            }
            Some(_) => {}
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let ptxas = args
        .iter()
        .position(|a| a == "--ptxas")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let out_dir = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let save = |name: String, bytes: &[u8]| {
        if let Some(d) = &out_dir {
            let path = std::path::Path::new(d).join(name);
            if let Err(e) = std::fs::create_dir_all(d).and_then(|_| std::fs::write(&path, bytes)) {
                println!("FAIL writing {}: {e}", path.display());
            }
        }
    };
    let version = match compile::nvrtc_version() {
        Ok(v) => v,
        Err(e) => {
            println!("SKIPPED: {e}");
            std::process::exit(2);
        }
    };
    let entries = kernels::entry_points();
    println!(
        "NVRTC {}.{}: {} entry points",
        version.0,
        version.1,
        entries.len()
    );
    let mut failed = BTreeSet::new();
    for arch in ARCHS {
        let sm = format!("sm_{}{}", arch.0, arch.1);
        match compile::compile_with(arch, Target::Cubin, true) {
            Ok(c) => {
                save(format!("bnorm_sm{}{}.cubin", arch.0, arch.1), &c.image);
                let usage = parse_ptxas_report(&c.log);
                println!(
                    "{sm} cubin: {} bytes in {:.0} ms; registers {}..{}",
                    c.image.len(),
                    c.ms,
                    usage.iter().map(|k| k.registers).min().unwrap_or(0),
                    usage.iter().map(|k| k.registers).max().unwrap_or(0)
                );
                for k in &usage {
                    println!(
                        "  {:<24} {:>3} registers, {} B stack, {} B spill stores, {} B spill loads",
                        k.name, k.registers, k.stack, k.spill_stores, k.spill_loads
                    );
                }
                judge(arch, "cubin", &usage, &mut failed);
            }
            Err(e) => {
                println!("FAIL {sm} cubin: {e}");
                failed.extend(entries.iter().cloned());
            }
        }
        match compile::compile(arch, Target::Ptx) {
            Ok(c) => {
                save(format!("bnorm_compute{}{}.ptx", arch.0, arch.1), &c.image);
                let text = String::from_utf8_lossy(&c.image);
                let missing: Vec<&String> = entries
                    .iter()
                    .filter(|e| !text.contains(&format!(".entry {e}(")))
                    .collect();
                println!(
                    "compute_{}{} PTX: {} bytes in {:.0} ms",
                    arch.0,
                    arch.1,
                    c.image.len(),
                    c.ms
                );
                for e in missing {
                    println!("FAIL compute_{}{} PTX: no entry {e}", arch.0, arch.1);
                    failed.insert(e.clone());
                }
                if let Some(ptxas) = &ptxas {
                    let usage = external_ptxas(ptxas, arch, &c.image);
                    match usage {
                        Ok(u) => judge(arch, "ptxas", &u, &mut failed),
                        Err(e) => {
                            println!("FAIL {sm} ptxas: {e}");
                            failed.extend(entries.iter().cloned());
                        }
                    }
                }
            }
            Err(e) => {
                println!("FAIL compute_{}{} PTX: {e}", arch.0, arch.1);
                failed.extend(entries.iter().cloned());
            }
        }
    }
    // What Gpu::new does on an sm_90 device: one program per element type, in parallel.
    let t = std::time::Instant::now();
    let ok = std::thread::scope(|sc| {
        let hs: Vec<_> = bnorm_cuda::DTypeTag::ALL
            .iter()
            .map(|&d| {
                sc.spawn(move || {
                    compile::compile_for_device(&kernels::source_for(&[d]), (9, 0)).is_ok()
                })
            })
            .collect();
        hs.into_iter().all(|h| h.join().unwrap_or(false))
    });
    println!(
        "Gpu::new's compile for sm_90 (3 programs in parallel): {:.0} ms, {}",
        t.elapsed().as_secs_f64() * 1e3,
        if ok { "ok" } else { "FAILED" }
    );
    if !ok {
        failed.insert("per-dtype programs".into());
    }
    let archs: Vec<String> = ARCHS.iter().map(|a| format!("sm_{}{}", a.0, a.1)).collect();
    println!(
        "compiled {} kernels for {}: {} failed",
        entries.len(),
        archs.join(", "),
        failed.len()
    );
    std::process::exit(i32::from(!failed.is_empty()));
}

/// Assembles `ptx` with an external `ptxas -v` and parses its report.
fn external_ptxas(ptxas: &str, arch: (i32, i32), ptx: &[u8]) -> Result<Vec<KernelUsage>, String> {
    let dir = std::env::temp_dir().join(format!("bnorm-nvrtc-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let src = dir.join(format!("k{}{}.ptx", arch.0, arch.1));
    let text: Vec<u8> = ptx.iter().copied().take_while(|&b| b != 0).collect();
    std::fs::write(&src, text).map_err(|e| e.to_string())?;
    let out = Command::new(ptxas)
        .arg("-v")
        .arg(format!("-arch=sm_{}{}", arch.0, arch.1))
        .arg(&src)
        .arg("-o")
        .arg(dir.join("k.cubin"))
        .output()
        .map_err(|e| format!("running {ptxas}: {e}"))?;
    let _ = std::fs::remove_dir_all(&dir);
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(format!("{ptxas} failed: {log}"));
    }
    let usage = parse_ptxas_report(&log);
    println!(
        "sm_{}{} external ptxas: {} entries, max {} registers",
        arch.0,
        arch.1,
        usage.len(),
        usage.iter().map(|k| k.registers).max().unwrap_or(0)
    );
    Ok(usage)
}
