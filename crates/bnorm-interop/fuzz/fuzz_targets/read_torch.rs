//! Fuzzes the PyTorch reader (zip, pickle interpreter, state-dict selection, tensor views)
//! through `read::read_bytes`, then everything that consumes what it returns: no input may
//! panic, and a checkpoint that is read must serialize to safetensors and parse back.
#![no_main]

use bnorm_interop::read::read_bytes;
use bnorm_interop::{inspect, BnAffine, Checkpoint};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(loaded) = read_bytes(data) else {
        return;
    };
    let ckpt = loaded.checkpoint;
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
    }
});
