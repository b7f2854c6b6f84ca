//! Every kernel entry point compiles with NVRTC, through the crate's own code path, for
//! the architectures the crate targets: a cubin for sm_80 and sm_90 (no spills, no stack)
//! and the PTX fallback. Needs NVRTC only, no driver or GPU. Reported as ignored unless
//! `BNORM_NVRTC` (where libnvrtc is) or `BNORM_REQUIRE_NVRTC=1` was set when building
//! (build.rs); then a missing NVRTC is a failure.

use bnorm_cuda::compile::{compile, compile_with, nvrtc_available, parse_ptxas_report, Target};
use bnorm_cuda::kernels::entry_points;

#[test]
#[cfg_attr(
    not(bnorm_nvrtc_tests),
    ignore = "needs NVRTC: set BNORM_NVRTC=<libnvrtc.so or its folder> or BNORM_REQUIRE_NVRTC=1"
)]
fn every_kernel_compiles_for_sm80_and_sm90_without_spills() {
    if let Err(e) = nvrtc_available() {
        panic!("NVRTC required here but not usable: {e}");
    }
    let entries = entry_points();
    for arch in [(8, 0), (9, 0)] {
        let cubin = compile_with(arch, Target::Cubin, true).unwrap();
        // An ELF image, not PTX text.
        assert_eq!(&cubin.image[..4], b"\x7fELF", "sm_{}{}", arch.0, arch.1);
        let usage = parse_ptxas_report(&cubin.log);
        for e in &entries {
            let k = usage
                .iter()
                .find(|k| &k.name == e)
                .unwrap_or_else(|| panic!("{e} missing for sm_{}{}", arch.0, arch.1));
            assert_eq!(
                (k.spill_stores, k.spill_loads, k.stack),
                (0, 0, 0),
                "{e} spills on sm_{}{}",
                arch.0,
                arch.1
            );
        }
        let ptx = compile(arch, Target::Ptx).unwrap();
        let text = String::from_utf8_lossy(&ptx.image);
        assert!(text.contains(&format!(".target sm_{}{}", arch.0, arch.1)));
        for e in &entries {
            assert!(text.contains(&format!(".entry {e}(")), "{e} not in PTX");
        }
    }
}

#[test]
#[cfg_attr(
    not(bnorm_nvrtc_tests),
    ignore = "needs NVRTC: set BNORM_NVRTC=<libnvrtc.so or its folder> or BNORM_REQUIRE_NVRTC=1"
)]
fn a_compile_error_is_typed_and_carries_the_log() {
    nvrtc_available().expect("NVRTC required here");
    // An architecture NVRTC does not know: a typed error naming the option, not a panic.
    match compile((1, 0), Target::Cubin) {
        Err(bnorm_cuda::CudaError::Compile { log }) => assert!(log.contains("sm_10"), "{log}"),
        other => panic!("expected a compile error, got {other:?}"),
    }
}

/// What `Gpu::new` compiles: one program per element type (in parallel), each a cubin
/// defining that type's entry points.
#[test]
#[cfg_attr(
    not(bnorm_nvrtc_tests),
    ignore = "needs NVRTC: set BNORM_NVRTC=<libnvrtc.so or its folder> or BNORM_REQUIRE_NVRTC=1"
)]
fn the_per_dtype_programs_compile_to_cubins_in_parallel() {
    nvrtc_available().expect("NVRTC required here");
    let parts: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = bnorm_cuda::DTypeTag::ALL
            .iter()
            .map(|&d| {
                s.spawn(move || {
                    let src = bnorm_cuda::kernels::source_for(&[d]);
                    (d, bnorm_cuda::compile::compile_for_device(&src, (9, 0)))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (d, part) in parts {
        let c = part.unwrap_or_else(|e| panic!("{d:?}: {e}"));
        assert_eq!(c.target, Target::Cubin);
        assert_eq!(&c.image[..4], b"\x7fELF");
        let bytes = String::from_utf8_lossy(&c.image);
        let typed = format!("_{}_v", d.suffix());
        for e in entry_points().iter().filter(|e| e.contains(&typed)) {
            assert!(bytes.contains(e.as_str()), "{e} not in the {d:?} cubin");
        }
    }
}
