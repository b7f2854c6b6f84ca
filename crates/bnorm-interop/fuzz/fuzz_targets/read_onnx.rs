//! Fuzzes the ONNX reader through `read::read_bytes`, then everything that consumes what it
//! returns ([`consume`]): no input may panic.
#![no_main]

mod consume;

use bnorm_interop::read::read_bytes;
use consume::consume;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(loaded) = read_bytes(data) {
        consume(&loaded.checkpoint);
    }
});
