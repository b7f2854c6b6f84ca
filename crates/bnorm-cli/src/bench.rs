//! `bnorm bench`: effective memory bandwidth of bnorm's kernels against a plain copy of
//! the same bytes measured in the same run, and against candle-nn's BatchNorm.
//!
//! Effective bandwidth = bytes of x read once + bytes of y written once, over the median
//! time (backward: x and dy read once, dx written once). The copy row moves the same
//! number of bytes (forward: copies x into y; backward: copies 1.5× as many elements) with
//! the same threads, in the same chunks. Each ratio is measured twice: from medians taken
//! one after the other (each operation warm from its own previous call), and paired
//! (`ratio_paired`: the operation and the copy alternated call by call, so that the
//! machine's drift and the cache's state hit both alike).

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bnorm::config::BackwardArithmetic;
use bnorm::element::{bf16, f16, Element};
use bnorm::expert::{backward_into, forward_into, Grads, Parallelism, Saved, Workspace};
use bnorm::tuning::{fused_channels, zeroed_buffer};
use bnorm::{Config, Layout, Mode, Params, RunningState};
use candle_core::{DType, Device, Tensor};
use candle_nn::{ModuleT, VarBuilder, VarMap};
use clap::Args;
use rayon::prelude::*;
use serde_json::{json, Value};

use crate::demo::write_atomic;

/// Options of `bnorm bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Also write one JSON object per measurement to FILE.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Seconds of timed runs per measurement (after one warm-up run).
    #[arg(long, default_value_t = 1.0)]
    pub seconds: f64,
    /// Minimum timed runs per measurement (the median is reported).
    #[arg(long, default_value_t = 20)]
    pub min_runs: usize,
    /// Skip the candle-nn comparison rows.
    #[arg(long)]
    pub no_candle: bool,
    /// Only these shapes (e.g. `--shapes S1,S4`; the list is generated from the shape
    /// table).
    #[arg(long, value_delimiter = ',', value_parser = parse_shape, help = shapes_help())]
    pub shapes: Vec<String>,
    /// Allocate every buffer of bnorm's rows and of the copies with
    /// `bnorm::tuning::zeroed_buffer` (transparent huge pages where the OS allows) instead of
    /// `vec!` (JSON key `huge_pages`).
    #[arg(long)]
    pub huge_pages: bool,
}

// `Shape` and `SHAPES` (S1–S5), shared with the divan benchmarks of the core crate.
include!("../../bnorm/benches/common/shapes.rs");

/// Every shape of [`SHAPES`] with its layout and dimensions: `S1 (NCHW 32x64x56x56), ...`.
fn shape_list() -> String {
    SHAPES
        .iter()
        .map(|s| {
            let dims: Vec<String> = s.dims.iter().map(usize::to_string).collect();
            format!("{} ({} {})", s.name, s.layout.name(), dims.join("x"))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The help of `--shapes`, listing [`SHAPES`].
fn shapes_help() -> String {
    format!(
        "Only these shapes (e.g. `--shapes S1,S4`): {}",
        shape_list()
    )
}

/// Parses one `--shapes` entry (any case) to its name in [`SHAPES`]; an unknown name is
/// an error listing the shapes.
fn parse_shape(s: &str) -> std::result::Result<String, String> {
    SHAPES
        .iter()
        .find(|sh| sh.name.eq_ignore_ascii_case(s.trim()))
        .map(|sh| sh.name.to_string())
        .ok_or_else(|| format!("no shape {s:?}; the shapes are {}", shape_list()))
}

/// Median wall time of `f` over at least `min_runs` runs and about `seconds` seconds.
fn median(seconds: f64, min_runs: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm-up
    let mut times = Vec::new();
    let budget = Duration::from_secs_f64(seconds);
    let start = Instant::now();
    while times.len() < min_runs || (start.elapsed() < budget && times.len() < 1000) {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    times[times.len() / 2]
}

/// The target's ratio measured in the same minute: `op` and a plain copy of the same
/// bytes (`copy`) alternated call by call, in the order op, copy, copy, op, so that the
/// machine's drift (±30% over minutes on a shared VM) hits both alike, and each runs as
/// often right after the other (its data evicted from the caches) as right after itself
/// (the run-alone medians give each the cache its own previous call left, which favours
/// whichever fits the L3 better). Returns the median over rounds of (copy time / op
/// time) — the op's rate over the copy's, as both move the same bytes — and the median
/// of the copy's time per call.
fn paired(
    seconds: f64,
    min_rounds: usize,
    mut op: impl FnMut(),
    mut copy: impl FnMut(),
) -> (f64, f64) {
    let rounds = alternate(seconds, min_rounds, &mut [&mut op, &mut copy]);
    (
        median_of(rounds.iter().map(|r| r[1] / r[0])),
        median_of(rounds.iter().map(|r| r[1] / 2.0)),
    )
}

/// Calls every function of `fs` once (a warm-up), then in rounds — each function in
/// order, then each in reverse order (for two: a, b, b, a) — for `seconds` and at least
/// `min_rounds` rounds (at most 500). Returns each round's time per function (its two
/// calls together).
fn alternate(seconds: f64, min_rounds: usize, fs: &mut [&mut dyn FnMut()]) -> Vec<Vec<f64>> {
    for f in fs.iter_mut() {
        f();
    }
    let budget = Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let mut rounds = Vec::new();
    while rounds.len() < min_rounds || (start.elapsed() < budget && rounds.len() < 500) {
        let mut t = vec![0.0; fs.len()];
        let order: Vec<usize> = (0..fs.len()).chain((0..fs.len()).rev()).collect();
        for i in order {
            let at = Instant::now();
            fs[i]();
            t[i] += at.elapsed().as_secs_f64();
        }
        rounds.push(t);
    }
    rounds
}

/// The median of some values (NaN for none).
fn median_of(v: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = v.collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn par_copy<T: Copy + Send + Sync>(src: &[T], dst: &mut [T]) {
    const CHUNK: usize = 1 << 15;
    dst.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(d, s)| d.copy_from_slice(s));
}

/// A parallel copy with streaming (non-temporal) stores: the ceiling for a kernel that
/// writes its output with them, as bnorm's does for outputs of 16 MB and more. Falls back
/// to [`par_copy`] where the CPU has no AVX.
fn par_copy_nt<T: Element>(src: &[T], dst: &mut [T]) {
    const CHUNK: usize = 1 << 15;
    dst.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(d, s)| copy_nt(s, d));
}

/// One chunk of [`par_copy_nt`].
fn copy_nt<T: Element>(src: &[T], dst: &mut [T]) {
    let n = src.len().min(dst.len()) * std::mem::size_of::<T>();
    // SAFETY: every `Element` (f32, f64, f16, bf16) is plain bits without padding, so its
    // slices may be viewed as bytes, and any bytes written back form valid values; the
    // two views cover exactly the first `n` bytes of each slice, which do not overlap
    // (one is borrowed shared, the other exclusively).
    let (s, d) = unsafe {
        (
            std::slice::from_raw_parts(src.as_ptr().cast::<u8>(), n),
            std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast::<u8>(), n),
        )
    };
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: AVX was detected just above.
        unsafe { copy_bytes_nt(s, d) };
        return;
    }
    d.copy_from_slice(s);
}

/// Byte copy with 32-byte streaming stores (plain copies for the unaligned head and the
/// tail), then a store fence.
///
/// # Safety
/// The CPU must support AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn copy_bytes_nt(s: &[u8], d: &mut [u8]) {
    use std::arch::x86_64::*;
    let n = s.len().min(d.len());
    let head = d.as_ptr().align_offset(32).min(n);
    let body = head + (n - head) / 32 * 32;
    d[..head].copy_from_slice(&s[..head]);
    d[body..n].copy_from_slice(&s[body..n]);
    let mut i = head;
    while i < body {
        // SAFETY: `i + 32 <= body <= n` is within both slices, and `d + i` is 32-byte
        // aligned (`head` aligned it; steps are 32 bytes) as the streaming store needs.
        unsafe {
            let v = _mm256_loadu_si256(s.as_ptr().add(i).cast());
            _mm256_stream_si256(d.as_mut_ptr().add(i).cast(), v);
        }
        i += 32;
    }
    _mm_sfence();
}

/// Reads every byte (a vectorizable xor of 64-bit words, kept alive through
/// `black_box`): traffic without arithmetic or conversions, whatever the storage type
/// (converting each f16 value, as the kernels do, would make the floor compute-bound).
fn touch<T: Element>(xs: &[T]) {
    // SAFETY: every `Element` (f32, f64, f16, bf16) is plain bits without padding, so its
    // slices may be viewed as the bytes they cover (read only).
    let b =
        unsafe { std::slice::from_raw_parts(xs.as_ptr().cast::<u8>(), std::mem::size_of_val(xs)) };
    let mut acc = [0u64; 8];
    let (body, tail) = b.as_chunks::<64>();
    for ch in body {
        for (l, a) in acc.iter_mut().enumerate() {
            let w: [u8; 8] = ch[8 * l..8 * l + 8].try_into().unwrap_or_default();
            *a ^= u64::from_ne_bytes(w);
        }
    }
    black_box((acc, tail.len()));
}

/// The memory traffic of bnorm's schedule for an operation, with no arithmetic: read the
/// inputs once, then read them again while writing the output with streaming stores.
/// `chunk`: elements per task doing both passes back to back (the fused channels-first
/// schedule, second pass from cache); `None`: two passes over the whole tensor (the
/// channels-last schedule, whose statistics need every row before any output).
fn traffic_floor<T: Element>(ins: &[&[T]], out: &mut [T], chunk: Option<usize>) {
    // The second pass over elements `r`: read the other inputs, stream the first out.
    let second = |r: std::ops::Range<usize>, o: &mut [T]| {
        for x in &ins[1..] {
            touch(&x[r.clone()]);
        }
        copy_nt(&ins[0][r], o);
    };
    match chunk {
        Some(ch) => out.par_chunks_mut(ch).enumerate().for_each(|(i, o)| {
            let r = i * ch..i * ch + o.len();
            for x in ins {
                touch(&x[r.clone()]);
            }
            second(r, o);
        }),
        None => {
            const CH: usize = 1 << 15;
            for x in ins {
                x.par_chunks(CH).for_each(|c| touch(c));
            }
            out.par_chunks_mut(CH)
                .enumerate()
                .for_each(|(i, o)| second(i * CH..i * CH + o.len(), o));
        }
    }
}

struct Row {
    value: Value,
}

fn row(
    imp: &str,
    op: &str,
    s: &Shape,
    dtype: &str,
    median_s: f64,
    bytes: f64,
    copy_gbps: Option<f64>,
) -> Row {
    let gbps = bytes / median_s / 1e9;
    let mut v = json!({
        "impl": imp, "op": op, "shape": s.name, "dims": s.dims, "layout": s.layout.name(),
        "dtype": dtype, "median_s": median_s, "gbps": gbps,
    });
    if let Some(c) = copy_gbps {
        v["copy_gbps"] = json!(c);
        v["ratio"] = json!(gbps / c);
    }
    Row { value: v }
}

/// A zeroed buffer of `n` elements: from `bnorm::tuning::zeroed_buffer` when `huge`.
fn buffer<T: Element + Default>(n: usize, huge: bool) -> Vec<T> {
    if huge {
        zeroed_buffer(n)
    } else {
        vec![T::default(); n]
    }
}

/// `n` pseudo-random values in [1, 5) in a [`buffer`].
fn data<T: Element + Default>(n: usize, seed: u64, huge: bool) -> Vec<T> {
    let mut s = seed;
    let mut v = buffer(n, huge);
    for x in v.iter_mut() {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *x = T::from_f64(((s >> 40) as f64 / (1u64 << 24) as f64) * 4.0 - 2.0 + 3.0);
    }
    v
}

fn bench_bnorm<T: Element + Default>(
    s: &Shape,
    dtype: &str,
    a: &BenchArgs,
    out: &mut Vec<Row>,
) -> Result<()> {
    let first = out.len();
    let g = s.layout.geometry(s.dims)?;
    let n = g.len();
    let c = g.channels;
    let size = std::mem::size_of::<T>() as f64;
    let cfg = Config::torch(c);
    let p = Params::init(&cfg);
    let huge = a.huge_pages;
    let x: Vec<T> = data(n, 1, huge);
    let dy: Vec<T> = data(n, 2, huge);
    let mut y: Vec<T> = buffer(n, huge);
    let mut dx: Vec<T> = buffer(n, huge);
    let mut state = RunningState::init(&cfg);
    let mut saved = Saved::default();
    let mut ws = Workspace::default();
    let mut grads = Grads::default();
    let par = Parallelism::Rayon;

    // Copy ceilings: a plain copy moving the same bytes (k·N elements: half read, half
    // written), measured in this run with the same threads.
    // The streaming-store copy (`copy-nt`) is the ceiling for outputs bnorm streams.
    let mut copy_rates = std::collections::BTreeMap::new();
    let mut nt_rates = std::collections::BTreeMap::new();
    let mut pair_bufs = std::collections::BTreeMap::new();
    for k in [2usize, 3, 4, 5] {
        let len = n * k / 2;
        let src: Vec<T> = data(len, 3, huge);
        let mut dst: Vec<T> = buffer(len, huge);
        let bytes = k as f64 * n as f64 * size;
        let t = median(a.seconds, a.min_runs, || {
            par_copy(black_box(&src), &mut dst)
        });
        out.push(row("copy", &format!("copy_{k}n"), s, dtype, t, bytes, None));
        copy_rates.insert(k, bytes / t / 1e9);
        let t = median(a.seconds, a.min_runs, || {
            par_copy_nt(black_box(&src), &mut dst)
        });
        out.push(row(
            "copy-nt",
            &format!("copy_{k}n"),
            s,
            dtype,
            t,
            bytes,
            None,
        ));
        nt_rates.insert(k, bytes / t / 1e9);
        pair_bufs.insert(k, (src, dst));
    }
    let copy = |k: usize| copy_rates.get(&k).copied();
    let bytes = |k: usize| k as f64 * n as f64 * size;
    // The traffic floor of the schedule bnorm uses for this layout (see `traffic_floor`),
    // on its own copies of the inputs (`x2`, `dy2`, output `o2`) so that it never warms
    // the operation's data.
    let chunk = |arrays| (g.inner > 1).then(|| fused_channels::<T>(g, arrays) * g.outer * g.inner);
    let (x2, dy2): (Vec<T>, Vec<T>) = (data(n, 1, huge), data(n, 2, huge));
    let mut o2: Vec<T> = buffer(n, huge);
    // Every bnorm row: the median of `op` alone, then `op` paired with the
    // plain copy of its bytes (`paired`: the row's `ratio_paired`, `copy_paired_gbps`);
    // with a `floor`, also the three alternated (`alternate`: op, floor, copy, copy,
    // floor, op): `floor_paired` (the floor's rate over the copy's — the highest paired
    // ratio the schedule allows in those minutes) and `ratio_floor_paired` (the
    // operation's rate over the floor's).
    // Every row is also paired with the streaming-store copy (`ratio_nt_paired`,
    // `copy_nt_paired_gbps`: the physical limit for a fresh output), and its floor
    // alternated with that copy too (`floor_nt_paired`: the highest ratio to the streaming
    // copy the schedule allows in those minutes; the row's `limit`).
    let mut timed =
        |imp: &str, name: &str, k: usize, op: &mut dyn FnMut(), floor: Option<&mut dyn FnMut()>| {
            let t = median(a.seconds, a.min_runs, &mut *op);
            let mut r = row(imp, name, s, dtype, t, bytes(k), copy(k));
            if let Some((src, dst)) = pair_bufs.get_mut(&k) {
                let (ratio, tc) = paired(a.seconds, a.min_runs, &mut *op, || {
                    par_copy(black_box(&src[..]), dst)
                });
                r.value["ratio_paired"] = json!(ratio);
                r.value["copy_paired_gbps"] = json!(bytes(k) / tc / 1e9);
                let (ratio, tc) = paired(a.seconds, a.min_runs, &mut *op, || {
                    par_copy_nt(black_box(&src[..]), dst)
                });
                r.value["ratio_nt_paired"] = json!(ratio);
                r.value["copy_nt_paired_gbps"] = json!(bytes(k) / tc / 1e9);
                if name == "infer_fwd" {
                    r.value["limit"] = json!(1.0); // x read once, y written once
                }
                if let Some(floor) = floor {
                    let mut cp = || par_copy(black_box(&src[..]), dst);
                    let rounds = alternate(a.seconds, a.min_runs, &mut [op, floor, &mut cp]);
                    r.value["floor_paired"] = json!(median_of(rounds.iter().map(|t| t[2] / t[1])));
                    r.value["ratio_floor_paired"] =
                        json!(median_of(rounds.iter().map(|t| t[1] / t[0])));
                    let mut nt = || par_copy_nt(black_box(&src[..]), dst);
                    let rounds = alternate(a.seconds, a.min_runs, &mut [floor, &mut nt]);
                    let limit = median_of(rounds.iter().map(|t| t[1] / t[0])).min(1.0);
                    r.value["floor_nt_paired"] = json!(limit);
                    r.value["limit"] = json!(limit);
                }
            }
            r
        };

    out.push(timed(
        "bnorm",
        "train_fwd",
        2,
        &mut || {
            forward_into(
                &cfg,
                g,
                &x,
                &p,
                state.as_mut(),
                Mode::Train,
                &mut y,
                &mut saved,
                &mut ws,
                par,
            )
            .expect("valid input");
        },
        Some(&mut || traffic_floor(&[&x2[..]], &mut o2, chunk(1))),
    ));
    out.push(timed(
        "bnorm",
        "backward",
        3,
        &mut || {
            backward_into(
                &cfg, g, &x, &dy, &p, &saved, &mut dx, &mut grads, &mut ws, par,
            )
            .expect("valid input");
        },
        Some(&mut || traffic_floor(&[&x2[..], &dy2[..]], &mut o2, chunk(2))),
    ));
    if T::DTYPE == bnorm::element::DType::F32 {
        // The opt-in f32 backward map (`BackwardArithmetic::F32`), same saved statistics.
        let fast = cfg.clone().backward_arithmetic(BackwardArithmetic::F32);
        out.push(timed(
            "bnorm",
            "backward_f32map",
            3,
            &mut || {
                backward_into(
                    &fast, g, &x, &dy, &p, &saved, &mut dx, &mut grads, &mut ws, par,
                )
                .expect("valid input");
            },
            None,
        ));
    }
    out.push(timed(
        "bnorm",
        "infer_fwd",
        2,
        &mut || {
            forward_into(
                &cfg,
                g,
                &x,
                &p,
                state.as_mut(),
                Mode::Inference,
                &mut y,
                &mut saved,
                &mut ws,
                par,
            )
            .expect("valid input");
        },
        None,
    ));

    // Fused epilogues: relu(bn(x)) reads x, writes y; relu(bn(x) + r) also reads r.
    // Backward through them reads x, y, dy and writes dx (and d_residual).
    let res: Vec<T> = data(n, 4, huge);
    let mut dres: Vec<T> = buffer(n, huge);
    for (op, residual, kf) in [
        ("train_fwd_relu", None, 2),
        ("train_fwd_add_relu", Some(&res[..]), 3),
    ] {
        let mut fwd = || {
            bnorm::expert::forward_into(
                &cfg,
                g,
                &x,
                &p,
                state.as_mut(),
                Mode::Train,
                &mut y,
                &mut saved,
                &mut ws,
                bnorm::expert::Options::from(par).epilogue(residual.map_or(
                    bnorm::expert::Epilogue::Relu,
                    bnorm::expert::Epilogue::AddRelu,
                )),
            )
            .expect("valid input");
        };
        out.push(timed("bnorm", op, kf, &mut fwd, None));
        let (bop, kb) = if residual.is_some() {
            ("backward_add_relu", 5)
        } else {
            ("backward_relu", 4)
        };
        let mut bwd = || {
            let dr = residual.map(|_| &mut dres[..]);
            bnorm::expert::backward_into(
                &cfg,
                g,
                &x,
                &dy,
                &p,
                &saved,
                &mut dx,
                &mut grads,
                &mut ws,
                bnorm::expert::BackwardOptions::from(par).epilogue(match dr {
                    Some(dresidual) => {
                        bnorm::expert::BackwardEpilogue::AddRelu { y: &y, dresidual }
                    }
                    None => bnorm::expert::BackwardEpilogue::Relu { y: &y },
                }),
            )
            .expect("valid input");
        };
        out.push(timed("bnorm", bop, kb, &mut bwd, None));
    }

    // The floor alone: what the training forward and the backward would take with free
    // arithmetic.
    let t = median(a.seconds, a.min_runs, || {
        traffic_floor(&[&x[..]], &mut y, chunk(1))
    });
    out.push(row("floor", "train_fwd", s, dtype, t, bytes(2), copy(2)));
    let t = median(a.seconds, a.min_runs, || {
        traffic_floor(&[&x[..], &dy[..]], &mut dx, chunk(2))
    });
    out.push(row("floor", "backward", s, dtype, t, bytes(3), copy(3)));

    // The allocating tier (`BatchNorm::forward` / `backward`: an output allocated per
    // call), paired like the caller-buffer rows; its limit is the streaming copy.
    let mut layer = cfg.clone().build()?;
    for (name, mode) in [("train_fwd", Mode::Train), ("infer_fwd", Mode::Inference)] {
        out.push(timed(
            "bnorm-alloc",
            name,
            2,
            &mut || {
                black_box(
                    layer
                        .forward(&x, s.dims, s.layout, mode)
                        .expect("valid input"),
                );
            },
            None,
        ));
    }
    layer
        .forward(&x, s.dims, s.layout, Mode::Train)
        .expect("valid input");
    out.push(timed(
        "bnorm-alloc",
        "backward",
        3,
        &mut || {
            black_box(
                layer
                    .backward(&x, &dy, s.dims, s.layout)
                    .expect("valid input"),
            );
        },
        None,
    ));
    // Beside each ratio, the ratio to the streaming copy of the same bytes, and for the
    // training forward and backward the share of the schedule's traffic floor reached.
    let floors: Vec<(String, f64)> = out[first..]
        .iter()
        .filter(|r| r.value["impl"] == "floor")
        .map(|r| {
            let op = r.value["op"].as_str().unwrap_or("").to_string();
            (op, r.value["gbps"].as_f64().unwrap_or(0.0))
        })
        .collect();
    // Where the caller-buffer tensors lie: each one's address modulo 4 KiB (the kernels'
    // cost depends on their relative offsets; bench/README.md, "Buffer placement").
    let page_offsets = json!({
        "x": x.as_ptr() as usize % 4096,
        "dy": dy.as_ptr() as usize % 4096,
        "y": y.as_ptr() as usize % 4096,
        "dx": dx.as_ptr() as usize % 4096,
    });
    // The allocating tier runs the caller-buffer tier's schedule: the same limit.
    let limits: Vec<(String, Value)> = out[first..]
        .iter()
        .filter(|r| r.value["impl"] == "bnorm")
        .map(|r| {
            (
                r.value["op"].as_str().unwrap_or("").to_string(),
                r.value["limit"].clone(),
            )
        })
        .collect();
    for r in &mut out[first..] {
        let v = &mut r.value;
        if v["impl"] == "bnorm-alloc" {
            if let Some((_, l)) = limits
                .iter()
                .find(|(op, l)| v["op"] == *op && l.is_number())
            {
                v["limit"] = l.clone();
            }
        }
        if v["impl"] != "bnorm" && v["impl"] != "bnorm-alloc" {
            continue;
        }
        if v["impl"] == "bnorm" {
            v["page_offsets"] = page_offsets.clone();
        }
        let moved = v["gbps"].as_f64().unwrap_or(0.0) * v["median_s"].as_f64().unwrap_or(0.0);
        let k = (moved * 1e9 / (n as f64 * size)).round() as usize;
        if let Some(&nt) = nt_rates.get(&k) {
            v["copy_nt_gbps"] = json!(nt);
            v["ratio_nt"] = json!(v["gbps"].as_f64().unwrap_or(0.0) / nt);
        }
        if let Some(f) = floors
            .iter()
            .find(|(op, _)| v["op"] == *op && v["impl"] == "bnorm")
        {
            v["floor_gbps"] = json!(f.1);
            v["ratio_floor"] = json!(v["gbps"].as_f64().unwrap_or(0.0) / f.1);
        }
    }
    Ok(())
}

fn bench_candle(
    s: &Shape,
    dtype: DType,
    dname: &str,
    a: &BenchArgs,
    out: &mut Vec<Row>,
) -> Result<()> {
    if s.layout.is_channels_last() && s.layout != Layout::NC {
        return Ok(()); // candle-nn normalizes dim 1 only: no channels-last layout
    }
    let dev = Device::Cpu;
    let g = s.layout.geometry(s.dims)?;
    let n = g.len();
    let size = dtype.size_in_bytes() as f64;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, dtype, &dev);
    let bn = candle_nn::batch_norm(g.channels, candle_nn::BatchNormConfig::default(), vb)?;
    let x = Tensor::from_vec(data::<f32>(n, 1, false), s.dims, &dev)?.to_dtype(dtype)?;
    let x = candle_core::Var::from_tensor(&x)?;
    let dy = Tensor::from_vec(data::<f32>(n, 2, false), s.dims, &dev)?.to_dtype(dtype)?;
    let (fwd_bytes, bwd_bytes) = (2.0 * n as f64 * size, 3.0 * n as f64 * size);
    let runs = a.min_runs.min(5);
    // candle-nn cannot train every dtype (bf16 fails inside its BatchNorm): report it.
    if let Err(e) = bn.forward_t(x.as_tensor(), true) {
        let first = e.to_string().lines().next().unwrap_or("").to_string();
        outln!(
            "candle-nn {} {dname}: training forward fails ({first}); no candle rows",
            s.name
        )?;
        return Ok(());
    }
    let t = median(a.seconds, runs, || {
        black_box(bn.forward_t(x.as_tensor(), true).expect("candle forward"));
    });
    out.push(row("candle-nn", "train_fwd", s, dname, t, fwd_bytes, None));
    let t = median(a.seconds, runs, || {
        black_box(bn.forward_t(x.as_tensor(), false).expect("candle forward"));
    });
    out.push(row("candle-nn", "infer_fwd", s, dname, t, fwd_bytes, None));
    let t = median(a.seconds, runs, || {
        let y = bn.forward_t(x.as_tensor(), true).expect("candle forward");
        let loss = (y * &dy).and_then(|p| p.sum_all()).expect("candle loss");
        black_box(loss.backward().expect("candle backward"));
    });
    let t_fwd = median(a.seconds, runs, || {
        let y = bn.forward_t(x.as_tensor(), true).expect("candle forward");
        black_box((y * &dy).and_then(|p| p.sum_all()).expect("candle loss"));
    });
    // backward alone: the step minus its forward part.
    out.push(row(
        "candle-nn",
        "backward",
        s,
        dname,
        (t - t_fwd).max(1e-9),
        bwd_bytes,
        None,
    ));
    Ok(())
}

/// A training step (forward in training mode + backward through candle's autograd) of
/// `bnorm_candle::BatchNorm` against `candle_nn::BatchNorm`, on S1 in f32.
fn bench_candle_step(a: &BenchArgs) -> Result<()> {
    let s = &SHAPES[0];
    let dev = Device::Cpu;
    let n: usize = s.dims.iter().product();
    let c = s.dims[1];
    let x =
        candle_core::Var::from_tensor(&Tensor::from_vec(data::<f32>(n, 1, false), s.dims, &dev)?)?;
    let dy = Tensor::from_vec(data::<f32>(n, 2, false), s.dims, &dev)?;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let ours = bnorm_candle::BatchNorm::new(Config::torch(c), Layout::NCHW, vb.pp("ours"))?;
    let theirs = candle_nn::batch_norm(c, candle_nn::BatchNormConfig::default(), vb.pp("theirs"))?;
    let runs = a.min_runs.min(10);
    let step = |m: &dyn ModuleT| {
        let y = m.forward_t(x.as_tensor(), true).expect("forward");
        let loss = (y * &dy).and_then(|p| p.sum_all()).expect("loss");
        black_box(loss.backward().expect("backward"));
    };
    let t_ours = median(a.seconds, runs, || step(&ours));
    let t_theirs = median(a.seconds, runs, || step(&theirs));
    outln!(
        "training step through candle autograd, S1 NCHW f32: bnorm-candle {:.2} ms, candle-nn {:.2} ms: {:.1}x faster",
        t_ours * 1e3,
        t_theirs * 1e3,
        t_theirs / t_ours
    )?;
    Ok(())
}

/// Runs every measurement and prints the table.
pub fn run(a: &BenchArgs) -> Result<()> {
    let threads = rayon::current_num_threads();
    outln!("bnorm bench: {threads} threads; median of >= {} runs after a warm-up; GB/s = bytes read + written / time", a.min_runs)?;
    if a.huge_pages {
        outln!(
            "buffers of bnorm and of the copies from bnorm::tuning::zeroed_buffer (huge pages)"
        )?;
    }
    let mut rows = Vec::new();
    // `--shapes` holds names of `SHAPES` only (checked by `parse_shape`); still, a
    // selection matching nothing is an error, not an empty table.
    let wanted =
        |s: &Shape| a.shapes.is_empty() || a.shapes.iter().any(|w| w.eq_ignore_ascii_case(s.name));
    if !SHAPES.iter().any(&wanted) {
        bail!(
            "--shapes {} selects no shape; the shapes are {}",
            a.shapes.join(","),
            shape_list()
        );
    }
    for s in SHAPES.iter().filter(|s| wanted(s)) {
        bench_bnorm::<f32>(s, "f32", a, &mut rows)?;
        if !a.no_candle {
            bench_candle(s, DType::F32, "f32", a, &mut rows)?;
        }
    }
    for s in SHAPES
        .iter()
        .filter(|s| (s.name == "S1" || s.name == "S4") && wanted(s))
    {
        bench_bnorm::<bf16>(s, "bf16", a, &mut rows)?;
        if !a.no_candle {
            bench_candle(s, DType::BF16, "bf16", a, &mut rows)?;
        }
        bench_bnorm::<f16>(s, "f16", a, &mut rows)?;
    }
    // speed-up over candle-nn
    let values: Vec<Value> = rows.into_iter().map(|r| r.value).collect();
    let find = |imp: &str, op: &str, shape: &str, dtype: &str| {
        values.iter().find(|v| {
            v["impl"] == imp && v["op"] == op && v["shape"] == shape && v["dtype"] == dtype
        })
    };
    outln!(
        "{:<6} {:<6} {:<5} {:<10} {:>10} {:>9} {:>9} {:>7} {:>7} {:>7} {:>7} {:>7} {:>8} {:>9} {:>9} {:>12} {:>9}",
        "shape",
        "layout",
        "dtype",
        "op",
        "median ms",
        "GB/s",
        "copy GB/s",
        "ratio",
        "paired",
        "NT pd",
        "limit",
        "of lim",
        "of floor",
        "floor pd",
        "of fl pd",
        "candle GB/s",
        "speed-up"
    )?;
    let mut out = Vec::new();
    for v in &values {
        let mut v = v.clone();
        v["huge_pages"] = json!(a.huge_pages);
        if v["impl"] == "bnorm" || v["impl"] == "bnorm-alloc" {
            let text = |k: &str| v[k].as_str().unwrap_or("").to_string();
            let (op, shape, dtype) = (text("op"), text("shape"), text("dtype"));
            let (op, shape, dtype) = (op.as_str(), shape.as_str(), dtype.as_str());
            if let (Some(r), Some(l)) = (v["ratio_nt_paired"].as_f64(), v["limit"].as_f64()) {
                v["of_limit"] = json!(r / l);
            }
            let cand = find("candle-nn", op, shape, dtype).and_then(|c| c["median_s"].as_f64());
            if let (Some(c), Some(m)) = (cand, v["median_s"].as_f64()) {
                v["speedup_vs_candle"] = json!(c / m);
            }
            let opt = |k: &str| {
                v.get(k)
                    .and_then(|s| s.as_f64())
                    .map_or("-".to_string(), |s| format!("{s:.2}"))
            };
            outln!(
                "{:<6} {:<6} {:<5} {:<10} {:>10.3} {:>9.2} {:>9.2} {:>7.2} {:>7} {:>7} {:>7} {:>7} {:>8} {:>9} {:>9} {:>12} {:>9}",
                shape,
                v["layout"].as_str().unwrap_or(""),
                dtype,
                if v["impl"] == "bnorm-alloc" {
                    format!("{op}*")
                } else {
                    op.to_string()
                },
                v["median_s"].as_f64().unwrap_or(0.0) * 1e3,
                v["gbps"].as_f64().unwrap_or(0.0),
                v["copy_gbps"].as_f64().unwrap_or(0.0),
                v["ratio"].as_f64().unwrap_or(0.0),
                opt("ratio_paired"),
                opt("ratio_nt_paired"),
                opt("limit"),
                opt("of_limit"),
                opt("ratio_floor"),
                opt("floor_paired"),
                opt("ratio_floor_paired"),
                find("candle-nn", op, shape, dtype)
                    .and_then(|c| c["gbps"].as_f64())
                    .map_or("-".into(), |g| format!("{g:.2}")),
                v.get("speedup_vs_candle")
                    .and_then(|s| s.as_f64())
                    .map_or("-".into(), |s| format!("{s:.1}x")),
            )?;
        }
        out.push(v);
    }
    outln!("(* = allocating tier: a fresh output per call, page faults included)")?;
    outln!(
        "(paired: the same ratio with bnorm and the plain copy alternated call by call, \
         op, copy, copy, op: the median over rounds of copy time / op time)"
    )?;
    outln!(
        "(NT pd: the paired ratio to the streaming-store copy of the same bytes, the physical \
         limit for a fresh output; limit: the highest NT pd the schedule allows, its traffic \
         floor alternated with the streaming copy (1 for the inference map, which reads and \
         writes each byte once; the allocating tier has its schedule's limit; - where no floor is measured); of lim: NT \
         pd / limit; of \
         floor: share reached of the schedule's memory-traffic floor)"
    )?;
    outln!(
        "(floor pd: the floor's rate over the plain copy's, the two alternated with the \
         operation call by call, op, floor, copy, copy, floor, op — the highest paired ratio \
         the schedule allows in those minutes; of fl pd: the operation's rate over the \
         floor's in the same rounds)"
    )?;
    if !a.no_candle && wanted(&SHAPES[0]) {
        bench_candle_step(a)?;
    }
    if let Some(path) = &a.json {
        write_atomic(path, serde_json::to_string_pretty(&out)?.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        outln!("wrote {}", path.display())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paired_alternates_op_and_copy_in_abba_rounds() {
        use std::cell::RefCell;
        let calls = RefCell::new(String::new());
        let (ratio, copy_s) = paired(
            0.0,
            3,
            || {
                calls.borrow_mut().push('o');
                std::thread::sleep(Duration::from_micros(50));
            },
            || {
                calls.borrow_mut().push('c');
                std::thread::sleep(Duration::from_micros(50));
            },
        );
        // One warm-up call of each, then rounds op, copy, copy, op.
        assert_eq!(calls.into_inner(), "ococcooccoocco");
        assert!(ratio.is_finite() && ratio > 0.0, "ratio {ratio}");
        assert!(copy_s >= 0.0, "copy time {copy_s}");
    }

    #[test]
    fn alternate_runs_each_round_forwards_then_backwards() {
        use std::cell::RefCell;
        let calls = RefCell::new(String::new());
        let f = |c: char| {
            let calls = &calls;
            move || calls.borrow_mut().push(c)
        };
        let (mut a, mut b, mut c) = (f('a'), f('b'), f('c'));
        let rounds = alternate(0.0, 2, &mut [&mut a, &mut b, &mut c]);
        // One warm-up call of each, then rounds a, b, c, c, b, a.
        assert_eq!(calls.into_inner(), "abcabccbaabccba");
        assert_eq!(rounds.len(), 2);
        assert!(rounds
            .iter()
            .all(|r| r.len() == 3 && r.iter().all(|t| *t >= 0.0)));
        assert!(median_of([3.0, 1.0, 2.0].into_iter()) == 2.0);
        assert!(median_of(std::iter::empty()).is_nan());
    }

    #[test]
    fn streaming_copy_copies_every_byte_at_any_alignment() {
        let src: Vec<f32> = (0..70_001).map(|i| i as f32 * 0.5 - 7.0).collect();
        for (so, dof) in [(0usize, 0usize), (1, 0), (0, 3), (5, 7)] {
            let n = src.len() - so - 9;
            let mut dst = vec![f32::NAN; n + dof + 4];
            par_copy_nt(&src[so..so + n], &mut dst[dof..dof + n]);
            assert!(
                dst[..dof].iter().all(|v| v.is_nan()),
                "wrote before the target"
            );
            assert!(
                dst[dof + n..].iter().all(|v| v.is_nan()),
                "wrote past the target"
            );
            let same = dst[dof..dof + n]
                .iter()
                .zip(&src[so..so + n])
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "source offset {so}, destination offset {dof}");
        }
        let src16: Vec<bf16> = (0..1001).map(|i| bf16::from_f32(i as f32)).collect();
        let mut dst16 = vec![bf16::ZERO; 1001];
        copy_nt(&src16[1..], &mut dst16[..1000]);
        assert_eq!(&dst16[..1000], &src16[1..]);
    }
}
