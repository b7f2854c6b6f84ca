//! The command-line surface through the real binary: the top-level help, argument errors,
//! error messages, output into a closed pipe, and the convention names every subcommand
//! shares.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use bnorm::element::DType;
use bnorm_interop::{Checkpoint, Format, Layer, Tensor};

fn bnorm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bnorm"))
        .args(args)
        .output()
        .expect("runs the binary")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let d =
            std::env::temp_dir().join(format!("bnorm-cli-surface-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
    fn s(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A PyTorch checkpoint with `n` trained batch-norm layers of `c` channels.
fn checkpoint(path: &Path, n: usize, c: usize) {
    let mut ckpt = Checkpoint::default();
    for i in 0..n {
        let mut l = Layer::new(&format!("features.{i}.bn"), Format::Torch, c);
        l.running_mean = Some((0..c).map(|k| k as f64 * 0.5 - 1.0).collect());
        l.running_var = Some((0..c).map(|k| 0.5 + k as f64).collect());
        l.num_batches_tracked = Some(10);
        ckpt.insert_layer(&l, DType::F32).unwrap();
        let w: Vec<f64> = (0..c * 2).map(|k| k as f64 * 0.1 - 0.3).collect();
        ckpt.tensors.insert(
            format!("features.{i}.conv.weight"),
            Tensor::from_f64(&w, vec![c, 2, 1, 1], DType::F32),
        );
    }
    ckpt.write(path).unwrap();
}

const COMMANDS: [&str; 6] = ["conformance", "demo", "bench", "inspect", "fold", "convert"];

#[test]
fn top_level_help_names_and_lists_every_command() {
    for args in [&["--help"][..], &["help"], &["-h"]] {
        let out = bnorm(args);
        let text = stdout(&out);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        let (about, rest) = text.split_once("Usage:").expect("a usage line");
        for cmd in ["inspect", "fold", "convert", "conformance", "demo", "bench"] {
            assert!(
                about.contains(cmd),
                "{args:?}: the description omits {cmd}: {about}"
            );
        }
        let (_, commands) = rest.split_once("Commands:").expect("a command list");
        for cmd in COMMANDS {
            let line = commands
                .lines()
                .find(|l| l.trim_start().starts_with(&format!("{cmd} ")))
                .unwrap_or_else(|| panic!("{args:?}: {cmd} is not listed: {commands}"));
            let description = line.trim_start()[cmd.len()..].trim();
            assert!(
                description.len() > 10,
                "{args:?}: {cmd} has no description: {line:?}"
            );
        }
        assert!(
            text.contains("Without a command, bnorm runs `demo`"),
            "{text}"
        );
    }
}

#[test]
fn bench_refuses_an_unknown_shape_and_lists_the_shapes() {
    for shapes in ["S9", "S1,S9", ""] {
        let out = bnorm(&["bench", "--no-candle", "--shapes", shapes]);
        let err = stderr(&out);
        assert!(
            !out.status.success(),
            "--shapes {shapes:?} ran: {}",
            stdout(&out)
        );
        assert!(
            stdout(&out).is_empty(),
            "nothing is measured: {}",
            stdout(&out)
        );
        assert!(!err.contains("panicked"), "{err}");
        for shape in [
            "S1 (NCHW 32x64x56x56)",
            "S2 (NCHW 32x256x14x14)",
            "S3 (NC 4096x1024)",
            "S4 (NHWC 32x56x56x64)",
            "S5 (NCHW 64x128x56x56)",
        ] {
            assert!(
                err.contains(shape),
                "--shapes {shapes:?}: {shape} not listed: {err}"
            );
        }
    }
    assert!(stderr(&bnorm(&["bench", "--shapes", "S9"])).contains("S9"));
    // The help lists them too.
    let help = stdout(&bnorm(&["bench", "--help"]));
    assert!(help.contains("S3 (NC 4096x1024)"), "{help}");
}

#[test]
fn os_errors_are_reported_once() {
    let dir = TempDir::new("errors");
    let missing = dir.s("missing.safetensors");
    let out = dir.s("out.safetensors");
    let cases: [Vec<&str>; 5] = [
        vec!["inspect", &missing],
        vec!["inspect", "--json", &missing],
        vec!["convert", &missing, &out, "--to", "keras"],
        vec!["fold", &missing, &out, "--pairs", "conv1:bn1"],
        vec!["conformance", &missing],
    ];
    for args in cases {
        let o = bnorm(&args);
        let err = stderr(&o);
        assert!(!o.status.success(), "{args:?}");
        assert_eq!(err.matches("(os error 2)").count(), 1, "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with("bnorm: ") && err.contains(&missing),
            "{args:?}: {err}"
        );
    }
    assert!(!dir.path("out.safetensors").exists());
}

/// Runs the binary with standard output a pipe whose reader is already closed.
fn with_closed_stdout(args: &[&str], cwd: &Path) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    Command::new(env!("CARGO_BIN_EXE_bnorm"))
        .args(args)
        .current_dir(cwd)
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("runs the binary")
}

fn assert_quiet_stop(args: &[&str], o: &Output) {
    let err = stderr(o);
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    assert!(err.is_empty(), "{args:?} wrote to stderr: {err}");
    assert_eq!(o.status.code(), Some(141), "{args:?}: {:?}", o.status);
}

#[test]
fn a_closed_stdout_stops_every_command_quietly() {
    let dir = TempDir::new("pipe");
    let ckpt = dir.s("model.safetensors");
    checkpoint(&dir.path("model.safetensors"), 3, 4);
    let cases = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../conformance/cases");
    let (folded, converted) = (dir.s("folded.safetensors"), dir.s("flax.safetensors"));
    let runs: [Vec<&str>; 7] = [
        vec!["inspect", &ckpt],
        vec!["inspect", "--json", &ckpt],
        vec!["conformance", cases.to_str().unwrap()],
        vec![
            "bench",
            "--shapes",
            "S3",
            "--no-candle",
            "--seconds",
            "0",
            "--min-runs",
            "1",
        ],
        vec!["demo", "--epochs", "1", "--plot", "p.png"],
        vec![
            "convert",
            &ckpt,
            &converted,
            "--to",
            "flax",
            "--keep-variance",
        ],
        vec![
            "fold",
            &ckpt,
            &folded,
            "--pairs",
            "features.0.conv:features.0.bn",
        ],
    ];
    for args in &runs {
        assert_quiet_stop(args, &with_closed_stdout(args, &dir.0));
    }
    // The files are written before anything is printed.
    assert!(dir.path("folded.safetensors").exists());
    assert!(dir.path("flax.safetensors").exists());
}

#[test]
fn a_reader_that_stops_early_ends_inspect_quietly() {
    // `bnorm inspect --json FILE | head -c 10`, with output far larger than a pipe's buffer
    // (64 KiB by default, more where the pipe was enlarged) so that the reader leaves while
    // the tool is still writing: 500 layers (~78 KB of text) once let the text fit.
    let dir = TempDir::new("head");
    checkpoint(&dir.path("big.safetensors"), 1000, 2); // ~155 KB of text, ~700 KB of JSON
    for json in [true, false] {
        let mut args = vec!["inspect".to_string(), dir.s("big.safetensors")];
        if json {
            args.push("--json".into());
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_bnorm"))
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut head = [0u8; 10];
        child.stdout.take().unwrap().read_exact(&mut head).unwrap();
        let o = child.wait_with_output().unwrap();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_quiet_stop(&args, &o);
    }
}

/// The `- name: description` lines of a `--help` text's possible values.
fn value_lines(help: &str) -> Vec<String> {
    // A described value may wrap onto indented continuation lines: join them.
    let mut out: Vec<String> = Vec::new();
    let mut open = false;
    for l in help.lines().map(str::trim) {
        if l.starts_with("- ") {
            out.push(l.to_string());
            open = true;
        } else if l.is_empty() || l.starts_with('[') || l.starts_with('-') {
            open = false;
        } else if open {
            if let Some(last) = out.last_mut() {
                last.push(' ');
                last.push_str(l);
            }
        }
    }
    out.iter()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

#[test]
fn conventions_have_one_vocabulary_across_commands() {
    let demo = value_lines(&stdout(&bnorm(&["demo", "--help"])));
    let convert = value_lines(&stdout(&bnorm(&["convert", "--help"])));
    for name in ["torch", "keras", "flax"] {
        let find = |lines: &[String]| {
            lines
                .iter()
                .find(|l| l.starts_with(&format!("- {name}:")))
                .cloned()
        };
        let (d, c) = (find(&demo), find(&convert));
        assert!(
            d.is_some(),
            "demo --help does not describe {name}: {demo:?}"
        );
        assert_eq!(d, c, "demo and convert describe {name} differently");
    }
    assert!(
        demo.iter()
            .any(|l| l.starts_with("- tf:") && l.contains("tensorflow")),
        "{demo:?}"
    );
    // demo takes every name and the aliases (--epochs 0 stops it before training).
    for conv in [
        "torch",
        "pytorch",
        "keras",
        "tf_keras",
        "flax",
        "tf",
        "tensorflow",
        "Flax",
    ] {
        let o = bnorm(&["demo", "--convention", conv, "--epochs", "0"]);
        let err = stderr(&o);
        assert!(
            err.contains("--epochs must be at least 1") && !err.contains("invalid value"),
            "--convention {conv}: {err}"
        );
    }
    // convert takes the names with a checkpoint format, old spellings included, and says
    // what to use for tf.
    let dir = TempDir::new("vocabulary");
    checkpoint(&dir.path("in.safetensors"), 1, 3);
    for (to, key) in [
        ("flax", "batch_stats/features.0.bn/var"),
        ("tf_keras", "features.0.bn/moving_variance"),
        ("Keras", "features.0.bn/moving_variance"),
        ("pytorch", "features.0.bn.running_var"),
    ] {
        let o = bnorm(&[
            "convert",
            &dir.s("in.safetensors"),
            &dir.s("out.safetensors"),
            "--to",
            to,
            "--keep-variance",
        ]);
        assert!(o.status.success(), "--to {to}: {}", stderr(&o));
        let out = Checkpoint::read(&dir.path("out.safetensors")).unwrap();
        assert!(
            out.tensors.contains_key(key),
            "--to {to}: {:?}",
            out.tensors.keys()
        );
    }
    for to in ["tf", "tensorflow"] {
        let o = bnorm(&["convert", "a", "b", "--to", to]);
        let err = stderr(&o);
        assert!(!o.status.success());
        assert!(err.contains("use keras"), "--to {to}: {err}");
    }
}
