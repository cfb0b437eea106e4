//! `rxsim`: a simulated network mini-redirector, file server and network built on the `rdbss`
//! cancellation core, and the `rxsim` command-line simulator.
//!
//! The simulated mini-redirector arms a minirdr cancel routine on each request's `RX_CONTEXT`
//! before its exchange goes out, and disarms it when the reply comes back; whichever side wins
//! completes the request, exactly once. Around it: a server with SMB-like exchanges, credits and a
//! CANCEL message; a network with latency, jitter, loss, partitions and crashes; workloads with
//! user cancels, timeouts and session teardown; and a checker that tests the invariants during and
//! after every run.
//!
//! ```
//! use rxsim::{run, Config};
//!
//! let config = Config { requests: 2_000, ..Config::default() };
//! let outcome = run(&config, &|_, _| {}).unwrap();
//! assert!(outcome.passed(), "{}", outcome.report);
//! assert_eq!(outcome.report.requests.completed, 2_000);
//! ```
//!
//! [`Live`] is the same mini-redirector in real time on a tokio runtime, serving requests
//! submitted from outside (live mode, for the FUSE adapter): see [`live`].
//!
//! See `docs/simulator.md` for the model, the modes and how to reproduce a failure from a seed.
//!
//! Invariants of the crate as a whole:
//! 1. Library code never panics on a bad configuration: [`run`] and [`Live::new`] validate it and
//!    return `Err`.
//! 2. A run never leaves process-wide state changed: the bug-check policy is restored after it.

#![deny(unsafe_op_in_unsafe_fn)]
#![forbid(unsafe_code)]

pub mod config;
pub mod engine;
pub mod live;
pub mod mi;
pub mod minirdr;
#[cfg(target_os = "linux")]
pub mod mount;
pub mod net;
pub mod record;
pub mod report;
pub mod resource;
pub mod server;

pub use config::{Bug, Config, Latency, Mode, OpKind, OpMix, Window};
pub use engine::{run, Outcome};
pub use live::{live_cancel, Live, LiveReply, LiveRequest, LiveStats};
pub use record::{CancelReason, Invariant, Violation};
pub use report::Report;
pub use server::{Op, Server, STATUS_FILE_IS_A_DIRECTORY};
