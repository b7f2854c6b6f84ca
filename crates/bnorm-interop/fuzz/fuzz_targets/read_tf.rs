//! Fuzzes the TensorFlow checkpoint reader: the input is a 4-byte little-endian length, the
//! `.index` file's bytes and the single shard's bytes. No input may panic; whatever parses
//! goes on to layer discovery, inspection, validation, conversion and writing.
#![no_main]

mod consume;

use bnorm_interop::read::tf::read_bundle;
use consume::consume;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(loaded) = bnorm_interop::read::read_bytes(data) {
        consume(&loaded.checkpoint);
    }
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
    consume(&ckpt);
});
