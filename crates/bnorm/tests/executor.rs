//! Kernels run on threads lent by an [`Executor`] give bitwise the results of the calling
//! thread alone, on every kernel path (statistics, fused channels-first passes, maps with
//! their epilogues, the backward's sums and maps), and whatever the executor does with the
//! work: all of it, part of it, none of it.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use bnorm::element::{bf16, Element};
use bnorm::expert::{Executor, Parallelism};
use bnorm::{Config, Layout, Mode};
use common::Rng;

/// Runs the worker on `threads - 1` scoped threads and the caller; `skip` drops the
/// calling thread's share (the kernels' caller then does it).
struct Scoped {
    threads: usize,
    skip_caller: bool,
    runs: AtomicUsize,
}

impl Executor for Scoped {
    fn threads(&self) -> usize {
        self.threads
    }
    fn run(&self, worker: &(dyn Fn() + Sync)) {
        self.runs.fetch_add(1, Ordering::Relaxed);
        std::thread::scope(|s| {
            for _ in 1..self.threads {
                s.spawn(worker);
            }
            if !self.skip_caller {
                worker();
            }
        });
    }
    fn name(&self) -> &str {
        "scoped"
    }
}

/// Says it has threads, never runs the worker.
struct Idle;
impl Executor for Idle {
    fn threads(&self) -> usize {
        8
    }
    fn run(&self, _: &(dyn Fn() + Sync)) {}
}

static THREE: Scoped = Scoped {
    threads: 3,
    skip_caller: false,
    runs: AtomicUsize::new(0),
};
static HELPERS_ONLY: Scoped = Scoped {
    threads: 2,
    skip_caller: true,
    runs: AtomicUsize::new(0),
};
static IDLE: Idle = Idle;

type Step<T> = (Vec<T>, Vec<T>, Vec<T>, Vec<T>, Vec<f64>, Vec<f64>);

/// Training steps with a residual epilogue, their backward, and an inference step.
fn steps<T: Element>(
    par: Parallelism,
    layout: Layout,
    shp: &[usize],
    x: &[T],
    dy: &[T],
) -> Step<T> {
    let c = shp[layout.channel_axis()];
    let mut bn = Config::torch(c).build().unwrap();
    bn.set_parallelism(par);
    let res: Vec<T> = x.iter().rev().copied().collect();
    let (y, _) = bn
        .forward_relu(x, Some(&res), shp, layout, Mode::Train)
        .unwrap();
    let (b, dres) = bn.backward_relu(x, &y, dy, shp, layout, true).unwrap();
    let (plain, _) = bn.forward(x, shp, layout, Mode::Train).unwrap();
    let back = bn.backward(x, dy, shp, layout).unwrap();
    let (inf, _) = bn.forward(x, shp, layout, Mode::Inference).unwrap();
    let s = bn.running_state().unwrap();
    let mut grads = b.dweight.unwrap();
    grads.extend(b.dbias.unwrap());
    grads.extend(back.dweight.unwrap());
    let mut dx = b.dx;
    dx.extend(dres.unwrap());
    dx.extend(back.dx);
    let mut stats = s.mean.clone();
    stats.extend(&s.var);
    (y, plain, inf, dx, grads, stats)
}

fn check<T: Element>() {
    for (layout, shp) in [
        (Layout::NCHW, vec![8, 3, 61, 67]),
        (Layout::NCHW, vec![4, 40, 20, 20]),
        (Layout::NHWC, vec![8, 61, 67, 3]),
        (Layout::NHWC, vec![4, 41, 40, 64]),
        (Layout::NC, vec![40_000, 5]),
        (Layout::NC, vec![3001, 130]),
        (Layout::NCL, vec![3, 2, 70_001]),
    ] {
        let len: usize = shp.iter().product();
        let mut rng = Rng(7);
        let x: Vec<T> = (0..len)
            .map(|_| T::from_f64(1.0 + 3.0 * rng.normal()))
            .collect();
        let dy: Vec<T> = (0..len).map(|_| T::from_f64(rng.normal())).collect();
        let alone = steps(Parallelism::Sequential, layout, &shp, &x, &dy);
        for par in [
            Parallelism::Threads(&THREE),
            Parallelism::Threads(&HELPERS_ONLY),
            Parallelism::Threads(&IDLE),
            Parallelism::Rayon,
        ] {
            let lent = steps(par, layout, &shp, &x, &dy);
            assert!(
                alone == lent,
                "{layout} {shp:?} {par:?}: differs from the calling thread alone"
            );
        }
    }
    assert!(THREE.runs.load(Ordering::Relaxed) > 0);
    assert!(HELPERS_ONLY.runs.load(Ordering::Relaxed) > 0);
}

#[test]
fn lent_threads_give_the_calling_threads_bits_f32() {
    check::<f32>();
}

#[test]
fn lent_threads_give_the_calling_threads_bits_bf16() {
    check::<bf16>();
}

#[test]
fn the_plan_sees_the_executors_threads() {
    assert_eq!(Parallelism::Threads(&THREE).threads(), 3);
    assert_eq!(Parallelism::Threads(&IDLE).threads(), 8);
}
