//! Fuzzes QMP: framing, request parsing and every command's argument
//! handling in a real daemon core. Findings go into `corpus/qmp/`, replayed
//! by `crates/daemon/tests/fuzz_corpus.rs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    daemon::fuzzing::fuzz_qmp(data);
});
