//! Model-based property test of the FUSE interrupt table ([`InterruptTable`]) on real contexts
//! of an [`Rdbss`] instance: random sequences of calls, valid and invalid, run against the
//! implementation and against a small reference model written here, compared after every step.
//! Same conventions as `tests/model.rs`.
//!
//! # The model
//!
//! [`Model`] keeps, for every context ever created (an *object*, numbered in creation order): its
//! reference count (test handles plus one per table entry), `CANCELLED`, whether the routine is
//! armed, whether it is completed and with which status and information, how often the routine
//! ran and the reference count it saw. Around them it keeps the table: a map from FUSE id to
//! either an in-flight object or a remembered interrupt with its generation, the generation
//! counter, [`InterruptStats`], the pending-interrupt tokens the test holds, and the bug checks it
//! expects (`MULTIPLE_IRP_COMPLETE_REQUESTS` for a second completion). The rules are the numbered
//! invariants of `src/interrupt.rs` and `DESIGN.md` sections 2 and 5.
//!
//! # The operations
//!
//! [`Op`] works on at most [`MAX_HANDLES`] test handles and [`MAX_PENDING`] pending tokens, with
//! FUSE ids from [`UNIQUES`] (valid even ids, zero, odd ids): create a context, `register(id)`
//! (also duplicates and invalid ids), arm the routine (which completes the request
//! `STATUS_CANCELLED` and returns the completion's status), `interrupt(id)`, `settle` a token in
//! any order (so also stale ones), reply (disarm, then complete if the disarm won; a second
//! reply is a second completion), `unregister(id, handle)` (also with the wrong context or an
//! unregistered id), and dropping a handle.
//!
//! # What is compared
//!
//! After every step: the result exactly (`Registration`, `InterruptOutcome` with the token's id,
//! `Settled`, errors, disarm / completion results, which context `unregister` handed back,
//! `Dereferenced`); then `in_flight`, `remembered`, `is_empty`, `stats()`, `active_contexts`;
//! every handle's context (which object, `is_cancelled`, `is_completed`, `stored_status`,
//! `information`, `reference_count`, `has_cancel_routine`); every object ever created through
//! `lookup` of its id (found iff alive, and then the same snapshot); every object's routine
//! calls, the reference count the routine saw and that it always saw `CANCELLED`; and
//! `bugcheck::count()` with each new bug check's code and parameters. At the end every token is
//! settled, every in-flight id unregistered (through a `lookup` handle), every handle dropped:
//! the table must be empty, `active_contexts()` 0, and every mini-redirector state freed once
//! the instance and table are dropped.
//!
//! A tally of outcomes (shown with `--nocapture`) must reach every entry of [`MUST_SEE`]. A
//! failing sequence is shrunk by proptest and then by `minimize` (with [`simpler`]), and printed
//! numbered. The property runs under `BugCheckPolicy::Record` holding the lock of
//! `common::exclusive`. That machinery is `tests/common/model_harness.rs`, shared with
//! `tests/model.rs` ([`model_harness::check_property`], [`model_harness::run_sequence`]).
//!
//! Left out: concurrency (the loom suite covers it), cancels at DISPATCH, FUSE itself.
//!
//! Cases: `RDBSS_MODEL_CASES` (default 2 000) sequences of 1 to [`MAX_OPS`] operations.

#![cfg(feature = "std")]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use rdbss::bugcheck::{self, BugCheckCode};
use rdbss::interrupt::{
    InterruptOutcome, InterruptStats, InterruptTable, InterruptTableError, PendingInterrupt,
    Registration, Settled,
};
use rdbss::irql::{self, Irql};
use rdbss::{
    CancelOutcome, Cancelled, ContextInit, ContextRef, Dereferenced, NtStatus, Rdbss, RequestId,
    RxContext,
};

mod common;
use common::model_harness::{self, ensure_eq, label, Tally};

/// Live handles the test holds at most.
const MAX_HANDLES: usize = 5;
/// Pending-interrupt tokens the test holds at most (an interrupt beyond that settles at once).
const MAX_PENDING: usize = 4;
/// Operations per sequence, at most.
const MAX_OPS: usize = 50;
/// Cases when `RDBSS_MODEL_CASES` is not set.
const DEFAULT_CASES: u32 = 2_000;

/// FUSE ids: four valid ones, zero, and three with the interrupt bit set.
const UNIQUES: [u64; 8] = [2, 4, 6, 1 << 40, 0, 1, 3, (1 << 40) | 1];
/// How many of [`UNIQUES`] are valid (the first ones).
const VALID_UNIQUES: usize = 4;

// ---------------------------------------------------------------------------------------------
// The mini-redirector part: a routine that counts its calls and completes the request
// ---------------------------------------------------------------------------------------------

/// What the routine saw on one object; shared with the test so it outlives the context.
#[derive(Default, Debug)]
struct Counters {
    calls: AtomicUsize,
    /// Calls that found the context not `CANCELLED` (never expected).
    not_cancelled: AtomicUsize,
    /// Calls above `APC_LEVEL` (never expected).
    above_apc: AtomicUsize,
    refs_seen: AtomicUsize,
}

#[derive(Debug)]
struct Probe {
    counters: Arc<Counters>,
}

/// The routine: aborts the exchange by completing the request `STATUS_CANCELLED` (the adapter
/// answers `EINTR`), and returns what the completion returned.
fn abort(ctx: &RxContext<Probe>) -> NtStatus {
    let k = &ctx.minirdr().counters;
    if !ctx.is_cancelled() {
        k.not_cancelled.fetch_add(1, Ordering::SeqCst);
    }
    if irql::current() > Irql::APC {
        k.above_apc.fetch_add(1, Ordering::SeqCst);
    }
    k.refs_seen.store(ctx.reference_count(), Ordering::SeqCst);
    k.calls.fetch_add(1, Ordering::SeqCst);
    match ctx.complete_request(NtStatus::CANCELLED, 0) {
        Ok(()) => NtStatus::SUCCESS,
        Err(status) => status,
    }
}

// ---------------------------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------------------------

/// One call. `h` and `p` are taken modulo the pool's length (skipped if it is empty), `u` indexes
/// [`UNIQUES`].
#[derive(Clone, Debug)]
enum Op {
    /// `create_context`.
    Create,
    /// `register(UNIQUES[u], handle h)`.
    Register { u: usize, h: usize },
    /// `set_minirdr_cancel_routine(Some(abort))`.
    Arm { h: usize },
    /// `interrupt(UNIQUES[u])`; a `Pending` token is kept (settled at once if the pool is full).
    Interrupt { u: usize },
    /// `settle` of token `p`.
    Settle { p: usize },
    /// Disarm, then complete with `STATUS_SUCCESS` and `info` if the disarm won.
    Reply { h: usize, info: usize },
    /// `unregister(UNIQUES[u], handle h)`; the handle handed back is dropped.
    Unregister { u: usize, h: usize },
    /// `dereference()` of handle `h`.
    Drop { h: usize },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let h = || 0..MAX_HANDLES;
    let u = || {
        prop_oneof![
            6 => 0..VALID_UNIQUES,
            1 => VALID_UNIQUES..UNIQUES.len(),
        ]
    };
    prop_oneof![
        6 => Just(Op::Create),
        8 => (u(), h()).prop_map(|(u, h)| Op::Register { u, h }),
        6 => h().prop_map(|h| Op::Arm { h }),
        8 => u().prop_map(|u| Op::Interrupt { u }),
        5 => (0..MAX_PENDING).prop_map(|p| Op::Settle { p }),
        5 => (h(), 0..3usize).prop_map(|(h, info)| Op::Reply { h, info }),
        6 => (u(), h()).prop_map(|(u, h)| Op::Unregister { u, h }),
        4 => h().prop_map(|h| Op::Drop { h }),
    ]
}

// ---------------------------------------------------------------------------------------------
// The reference model
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct MCtx {
    id: RequestId,
    refs: usize,
    cancelled: bool,
    armed: bool,
    completed: bool,
    status: NtStatus,
    info: usize,
    calls: usize,
    refs_seen: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum MEntry {
    InFlight(usize),
    Interrupted(u64),
}

/// An expected bug check: code and parameters.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct ExpectedBugCheck {
    code: BugCheckCode,
    parameters: [usize; 4],
}

/// The model's `InterruptOutcome`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum MOutcome {
    Cancelled(CancelOutcome),
    /// The token: id and generation.
    Pending(u64, u64),
    InvalidId,
}

#[derive(Debug, Default)]
struct Model {
    ctxs: Vec<MCtx>,
    handles: Vec<usize>,
    entries: BTreeMap<u64, MEntry>,
    next_generation: u64,
    stats: InterruptStats,
    /// The tokens the test holds: id and generation, same order as the real ones.
    pending: Vec<(u64, u64)>,
    bugchecks: Vec<ExpectedBugCheck>,
}

fn valid(unique: u64) -> bool {
    unique != 0 && unique & 1 == 0
}

impl Model {
    fn live(&self, o: usize) -> bool {
        self.ctxs[o].refs > 0
    }

    fn active(&self) -> usize {
        (0..self.ctxs.len()).filter(|&o| self.live(o)).count()
    }

    fn unref(&mut self, o: usize) -> Dereferenced {
        let c = &mut self.ctxs[o];
        assert!(c.refs > 0, "model: dereference of a freed object {o}");
        c.refs -= 1;
        if c.refs == 0 {
            Dereferenced::Freed
        } else {
            Dereferenced::StillReferenced
        }
    }

    fn complete(&mut self, o: usize, status: NtStatus, info: usize) -> Result<(), NtStatus> {
        let c = &mut self.ctxs[o];
        if c.completed {
            self.bugchecks.push(ExpectedBugCheck {
                code: BugCheckCode::MULTIPLE_IRP_COMPLETE_REQUESTS,
                parameters: [
                    c.id.serial_number() as usize,
                    c.status.code() as usize,
                    status.code() as usize,
                    0,
                ],
            });
            return Err(NtStatus::INVALID_DEVICE_STATE);
        }
        c.completed = true;
        c.status = status;
        c.info = info;
        Ok(())
    }

    /// The core's cancel; `extra` references are held by the caller for the call.
    fn cancel(&mut self, o: usize, extra: usize) -> CancelOutcome {
        let c = &mut self.ctxs[o];
        if c.cancelled {
            return CancelOutcome::AlreadyCancelled;
        }
        c.cancelled = true;
        if !std::mem::take(&mut c.armed) {
            return CancelOutcome::NoRoutineArmed;
        }
        c.calls += 1;
        c.refs_seen = c.refs + extra;
        CancelOutcome::RoutineCalled(match self.complete(o, NtStatus::CANCELLED, 0) {
            Ok(()) => NtStatus::SUCCESS,
            Err(status) => status,
        })
    }

    fn set_routine(&mut self, o: usize, arm: bool) -> Result<(), Cancelled> {
        let c = &mut self.ctxs[o];
        if c.cancelled {
            return Err(Cancelled);
        }
        c.armed = arm;
        Ok(())
    }

    fn register(&mut self, unique: u64, o: usize) -> Result<Registration, InterruptTableError> {
        if !valid(unique) {
            self.stats.invalid_ids += 1;
            return Err(InterruptTableError::InvalidId(unique));
        }
        let interrupted = match self.entries.get(&unique) {
            Some(MEntry::InFlight(_)) => {
                self.stats.duplicate_registrations += 1;
                return Err(InterruptTableError::AlreadyRegistered(unique));
            }
            Some(MEntry::Interrupted(_)) => {
                self.stats.cancelled_on_registration += 1;
                true
            }
            None => false,
        };
        self.entries.insert(unique, MEntry::InFlight(o));
        self.ctxs[o].refs += 1;
        self.stats.registered += 1;
        Ok(if interrupted {
            Registration::Interrupted(self.cancel(o, 0))
        } else {
            Registration::Registered
        })
    }

    fn interrupt(&mut self, unique: u64) -> MOutcome {
        if !valid(unique) {
            self.stats.invalid_ids += 1;
            return MOutcome::InvalidId;
        }
        self.stats.interrupts += 1;
        let generation = self.next_generation;
        match self.entries.get(&unique).copied() {
            Some(MEntry::InFlight(o)) => {
                self.stats.cancelled_in_flight += 1;
                MOutcome::Cancelled(self.cancel(o, 1))
            }
            Some(MEntry::Interrupted(_)) | None => {
                self.entries.insert(unique, MEntry::Interrupted(generation));
                self.next_generation += 1;
                self.stats.remembered += 1;
                MOutcome::Pending(unique, generation)
            }
        }
    }

    fn settle(&mut self, unique: u64, generation: u64) -> Settled {
        match self.entries.get(&unique) {
            Some(&MEntry::Interrupted(latest)) if latest == generation => {
                self.entries.remove(&unique);
                self.stats.retried += 1;
                Settled::Retry
            }
            _ => Settled::Delivered,
        }
    }

    fn unregister(&mut self, unique: u64, o: usize) -> Option<usize> {
        match self.entries.get(&unique) {
            Some(&MEntry::InFlight(registered)) if registered == o => {
                self.entries.remove(&unique);
                Some(o)
            }
            _ => None,
        }
    }

    fn in_flight(&self) -> usize {
        self.entries
            .values()
            .filter(|e| matches!(e, MEntry::InFlight(_)))
            .count()
    }
}

// ---------------------------------------------------------------------------------------------
// The real side and the comparison
// ---------------------------------------------------------------------------------------------

/// What the test can observe of one context.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Snapshot {
    cancelled: bool,
    completed: bool,
    status: NtStatus,
    info: usize,
    refs: usize,
    armed: bool,
}

fn snapshot(c: &RxContext<Probe>) -> Snapshot {
    Snapshot {
        cancelled: c.is_cancelled(),
        completed: c.is_completed(),
        status: c.stored_status(),
        info: c.information(),
        refs: c.reference_count(),
        armed: c.has_cancel_routine(),
    }
}

impl MCtx {
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            cancelled: self.cancelled,
            completed: self.completed,
            status: self.status,
            info: self.info,
            refs: self.refs,
            armed: self.armed,
        }
    }
}

fn pick(len: usize, i: usize) -> Option<usize> {
    (len > 0).then(|| i % len)
}

fn error_kind(e: &InterruptTableError) -> &'static str {
    match e {
        InterruptTableError::InvalidId(_) => "Err(InvalidId)",
        InterruptTableError::AlreadyRegistered(_) => "Err(AlreadyRegistered)",
    }
}

struct Harness {
    model: Model,
    rdbss: Rdbss<Probe>,
    table: InterruptTable<Probe>,
    handles: Vec<ContextRef<Probe>>,
    pending: Vec<PendingInterrupt>,
    counters: Vec<Arc<Counters>>,
    bugchecks_seen: usize,
}

impl Harness {
    fn new() -> Self {
        Harness {
            model: Model::default(),
            rdbss: Rdbss::new(),
            table: InterruptTable::new(),
            handles: Vec::new(),
            pending: Vec::new(),
            counters: Vec::new(),
            bugchecks_seen: 0,
        }
    }

    fn object_of(&self, c: &RxContext<Probe>) -> Option<usize> {
        self.counters
            .iter()
            .position(|k| Arc::ptr_eq(k, &c.minirdr().counters))
    }

    /// Settles token `p` on both sides.
    fn settle(&mut self, p: usize) -> Result<String, String> {
        let token = self.pending.remove(p);
        let (unique, generation) = self.model.pending.remove(p);
        ensure_eq!(token.unique(), unique, "settle: the token's id");
        let real = self.table.settle(token);
        ensure_eq!(
            real,
            self.model.settle(unique, generation),
            "settle({unique})"
        );
        Ok(label("settle", &real))
    }

    /// Runs one operation on both sides; a label for the tally, `None` if skipped.
    fn step(&mut self, op: &Op) -> Result<Option<String>, String> {
        let label = match *op {
            Op::Create => {
                if self.handles.len() >= MAX_HANDLES {
                    return Ok(None);
                }
                let counters = Arc::new(Counters::default());
                let handle = self
                    .rdbss
                    .create_context(
                        ContextInit::default(),
                        Probe {
                            counters: counters.clone(),
                        },
                    )
                    .map_err(|(status, _)| format!("create: {status:?}"))?;
                self.model.ctxs.push(MCtx {
                    id: handle.id(),
                    refs: 1,
                    cancelled: false,
                    armed: false,
                    completed: false,
                    status: NtStatus::SUCCESS,
                    info: 0,
                    calls: 0,
                    refs_seen: 0,
                });
                self.model.handles.push(self.model.ctxs.len() - 1);
                self.counters.push(counters);
                self.handles.push(handle);
                "create".to_string()
            }
            Op::Register { u, h } => {
                let Some(i) = pick(self.handles.len(), h) else {
                    return Ok(None);
                };
                let unique = UNIQUES[u];
                let real = self.table.register(unique, &self.handles[i]);
                let expected = self.model.register(unique, self.model.handles[i]);
                ensure_eq!(real, expected, "register({unique})");
                match real {
                    Ok(r) => label("register", &r),
                    Err(e) => format!("register: {}", error_kind(&e)),
                }
            }
            Op::Arm { h } => {
                let Some(i) = pick(self.handles.len(), h) else {
                    return Ok(None);
                };
                let real = self.handles[i].set_minirdr_cancel_routine(Some(abort));
                ensure_eq!(
                    real,
                    self.model.set_routine(self.model.handles[i], true),
                    "arm"
                );
                label("arm", &real)
            }
            Op::Interrupt { u } => {
                let unique = UNIQUES[u];
                let real = self.table.interrupt(unique);
                let expected = self.model.interrupt(unique);
                match (real, expected) {
                    (InterruptOutcome::Cancelled(r), MOutcome::Cancelled(m)) => {
                        ensure_eq!(r, m, "interrupt({unique})");
                        label("interrupt: Cancelled", &r)
                    }
                    (InterruptOutcome::InvalidId, MOutcome::InvalidId) => {
                        "interrupt: InvalidId".to_string()
                    }
                    (InterruptOutcome::Pending(token), MOutcome::Pending(id, generation)) => {
                        ensure_eq!(token.unique(), id, "interrupt({unique}): the token's id");
                        self.pending.push(token);
                        self.model.pending.push((id, generation));
                        if self.pending.len() > MAX_PENDING {
                            self.settle(0)?;
                        }
                        "interrupt: Pending".to_string()
                    }
                    (real, expected) => {
                        return Err(format!(
                            "interrupt({unique}): implementation {real:?}, model {expected:?}"
                        ))
                    }
                }
            }
            Op::Settle { p } => {
                let Some(p) = pick(self.pending.len(), p) else {
                    return Ok(None);
                };
                self.settle(p)?
            }
            Op::Reply { h, info } => {
                let Some(i) = pick(self.handles.len(), h) else {
                    return Ok(None);
                };
                let o = self.model.handles[i];
                let disarm = self.handles[i].set_minirdr_cancel_routine(None);
                ensure_eq!(disarm, self.model.set_routine(o, false), "reply: disarm");
                if disarm.is_ok() {
                    let real =
                        RxContext::complete_request(&self.handles[i], NtStatus::SUCCESS, info);
                    ensure_eq!(
                        real,
                        self.model.complete(o, NtStatus::SUCCESS, info),
                        "reply: complete"
                    );
                    label("reply: disarm Ok, complete", &real)
                } else {
                    "reply: disarm Err(Cancelled)".to_string()
                }
            }
            Op::Unregister { u, h } => {
                let Some(i) = pick(self.handles.len(), h) else {
                    return Ok(None);
                };
                let unique = UNIQUES[u];
                let o = self.model.handles[i];
                let real = self.table.unregister(unique, &self.handles[i]);
                let expected = self.model.unregister(unique, o);
                match (real, expected) {
                    (Some(handed), Some(o)) => {
                        ensure_eq!(
                            self.object_of(&handed),
                            Some(o),
                            "unregister({unique}): which context"
                        );
                        let dropped = handed.dereference();
                        ensure_eq!(dropped, self.model.unref(o), "unregister: dropping it");
                        "unregister: Some".to_string()
                    }
                    (None, None) => "unregister: None".to_string(),
                    (real, expected) => {
                        return Err(format!(
                            "unregister({unique}): implementation {:?}, model {expected:?}",
                            real.map(|h| h.id())
                        ))
                    }
                }
            }
            Op::Drop { h } => {
                let Some(i) = pick(self.handles.len(), h) else {
                    return Ok(None);
                };
                let o = self.model.handles.remove(i);
                let real = self.handles.remove(i).dereference();
                ensure_eq!(real, self.model.unref(o), "drop");
                label("drop", &real)
            }
        };
        Ok(Some(label))
    }

    /// Compares everything observable with the model.
    fn check(&mut self) -> Result<(), String> {
        let m = &self.model;
        ensure_eq!(irql::current(), Irql::PASSIVE, "IRQL");
        ensure_eq!(self.table.in_flight(), m.in_flight(), "in_flight");
        ensure_eq!(
            self.table.remembered(),
            m.entries.len() - m.in_flight(),
            "remembered"
        );
        ensure_eq!(self.table.is_empty(), m.entries.is_empty(), "is_empty");
        ensure_eq!(self.table.stats(), m.stats, "stats");
        ensure_eq!(self.rdbss.active_contexts(), m.active(), "active_contexts");

        let count = bugcheck::count();
        ensure_eq!(count, m.bugchecks.len(), "bugcheck::count()");
        if count > self.bugchecks_seen {
            let recent: Vec<ExpectedBugCheck> = bugcheck::recent()
                .into_iter()
                .map(|b| ExpectedBugCheck {
                    code: b.code,
                    parameters: b.parameters,
                })
                .collect();
            let new = (count - self.bugchecks_seen).min(recent.len());
            ensure_eq!(
                recent[recent.len() - new..],
                m.bugchecks[count - new..],
                "the new bug checks"
            );
        }
        self.bugchecks_seen = count;

        for (i, (handle, &o)) in self.handles.iter().zip(&m.handles).enumerate() {
            ensure_eq!(self.object_of(handle), Some(o), "handle {i}: which context");
            ensure_eq!(
                snapshot(handle),
                m.ctxs[o].snapshot(),
                "handle {i} (object {o})"
            );
        }
        for (o, c) in m.ctxs.iter().enumerate() {
            match (self.rdbss.lookup(c.id), m.live(o)) {
                (Ok(found), true) => {
                    ensure_eq!(self.object_of(&found), Some(o), "lookup of object {o}");
                    let mut expected = c.snapshot();
                    expected.refs += 1;
                    ensure_eq!(snapshot(&found), expected, "object {o} by lookup");
                }
                (Err(NtStatus::NOT_FOUND), false) => {}
                (real, live) => {
                    return Err(format!(
                        "lookup of object {o}: implementation {:?}, model alive {live}",
                        real.map(|h| h.id())
                    ))
                }
            }
            let k = &self.counters[o];
            ensure_eq!(k.calls.load(Ordering::SeqCst), c.calls, "object {o}: calls");
            ensure_eq!(
                k.refs_seen.load(Ordering::SeqCst),
                c.refs_seen,
                "object {o}: references the routine saw"
            );
            ensure_eq!(
                k.not_cancelled.load(Ordering::SeqCst),
                0,
                "object {o}: calls not CANCELLED"
            );
            ensure_eq!(
                k.above_apc.load(Ordering::SeqCst),
                0,
                "object {o}: calls above APC_LEVEL"
            );
            if c.calls > 1 {
                return Err(format!("model: object {o} called more than once"));
            }
        }
        Ok(())
    }

    /// Settles, unregisters and drops everything, and checks that nothing is left.
    fn finish(mut self) -> Result<(), String> {
        while !self.pending.is_empty() {
            self.step(&Op::Settle { p: 0 })?;
            self.check()?;
        }
        let in_flight: Vec<(u64, usize)> = self
            .model
            .entries
            .iter()
            .filter_map(|(&u, e)| match *e {
                MEntry::InFlight(o) => Some((u, o)),
                MEntry::Interrupted(_) => None,
            })
            .collect();
        for (unique, o) in in_flight {
            let id = self.model.ctxs[o].id;
            let handle = self
                .rdbss
                .lookup(id)
                .map_err(|s| format!("final lookup of object {o}: {s:?}"))?;
            let handed = self
                .table
                .unregister(unique, &handle)
                .ok_or_else(|| format!("final unregister({unique}) of object {o}: None"))?;
            ensure_eq!(
                self.model.unregister(unique, o),
                Some(o),
                "model unregister"
            );
            ensure_eq!(
                handle.dereference(),
                Dereferenced::StillReferenced,
                "lookup ref"
            );
            ensure_eq!(
                handed.dereference(),
                self.model.unref(o),
                "final unregister"
            );
            self.check()?;
        }
        while !self.handles.is_empty() {
            self.step(&Op::Drop { h: 0 })?;
            self.check()?;
        }
        ensure_eq!(self.table.is_empty(), true, "table empty at the end");
        ensure_eq!(
            self.rdbss.active_contexts(),
            0,
            "active_contexts at the end"
        );
        let counters = std::mem::take(&mut self.counters);
        drop(self);
        for (o, k) in counters.iter().enumerate() {
            ensure_eq!(
                Arc::strong_count(k),
                1,
                "object {o}: state still alive at the end"
            );
        }
        Ok(())
    }
}

/// Runs one sequence; on a mismatch, says at which step and shows the model.
fn run_case(ops: &[Op], tally: &Tally) -> Result<(), TestCaseError> {
    model_harness::run_sequence(
        ops,
        tally,
        Harness::new,
        Harness::step,
        Harness::check,
        |harness| &harness.model,
        |harness| {
            for expected in &harness.model.bugchecks {
                model_harness::count(tally, format!("bug check: {}", expected.code));
            }
            harness.finish()
        },
    )
}

/// Outcomes the random sequences must reach (checked when at least [`DEFAULT_CASES`] run).
const MUST_SEE: &[&str] = &[
    "create",
    "register: Registered",
    "register: Interrupted(RoutineCalled(STATUS_SUCCESS))",
    "register: Interrupted(NoRoutineArmed)",
    "register: Interrupted(AlreadyCancelled)",
    "register: Err(InvalidId)",
    "register: Err(AlreadyRegistered)",
    "arm: Ok(())",
    "arm: Err(Cancelled)",
    "interrupt: Cancelled: RoutineCalled(STATUS_SUCCESS)",
    "interrupt: Cancelled: RoutineCalled(STATUS_INVALID_DEVICE_STATE)",
    "interrupt: Cancelled: NoRoutineArmed",
    "interrupt: Cancelled: AlreadyCancelled",
    "interrupt: Pending",
    "interrupt: InvalidId",
    "settle: Retry",
    "settle: Delivered",
    "reply: disarm Ok, complete: Ok(())",
    "reply: disarm Ok, complete: Err(STATUS_INVALID_DEVICE_STATE)",
    "reply: disarm Err(Cancelled)",
    "unregister: Some",
    "unregister: None",
    "drop: Freed",
    "drop: StillReferenced",
    "bug check: MULTIPLE_IRP_COMPLETE_REQUESTS (0x00000044)",
];

/// Simpler versions of one operation: smaller indices.
fn simpler(op: &Op) -> Vec<Op> {
    let below = |n: usize| 0..n;
    match *op {
        Op::Create => vec![],
        Op::Register { u, h } => below(u)
            .map(|u| Op::Register { u, h })
            .chain(below(h).map(|h| Op::Register { u, h }))
            .collect(),
        Op::Arm { h } => below(h).map(|h| Op::Arm { h }).collect(),
        Op::Interrupt { u } => below(u).map(|u| Op::Interrupt { u }).collect(),
        Op::Settle { p } => below(p).map(|p| Op::Settle { p }).collect(),
        Op::Reply { h, info } => below(h)
            .map(|h| Op::Reply { h, info })
            .chain(below(info).map(|info| Op::Reply { h, info }))
            .collect(),
        Op::Unregister { u, h } => below(u)
            .map(|u| Op::Unregister { u, h })
            .chain(below(h).map(|h| Op::Unregister { u, h }))
            .collect(),
        Op::Drop { h } => below(h).map(|h| Op::Drop { h }).collect(),
    }
}

#[test]
fn interrupt_table_matches_the_model() {
    let sequences = prop::collection::vec(op_strategy(), 1..=MAX_OPS);
    model_harness::check_property(sequences, run_case, simpler, DEFAULT_CASES, MUST_SEE);
}

/// A fixed sequence through the main paths, so a broken model is caught even if the random
/// cases miss a path.
#[test]
fn a_hand_written_sequence_matches_the_model() {
    let ops = [
        Op::Create,
        Op::Register { u: 0, h: 0 },
        Op::Arm { h: 0 },
        Op::Interrupt { u: 0 },
        Op::Reply { h: 0, info: 1 },
        Op::Interrupt { u: 1 },
        Op::Interrupt { u: 1 },
        Op::Settle { p: 0 },
        Op::Create,
        Op::Register { u: 1, h: 1 },
        Op::Register { u: 1, h: 0 },
        Op::Settle { p: 0 },
        Op::Unregister { u: 1, h: 0 },
        Op::Interrupt { u: 4 },
        Op::Register { u: 5, h: 0 },
        Op::Create,
        Op::Reply { h: 2, info: 2 },
        Op::Reply { h: 2, info: 0 },
        Op::Drop { h: 1 },
        Op::Unregister { u: 0, h: 0 },
    ];
    model_harness::check_sequence(&ops, run_case);
}
