//! Fuzz target `resmon_calls`: see `../harness/resmon_calls.rs` for the decoding and the checks (shared with
//! `tests/fuzz_regressions.rs`, which replays `fuzz/regressions/resmon_calls/`).
#![no_main]

#[path = "../harness/resmon_calls.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(data));
