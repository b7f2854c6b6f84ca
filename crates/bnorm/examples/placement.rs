//! What the placement of the backward's buffers costs: alternates, call by call in one
//! process (order A B B A, 200 calls), the f32 backward of a channels-last benchmark shape
//! on two placements of dy and dx relative to x modulo 4 KiB, and prints the median of
//! each. Alternating in one process cancels the drift of a shared machine, which two
//! separate runs cannot; two identical placements measure what is left (about ±2%).
//!
//! Run: `cargo run --release -p bnorm --example placement -- S3 0 0 16 48` (shape S3 = NC
//! (4096, 1024) or S4 = NHWC (32, 56, 56, 64); then dy and dx offsets in bytes past x for
//! A, then for B, multiples of 4 below 4096). `16 48` is where a heap puts tensors
//! allocated one after another; `0 0` where fresh mappings put them (each at the same
//! offset of its first page).

use bnorm::expert::{backward_into, forward_into, Grads, Parallelism, Saved, Workspace};
use bnorm::{Config, Layout, Mode, Params, RunningState};

/// The index in `buf` at which a tensor starts `b` bytes past `x` modulo 4 KiB.
fn place(x: &[f32], buf: &[f32], b: usize) -> usize {
    let want = (x.as_ptr() as usize + b) % 4096;
    ((want + 4096 - buf.as_ptr() as usize % 4096) % 4096) / 4
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let offsets: Vec<usize> = args
        .get(2..6)
        .map(|v| v.iter().filter_map(|a| a.parse().ok()).collect())
        .unwrap_or_default();
    if args.len() != 6 || offsets.len() != 4 || offsets.iter().any(|&o| o % 4 != 0 || o >= 4096) {
        eprintln!("usage: placement S3|S4 DY_A DX_A DY_B DX_B (bytes past x, multiples of 4)");
        std::process::exit(2);
    }
    let (layout, shape) = match args[1].as_str() {
        "S4" => (Layout::NHWC, vec![32, 56, 56, 64]),
        _ => (Layout::NC, vec![4096, 1024]),
    };
    let g = layout.geometry(&shape).unwrap();
    let n = g.len();
    let cfg = Config::torch(g.channels);
    let p = Params::init(&cfg);
    let mut x = vec![0f32; n];
    for (i, v) in x.iter_mut().enumerate() {
        *v = (i % 97) as f32 * 0.1 + 3.0;
    }
    // One dy and one dx buffer per placement (the same ones when both are equal), each
    // 1024 values longer than needed so that the tensor can start anywhere in a page.
    let same = offsets[..2] == offsets[2..];
    let dys: Vec<Vec<f32>> = (0..if same { 1 } else { 2 })
        .map(|_| (0..n + 1024).map(|i| (i % 13) as f32 * 0.2 - 1.0).collect())
        .collect();
    let mut dxs: Vec<Vec<f32>> = (0..dys.len()).map(|_| vec![0f32; n + 1024]).collect();
    let at: Vec<(usize, usize)> = (0..2)
        .map(|k| {
            let b = k.min(dys.len() - 1);
            (
                place(&x, &dys[b], offsets[2 * k]),
                place(&x, &dxs[b], offsets[2 * k + 1]),
            )
        })
        .collect();
    let mut state = RunningState::init(&cfg);
    let mut y = vec![0f32; n];
    let (mut saved, mut ws, mut grads) = (Saved::default(), Workspace::default(), Grads::default());
    let par = Parallelism::Rayon;
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
    .unwrap();
    let mut times = [vec![], vec![]];
    for it in 0..200 {
        let k = usize::from(it % 4 == 1 || it % 4 == 2);
        let b = k.min(dys.len() - 1);
        let (dy_at, dx_at) = at[k];
        let dy = &dys[b][dy_at..dy_at + n];
        let dx = &mut dxs[b][dx_at..dx_at + n];
        let t = std::time::Instant::now();
        backward_into(&cfg, g, &x, dy, &p, &saved, dx, &mut grads, &mut ws, par).unwrap();
        times[k].push(t.elapsed().as_secs_f64());
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2] * 1e3
    };
    let (ta, tb) = (median(&mut times[0]), median(&mut times[1]));
    println!(
        "{} A dy+{} dx+{}: {ta:.3} ms | B dy+{} dx+{}: {tb:.3} ms | B/A {:.3}",
        args[1],
        offsets[0],
        offsets[1],
        offsets[2],
        offsets[3],
        tb / ta
    );
}
