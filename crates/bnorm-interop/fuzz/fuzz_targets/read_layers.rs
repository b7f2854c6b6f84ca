//! Fuzzes the checkpoint reader and everything that consumes what it returns: no input
//! may panic, and a checkpoint that parses must serialize and parse back to itself.
#![no_main]

use bnorm_interop::{inspect, BnAffine, Checkpoint, ConvertOptions, Format};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The owned-buffer reader (what `read_path` uses) accepts and refuses exactly the same.
    let owned = Checkpoint::from_vec(data.to_vec()).ok();
    let Ok(ckpt) = Checkpoint::from_bytes(data) else {
        assert!(owned.is_none());
        return;
    };
    assert_eq!(owned.as_ref(), Some(&ckpt));
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
