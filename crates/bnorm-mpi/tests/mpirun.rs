//! Runs the MPI self-test under `mpirun -np 4` (skipped, with the reason printed, when
//! `mpirun` is not installed).

use std::process::Command;

fn mpirun(np: usize, exe: &str) -> Option<std::process::Output> {
    let probe = Command::new("mpirun").arg("--version").output();
    if probe.map(|o| !o.status.success()).unwrap_or(true) {
        eprintln!("SKIPPED: `mpirun` not found (install Open MPI: apt-get install openmpi-bin)");
        return None;
    }
    let out = Command::new("mpirun")
        .args(["-np", &np.to_string(), exe])
        // Allowed as root in containers; more ranks than cores is fine for a test.
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .expect("mpirun starts");
    Some(out)
}

#[test]
fn four_processes_equal_one_process_and_agree_bitwise() {
    let Some(out) = mpirun(4, env!("CARGO_BIN_EXE_bnorm-mpi-selftest")) else {
        return;
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}\n{stderr}");
    assert!(out.status.success(), "mpirun failed: {stdout}\n{stderr}");
    assert!(stdout.contains("over 4 ranks"), "{stdout}");
    assert!(
        stdout.contains("bitwise identical across ranks: yes"),
        "{stdout}"
    );
    assert!(stdout.contains("reported on every rank: yes"), "{stdout}");
}

#[test]
fn a_singleton_without_mpirun_is_one_rank() {
    let out = Command::new(env!("CARGO_BIN_EXE_bnorm-mpi-selftest"))
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .expect("the self-test starts");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("over 1 ranks"), "{stdout}");
}
