//! Fuzzes every NBD decoder (`cargo +nightly fuzz run codec`). Findings go
//! into `corpus/codec/`, which `codec::tests::fuzz_corpus_replays_cleanly`
//! replays on stable in the normal test run.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    nbd::codec::check_all_decoders(data);
});
