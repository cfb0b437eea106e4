//! `interrupt_table`: the FUSE interrupt layer's inputs (`rdbss::interrupt::InterruptTable`),
//! decoded from the fuzzer's bytes with `arbitrary`: arbitrary 64-bit ids (unknown, duplicate,
//! zero, with the interrupt bit set), interrupts before their requests, settles in any order,
//! unregisters with the wrong context, replies, direct cancels.
//!
//! The adapter side follows the protocol of DESIGN.md sections 2 and 5: a request is registered
//! when it arrives, *sent* by arming a routine that completes it with `STATUS_CANCELLED` (EINTR),
//! or answered EINTR at once if the arm is refused; the server's *reply* disarms and completes
//! only if the disarm wins (else completes as the cancel side if no routine ran), then
//! unregisters every id the request holds.
//!
//! A small reference model of the table (id -> in flight / remembered with a generation)
//! predicts every result exactly. After every call: the outcome, `in_flight`, `remembered` and
//! `stats` match the model; no bug check was reported (the adapter never breaks a rule); the IRQL
//! is `PASSIVE_LEVEL`; a registration that found an interrupt waiting cancelled its request; a
//! settle answers `Delivered` exactly when, since that interrupt, a registration of its id
//! consumed an interrupt (cancelling a request) or a later interrupt for the id took over, and
//! `Retry` otherwise. At the end (every interrupt settled, every request replied): every request
//! was completed exactly once, its routine ran at most once, the table is empty, the instance
//! drains, and every request's state was dropped.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use arbitrary::{Arbitrary, Unstructured};

use rdbss::bugcheck::{self, BugCheckPolicy};
use rdbss::interrupt::{InterruptStats, InterruptTableError, PendingInterrupt, FUSE_INT_REQ_BIT};
use rdbss::irql::{self, Irql};
use rdbss::{
    CancelOutcome, ContextInit, ContextRef, DrainStatus, InterruptOutcome, InterruptTable,
    ManualWorkQueue, NtStatus, Rdbss, Registration, RxContext, Settled,
};

/// Operations per input, at most.
pub const MAX_OPS: usize = 128;
/// Requests in flight at most.
const MAX_REQUESTS: usize = 16;

/// A FUSE id.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum FuseId {
    /// One of the ids used so far (duplicates, replied ids, ids of remembered interrupts).
    Recent(u8),
    /// A small even id (a plausible unique).
    Even(u8),
    /// Zero (invalid).
    Zero,
    /// A used id with the interrupt bit set (invalid).
    IntBit(u8),
    /// Any 64-bit value.
    Raw(u64),
}

/// One event on the adapter.
#[derive(Arbitrary, Clone, Debug)]
pub enum Op {
    /// A request arrives: a new context, registered under `id`.
    Request { id: FuseId },
    /// A live request registered (again) under `id`: duplicates and second ids.
    Register { r: u8, id: FuseId },
    /// The request is sent: its routine is armed (EINTR at once if refused).
    Send { r: u8 },
    /// `FUSE_INTERRUPT` for `id`.
    Interrupt { id: FuseId },
    /// A remembered interrupt is settled (any of them, in any order).
    Settle { p: u8 },
    /// The server replies to the request.
    Reply { r: u8 },
    /// `unregister(id, request r's context)`: the context may not be the one registered.
    Unregister { r: u8, id: FuseId },
    /// The request is cancelled through the core directly (another cancel path).
    CancelDirect { r: u8 },
}

/// Decodes an input into at most [`MAX_OPS`] operations.
pub fn decode(data: &[u8]) -> Vec<Op> {
    let mut u = Unstructured::new(data);
    let mut ops = Vec::new();
    while ops.len() < MAX_OPS && !u.is_empty() {
        match Op::arbitrary(&mut u) {
            Ok(op) => ops.push(op),
            Err(_) => break,
        }
    }
    ops
}

/// A request's mini-redirector state.
pub struct ReqState {
    completions: AtomicUsize,
    routine_calls: AtomicUsize,
    dropped: Arc<AtomicUsize>,
}

impl Drop for ReqState {
    fn drop(&mut self) {
        self.dropped.fetch_add(1, Ordering::SeqCst);
    }
}

type Ctx = RxContext<ReqState>;

/// The routine: aborts and completes with STATUS_CANCELLED (the adapter answers EINTR).
fn abort(ctx: &Ctx) -> NtStatus {
    assert!(ctx.is_cancelled(), "routine on a context not CANCELLED");
    assert!(irql::current() <= Irql::APC, "routine above APC_LEVEL");
    assert!(
        !ctx.has_cancel_routine(),
        "routine with a routine still armed"
    );
    ctx.minirdr().routine_calls.fetch_add(1, Ordering::SeqCst);
    complete(ctx, NtStatus::CANCELLED);
    NtStatus::SUCCESS
}

fn complete(ctx: &Ctx, status: NtStatus) {
    assert_eq!(
        ctx.complete_request(status, 0),
        Ok(()),
        "a request completed twice"
    );
    ctx.minirdr().completions.fetch_add(1, Ordering::SeqCst);
}

enum Entry {
    InFlight(usize),
    Interrupted { generation: u64 },
}

struct Req {
    ctx: ContextRef<ReqState>,
    /// Ids it is registered under (per the model).
    ids: Vec<u64>,
    /// Sent once (its routine armed, or EINTR at once); a request is sent at most once.
    sent: bool,
    armed: bool,
    cancelled: bool,
    completed: bool,
}

struct Pending {
    interrupt: PendingInterrupt,
    generation: u64,
    /// Since this interrupt, a registration of its id consumed an interrupt, or a later
    /// interrupt for the id came.
    covered: bool,
}

struct Harness {
    rdbss: Rdbss<ReqState>,
    table: InterruptTable<ReqState>,
    reqs: Vec<Req>,
    /// Every request ever made: (routine calls, completions) checked at the end.
    all: Vec<ContextRef<ReqState>>,
    model: BTreeMap<u64, Entry>,
    next_generation: u64,
    stats: InterruptStats,
    pending: Vec<Pending>,
    used: Vec<u64>,
    dropped: Arc<AtomicUsize>,
    created: usize,
}

fn valid(unique: u64) -> bool {
    unique != 0 && unique & FUSE_INT_REQ_BIT == 0
}

fn pick<T>(v: &[T], i: u8) -> Option<usize> {
    (!v.is_empty()).then(|| usize::from(i) % v.len())
}

impl Harness {
    fn new() -> Self {
        Harness {
            rdbss: Rdbss::with_work_queue(ManualWorkQueue::new()),
            table: InterruptTable::new(),
            reqs: Vec::new(),
            all: Vec::new(),
            model: BTreeMap::new(),
            next_generation: 0,
            stats: InterruptStats::default(),
            pending: Vec::new(),
            used: Vec::new(),
            dropped: Arc::new(AtomicUsize::new(0)),
            created: 0,
        }
    }

    fn resolve(&mut self, id: FuseId) -> u64 {
        let unique = match id {
            FuseId::Recent(i) => match pick(&self.used, i) {
                Some(i) => self.used[i],
                None => 2,
            },
            FuseId::Even(i) => (u64::from(i) + 1) * 2,
            FuseId::Zero => 0,
            FuseId::IntBit(i) => match pick(&self.used, i) {
                Some(i) => self.used[i] | FUSE_INT_REQ_BIT,
                None => 3,
            },
            FuseId::Raw(raw) => raw,
        };
        if valid(unique) && !self.used.contains(&unique) {
            self.used.push(unique);
        }
        unique
    }

    /// The outcome a core cancel of request `r` gives, updating the model.
    fn predict_cancel(&mut self, r: usize) -> CancelOutcome {
        let req = &mut self.reqs[r];
        if req.cancelled {
            return CancelOutcome::AlreadyCancelled;
        }
        req.cancelled = true;
        if std::mem::take(&mut req.armed) {
            req.completed = true;
            CancelOutcome::RoutineCalled(NtStatus::SUCCESS)
        } else {
            CancelOutcome::NoRoutineArmed
        }
    }

    /// Registers request `r` under `unique` and checks the result against the model.
    fn register(&mut self, r: usize, unique: u64) {
        let got = self.table.register(unique, &self.reqs[r].ctx);
        if !valid(unique) {
            self.stats.invalid_ids += 1;
            assert_eq!(got, Err(InterruptTableError::InvalidId(unique)));
            return;
        }
        let expected = match self.model.get(&unique) {
            Some(Entry::InFlight(_)) => {
                self.stats.duplicate_registrations += 1;
                assert_eq!(got, Err(InterruptTableError::AlreadyRegistered(unique)));
                return;
            }
            Some(Entry::Interrupted { .. }) => {
                self.stats.cancelled_on_registration += 1;
                for p in &mut self.pending {
                    if p.interrupt.unique() == unique {
                        p.covered = true;
                    }
                }
                Registration::Interrupted(self.predict_cancel(r))
            }
            None => Registration::Registered,
        };
        self.stats.registered += 1;
        self.model.insert(unique, Entry::InFlight(r));
        self.reqs[r].ids.push(unique);
        assert_eq!(got, Ok(expected), "register {unique:#x}");
        if matches!(expected, Registration::Interrupted(_)) {
            assert!(
                self.reqs[r].ctx.is_cancelled(),
                "an interrupted registration did not cancel"
            );
        }
    }

    /// Removes request `r`'s registration under `unique` (with `r`'s context).
    fn unregister(&mut self, r: usize, unique: u64) {
        let got = self.table.unregister(unique, &self.reqs[r].ctx);
        let ours = matches!(self.model.get(&unique), Some(Entry::InFlight(x)) if *x == r);
        assert_eq!(got.is_some(), ours, "unregister {unique:#x} by request {r}");
        if let Some(handle) = got {
            assert!(ContextRef::ptr_eq(&handle, &self.reqs[r].ctx));
            self.model.remove(&unique);
            self.reqs[r].ids.retain(|&x| x != unique);
        }
    }

    /// The request is answered: every registration removed, the handle dropped.
    fn retire(&mut self, r: usize) {
        for unique in self.reqs[r].ids.clone() {
            self.unregister(r, unique);
        }
        assert!(self.reqs[r].ids.is_empty());
        let req = self.reqs.remove(r);
        assert!(req.completed);
        // Model indices above `r` shift down.
        for entry in self.model.values_mut() {
            if let Entry::InFlight(x) = entry {
                assert_ne!(*x, r, "a retired request is still registered");
                if *x > r {
                    *x -= 1;
                }
            }
        }
    }

    fn step(&mut self, op: &Op) {
        match *op {
            Op::Request { id } => {
                if self.reqs.len() >= MAX_REQUESTS {
                    return;
                }
                let unique = self.resolve(id);
                let state = ReqState {
                    completions: AtomicUsize::new(0),
                    routine_calls: AtomicUsize::new(0),
                    dropped: self.dropped.clone(),
                };
                self.created += 1;
                let ctx = self
                    .rdbss
                    .create_context(ContextInit::default(), state)
                    .map_err(|(s, _)| s)
                    .expect("create");
                self.all.push(ctx.reference());
                self.reqs.push(Req {
                    ctx,
                    ids: Vec::new(),
                    sent: false,
                    armed: false,
                    cancelled: false,
                    completed: false,
                });
                let r = self.reqs.len() - 1;
                self.register(r, unique);
            }
            Op::Register { r, id } => {
                let Some(r) = pick(&self.reqs, r) else { return };
                let unique = self.resolve(id);
                self.register(r, unique);
            }
            Op::Send { r } => {
                let Some(r) = pick(&self.reqs, r) else { return };
                let req = &mut self.reqs[r];
                if std::mem::replace(&mut req.sent, true) {
                    return;
                }
                let got = req.ctx.set_minirdr_cancel_routine(Some(abort));
                assert_eq!(got.is_err(), req.cancelled, "arming");
                if got.is_ok() {
                    req.armed = true;
                } else {
                    // EINTR at once, without sending.
                    assert!(!req.completed);
                    complete(&req.ctx, NtStatus::CANCELLED);
                    req.completed = true;
                    self.retire(r);
                }
            }
            Op::Interrupt { id } => {
                let unique = self.resolve(id);
                let got = self.table.interrupt(unique);
                if !valid(unique) {
                    self.stats.invalid_ids += 1;
                    assert_eq!(got, InterruptOutcome::InvalidId);
                    return;
                }
                self.stats.interrupts += 1;
                for p in &mut self.pending {
                    if p.interrupt.unique() == unique {
                        p.covered = true;
                    }
                }
                match self.model.get(&unique) {
                    Some(&Entry::InFlight(r)) => {
                        self.stats.cancelled_in_flight += 1;
                        let expected = self.predict_cancel(r);
                        assert_eq!(got, InterruptOutcome::Cancelled(expected), "interrupt");
                        assert!(self.reqs[r].ctx.is_cancelled());
                    }
                    _ => {
                        self.stats.remembered += 1;
                        let generation = self.next_generation;
                        self.next_generation += 1;
                        self.model.insert(unique, Entry::Interrupted { generation });
                        let InterruptOutcome::Pending(interrupt) = got else {
                            panic!("interrupt of an unregistered id: {got:?}");
                        };
                        assert_eq!(interrupt.unique(), unique);
                        self.pending.push(Pending {
                            interrupt,
                            generation,
                            covered: false,
                        });
                    }
                }
            }
            Op::Settle { p } => {
                let Some(p) = pick(&self.pending, p) else {
                    return;
                };
                let p = self.pending.remove(p);
                let unique = p.interrupt.unique();
                let latest = matches!(
                    self.model.get(&unique),
                    Some(Entry::Interrupted { generation }) if *generation == p.generation
                );
                let got = self.table.settle(p.interrupt);
                if latest {
                    assert_eq!(
                        got,
                        Settled::Retry,
                        "settle of the latest remembered interrupt"
                    );
                    self.model.remove(&unique);
                    self.stats.retried += 1;
                } else {
                    assert_eq!(got, Settled::Delivered, "settle");
                }
                // A Delivered interrupt cancelled its request or was taken over by a later one.
                assert_eq!(
                    got == Settled::Delivered,
                    p.covered,
                    "settle of {unique:#x}"
                );
            }
            Op::Reply { r } => {
                let Some(r) = pick(&self.reqs, r) else { return };
                let req = &mut self.reqs[r];
                let disarm = req.ctx.set_minirdr_cancel_routine(None);
                assert_eq!(disarm.is_err(), req.cancelled, "disarm at reply");
                if disarm.is_ok() {
                    req.armed = false;
                    complete(&req.ctx, NtStatus::SUCCESS);
                    req.completed = true;
                } else if !req.completed {
                    // Cancelled before it was sent: no routine ran; this side answers EINTR.
                    complete(&req.ctx, NtStatus::CANCELLED);
                    req.completed = true;
                }
                self.retire(r);
            }
            Op::Unregister { r, id } => {
                let Some(r) = pick(&self.reqs, r) else { return };
                let unique = self.resolve(id);
                self.unregister(r, unique);
            }
            Op::CancelDirect { r } => {
                let Some(r) = pick(&self.reqs, r) else { return };
                let expected = self.predict_cancel(r);
                assert_eq!(self.reqs[r].ctx.cancel(), expected, "direct cancel");
            }
        }
        self.check(op);
    }

    fn check(&self, op: &Op) {
        assert_eq!(irql::current(), Irql::PASSIVE, "IRQL after {op:?}");
        assert_eq!(
            bugcheck::count(),
            0,
            "bug check after {op:?}: {:?}",
            bugcheck::recent()
        );
        let in_flight = self
            .model
            .values()
            .filter(|e| matches!(e, Entry::InFlight(_)))
            .count();
        assert_eq!(self.table.in_flight(), in_flight, "in flight after {op:?}");
        assert_eq!(
            self.table.remembered(),
            self.model.len() - in_flight,
            "remembered after {op:?}"
        );
        assert_eq!(self.table.is_empty(), self.model.is_empty());
        assert_eq!(self.table.stats(), self.stats, "stats after {op:?}");
        for req in &self.reqs {
            assert_eq!(req.ctx.is_cancelled(), req.cancelled);
            assert_eq!(req.ctx.is_completed(), req.completed);
            assert_eq!(req.ctx.has_cancel_routine(), req.armed);
            // The harness's handle, the table's one per registration, and `all`'s.
            assert_eq!(req.ctx.reference_count(), 2 + req.ids.len());
        }
    }

    fn finish(mut self) {
        while !self.pending.is_empty() {
            self.step(&Op::Settle { p: 0 });
        }
        while !self.reqs.is_empty() {
            self.step(&Op::Reply { r: 0 });
        }
        assert!(self.table.is_empty(), "table not empty at the end");
        assert_eq!(self.table.in_flight(), 0);
        assert_eq!(self.table.remembered(), 0);
        for ctx in self.all.drain(..) {
            let state = ctx.minirdr();
            assert_eq!(state.completions.load(Ordering::SeqCst), 1, "completions");
            assert!(
                state.routine_calls.load(Ordering::SeqCst) <= 1,
                "routine calls"
            );
            assert_eq!(ctx.reference_count(), 1, "references left");
        }
        assert_eq!(self.rdbss.active_contexts(), 0, "contexts leaked");
        self.rdbss.start_drain();
        assert_eq!(self.rdbss.drain_status(), DrainStatus::Drained);
        assert_eq!(bugcheck::count(), 0);
        let dropped = self.dropped.clone();
        let created = self.created;
        drop(self);
        assert_eq!(
            dropped.load(Ordering::SeqCst),
            created,
            "request states not dropped"
        );
    }
}

/// Runs one input: decodes it and checks every event and the end state. Panics on a violation.
pub fn run(data: &[u8]) {
    bugcheck::set_policy(BugCheckPolicy::Record);
    bugcheck::clear();
    let ops = decode(data);
    let mut harness = Harness::new();
    for op in &ops {
        harness.step(op);
    }
    harness.finish();
}
