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

/// The `sync_train` example, built next to this test by `cargo test`.
fn example(name: &str) -> Option<std::path::PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?.parent()?.join("examples");
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    path.exists().then_some(path)
}

#[test]
fn sync_train_under_mpirun_matches_one_process() {
    let Some(exe) = example("sync_train") else {
        eprintln!("SKIPPED: the sync_train example was not built next to the tests");
        return;
    };
    let Some(out) = mpirun(4, &exe.to_string_lossy()) else {
        return;
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with("sync check: max relative difference"))
        .expect("the sync check line");
    assert!(line.ends_with("over 4 ranks"), "{line}");
}
