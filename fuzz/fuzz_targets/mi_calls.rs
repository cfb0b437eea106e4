//! Fuzz target `mi_calls`: see `../harness/mi_calls.rs` for the decoding and the checks (shared with
//! `tests/fuzz_regressions.rs`, which replays `fuzz/regressions/mi_calls/`).
#![no_main]

#[path = "../harness/mi_calls.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(data));
