//! Fuzz target `open_read`: arbitrary bytes as an image file, opened
//! read-only as qcow2 and as raw, then mapped, read and checked over a few
//! ranges. The body is `image::testing::fuzz_open_read`, which the image
//! crate's `fuzz_corpus` test also replays over `fuzz/corpus/open_read/`;
//! every crash found here becomes a file in that corpus (named `reject-*`
//! when it must not open, `any-*` otherwise) and so a regression test.
#![no_main]

use libfuzzer_sys::fuzz_target;

/// Inputs above this are cut: the engine's limits, not the input size,
/// must bound the work.
const MAX_INPUT: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    image::testing::fuzz_open_read(&data[..data.len().min(MAX_INPUT)]);
});
