//! A warmed-up training step of the expert tier allocates nothing: counted by a global
//! allocator that tallies the allocations of the calling thread (the step runs with
//! `Parallelism::Sequential`, so all of its work is on that thread; the test harness's own
//! threads do not count).

use std::alloc::{GlobalAlloc, Layout as AllocLayout, System};
use std::cell::Cell;

use bnorm::expert::{backward_into, forward_into, Grads, Parallelism, Saved, Workspace};
use bnorm::{Config, Layout, Mode, Params, RunningState};

struct Counting;
thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

fn count() {
    let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
}

fn allocations() -> usize {
    ALLOCATIONS.with(|c| c.get())
}

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: AllocLayout) -> *mut u8 {
        count();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: AllocLayout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: AllocLayout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn a_warmed_up_training_step_does_not_allocate() {
    for (layout, shape) in [
        (Layout::NCHW, vec![4usize, 8, 20, 20]),
        (Layout::NHWC, vec![4, 20, 20, 8]),
        (Layout::NC, vec![300, 40]),
        (Layout::NLC, vec![3, 50, 5]),
    ] {
        let g = layout.geometry(&shape).unwrap();
        let cfg = Config::torch(g.channels);
        let p = Params::init(&cfg);
        let mut state = RunningState::init(&cfg);
        let x: Vec<f32> = (0..g.len()).map(|i| (i % 17) as f32).collect();
        let dy: Vec<f32> = (0..g.len()).map(|i| (i % 5) as f32 - 2.0).collect();
        let (mut y, mut dx) = (vec![0f32; g.len()], vec![0f32; g.len()]);
        let (mut saved, mut ws, mut grads) =
            (Saved::default(), Workspace::default(), Grads::default());
        let seq = Parallelism::Sequential;
        let mut step = |count: bool| {
            let before = allocations();
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
                seq,
            )
            .unwrap();
            backward_into(
                &cfg, g, &x, &dy, &p, &saved, &mut dx, &mut grads, &mut ws, seq,
            )
            .unwrap();
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
                seq,
            )
            .unwrap();
            let after = allocations();
            if !count {
                // the counter works: the first step grows the buffers
                assert!(after > before, "{layout}: the warm-up step should allocate");
            }
            if count {
                assert_eq!(
                    after - before,
                    0,
                    "{layout}: {} allocations in a warmed-up step",
                    after - before
                );
            }
        };
        step(false); // warm-up: buffers grow to size
        step(true);
        step(true);
    }
}

/// The layer's own loop: `forward_into`, `backward_into`, and the optimizer step through
/// `update_params` (see the `alloc_free_training` example).
#[test]
fn a_warmed_up_layer_step_with_an_optimizer_update_does_not_allocate() {
    let shape = [4usize, 8, 10, 10];
    let n: usize = shape.iter().product();
    let mut bn = Config::torch(8).build().unwrap();
    bn.set_parallelism(Parallelism::Sequential);
    let x: Vec<f32> = (0..n).map(|i| (i % 17) as f32).collect();
    let (mut y, mut dx, mut grads) = (vec![0f32; n], vec![0f32; n], Grads::default());
    let mut step = || {
        let before = allocations();
        bn.forward_into(&x, &shape, Layout::NCHW, Mode::Train, &mut y)
            .unwrap();
        bn.backward_into(&x, &y, &shape, Layout::NCHW, &mut dx, &mut grads)
            .unwrap();
        bn.update_params(|w, b| {
            for (p, g) in w.into_iter().flatten().zip(&grads.dweight) {
                *p -= 0.01 * g;
            }
            for (p, g) in b.into_iter().flatten().zip(&grads.dbias) {
                *p -= 0.01 * g;
            }
        })
        .unwrap();
        allocations() - before
    };
    assert!(step() > 0, "the warm-up step should allocate");
    step();
    assert_eq!(step(), 0, "allocations in a warmed-up layer step");
    assert_eq!(step(), 0, "allocations in a warmed-up layer step");
}
