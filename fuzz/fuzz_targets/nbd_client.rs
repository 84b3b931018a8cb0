//! Fuzzes the NBD client from the server side: the input is everything a
//! server sends (greeting, option replies, transmission replies). Findings
//! go into `corpus/nbd_client/`, replayed by `crates/nbd/tests/fuzz_corpus.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    nbd::fuzzing::fuzz_client(data);
});
