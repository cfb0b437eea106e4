//! Fuzz target `interrupt_table`: see `../harness/interrupt_table.rs` for the decoding and the checks (shared with
//! `tests/fuzz_regressions.rs`, which replays `fuzz/regressions/interrupt_table/`).
#![no_main]

#[path = "../harness/interrupt_table.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::run(data));
