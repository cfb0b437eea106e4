//! Randomized-schedule runs of the rdbss cancellation core with [shuttle], for scenarios too
//! large for loom's exhaustive search (8 threads, 1000 contexts). The tests are in `tests/`;
//! without `--cfg shuttle` they compile to nothing.
//!
//! ```sh
//! RUSTFLAGS="--cfg shuttle" cargo test -p rdbss-shuttle-tests --release --target-dir target/shuttle
//! ```
//!
//! [shuttle]: https://docs.rs/shuttle
