//! Fuzzes the safetensors reader (borrowed and owned buffers alike) and everything that
//! consumes what it returns ([`consume`]): no input may panic.
#![no_main]

mod consume;

use bnorm_interop::Checkpoint;
use consume::consume;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The owned-buffer reader (what `read_path` uses) accepts and refuses exactly the same.
    let owned = Checkpoint::from_vec(data.to_vec()).ok();
    let Ok(ckpt) = Checkpoint::from_bytes(data) else {
        assert!(owned.is_none());
        return;
    };
    assert_eq!(owned.as_ref(), Some(&ckpt));
    consume(&ckpt);
});
