// The benchmark shapes S1–S5, in one place: `bnorm bench` (crates/bnorm-cli/src/bench.rs)
// and the divan benchmarks (this folder's mod.rs) both `include!` this file. It needs
// `bnorm::Layout` in scope.

/// A benchmark shape: its name (S1–S5), layout and dimensions.
#[derive(Clone, Copy)]
pub struct Shape {
    /// S1–S5.
    pub name: &'static str,
    /// The layout of `dims`.
    pub layout: Layout,
    /// The dimensions.
    pub dims: &'static [usize],
}

/// S1–S5: ResNet-like activations (S1, S5 NCHW 56×56; S2 NCHW 14×14 with more
/// channels), a fully connected layer's input (S3, NC), and S1's data channels-last (S4).
pub const SHAPES: &[Shape] = &[
    Shape {
        name: "S1",
        layout: Layout::NCHW,
        dims: &[32, 64, 56, 56],
    },
    Shape {
        name: "S2",
        layout: Layout::NCHW,
        dims: &[32, 256, 14, 14],
    },
    Shape {
        name: "S3",
        layout: Layout::NC,
        dims: &[4096, 1024],
    },
    Shape {
        name: "S4",
        layout: Layout::NHWC,
        dims: &[32, 56, 56, 64],
    },
    Shape {
        name: "S5",
        layout: Layout::NCHW,
        dims: &[64, 128, 56, 56],
    },
];
