//! Per-request records and the invariant checker.
//!
//! Every request has one [`RequestRecord`], written with atomics by whichever thread sees a
//! milestone (creation, dispatch, a cancel, the cancel routine, the response, completion), so the
//! checker can test the invariants while the run goes on and print a request's history when one
//! fails.
//!
//! Invariants:
//! 1. A milestone time is stored as `time + 1` (0 means "not yet") and only the first store wins,
//!    so a history shows when each thing first happened.
//! 2. Counts (`completions`, `routine_runs`) are incremented by exactly the code that performs
//!    the counted action, before the action, so a second completion or routine call is seen even
//!    when the core refuses it.
//! 3. The checker never panics and never stops the run: it records [`Violation`]s; the run's
//!    report lists them and the process exits non-zero.

use crate::config::{Micros, OpKind};
use rdbss::NtStatus;
use serde::Serialize;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;

/// Why a cancel was requested.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelReason {
    /// The application cancelled the I/O (CancelIoEx).
    User = 1,
    /// The request's timer fired (a DPC, at DISPATCH_LEVEL: the routine is deferred).
    Timeout = 2,
    /// The session was torn down with the request in flight.
    Teardown = 3,
}

impl CancelReason {
    /// Every reason, in report order.
    pub const ALL: [CancelReason; 3] = [
        CancelReason::User,
        CancelReason::Timeout,
        CancelReason::Teardown,
    ];

    fn from_u8(v: u8) -> Option<Self> {
        CancelReason::ALL.into_iter().find(|r| *r as u8 == v)
    }

    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            CancelReason::User => "user",
            CancelReason::Timeout => "timeout",
            CancelReason::Teardown => "teardown",
        }
    }
}

/// The invariants the checker tests.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Invariant {
    /// Every request is completed exactly once.
    ExactlyOnce,
    /// A request cancelled before its exchange started completes with STATUS_CANCELLED.
    CancelledBeforeStart,
    /// The cancel routine runs at most once per context.
    RoutineAtMostOnce,
    /// No context leaks: the RDBSS instance drains to zero.
    NoLeak,
    /// The server's quota (credits in use) is back to zero.
    QuotaReturned,
    /// No emulated bug check (IRQL violation, double completion) happened.
    NoBugChecks,
    /// Every MI operation was closed exactly once by its client and got exactly one final
    /// result from its provider.
    MiClosedOnce,
    /// No MI provider cancel callback ran after its operation's final result was delivered, nor
    /// twice.
    MiCallbackNotAfterCompletion,
    /// The MI session's quota is back to zero and no operation is alive after the run.
    MiQuotaReturned,
    /// Every connection resource settled in a defined state: none pending after the run, each
    /// client connected exactly when its resource is online, each pending Online ended once.
    ResourceSettled,
}

impl Invariant {
    /// Every invariant, in report order.
    pub const ALL: [Invariant; 10] = [
        Invariant::ExactlyOnce,
        Invariant::CancelledBeforeStart,
        Invariant::RoutineAtMostOnce,
        Invariant::NoLeak,
        Invariant::QuotaReturned,
        Invariant::NoBugChecks,
        Invariant::MiClosedOnce,
        Invariant::MiCallbackNotAfterCompletion,
        Invariant::MiQuotaReturned,
        Invariant::ResourceSettled,
    ];

    /// What the invariant says.
    pub fn description(self) -> &'static str {
        match self {
            Invariant::ExactlyOnce => "every request completed exactly once",
            Invariant::CancelledBeforeStart => {
                "a request cancelled before its exchange started completed with STATUS_CANCELLED"
            }
            Invariant::RoutineAtMostOnce => "the cancel routine ran at most once per context",
            Invariant::NoLeak => "no context leaked: the RDBSS instance drained to zero",
            Invariant::QuotaReturned => "server quota back to zero",
            Invariant::NoBugChecks => "no IRQL violation or other emulated bug check",
            Invariant::MiClosedOnce => {
                "every MI operation closed once by its client, with one final result"
            }
            Invariant::MiCallbackNotAfterCompletion => {
                "no MI cancel callback after the final result was delivered, none twice"
            }
            Invariant::MiQuotaReturned => "MI quota back to zero, no MI operation alive",
            Invariant::ResourceSettled => {
                "every connection resource settled in a defined state (none pending)"
            }
        }
    }
}

impl fmt::Display for Invariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.description())
    }
}

/// One failed check.
#[derive(Clone, Debug, Serialize)]
pub struct Violation {
    /// Which invariant.
    pub invariant: Invariant,
    /// The request concerned, if one is.
    pub request: Option<u32>,
    /// What was seen.
    pub detail: String,
    /// The request's history, one line per milestone.
    pub history: Vec<String>,
}

/// What the core said when a cancel was requested (stored in the record).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelEffect {
    /// The minirdr routine was called now.
    RoutineCalled = 1,
    /// Marked cancelled; no routine was armed (before dispatch, or after completion disarmed).
    NoRoutineArmed = 2,
    /// A blocked operation was unlinked and completed by the core.
    BlockedOperationCancelled = 3,
    /// Marked cancelled at DISPATCH_LEVEL; the routine went to the work queue.
    Deferred = 4,
    /// Someone else had already cancelled it.
    AlreadyCancelled = 5,
    /// The request was already completed (or freed): too late.
    TooLate = 6,
}

impl CancelEffect {
    /// Every effect, in report order.
    pub const ALL: [CancelEffect; 6] = [
        CancelEffect::RoutineCalled,
        CancelEffect::NoRoutineArmed,
        CancelEffect::BlockedOperationCancelled,
        CancelEffect::Deferred,
        CancelEffect::AlreadyCancelled,
        CancelEffect::TooLate,
    ];

    fn from_u8(v: u8) -> Option<Self> {
        CancelEffect::ALL.into_iter().find(|e| *e as u8 == v)
    }

    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            CancelEffect::RoutineCalled => "routine_called",
            CancelEffect::NoRoutineArmed => "no_routine_armed",
            CancelEffect::BlockedOperationCancelled => "blocked_operation_cancelled",
            CancelEffect::Deferred => "deferred_to_work_queue",
            CancelEffect::AlreadyCancelled => "already_cancelled",
            CancelEffect::TooLate => "too_late",
        }
    }

    /// Whether this call is the one that cancelled the context.
    pub fn cancelled_now(self) -> bool {
        !matches!(self, CancelEffect::AlreadyCancelled | CancelEffect::TooLate)
    }
}

/// A milestone time (invariant 1).
#[derive(Default)]
pub struct Mark(AtomicU64);

impl Mark {
    /// Stores `now` if nothing is stored yet.
    pub fn set(&self, now: Micros) {
        let _ = self
            .0
            .compare_exchange(0, now + 1, Ordering::AcqRel, Ordering::Acquire);
    }

    /// The stored time, if any.
    pub fn get(&self) -> Option<Micros> {
        self.0.load(Ordering::Acquire).checked_sub(1)
    }
}

/// Everything recorded about one request.
#[derive(Default)]
pub struct RequestRecord {
    /// The `RequestId` as a `u64`; 0 until the request is created.
    pub id: AtomicU64,
    /// The client.
    pub client: AtomicU32,
    /// The operation kind (`OpKind` index).
    pub kind: AtomicU8,
    /// Created.
    pub created: Mark,
    /// The core refused to start it (arm or enqueue saw CANCELLED).
    pub refused: Mark,
    /// Queued in a blocked-operation queue (pipe order, or waiting for a credit or the
    /// connection).
    pub blocked: Mark,
    /// Taken off its queue to run.
    pub resumed: Mark,
    /// Its exchange was sent to the server.
    pub dispatched: Mark,
    /// The message id of its exchange.
    pub msg: AtomicU64,
    /// A cancel was first requested.
    pub cancel_requested: Mark,
    /// The first cancel's reason (`CancelReason`).
    pub cancel_reason: AtomicU8,
    /// The cancel call that cancelled it (`CancelEffect`), or `TooLate` if every call was late.
    pub cancel_effect: AtomicU8,
    /// The cancel routine ran (first time).
    pub routine: Mark,
    /// Times the cancel routine ran.
    pub routine_runs: AtomicU32,
    /// The routine sent CANCEL to the server.
    pub server_cancel_sent: Mark,
    /// The server's reply arrived.
    pub response: Mark,
    /// The reply's status.
    pub response_status: AtomicU32,
    /// Disarming at completion succeeded (the response path owns completion).
    pub disarm_won: Mark,
    /// Disarming at completion found the context cancelled (the cancel side owns completion).
    pub disarm_lost: Mark,
    /// Completed (first time).
    pub completed: Mark,
    /// Completion attempts.
    pub completions: AtomicU32,
    /// The first completion's status.
    pub status: AtomicU32,
    /// The second completion's status, if there was one.
    pub second_status: AtomicU32,
    /// The mini-redirector released its last handle to the context.
    pub released: AtomicBool,
    /// Its MI operation was cancelled by the client (`MI_Operation_Cancel`, first time).
    pub mi_cancel: Mark,
}

impl RequestRecord {
    /// The operation kind.
    pub fn op_kind(&self) -> OpKind {
        OpKind::from_index(self.kind.load(Ordering::Relaxed))
    }

    /// Whether the request was created.
    pub fn is_created(&self) -> bool {
        self.id.load(Ordering::Acquire) != 0
    }

    /// The first completion's status, if completed.
    pub fn final_status(&self) -> Option<NtStatus> {
        self.completed
            .get()
            .map(|_| NtStatus::from_code(self.status.load(Ordering::Acquire)))
    }

    /// The first cancel's reason.
    pub fn reason(&self) -> Option<CancelReason> {
        CancelReason::from_u8(self.cancel_reason.load(Ordering::Acquire))
    }

    /// The effect of the cancel that cancelled it (or `TooLate`).
    pub fn effect(&self) -> Option<CancelEffect> {
        CancelEffect::from_u8(self.cancel_effect.load(Ordering::Acquire))
    }

    /// Records a cancel request; the first reason wins.
    pub fn note_cancel_requested(&self, now: Micros, reason: CancelReason) {
        self.cancel_requested.set(now);
        let _ = self.cancel_reason.compare_exchange(
            0,
            reason as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// Records what a cancel call did: the call that cancelled wins; `TooLate` only fills an
    /// empty slot.
    pub fn note_cancel_effect(&self, effect: CancelEffect) {
        if effect.cancelled_now() {
            self.cancel_effect.store(effect as u8, Ordering::Release);
        } else if effect == CancelEffect::TooLate {
            let _ = self.cancel_effect.compare_exchange(
                0,
                effect as u8,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
    }

    /// The history, one line per milestone, in time order.
    pub fn history(&self, index: u32) -> Vec<String> {
        let id = self.id.load(Ordering::Acquire);
        let mut lines: Vec<(Micros, String)> = Vec::new();
        let mut at = |mark: &Mark, text: String| {
            if let Some(t) = mark.get() {
                lines.push((t, text));
            }
        };
        at(
            &self.created,
            format!(
                "created: request {index}, {} by client {}, RequestId {}",
                self.op_kind().name(),
                self.client.load(Ordering::Relaxed),
                rdbss::RequestId::from_u64(id)
            ),
        );
        at(
            &self.cancel_requested,
            format!(
                "cancel requested ({}); core said {}",
                self.reason().map_or("?", CancelReason::name),
                self.effect().map_or("?", CancelEffect::name)
            ),
        );
        at(
            &self.blocked,
            "queued (behind a pipe operation, or for a credit or the connection)".into(),
        );
        at(&self.resumed, "taken off its queue to run".into());
        at(
            &self.mi_cancel,
            "MI_Operation_Cancel by the client (its MI operation)".into(),
        );
        at(
            &self.refused,
            "the core refused to start it: already cancelled".into(),
        );
        at(
            &self.dispatched,
            format!(
                "exchange sent to the server, message id {}",
                self.msg.load(Ordering::Relaxed)
            ),
        );
        at(
            &self.routine,
            format!(
                "cancel routine ran ({} time(s) in all)",
                self.routine_runs.load(Ordering::Relaxed)
            ),
        );
        at(&self.server_cancel_sent, "CANCEL sent to the server".into());
        at(
            &self.response,
            format!(
                "server reply: {}",
                NtStatus::from_code(self.response_status.load(Ordering::Relaxed))
            ),
        );
        at(
            &self.disarm_won,
            "disarm succeeded: the response path completes".into(),
        );
        at(
            &self.disarm_lost,
            "disarm found CANCELLED: the cancel side completes".into(),
        );
        let completions = self.completions.load(Ordering::Relaxed);
        at(
            &self.completed,
            format!(
                "completed with {} ({completions} completion(s) in all{})",
                NtStatus::from_code(self.status.load(Ordering::Relaxed)),
                if completions > 1 {
                    format!(
                        "; the second with {}",
                        NtStatus::from_code(self.second_status.load(Ordering::Relaxed))
                    )
                } else {
                    String::new()
                }
            ),
        );
        lines.sort_by_key(|(t, _)| *t);
        lines
            .into_iter()
            .map(|(t, text)| format!("{t:>12}us  {text}"))
            .collect()
    }
}

/// Collects violations (invariant 3). Keeps the first [`Checker::KEPT`] of each invariant in
/// full and counts all.
#[derive(Default)]
pub struct Checker {
    kept: Mutex<Vec<Violation>>,
    counts: [AtomicU64; Invariant::ALL.len()],
}

impl Checker {
    /// How many violations of each invariant are kept with their details.
    pub const KEPT: usize = 10;

    /// Records a violation.
    pub fn fail(
        &self,
        invariant: Invariant,
        request: Option<(u32, &RequestRecord)>,
        detail: String,
    ) {
        let slot = Invariant::ALL
            .iter()
            .position(|i| *i == invariant)
            .unwrap_or(0);
        let seen = self.counts[slot].fetch_add(1, Ordering::Relaxed);
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        if seen < Self::KEPT as u64 {
            kept.push(Violation {
                invariant,
                request: request.map(|(i, _)| i),
                detail,
                history: request.map(|(i, r)| r.history(i)).unwrap_or_default(),
            });
        }
    }

    /// How many times `invariant` failed.
    pub fn count(&self, invariant: Invariant) -> u64 {
        let slot = Invariant::ALL
            .iter()
            .position(|i| *i == invariant)
            .unwrap_or(0);
        self.counts[slot].load(Ordering::Relaxed)
    }

    /// The kept violations, in the order they were found.
    pub fn violations(&self) -> Vec<Violation> {
        self.kept.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_keep_the_first_time() {
        let m = Mark::default();
        assert_eq!(m.get(), None);
        m.set(0);
        m.set(5);
        assert_eq!(m.get(), Some(0));
    }

    #[test]
    fn the_cancelling_call_wins_over_too_late() {
        let r = RequestRecord::default();
        r.note_cancel_effect(CancelEffect::TooLate);
        assert_eq!(r.effect(), Some(CancelEffect::TooLate));
        r.note_cancel_effect(CancelEffect::NoRoutineArmed);
        r.note_cancel_effect(CancelEffect::AlreadyCancelled);
        r.note_cancel_effect(CancelEffect::TooLate);
        assert_eq!(r.effect(), Some(CancelEffect::NoRoutineArmed));
        r.note_cancel_requested(3, CancelReason::Timeout);
        r.note_cancel_requested(4, CancelReason::User);
        assert_eq!(r.reason(), Some(CancelReason::Timeout));
        assert_eq!(r.cancel_requested.get(), Some(3));
    }

    #[test]
    fn the_checker_keeps_details_and_counts() {
        let c = Checker::default();
        let r = RequestRecord::default();
        r.created.set(10);
        r.released.store(true, Ordering::Relaxed);
        for _ in 0..Checker::KEPT + 5 {
            c.fail(Invariant::ExactlyOnce, Some((7, &r)), "twice".into());
        }
        assert_eq!(c.count(Invariant::ExactlyOnce), Checker::KEPT as u64 + 5);
        assert_eq!(c.count(Invariant::NoLeak), 0);
        c.fail(Invariant::NoLeak, None, "leak".into());
        let v = c.violations();
        assert_eq!(v.len(), Checker::KEPT + 1);
        assert_eq!(v[Checker::KEPT].invariant, Invariant::NoLeak);
        assert_eq!(v[0].request, Some(7));
        assert!(
            v[0].history[0].contains("created: request 7"),
            "{:?}",
            v[0].history
        );
    }
}
