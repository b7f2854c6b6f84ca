//! Fuzzes the Onnx reader through `read::read_bytes` and everything that consumes what it
//! returns (layer discovery, inspection, validation, folding coefficients, conversion to
//! every format, writing): no input may panic.
#![no_main]

use bnorm_interop::{inspect, read::read_bytes, BnAffine, ConvertOptions, Format};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(loaded) = read_bytes(data) else {
        return;
    };
    let ckpt = loaded.checkpoint;
    let _ = ckpt.to_bytes();
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
                let mut out = bnorm_interop::Checkpoint::default();
                let _ = out.insert_layer(&converted, bnorm::element::DType::F32);
            }
        }
    }
});
