//! The demo network: four 3×3 convolutions, each followed by a bnorm layer and ReLU, with
//! 2×2 max-pools after the second and third, global average pooling and a linear
//! classifier (the ResNet pattern). On 8×8 digits the last batch norm sees 2×2 positions
//! per channel and image: with per-example statistics (batch size 1 in training mode)
//! every channel is forced to mean 0 there, and the pooled features lose how strongly
//! each pattern is present.

use bnorm::{Layout, Mode};
use bnorm_candle::{BatchNorm, Snapshot};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{conv2d_no_bias, linear, Conv2d, Conv2dConfig, Linear, VarBuilder, VarMap};

use crate::convention::Convention;

/// Output channels of the four convolutions.
pub const CHANNELS: [usize; 4] = [16, 32, 32, 64];

pub struct Net {
    convs: Vec<Conv2d>,
    pub bns: Vec<BatchNorm>,
    fc: Linear,
}

impl Net {
    pub fn new(
        vm: &VarMap,
        conv: Convention,
        momentum: Option<f64>,
        h: usize,
        w: usize,
        seed: u64,
    ) -> anyhow::Result<Net> {
        let vb = VarBuilder::from_varmap(vm, DType::F32, &Device::Cpu);
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let mut convs = Vec::new();
        let mut bns = Vec::new();
        let mut cin = 1;
        for (i, &c) in CHANNELS.iter().enumerate() {
            convs.push(conv2d_no_bias(cin, c, 3, cfg, vb.pp(format!("conv{i}")))?);
            bns.push(BatchNorm::new(
                conv.config(c, momentum),
                Layout::NCHW,
                vb.pp(format!("bn{i}")),
            )?);
            cin = c;
        }
        let _ = (h, w);
        let fc = linear(CHANNELS[3], 10, vb.pp("fc"))?;
        reinit(vm, seed)?;
        Ok(Net { convs, bns, fc })
    }

    /// Logits for a batch `(N, 1, H, W)`, every bnorm layer in `mode`.
    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, (conv, bn)) in self.convs.iter().zip(&self.bns).enumerate() {
            h = bn.forward_mode(&conv.forward(&h)?, mode)?.relu()?;
            if i == 1 || i == 2 {
                h = h.max_pool2d(2)?;
            }
        }
        // global average pooling, as in ResNet
        self.fc.forward(&h.mean((2, 3))?)
    }

    pub fn snapshot(&self) -> Result<Vec<Snapshot>> {
        self.bns.iter().map(|b| b.snapshot()).collect()
    }

    pub fn restore(&self, snaps: &[Snapshot]) -> Result<()> {
        for (b, s) in self.bns.iter().zip(snaps) {
            b.restore(s)?;
        }
        Ok(())
    }
}

/// Deterministic He-uniform initialization of every weight (candle's CPU generator cannot
/// be seeded), so a run is reproducible from `--seed`.
fn reinit(vm: &VarMap, seed: u64) -> anyhow::Result<()> {
    let data = vm
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("varmap poisoned"))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut s = seed ^ 0xB0B0_CAFE;
    let mut next = move || {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let is_weight = name.ends_with("weight") && dims.len() >= 2;
        let is_fc_bias = name.starts_with("fc.") && name.ends_with("bias");
        if !(is_weight || is_fc_bias) {
            continue;
        }
        let fan_in: usize = if is_weight {
            dims[1..].iter().product()
        } else {
            CHANNELS[3]
        };
        let bound = if name.starts_with("fc.") {
            (1.0 / fan_in as f64).sqrt()
        } else {
            (6.0 / fan_in as f64).sqrt()
        };
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| ((next() * 2.0 - 1.0) * bound) as f32)
            .collect();
        var.set(&Tensor::from_vec(v, dims.as_slice(), &Device::Cpu)?)?;
    }
    Ok(())
}
