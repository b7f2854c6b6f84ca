//! Fuzzes the TensorFlow checkpoint reader: the input is a 4-byte little-endian length, the
//! `.index` file's bytes and the single shard's bytes. No input may panic; whatever parses
//! goes on to layer discovery, inspection, validation, conversion and writing.
#![no_main]

use bnorm_interop::read::tf::read_bundle;
use bnorm_interop::{inspect, BnAffine, Checkpoint, ConvertOptions, Format};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = bnorm_interop::read::read_bytes(data);
    let Some((n, rest)) = data.split_first_chunk::<4>() else {
        return;
    };
    let n = u32::from_le_bytes(*n) as usize;
    if n > rest.len() {
        return;
    }
    let (index, shard) = rest.split_at(n);
    let Ok(ckpt) = read_bundle(index, &[shard]) else {
        return;
    };
    if let Ok(bytes) = ckpt.to_bytes() {
        assert_eq!(Checkpoint::from_bytes(&bytes).ok().as_ref(), Some(&ckpt));
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
});
