//! Fuzzes the Keras reader (Keras 3 `.keras` / `.weights.h5`, tf_keras `.h5`, through the
//! content-sniffing entry point) and everything that consumes what it returns: no input
//! may panic.
#![no_main]

use bnorm_interop::{inspect, read::read_bytes, BnAffine, ConvertOptions, Format};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(loaded) = read_bytes(data) else {
        return;
    };
    let Ok(layers) = loaded.checkpoint.layers() else {
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
            let _ = layer.convert(to, &opts);
        }
    }
});
