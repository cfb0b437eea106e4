//! The mini-redirector's per-request state and its cancel routine, on the `rdbss` core.
//!
//! Each network exchange arms [`mrx_cancel`] on its `RX_CONTEXT` with
//! `set_minirdr_cancel_routine` before the request goes out; the response path disarms it, and
//! the disarm decides who completes (DESIGN.md section 2):
//!
//! - disarm `Ok`: the routine will never run; the response path completes with the server's
//!   status;
//! - disarm `Err(Cancelled)`: the routine has run (or is about to, from the work queue); it sent
//!   the server CANCEL and completed the request with STATUS_CANCELLED. The response path only
//!   releases its handle.
//!
//! Invariants:
//! 1. The routine touches only the context it is given and the simulation's shared state through
//!    a `Weak` (a context never keeps its simulation alive, so a finished run frees everything).
//! 2. Exactly one completion per request, by one of: the dispatcher (arm refused), the response
//!    path (disarm won, or no routine armed), the routine (disarm lost), the core itself (a
//!    blocked operation unlinked by a cancel, recorded by the canceller), or a disconnect.
//! 3. The routine never blocks and never takes a lock the response path holds while disarming.

use crate::config::{Bug, OpKind};
use crate::engine::Shared;
use crate::record::Invariant;
use crate::server::Op;
use rdbss::{NtStatus, RxContext};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, Weak};

/// What the mini-redirector keeps in each `RX_CONTEXT` (`MRxContext`).
pub struct MiniRequest {
    pub(crate) shared: Weak<Shared>,
    /// The request's index in the run (its record).
    pub(crate) index: u32,
    pub(crate) client: u32,
    pub(crate) kind: OpKind,
    /// The exchange's message id, set before the routine is armed.
    pub(crate) msg: AtomicU64,
    /// The connection epoch the exchange went out on.
    pub(crate) epoch: AtomicU32,
    /// The operation, taken when the exchange is sent.
    pub(crate) op: Mutex<Option<Op>>,
}

impl MiniRequest {
    pub(crate) fn take_op(&self) -> Option<Op> {
        self.op.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// `MRxCancel`: the minirdr cancel routine. Sends CANCEL for the exchange to the server and, as
/// the side that now owns completion, completes the request with STATUS_CANCELLED.
#[doc(alias = "MRxSmbCancel")]
pub fn mrx_cancel(ctx: &RxContext<MiniRequest>) -> NtStatus {
    let m = ctx.minirdr();
    let Some(shared) = m.shared.upgrade() else {
        return NtStatus::UNSUCCESSFUL;
    };
    let now = shared.now();
    let record = shared.record(m.index);
    let runs = record.routine_runs.fetch_add(1, Ordering::AcqRel) + 1;
    record.routine.set(now);
    if runs > 1 {
        shared.checker.fail(
            Invariant::RoutineAtMostOnce,
            Some((m.index, record)),
            format!("the cancel routine ran {runs} times"),
        );
    }
    shared.send_server_cancel(
        m.client,
        m.msg.load(Ordering::Acquire),
        m.epoch.load(Ordering::Acquire),
    );
    record.server_cancel_sent.set(now);
    if shared.config.bug != Some(Bug::LoseCompletion) {
        shared.note_completion(m.index, NtStatus::CANCELLED);
        let _ = ctx.complete_request(NtStatus::CANCELLED, 0);
    }
    NtStatus::SUCCESS
}
