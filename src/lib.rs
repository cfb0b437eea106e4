//! A verified model of the Windows network-redirector cancellation machinery (RDBSS).
//!
//! A mini-redirector arms a cancel routine on a request's [`RxContext`] with
//! [`RxContext::set_minirdr_cancel_routine`] (`RxSetMinirdrCancelRoutine`), under a spin lock; if
//! the context is already cancelled it gets `STATUS_CANCELLED` back and nothing is stored.
//! [`RxContext::cancel`] marks the context cancelled and calls the armed routine, outside the lock,
//! at most once. IRQL levels are emulated per thread ([`irql`]) and every documented IRQL rule is
//! checked with an emulated bug check ([`bugcheck`]); [`KSpinLock`] raises to `DISPATCH_LEVEL`
//! while held.
//!
//! ```
//! use rdbss::{CancelOutcome, MajorFunction, NtStatus, RxContext};
//! use std::sync::atomic::{AtomicBool, Ordering};
//!
//! #[derive(Default)]
//! struct Exchange { aborted: AtomicBool }
//!
//! fn abort(ctx: &RxContext<Exchange>) -> NtStatus {
//!     ctx.minirdr().aborted.store(true, Ordering::SeqCst);
//!     NtStatus::SUCCESS
//! }
//!
//! let ctx = RxContext::new(MajorFunction::READ, Exchange::default());
//! ctx.set_minirdr_cancel_routine(Some(abort)).unwrap();
//! assert_eq!(ctx.cancel(), CancelOutcome::RoutineCalled(NtStatus::SUCCESS));
//! assert!(ctx.minirdr().aborted.load(Ordering::SeqCst));
//! assert_eq!(ctx.cancel(), CancelOutcome::AlreadyCancelled);
//! ```
//!
//! # Features and configurations
//!
//! - `std` (default): one emulated processor per OS thread. Without it the crate is `no_std` +
//!   `alloc` and the embedder supplies an [`irql::ProcessorHook`].
//! - `--cfg loom`: every atomic, lock and thread-local of the protocol is loom's (see the
//!   `loom-tests` crate).
//!
//! See `docs/protocol.md` for the state diagram and invariants and `docs/conformance.md` for the
//! table of documented behaviours and the tests that check them.

#![no_std]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(
    missing_docs,
    clippy::std_instead_of_core,
    clippy::std_instead_of_alloc,
    clippy::undocumented_unsafe_blocks
)]

extern crate alloc;
#[cfg(any(feature = "std", loom))]
extern crate std;

pub mod blocked;
pub mod bugcheck;
pub mod context;
pub mod interrupt;
pub mod irql;
pub mod mi;
pub mod registry;
pub mod resmon;
pub mod spinlock;
pub mod status;
mod sync;
pub mod workqueue;

pub use blocked::{BlockedQueue, BlockedState};
pub use bugcheck::{BugCheck, BugCheckCode, BugCheckPolicy};
pub use context::{
    rx_set_minirdr_cancel_routine, CancelClaim, CancelOutcome, CancelRoutine, Cancelled,
    ContextFlags, ContextInit, MajorFunction, RxContext,
};
pub use interrupt::{InterruptOutcome, InterruptTable, Registration, Settled};
pub use irql::Irql;
pub use mi::{
    MiCallerId, MiCancellationReason, MiContext, MiOperation, MiOperationKind, MiResult, MiSession,
};
pub use registry::{CancelByIdOutcome, ContextRef, Dereferenced, DrainStatus, Rdbss, RequestId};
pub use resmon::{ResourceMonitor, ResourceState, Win32Error};
pub use spinlock::{KSpinLock, KSpinLockGuard};
pub use status::NtStatus;
#[cfg(all(feature = "std", not(loom)))]
pub use workqueue::ThreadWorkQueue;
pub use workqueue::{DeferredCancel, ManualWorkQueue, WorkQueue};

/// README.md's examples, compiled and run as doctests so the README stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
