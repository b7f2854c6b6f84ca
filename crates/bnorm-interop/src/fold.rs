//! Folding inference-mode batch norm into the neighbouring linear or convolution layer.
//!
//! In inference, batch norm is a per-channel affine map `y = s·x + t` with
//! `s = γ / sqrt(var + eps)` and `t = β − mean·s`. Folded into the **preceding** layer it
//! scales that layer's output channels (always exact). Folded into the **following** layer
//! it scales its input channels and moves `t` into the bias, which is exact only when
//! nothing sits between them and every output sees every input term: a linear layer or an
//! unpadded convolution, not a zero-padded or transposed convolution.
//!
//! Everything is computed in f64 and rounded once to the target dtype; the result carries
//! the largest error of the folded layer against the unfolded pair on a random probe input.

use super::error::InteropError;
use super::layer::Layer;
use super::Result;
use bnorm::element::{bf16, f16};
use bnorm::element::{DType, Element};
use bnorm::Params;

/// The kind of layer batch norm is folded into. Weights use PyTorch's layouts: linear
/// `(out, in)`, convolution `(out, in/groups, k…)`, transposed convolution
/// `(in, out/groups, k…)`. Convolutions have stride 1 and dilation 1 in the probe; the
/// fold itself does not depend on stride or dilation (nor on padding, when folding into
/// the preceding layer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinearKind {
    /// A fully connected layer.
    Linear,
    /// A convolution with `groups` groups (`groups = channels` for depthwise).
    Conv {
        /// Number of groups (≥ 1).
        groups: usize,
    },
    /// A transposed convolution with `groups` groups.
    ConvTranspose {
        /// Number of groups (≥ 1).
        groups: usize,
    },
}

/// Inference batch norm as a per-channel affine map `y = scale·x + shift`.
#[derive(Debug, Clone, PartialEq)]
pub struct BnAffine {
    /// `γ / sqrt(var + eps)` per channel.
    pub scale: Vec<f64>,
    /// `β − mean · scale` per channel.
    pub shift: Vec<f64>,
}

impl BnAffine {
    /// The map of gamma/beta, running statistics and eps (all finite, variances ≥ 0,
    /// eps > 0, equal lengths).
    ///
    /// ```
    /// let a = bnorm_interop::BnAffine::new(&bnorm::Params::default(), &[1.0], &[3.0], 1.0)?;
    /// assert_eq!((a.scale[0], a.shift[0]), (0.5, -0.5));
    /// # Ok::<(), bnorm_interop::InteropError>(())
    /// ```
    pub fn new(params: &Params, mean: &[f64], var: &[f64], eps: f64) -> Result<BnAffine> {
        let bad = |reason: String| InteropError::InvalidLayer {
            layer: "batch norm".into(),
            reason,
        };
        let c = mean.len();
        if var.len() != c
            || params.weight.as_ref().is_some_and(|w| w.len() != c)
            || params.bias.as_ref().is_some_and(|b| b.len() != c)
        {
            return Err(bad(format!("lengths differ from {c} channels")));
        }
        if !(eps.is_finite() && eps > 0.0) {
            return Err(bad(format!("eps = {eps} is not finite and positive")));
        }
        let mut scale = Vec::with_capacity(c);
        let mut shift = Vec::with_capacity(c);
        for ch in 0..c {
            let (g, b) = (params.gamma(ch), params.beta(ch));
            let valid = [mean[ch], var[ch], g, b].iter().all(|v| v.is_finite()) && var[ch] >= 0.0;
            if !valid {
                return Err(bad(format!(
                    "channel {ch} has a non-finite value or a negative variance"
                )));
            }
            let s = g / (var[ch] + eps).sqrt();
            scale.push(s);
            shift.push(b - mean[ch] * s);
        }
        Ok(BnAffine { scale, shift })
    }

    /// The map of a checkpoint layer (it needs running statistics).
    pub fn from_layer(layer: &Layer) -> Result<BnAffine> {
        match (&layer.running_mean, &layer.running_var) {
            (Some(m), Some(v)) => {
                BnAffine::new(&layer.params(), m, v, layer.eps).map_err(|e| match e {
                    InteropError::InvalidLayer { reason, .. } => InteropError::InvalidLayer {
                        layer: layer.name.clone(),
                        reason,
                    },
                    e => e,
                })
            }
            _ => Err(InteropError::FoldNotExact {
                reason: "the layer has no running statistics, so inference normalizes with \
                         each batch's statistics and is not a fixed affine map",
            }),
        }
    }

    /// Number of channels.
    pub fn channels(&self) -> usize {
        self.scale.len()
    }
}

/// A folded layer: weight (same shape as given) and bias (one per output channel), both
/// already rounded to the target dtype (stored as f64), and the probe's verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct Folded {
    /// The folded weight.
    pub weight: Vec<f64>,
    /// The folded bias.
    pub bias: Vec<f64>,
    /// Largest `|folded − unfolded|` over the probe's outputs.
    pub max_error: f64,
    /// Largest `|unfolded|` over the probe's outputs (for a relative reading).
    pub max_output: f64,
}

fn round_to(v: f64, dtype: DType) -> f64 {
    match dtype {
        DType::F64 => v,
        DType::F32 => (v as f32) as f64,
        DType::F16 => f16::from_f64(v).to_f64(),
        DType::BF16 => Element::to_f64(bf16::from_f64(v)),
    }
}

struct Geometry {
    out_ch: usize,
    in_ch: usize,
    kernel: Vec<usize>,
}

fn bad_shape(shape: &[usize], expected: String) -> InteropError {
    InteropError::BadShape {
        tensor: "weight".into(),
        shape: shape.to_vec(),
        expected,
    }
}

fn geometry(
    kind: LinearKind,
    weight: &[f64],
    shape: &[usize],
    bias: Option<&[f64]>,
) -> Result<Geometry> {
    let numel = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad_shape(shape, "a shape whose product fits in memory".into()))?;
    if numel != weight.len() || numel == 0 {
        return Err(bad_shape(
            shape,
            format!("{} non-zero values", weight.len()),
        ));
    }
    let g = match kind {
        LinearKind::Linear => {
            if shape.len() != 2 {
                return Err(bad_shape(shape, "(out, in) for a linear layer".into()));
            }
            Geometry {
                out_ch: shape[0],
                in_ch: shape[1],
                kernel: vec![],
            }
        }
        LinearKind::Conv { groups } | LinearKind::ConvTranspose { groups } => {
            if shape.len() < 3 || groups == 0 {
                return Err(bad_shape(
                    shape,
                    "(out, in/groups, k...) with groups >= 1".into(),
                ));
            }
            let (a, b) = (shape[0], shape[1]);
            if a % groups != 0 {
                return Err(bad_shape(
                    shape,
                    format!("a first axis divisible by groups = {groups}"),
                ));
            }
            let (out_ch, in_ch) = match kind {
                LinearKind::Conv { .. } => (a, b * groups),
                _ => (b * groups, a),
            };
            Geometry {
                out_ch,
                in_ch,
                kernel: shape[2..].to_vec(),
            }
        }
    };
    if let Some(b) = bias {
        if b.len() != g.out_ch {
            return Err(InteropError::BadShape {
                tensor: "bias".into(),
                shape: vec![b.len()],
                expected: format!("[{}]", g.out_ch),
            });
        }
    }
    Ok(g)
}

fn channel_mismatch(what: &str, layer_ch: usize, bn: usize) -> InteropError {
    InteropError::BadShape {
        tensor: "weight".into(),
        shape: vec![layer_ch],
        expected: format!("{what} equal to the batch norm's {bn} channels"),
    }
}

/// Folds batch norm into the layer before it: `bn(layer(x)) = layer'(x)`. The batch norm's
/// channels are the layer's output channels (axis 0 of a linear or convolution weight,
/// axis 1 times the group of a transposed convolution's). Exact in f64; the result is
/// rounded once to `dtype`.
///
/// ```
/// use bnorm_interop::{fold_into_preceding, BnAffine, LinearKind};
/// // Linear 1 -> 2, then batch norm with scale (2, 0.5) and shift (1, -1).
/// let bn = BnAffine { scale: vec![2.0, 0.5], shift: vec![1.0, -1.0] };
/// let f = fold_into_preceding(&[3.0, 4.0], &[2, 1], Some(&[0.0, 2.0]), LinearKind::Linear,
///                             &bn, bnorm::element::DType::F64)?;
/// assert_eq!(f.weight, vec![6.0, 2.0]);
/// assert_eq!(f.bias, vec![1.0, 0.0]);
/// assert!(f.max_error < 1e-12);
/// # Ok::<(), bnorm_interop::InteropError>(())
/// ```
pub fn fold_into_preceding(
    weight: &[f64],
    shape: &[usize],
    bias: Option<&[f64]>,
    kind: LinearKind,
    bn: &BnAffine,
    dtype: DType,
) -> Result<Folded> {
    let g = geometry(kind, weight, shape, bias)?;
    if g.out_ch != bn.channels() {
        return Err(channel_mismatch("output channels", g.out_ch, bn.channels()));
    }
    let mut w = weight.to_vec();
    match kind {
        LinearKind::Linear | LinearKind::Conv { .. } => {
            let per = weight.len() / shape[0];
            for (o, row) in w.chunks_exact_mut(per).enumerate() {
                row.iter_mut().for_each(|v| *v *= bn.scale[o]);
            }
        }
        LinearKind::ConvTranspose { groups } => {
            let ipg = shape[0] / groups;
            let opg = shape[1];
            let k: usize = shape[2..].iter().product();
            for (idx, v) in w.iter_mut().enumerate() {
                let i = idx / (opg * k);
                let j = (idx / k) % opg;
                *v *= bn.scale[(i / ipg) * opg + j];
            }
        }
    }
    let b: Vec<f64> = (0..g.out_ch)
        .map(|o| bias.map_or(0.0, |b| b[o]) * bn.scale[o] + bn.shift[o])
        .collect();
    let w: Vec<f64> = w.into_iter().map(|v| round_to(v, dtype)).collect();
    let b: Vec<f64> = b.into_iter().map(|v| round_to(v, dtype)).collect();
    let probe = Probe::new(kind, &g);
    let unfolded = bn.apply(&probe.run(kind, weight, shape, bias, &g, &probe.x), probe.n);
    let folded = probe.run(kind, &w, shape, Some(&b), &g, &probe.x);
    Ok(verdict(w, b, &unfolded, &folded))
}

/// Folds batch norm into the layer after it: `layer(bn(x)) = layer'(x)`. The batch norm's
/// channels are the layer's input channels. Exact only for a linear layer or an unpadded
/// convolution with nothing in between: with zero padding the padded zeros bypass batch
/// norm's shift, and a transposed convolution's border outputs receive fewer terms, so
/// both are refused with [`InteropError::FoldNotExact`]. (A linear layer after a flatten
/// of (C, H, W) is not covered: fold per channel yourself or fold into the preceding
/// layer.)
///
/// ```
/// use bnorm_interop::{fold_into_following, BnAffine, LinearKind, InteropError};
/// let bn = BnAffine { scale: vec![2.0, 0.5], shift: vec![1.0, -1.0] };
/// let f = fold_into_following(&[1.0, 1.0], &[1, 2], None, LinearKind::Linear, &bn, false,
///                             bnorm::element::DType::F32)?;
/// assert_eq!(f.weight, vec![2.0, 0.5]);
/// assert_eq!(f.bias, vec![0.0]);
/// let padded = fold_into_following(&[1.0; 18], &[1, 2, 3, 3], None,
///     LinearKind::Conv { groups: 1 }, &bn, true, bnorm::element::DType::F32);
/// assert!(matches!(padded, Err(InteropError::FoldNotExact { .. })));
/// # Ok::<(), InteropError>(())
/// ```
pub fn fold_into_following(
    weight: &[f64],
    shape: &[usize],
    bias: Option<&[f64]>,
    kind: LinearKind,
    bn: &BnAffine,
    zero_padding: bool,
    dtype: DType,
) -> Result<Folded> {
    let groups = match kind {
        LinearKind::ConvTranspose { .. } => {
            return Err(InteropError::FoldNotExact {
                reason: "a transposed convolution's border outputs receive fewer input terms, \
                         so batch norm's shift is not one bias per output channel; fold into \
                         the preceding layer instead",
            })
        }
        LinearKind::Conv { .. } if zero_padding => {
            return Err(InteropError::FoldNotExact {
                reason: "zero padding is added after batch norm, so padded positions would skip \
                         its shift and border outputs would change; fold into the preceding \
                         layer instead, or use an unpadded convolution",
            })
        }
        LinearKind::Conv { groups } => groups,
        LinearKind::Linear => 1,
    };
    let g = geometry(kind, weight, shape, bias)?;
    if g.in_ch != bn.channels() {
        return Err(channel_mismatch("input channels", g.in_ch, bn.channels()));
    }
    let cpg = shape[1];
    let k: usize = shape[2..].iter().product();
    let opg = g.out_ch / groups;
    let mut w = weight.to_vec();
    let mut b: Vec<f64> = (0..g.out_ch).map(|o| bias.map_or(0.0, |b| b[o])).collect();
    for (idx, v) in w.iter_mut().enumerate() {
        let o = idx / (cpg * k);
        let ci = (idx / k) % cpg;
        let c = (o / opg) * cpg + ci;
        b[o] += *v * bn.shift[c];
        *v *= bn.scale[c];
    }
    let w: Vec<f64> = w.into_iter().map(|v| round_to(v, dtype)).collect();
    let b: Vec<f64> = b.into_iter().map(|v| round_to(v, dtype)).collect();
    let probe = Probe::new(kind, &g);
    let normalized = bn.apply(&probe.x, probe.n);
    let unfolded = probe.run(kind, weight, shape, bias, &g, &normalized);
    let folded = probe.run(kind, &w, shape, Some(&b), &g, &probe.x);
    Ok(verdict(w, b, &unfolded, &folded))
}

fn verdict(weight: Vec<f64>, bias: Vec<f64>, unfolded: &[f64], folded: &[f64]) -> Folded {
    let mut max_error = 0f64;
    let mut max_output = 0f64;
    for (u, f) in unfolded.iter().zip(folded) {
        max_error = max_error.max((u - f).abs());
        max_output = max_output.max(u.abs());
    }
    Folded {
        weight,
        bias,
        max_error,
        max_output,
    }
}

impl BnAffine {
    /// Applies the map to `(n, C, spatial…)` data, channel axis 1.
    fn apply(&self, x: &[f64], n: usize) -> Vec<f64> {
        let c = self.channels();
        let inner = x.len() / (n * c).max(1);
        x.iter()
            .enumerate()
            .map(|(i, v)| {
                let ch = (i / inner.max(1)) % c;
                v * self.scale[ch] + self.shift[ch]
            })
            .collect()
    }
}

/// A deterministic random probe input, `(n, in_channels, spatial…)`.
struct Probe {
    n: usize,
    spatial: Vec<usize>,
    x: Vec<f64>,
}

impl Probe {
    fn new(kind: LinearKind, g: &Geometry) -> Probe {
        let n = 2;
        let spatial: Vec<usize> = match kind {
            LinearKind::Conv { .. } => g.kernel.iter().map(|k| k + 2).collect(),
            _ => g.kernel.iter().map(|_| 3).collect(),
        };
        let len = n * g.in_ch * spatial.iter().product::<usize>();
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let x = (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0
            })
            .collect();
        Probe { n, spatial, x }
    }

    fn run(
        &self,
        kind: LinearKind,
        w: &[f64],
        shape: &[usize],
        bias: Option<&[f64]>,
        g: &Geometry,
        x: &[f64],
    ) -> Vec<f64> {
        match kind {
            LinearKind::Linear => {
                let mut y = vec![0.0; self.n * g.out_ch];
                for b in 0..self.n {
                    for o in 0..g.out_ch {
                        let row = &w[o * g.in_ch..(o + 1) * g.in_ch];
                        let xs = &x[b * g.in_ch..(b + 1) * g.in_ch];
                        y[b * g.out_ch + o] = bias.map_or(0.0, |bb| bb[o])
                            + row.iter().zip(xs).map(|(a, c)| a * c).sum::<f64>();
                    }
                }
                y
            }
            LinearKind::Conv { groups } => {
                conv(x, self.n, &self.spatial, w, shape, groups, bias, g)
            }
            LinearKind::ConvTranspose { groups } => {
                conv_transpose(x, self.n, &self.spatial, w, shape, groups, bias, g)
            }
        }
    }
}

fn unravel(mut i: usize, dims: &[usize]) -> Vec<usize> {
    let mut c = vec![0; dims.len()];
    for d in (0..dims.len()).rev() {
        c[d] = i % dims[d];
        i /= dims[d];
    }
    c
}

fn ravel(c: &[usize], dims: &[usize]) -> usize {
    c.iter().zip(dims).fold(0, |acc, (&ci, &d)| acc * d + ci)
}

/// Direct convolution, stride 1, no padding.
#[allow(clippy::too_many_arguments)]
fn conv(
    x: &[f64],
    n: usize,
    ins: &[usize],
    w: &[f64],
    shape: &[usize],
    groups: usize,
    bias: Option<&[f64]>,
    g: &Geometry,
) -> Vec<f64> {
    let ks = &g.kernel;
    let outs: Vec<usize> = ins.iter().zip(ks).map(|(i, k)| i - k + 1).collect();
    let (opos, kpos, ipos) = (
        outs.iter().product::<usize>(),
        ks.iter().product::<usize>(),
        ins.iter().product::<usize>(),
    );
    let mut table = Vec::with_capacity(opos * kpos);
    for p in 0..opos {
        let pc = unravel(p, &outs);
        for q in 0..kpos {
            let qc = unravel(q, ks);
            let ic: Vec<usize> = pc.iter().zip(&qc).map(|(a, b)| a + b).collect();
            table.push(ravel(&ic, ins));
        }
    }
    let cpg = shape[1];
    let opg = g.out_ch / groups;
    let mut y = vec![0.0; n * g.out_ch * opos];
    for b in 0..n {
        for o in 0..g.out_ch {
            let grp = o / opg;
            for p in 0..opos {
                let mut acc = bias.map_or(0.0, |bb| bb[o]);
                for ci in 0..cpg {
                    let xbase = (b * g.in_ch + grp * cpg + ci) * ipos;
                    let wbase = (o * cpg + ci) * kpos;
                    for q in 0..kpos {
                        acc += w[wbase + q] * x[xbase + table[p * kpos + q]];
                    }
                }
                y[(b * g.out_ch + o) * opos + p] = acc;
            }
        }
    }
    y
}

/// Direct transposed convolution, stride 1, no padding: output size `in + k − 1`.
#[allow(clippy::too_many_arguments)]
fn conv_transpose(
    x: &[f64],
    n: usize,
    ins: &[usize],
    w: &[f64],
    shape: &[usize],
    groups: usize,
    bias: Option<&[f64]>,
    g: &Geometry,
) -> Vec<f64> {
    let ks = &g.kernel;
    let outs: Vec<usize> = ins.iter().zip(ks).map(|(i, k)| i + k - 1).collect();
    let (opos, kpos, ipos) = (
        outs.iter().product::<usize>(),
        ks.iter().product::<usize>(),
        ins.iter().product::<usize>(),
    );
    let ipg = shape[0] / groups;
    let opg = shape[1];
    let mut y = vec![0.0; n * g.out_ch * opos];
    for b in 0..n {
        for o in 0..g.out_ch {
            let v = bias.map_or(0.0, |bb| bb[o]);
            y[(b * g.out_ch + o) * opos..(b * g.out_ch + o + 1) * opos].fill(v);
        }
        for i in 0..g.in_ch {
            let grp = i / ipg;
            for p in 0..ipos {
                let pc = unravel(p, ins);
                let xv = x[(b * g.in_ch + i) * ipos + p];
                for q in 0..kpos {
                    let qc = unravel(q, ks);
                    let oc: Vec<usize> = pc.iter().zip(&qc).map(|(a, c)| a + c).collect();
                    let t = ravel(&oc, &outs);
                    for j in 0..opg {
                        let o = grp * opg + j;
                        y[(b * g.out_ch + o) * opos + t] += xv * w[(i * opg + j) * kpos + q];
                    }
                }
            }
        }
    }
    y
}
