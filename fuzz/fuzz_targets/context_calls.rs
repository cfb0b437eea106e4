//! Fuzz target `context_calls`: see `../harness/context_calls.rs` for the decoding and the checks (shared with
//! `tests/fuzz_regressions.rs`, which replays `fuzz/regressions/context_calls/`).
#![no_main]

#[path = "../harness/context_calls.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(data));
