//! The demo end to end, through the real binary: report structure, accuracy well above
//! chance, the plot, MNIST-format input, and errors a user can cause.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bnorm(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bnorm"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("bnorm runs")
}

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("bnorm-demo-test-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn demo_runs_end_to_end_and_reports_every_number() {
    let dir = tempdir("e2e");
    let out = bnorm(
        &[
            "demo",
            "--epochs",
            "2",
            "--threads",
            "2",
            "--report",
            "r.json",
            "--plot",
            "p.png",
        ],
        &dir,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("running statistics (inference mode"),
        "{stdout}"
    );
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("r.json")).unwrap()).unwrap();
    for key in [
        "running",
        "batch1_train",
        "full_batch_train",
        "never_updated",
        "recalibrated",
    ] {
        let v = &r["accuracy"][key];
        assert!(
            v.is_null() || v.as_f64().is_some_and(|a| (0.0..=1.0).contains(&a)),
            "accuracy.{key} = {v}"
        );
    }
    let running = r["accuracy"]["running"].as_f64().unwrap();
    assert!(
        running > 0.6,
        "inference accuracy {running} is not far above chance (0.1)"
    );
    assert!(r["seconds"].as_f64().unwrap() > 0.0);
    let epochs = r["epochs"].as_array().unwrap();
    assert_eq!(epochs.len(), 2);
    for e in epochs {
        for k in [
            "loss",
            "train_accuracy",
            "test_accuracy_inference",
            "test_accuracy_train_mode",
        ] {
            assert!(e[k].as_f64().is_some(), "epoch entry lacks {k}: {e}");
        }
    }
    assert_eq!(r["drift"].as_array().unwrap().len(), 4);
    let png = std::fs::read(dir.join("p.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let image = Rgb::decode(&png);
    assert_eq!((image.width, image.height), (1100, 820));
    assert_bars_show(&image, &r["accuracy"]);
    std::fs::remove_dir_all(&dir).ok();
}

/// A decoded 8-bit RGB PNG (what the demo's plot writes).
struct Rgb {
    width: usize,
    height: usize,
    pixels: Vec<u8>,
}

impl Rgb {
    fn decode(png: &[u8]) -> Rgb {
        use std::io::Read;
        let be = |b: &[u8]| u32::from_be_bytes(b.try_into().unwrap()) as usize;
        let (mut pos, mut width, mut height, mut zlib) = (8, 0, 0, Vec::new());
        while pos + 8 <= png.len() {
            let len = be(&png[pos..pos + 4]);
            let (kind, body) = (&png[pos + 4..pos + 8], &png[pos + 8..pos + 8 + len]);
            match kind {
                b"IHDR" => {
                    (width, height) = (be(&body[..4]), be(&body[4..8]));
                    assert_eq!(
                        (body[8], body[9], body[12]),
                        (8, 2, 0),
                        "not 8-bit RGB, non-interlaced"
                    );
                }
                b"IDAT" => zlib.extend_from_slice(body),
                _ => {}
            }
            pos += 12 + len;
        }
        let mut raw = Vec::new();
        flate2::read::ZlibDecoder::new(&zlib[..])
            .read_to_end(&mut raw)
            .unwrap();
        let stride = width * 3;
        assert_eq!(raw.len(), height * (stride + 1));
        let mut pixels = vec![0u8; height * stride];
        for y in 0..height {
            let filter = raw[y * (stride + 1)];
            for i in 0..stride {
                let x = raw[y * (stride + 1) + 1 + i];
                let a = if i >= 3 {
                    pixels[y * stride + i - 3]
                } else {
                    0
                } as i16;
                let b = if y > 0 {
                    pixels[(y - 1) * stride + i]
                } else {
                    0
                } as i16;
                let c = if y > 0 && i >= 3 {
                    pixels[(y - 1) * stride + i - 3]
                } else {
                    0
                } as i16;
                let predicted = match filter {
                    0 => 0,
                    1 => a,
                    2 => b,
                    3 => (a + b) / 2,
                    4 => {
                        let p = a + b - c;
                        let (pa, pb, pc) = ((p - a).abs(), (p - b).abs(), (p - c).abs());
                        if pa <= pb && pa <= pc {
                            a
                        } else if pb <= pc {
                            b
                        } else {
                            c
                        }
                    }
                    f => panic!("PNG filter {f}"),
                };
                pixels[y * stride + i] = x.wrapping_add(predicted as u8);
            }
        }
        Rgb {
            width,
            height,
            pixels,
        }
    }

    fn at(&self, x: usize, y: usize) -> [u8; 3] {
        let i = (y * self.width + x) * 3;
        self.pixels[i..i + 3].try_into().unwrap()
    }
}

/// The bar chart below the curves shows the report's five accuracies in table order: the
/// first (running statistics) as the one green bar on top, the rest as grey bars below it,
/// each as long as its accuracy says (bars share their left end; lengths are compared as
/// ratios, so the axis scale does not matter).
fn assert_bars_show(image: &Rgb, accuracy: &serde_json::Value) {
    const GREEN: [u8; 3] = [0, 150, 60];
    const GREY: [u8; 3] = [120, 130, 150];
    let keys = [
        "running",
        "batch1_train",
        "full_batch_train",
        "never_updated",
        "recalibrated",
    ];
    let values: Vec<Option<f64>> = keys.iter().map(|k| accuracy[*k].as_f64()).collect();
    if values.iter().any(|v| !v.is_some_and(|a| a >= 0.03)) {
        // A refused row or a bar too short to find: nothing to measure.
        return;
    }
    // Horizontal bands of rows holding a bar colour below the curve panels (440 pixels
    // high, where green also draws a curve): (colour, first x, last x) per band.
    let mut bands: Vec<([u8; 3], usize, usize)> = Vec::new();
    let mut in_band = false;
    for y in 440..image.height {
        let row: Vec<(usize, [u8; 3])> = (0..image.width)
            .map(|x| (x, image.at(x, y)))
            .filter(|(_, p)| *p == GREEN || *p == GREY)
            .collect();
        let Some(&(first, colour)) = row.first() else {
            in_band = false;
            continue;
        };
        let last = row.last().unwrap().0;
        if !in_band {
            bands.push((colour, first, last));
            in_band = true;
        } else {
            let b = bands.last_mut().unwrap();
            assert_eq!(b.0, colour, "a band of two colours at y = {y}");
            (b.1, b.2) = (b.1.min(first), b.2.max(last));
        }
    }
    let colours: Vec<[u8; 3]> = bands.iter().map(|b| b.0).collect();
    assert_eq!(
        colours,
        [GREEN, GREY, GREY, GREY, GREY],
        "bars by colour, top to bottom: {bands:?}"
    );
    let x0 = bands[0].1;
    let lengths: Vec<f64> = bands
        .iter()
        .map(|b| {
            assert!(
                b.1.abs_diff(x0) <= 1,
                "bars start at different x: {bands:?}"
            );
            (b.2 + 1 - x0) as f64
        })
        .collect();
    let per_unit = lengths[0] / values[0].unwrap();
    for (i, (len, v)) in lengths.iter().zip(&values).enumerate() {
        let want = v.unwrap() * per_unit;
        assert!(
            (len - want).abs() <= 3.0,
            "bar {} ({}) is {len} pixels, expected {want:.1} for accuracy {}",
            i + 1,
            keys[i],
            v.unwrap()
        );
    }
}

fn be32(v: u32) -> [u8; 4] {
    v.to_be_bytes()
}

/// Writes a tiny data set in MNIST's IDX format: 8×8 images whose class is the row of a
/// bright bar (classes 0..7), with noise.
fn write_idx(dir: &Path, n_train: usize, n_test: usize) {
    let mut s = 7u64;
    let mut rnd = move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 56) as u8
    };
    for (prefix, n) in [("train", n_train), ("t10k", n_test)] {
        let mut img = Vec::new();
        img.extend(be32(0x0803));
        img.extend(be32(n as u32));
        img.extend(be32(8));
        img.extend(be32(8));
        let mut lab = Vec::new();
        lab.extend(be32(0x0801));
        lab.extend(be32(n as u32));
        for i in 0..n {
            let class = (i % 8) as u8;
            for r in 0..8u8 {
                for _ in 0..8 {
                    img.push(if r == class {
                        200 + rnd() / 8
                    } else {
                        rnd() / 4
                    });
                }
            }
            lab.push(class);
        }
        std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), img).unwrap();
        std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), lab).unwrap();
    }
}

#[test]
fn demo_trains_on_idx_files() {
    let dir = tempdir("idx");
    write_idx(&dir, 160, 40);
    let d = dir.to_str().unwrap();
    let out = bnorm(
        &[
            "demo",
            "--data",
            d,
            "--epochs",
            "3",
            "--batch-size",
            "16",
            "--report",
            "r.json",
            "--plot",
            "p.png",
        ],
        &dir,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("r.json")).unwrap()).unwrap();
    let acc = r["accuracy"]["running"].as_f64().unwrap();
    assert!(acc > 0.5, "accuracy {acc} on an easy 8-class problem");
    std::fs::remove_dir_all(&dir).ok();
}

fn assert_clean_failure(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, stderr: {err}");
    assert!(
        !err.contains("panicked"),
        "panic instead of an error: {err}"
    );
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
}

#[test]
fn user_errors_give_one_clear_message() {
    let dir = tempdir("errors");
    let out = bnorm(&["demo", "--data", "does-not-exist", "--epochs", "1"], &dir);
    assert_clean_failure(&out, "not a directory");
    // malformed IDX: wrong magic number
    let bad = dir.join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    write_idx(&bad, 20, 10);
    std::fs::write(
        bad.join("train-images-idx3-ubyte"),
        [0u8, 0, 8, 4, 0, 0, 0, 1],
    )
    .unwrap();
    let out = bnorm(
        &["demo", "--data", bad.to_str().unwrap(), "--epochs", "1"],
        &dir,
    );
    assert_clean_failure(&out, "not an IDX image file");
    // truncated labels
    write_idx(&bad, 20, 10);
    std::fs::write(
        bad.join("t10k-labels-idx1-ubyte"),
        [0u8, 0, 8, 1, 0, 0, 0, 10, 1, 2],
    )
    .unwrap();
    let out = bnorm(
        &["demo", "--data", bad.to_str().unwrap(), "--epochs", "1"],
        &dir,
    );
    assert_clean_failure(&out, "header says");
    let out = bnorm(&["demo", "--batch-size", "100000", "--epochs", "1"], &dir);
    assert_clean_failure(&out, "larger than the training set");
    let out = bnorm(&["demo", "--batch-size", "1", "--epochs", "1"], &dir);
    assert_clean_failure(&out, "at least 2");
    let out = bnorm(
        &["demo", "--plot", "/nonexistent-dir/p.png", "--epochs", "1"],
        &dir,
    );
    assert_clean_failure(&out, "does not exist");
    let out = bnorm(&["demo", "--momentum", "1.5", "--epochs", "1"], &dir);
    assert_clean_failure(&out, "momentum");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn conformance_command_prints_the_summary_line() {
    let cases = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../conformance/cases");
    let out = bnorm(&["conformance", cases.to_str().unwrap()], Path::new("."));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout
            .lines()
            .last()
            .unwrap()
            .ends_with(" passed, 0 failed"),
        "{stdout}"
    );
    let out = bnorm(&["conformance", "/nonexistent"], Path::new("."));
    assert_clean_failure(&out, "reading conformance cases");
}
