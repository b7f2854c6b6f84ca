//! What every fuzz target does with a checkpoint a reader accepted: it serializes to
//! safetensors and parses back to itself, and each of its batch-norm layers goes through
//! inspection, validation, the folding coefficients, conversion to every format and
//! writing. Nothing may panic.

use bnorm_interop::{inspect, BnAffine, Checkpoint, ConvertOptions, Format};

/// Runs everything that consumes `ckpt`.
pub fn consume(ckpt: &Checkpoint) {
    if let Ok(bytes) = ckpt.to_bytes() {
        assert_eq!(Checkpoint::from_bytes(&bytes).ok().as_ref(), Some(ckpt));
    }
    let Ok(layers) = ckpt.layers() else {
        return;
    };
    for layer in layers {
        let _ = inspect(&layer);
        let _ = layer.to_batchnorm();
        let _ = BnAffine::from_layer(&layer);
        for to in Format::ALL {
            let opts = ConvertOptions {
                batch_size: Some(8),
                keep_variance: false,
            };
            if let Ok((converted, _)) = layer.convert(to, &opts) {
                let mut out = Checkpoint::default();
                let _ = out.insert_layer(&converted, bnorm::element::DType::F32);
            }
        }
    }
}
