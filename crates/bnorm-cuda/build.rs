//! Which device-dependent tests run: the GPU tests (tests/gpu.rs) are compiled as
//! `#[ignore]`d unless `BNORM_REQUIRE_GPU=1`, which makes them run and fail where no GPU
//! can be used; the NVRTC compile test (tests/nvrtc.rs) likewise unless `BNORM_NVRTC` is
//! set (where NVRTC is, see src/compile.rs) or `BNORM_REQUIRE_NVRTC=1`. A plain
//! `cargo test` therefore reports them as ignored, never as passed.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(bnorm_gpu_tests)");
    println!("cargo::rustc-check-cfg=cfg(bnorm_nvrtc_tests)");
    for var in ["BNORM_REQUIRE_GPU", "BNORM_NVRTC", "BNORM_REQUIRE_NVRTC"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    let on = |var: &str| std::env::var(var).is_ok_and(|v| v == "1");
    if on("BNORM_REQUIRE_GPU") {
        println!("cargo::rustc-cfg=bnorm_gpu_tests");
    }
    if on("BNORM_REQUIRE_NVRTC")
        || on("BNORM_REQUIRE_GPU")
        || std::env::var_os("BNORM_NVRTC").is_some_and(|v| !v.is_empty())
    {
        println!("cargo::rustc-cfg=bnorm_nvrtc_tests");
    }
}
