//! Data sets for the demo: the embedded 8×8 digits, or MNIST from IDX files.

use std::io::Read;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};

/// The UCI optical digits test set (8×8, 1,797 images), embedded in the binary.
const DIGITS_GZ: &[u8] = include_bytes!("../../../../data/digits.csv.gz");

/// Images (pixels scaled to [0, 1]) with labels 0..9.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Row-major pixels, `len × height × width`.
    pub pixels: Vec<f32>,
    /// One label per image.
    pub labels: Vec<u8>,
    /// Image height.
    pub height: usize,
    /// Image width.
    pub width: usize,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// The images at `idx`, in order.
    pub fn select(&self, idx: &[usize]) -> Dataset {
        let px = self.height * self.width;
        let mut pixels = Vec::with_capacity(idx.len() * px);
        for &i in idx {
            pixels.extend_from_slice(&self.pixels[i * px..(i + 1) * px]);
        }
        Dataset {
            pixels,
            labels: idx.iter().map(|&i| self.labels[i]).collect(),
            height: self.height,
            width: self.width,
        }
    }
}

/// The embedded digits, split 80/20 by a fixed permutation (seed 0, whatever `--seed`).
pub fn digits() -> Result<(Dataset, Dataset)> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(DIGITS_GZ)
        .read_to_string(&mut text)
        .context("decompressing the embedded digits")?;
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let v: Vec<u8> = line
            .split(',')
            .map(|s| s.trim().parse::<u8>())
            .collect::<Result<_, _>>()
            .with_context(|| format!("digits line {}", n + 1))?;
        ensure!(v.len() == 65, "digits line {}: {} values", n + 1, v.len());
        pixels.extend(v[..64].iter().map(|&p| p as f32 / 16.0));
        labels.push(v[64]);
    }
    let all = Dataset {
        pixels,
        labels,
        height: 8,
        width: 8,
    };
    let mut idx: Vec<usize> = (0..all.len()).collect();
    shuffle(&mut idx, 0x5EED);
    let n_test = all.len() / 5;
    Ok((all.select(&idx[n_test..]), all.select(&idx[..n_test])))
}

/// Fisher–Yates with SplitMix64: the same permutation on every machine.
pub fn shuffle(v: &mut [usize], seed: u64) {
    let mut s = seed;
    for i in (1..v.len()).rev() {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        v.swap(i, (z % (i as u64 + 1)) as usize);
    }
}

fn read_file(dir: &Path, names: &[&str]) -> Result<Vec<u8>> {
    for name in names {
        let p = dir.join(name);
        if p.exists() {
            let bytes = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
            if name.ends_with(".gz") {
                let mut out = Vec::new();
                flate2::read::GzDecoder::new(&bytes[..])
                    .read_to_end(&mut out)
                    .with_context(|| format!("decompressing {}", p.display()))?;
                return Ok(out);
            }
            return Ok(bytes);
        }
    }
    bail!(
        "{} has no {} (expected the standard MNIST IDX files)",
        dir.display(),
        names[0]
    )
}

fn be32(b: &[u8], at: usize) -> Result<usize> {
    let s = b.get(at..at + 4).context("IDX header truncated")?;
    Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]) as usize)
}

fn idx_images(b: &[u8], what: &str) -> Result<(Vec<f32>, usize, usize, usize)> {
    ensure!(
        be32(b, 0)? == 0x0803,
        "{what}: not an IDX image file (magic {:#x})",
        be32(b, 0)?
    );
    let (n, h, w) = (be32(b, 4)?, be32(b, 8)?, be32(b, 12)?);
    ensure!(
        h >= 4 && w >= 4 && h <= 1024 && w <= 1024,
        "{what}: implausible image size {h}×{w}"
    );
    let need = n
        .checked_mul(h * w)
        .and_then(|v| v.checked_add(16))
        .context("IDX size overflows")?;
    ensure!(
        b.len() == need,
        "{what}: {} bytes, header says {need}",
        b.len()
    );
    Ok((b[16..].iter().map(|&p| p as f32 / 255.0).collect(), n, h, w))
}

fn idx_labels(b: &[u8], what: &str) -> Result<Vec<u8>> {
    ensure!(
        be32(b, 0)? == 0x0801,
        "{what}: not an IDX label file (magic {:#x})",
        be32(b, 0)?
    );
    let n = be32(b, 4)?;
    ensure!(
        b.len() == 8 + n,
        "{what}: {} bytes, header says {}",
        b.len(),
        8 + n
    );
    let labels = b[8..].to_vec();
    ensure!(
        labels.iter().all(|&l| l < 10),
        "{what}: a label outside 0..9"
    );
    Ok(labels)
}

/// MNIST (or any data set in its format) from the four standard IDX files in `dir`,
/// optionally gzipped.
pub fn mnist(dir: &Path) -> Result<(Dataset, Dataset)> {
    ensure!(dir.is_dir(), "--data {}: not a directory", dir.display());
    let load = |img: &str, lab: &str| -> Result<Dataset> {
        let ib = read_file(dir, &[img, &format!("{img}.gz")])?;
        let lb = read_file(dir, &[lab, &format!("{lab}.gz")])?;
        let (pixels, n, h, w) = idx_images(&ib, img)?;
        let labels = idx_labels(&lb, lab)?;
        ensure!(
            labels.len() == n,
            "{img} has {n} images but {lab} has {} labels",
            labels.len()
        );
        Ok(Dataset {
            pixels,
            labels,
            height: h,
            width: w,
        })
    };
    let train = load("train-images-idx3-ubyte", "train-labels-idx1-ubyte")?;
    let test = load("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")?;
    ensure!(
        (train.height, train.width) == (test.height, test.width),
        "training and test images differ in size"
    );
    Ok((train, test))
}
