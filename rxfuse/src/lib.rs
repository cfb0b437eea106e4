//! `rxfuse`: a FUSE adapter on `fuse3` in which a real `FUSE_INTERRUPT` cancels the in-flight
//! request through the `rdbss` `RX_CONTEXT` core, so Ctrl-C works on a slow mount.
//!
//! - [`backend`]: what the adapter needs from a mini-redirector ([`Backend`]: prepare a context,
//!   dispatch it, resolve at completion) and the one status-to-errno mapping
//!   (`STATUS_CANCELLED` is `EINTR`).
//! - [`fs`]: the `fuse3` file system ([`RxFs`]). Every operation is one request registered under
//!   its FUSE id in an [`rdbss::InterruptTable`]; `FUSE_INTERRUPT` cancels it through the core,
//!   or is answered `EAGAIN` after a short delay if its request has not arrived; never `ENOSYS`.
//!   Files are opened with `FOPEN_DIRECT_IO` so reads reach the daemon and can be interrupted.
//! - [`probe`]: a reader process with a SIGUSR1 handler (no `SA_RESTART`), for end-to-end
//!   interrupt tests and the latency benchmark.
//! - [`mod@mount`]: clear errors when `/dev/fuse` or `fusermount3` is missing, mounting, serving
//!   until SIGINT/SIGTERM, and an unmount guard for tests.
//!
//! The `rxsim mount DIR` command serves the simulator's share with it; see `docs/fuse.md`.
//!
//! Invariants of the crate as a whole:
//! 1. The adapter never answers a `FUSE_INTERRUPT` with `ENOSYS` (it would turn interrupts off
//!    for the whole connection).
//! 2. Every `unsafe` block is one libc call (`getuid`, `kill`, `sigaction`, `pread`, ...) whose
//!    arguments are valid for it, as its `// SAFETY:` comment says.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod backend;
pub mod fs;
pub mod mount;
pub mod probe;

pub use backend::{errno_of, Backend, Completion, Dispatched, FsOp, STATUS_FILE_IS_A_DIRECTORY};
pub use fs::{AdapterHandle, AdapterStats, FsOptions, RxFs, FOPEN_DIRECT_IO};
pub use mount::{mount, preflight, serve_until_signal, MountError, Stopped, UnmountGuard};
