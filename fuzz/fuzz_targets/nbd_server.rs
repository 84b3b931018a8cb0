//! Fuzzes the NBD server from the client side: the input is everything a
//! client sends (handshake, options, requests) to a server exporting an
//! in-memory device. Findings go into `corpus/nbd_server/`, replayed by
//! `crates/nbd/tests/fuzz_corpus.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    nbd::fuzzing::fuzz_server(data);
});
