//! Model-based property test: random sequences of API calls, valid and invalid, run against the
//! real [`Rdbss`] instance and against a small reference model written here (plain structs, one
//! thread, no atomics or locks), compared after every step.
//!
//! # The model
//!
//! [`Model`] keeps, for every context ever created (an *object*, numbered in creation order): its
//! registry slot and serial number, its reference count and how many of those references are
//! kept by id, the flag word, the armed routine (`A` or `B`), the blocked-queue link and
//! [`BlockedState`], whether it is completed and with which status and information, and how often
//! each routine was called on it. Around the objects it keeps the instance: the serial counter
//! (create and reinitialise take the next number), `draining`, the two blocked queues (FIFO), the
//! deferred cancels waiting in the [`ManualWorkQueue`], the cancel claims taken at
//! `DISPATCH_LEVEL` and not run yet, and the list of every bug check it expects
//! (`MULTIPLE_IRP_COMPLETE_REQUESTS` 0x44 for a second completion, `DRIVER_IRQL_NOT_LESS_OR_EQUAL`
//! 0xD1 for arming or cancelling at DISPATCH). Which registry slot a new context gets is the
//! implementation's choice (not documented): the model takes it from the returned id and only
//! requires that no live context holds it. The rules are `DESIGN.md` sections 2-4, as documented
//! on the public API.
//!
//! # The operations
//!
//! [`Op`] works on a pool of at most [`MAX_HANDLES`] live [`ContextRef`] handles and on every
//! [`RequestId`] ever issued (so stale ids are used), plus a few forged ids: create (also with
//! `CANCELLED` in the initial flags, and while draining), arm / disarm (also at DISPATCH), cancel
//! (also at DISPATCH), `claim_cancel` at DISPATCH and running the claim later, `cancel_by_id` at
//! PASSIVE or DISPATCH (deferred), lookup, the three ways of completing (by handle, consuming it;
//! by id; `RxContext::complete_request` on a handle that stays), clone, drop (also at DISPATCH),
//! `into_id` / `dereference_by_id`, reinitialise, enqueue / resume on two blocked queues, running
//! the work queue, `start_drain`, and setting / clearing flags (also `CANCELLED`).
//!
//! # What is compared
//!
//! After every step: the operation's result, exactly (status codes, outcomes, returned ids and
//! which context a handle designates); then a snapshot of every live handle (slot, serial number,
//! `is_cancelled`, `is_completed`, `stored_status`, `information`, `reference_count`,
//! `has_cancel_routine`, `blocked_state`, `flags`); for every id ever issued, whether `lookup`
//! finds it, which context, and that context's snapshot; every routine's call count on every
//! object (also freed ones, through a counter shared with the test), the IRQL and reference count
//! the routine saw, and that it always saw `CANCELLED`; `active_contexts`, `drain_status`,
//! `is_draining`, the queue lengths; `bugcheck::count()` and the code and parameters of each new
//! recorded bug check. At the end everything is released (claims run, queues resumed, handles
//! dropped, kept ids dereferenced, pending work run) and `active_contexts()` must be 0, every call
//! count must match, and every mini-redirector state must have been dropped once the instance is.
//! The routine also takes the context's slot lock (`has_cancel_routine`), so a routine called
//! under that lock would be the fatal `SPIN_LOCK_ALREADY_OWNED`.
//!
//! A tally of outcomes (shown with `--nocapture`) must reach every entry of [`MUST_SEE`], so the
//! generator cannot silently stop exercising a path. A failing sequence is shrunk by proptest
//! and then further by `minimize` (removing operations, simplifying each with [`simpler`]), and
//! printed as a numbered list of [`Op`]s. That machinery, shared by the four model tests, is
//! `tests/common/model_harness.rs` ([`model_harness::check_property`], which runs the property,
//! and [`model_harness::run_sequence`], which runs one sequence through [`Harness`]).
//!
//! The whole property runs under `BugCheckPolicy::Record`, holding the lock of
//! `common::exclusive` ([`model_harness::record_policy`]; the policy and the counter are
//! process-wide); the policy is restored to `Panic` and cleared at the end.
//!
//! Left out on purpose: concurrency (the loom suite and `tests/lifecycle.rs` cover it), the
//! `ThreadWorkQueue`, waiting (`drain`, `BlockedQueue::wait`), running claims or deferred work at
//! DISPATCH, standalone `RxContext`s, and `STATUS_INSUFFICIENT_RESOURCES` (billions of slots).
//!
//! Cases: `RDBSS_MODEL_CASES` (default 2 000) sequences of 1 to [`MAX_OPS`] operations. On the
//! project's 2-core machine 2 000 cases take about 10 s unoptimised, and
//! `RDBSS_MODEL_CASES=100000 cargo test --release --test model` about 20 s.

#![cfg(feature = "std")]

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use rdbss::bugcheck::{self, BugCheckCode};
use rdbss::irql::{self, Irql, IrqlGuard};
use rdbss::{
    BlockedQueue, BlockedState, CancelByIdOutcome, CancelClaim, CancelOutcome, CancelRoutine,
    Cancelled, ContextFlags, ContextInit, ContextRef, Dereferenced, DrainStatus, MajorFunction,
    ManualWorkQueue, NtStatus, Rdbss, RequestId, RxContext,
};

mod common;
use common::model_harness::{self, ensure_eq, label, Tally};

// ---------------------------------------------------------------------------------------------
// Sizes
// ---------------------------------------------------------------------------------------------

/// Live handles the test holds at most (a create, clone or lookup beyond that is skipped or
/// dropped at once).
const MAX_HANDLES: usize = 6;
/// Cancel claims taken at DISPATCH and not run yet, at most.
const MAX_CLAIMS: usize = 3;
/// Operations per sequence, at most.
const MAX_OPS: usize = 60;
/// Cases when `RDBSS_MODEL_CASES` is not set.
const DEFAULT_CASES: u32 = 2_000;

// ---------------------------------------------------------------------------------------------
// The mini-redirector part: routines that count their calls
// ---------------------------------------------------------------------------------------------

/// What the routines saw on one object; shared with the test so it outlives the context.
#[derive(Default, Debug)]
struct Counters {
    /// Calls of routine A and routine B.
    calls: [AtomicUsize; 2],
    /// Calls that ran above `APC_LEVEL`.
    above_apc: AtomicUsize,
    /// Calls that found the context not `CANCELLED` (never expected).
    not_cancelled: AtomicUsize,
    /// Calls that found a routine still armed (never expected: the cancel took it).
    still_armed: AtomicUsize,
    /// `reference_count()` as the last call saw it.
    refs_seen: AtomicUsize,
}

/// The mini-redirector state of every context: its object's counters.
#[derive(Debug)]
struct Probe {
    counters: Arc<Counters>,
}

/// Which of the two routines.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Routine {
    A,
    B,
}

impl Routine {
    fn index(self) -> usize {
        match self {
            Routine::A => 0,
            Routine::B => 1,
        }
    }

    fn status(self) -> NtStatus {
        match self {
            Routine::A => NtStatus::REQUEST_ABORTED,
            Routine::B => NtStatus::IO_TIMEOUT,
        }
    }

    fn function(self) -> CancelRoutine<Probe> {
        match self {
            Routine::A => routine_a,
            Routine::B => routine_b,
        }
    }
}

fn record_call(ctx: &RxContext<Probe>, routine: Routine) -> NtStatus {
    let counters = &ctx.minirdr().counters;
    if irql::current() > Irql::APC {
        counters.above_apc.fetch_add(1, Ordering::SeqCst);
    }
    if !ctx.is_cancelled() {
        counters.not_cancelled.fetch_add(1, Ordering::SeqCst);
    }
    // Takes the slot lock: were the routine called under it, this would be the fatal
    // SPIN_LOCK_ALREADY_OWNED bug check (a panic even under `Record`).
    if ctx.has_cancel_routine() {
        counters.still_armed.fetch_add(1, Ordering::SeqCst);
    }
    counters
        .refs_seen
        .store(ctx.reference_count(), Ordering::SeqCst);
    counters.calls[routine.index()].fetch_add(1, Ordering::SeqCst);
    routine.status()
}

fn routine_a(ctx: &RxContext<Probe>) -> NtStatus {
    record_call(ctx, Routine::A)
}

fn routine_b(ctx: &RxContext<Probe>) -> NtStatus {
    record_call(ctx, Routine::B)
}

// ---------------------------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------------------------

/// An id argument: one issued earlier (index into the list of every id issued, modulo its
/// length), or a forged one that may or may not name a live context.
#[derive(Clone, Copy)]
enum IdSel {
    Issued(usize),
    Forged(RequestId),
}

impl fmt::Debug for IdSel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdSel::Issued(i) => write!(f, "Issued({i})"),
            IdSel::Forged(id) => write!(f, "Forged({id})"),
        }
    }
}

/// Raw values of forged ids: slot 0 / serial 0 (never issued), the first context's likely id,
/// small plausible ones, a slot in a bucket that is never allocated, and all ones.
const FORGED: [u64; 6] = [
    0,
    1 << 32,
    (2 << 32) | 1,
    (3 << 32) | 2,
    (1 << 32) | 1000,
    u64::MAX,
];

/// One API call. Handle (`h`), claim (`c`) and issued-id indices are taken modulo the current
/// pool's length; an operation whose pool is empty (or full, for one that adds a handle) is
/// skipped.
#[derive(Clone, Debug)]
enum Op {
    /// `create_context` with these flags (plus `CANCELLED` if `cancelled`).
    Create {
        flags: ContextFlags,
        cancelled: bool,
    },
    /// `set_minirdr_cancel_routine(Some(routine))`, at DISPATCH if `dispatch` (bug check 0xD1).
    Arm {
        h: usize,
        routine: Routine,
        dispatch: bool,
    },
    /// `set_minirdr_cancel_routine(None)`.
    Disarm { h: usize },
    /// `cancel()` on a handle, at DISPATCH if `dispatch` (bug check 0xD1, routine runs there).
    Cancel { h: usize, dispatch: bool },
    /// `claim_cancel()` at DISPATCH; the claim (and a clone of the handle) is kept to run later.
    ClaimAtDispatch { h: usize },
    /// Runs a kept claim at PASSIVE and drops its handle.
    RunClaim { c: usize },
    /// `Rdbss::cancel_by_id`, at DISPATCH if `dispatch`.
    CancelById { id: IdSel, dispatch: bool },
    /// `Rdbss::lookup`; the handle is kept if there is room, else dropped at once.
    Lookup { id: IdSel },
    /// `ContextRef::complete_request` (consumes the handle).
    CompleteHandle {
        h: usize,
        status: NtStatus,
        info: usize,
    },
    /// `Rdbss::complete_by_id`, at DISPATCH if `dispatch`.
    CompleteById {
        id: IdSel,
        status: NtStatus,
        info: usize,
        dispatch: bool,
    },
    /// `RxContext::complete_request` on a handle that stays.
    CompleteRx {
        h: usize,
        status: NtStatus,
        info: usize,
    },
    /// `clone()` (or `reference()`) of a handle.
    Clone { h: usize, via_reference: bool },
    /// `dereference()` of a handle, at DISPATCH if `dispatch`.
    Drop { h: usize, dispatch: bool },
    /// `into_id()` (consumes the handle).
    IntoId { h: usize },
    /// `Rdbss::dereference_by_id`, at DISPATCH if `dispatch`.
    DerefById { id: IdSel, dispatch: bool },
    /// `ContextRef::reinitialize`.
    Reinitialize { h: usize },
    /// `BlockedQueue::enqueue` on queue `q`.
    Enqueue { h: usize, q: usize },
    /// `resume_blocked_operations_serially` on queue `q`; the handle is kept if there is room.
    Resume { q: usize },
    /// `ManualWorkQueue::run_pending`.
    RunPending,
    /// `Rdbss::start_drain`.
    StartDrain,
    /// `set_flags` (plus `CANCELLED` if `cancelled`).
    SetFlags {
        h: usize,
        flags: ContextFlags,
        cancelled: bool,
    },
    /// `clear_flags` (plus `CANCELLED` if `cancelled`).
    ClearFlags {
        h: usize,
        flags: ContextFlags,
        cancelled: bool,
    },
}

/// The flags operations pick from (any subset): a mix of preserved, initialisation, blocked-queue
/// and plain flags.
const FLAG_CHOICES: [ContextFlags; 8] = [
    ContextFlags::WAIT,
    ContextFlags::FROM_POOL,
    ContextFlags::IN_FSP,
    ContextFlags::MUST_SUCCEED,
    ContextFlags::ASYNC_OPERATION,
    ContextFlags::IN_SERIALIZATION_QUEUE,
    ContextFlags::BLOCKED_PIPE_RESUME,
    ContextFlags::MINIRDR_INVOKED,
];

const STATUSES: [NtStatus; 4] = [
    NtStatus::SUCCESS,
    NtStatus::END_OF_FILE,
    NtStatus::CANCELLED,
    NtStatus::UNSUCCESSFUL,
];

fn flags_strategy() -> impl Strategy<Value = ContextFlags> {
    any::<u8>().prop_map(|bits| {
        FLAG_CHOICES
            .iter()
            .enumerate()
            .filter(|(i, _)| bits & (1 << i) != 0)
            .fold(ContextFlags::empty(), |acc, (_, f)| acc | *f)
    })
}

fn id_strategy() -> impl Strategy<Value = IdSel> {
    prop_oneof![
        5 => (0..64usize).prop_map(IdSel::Issued),
        1 => prop::sample::select(&FORGED[..])
            .prop_map(|raw| IdSel::Forged(RequestId::from_u64(raw))),
    ]
}

fn routine_strategy() -> impl Strategy<Value = Routine> {
    prop_oneof![Just(Routine::A), Just(Routine::B)]
}

fn status_strategy() -> impl Strategy<Value = NtStatus> {
    prop::sample::select(&STATUSES[..])
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let h = || 0..MAX_HANDLES;
    let rarely = || prop::bool::weighted(0.05);
    let sometimes = || prop::bool::weighted(0.2);
    prop_oneof![
        20 => (flags_strategy(), prop::bool::weighted(0.1))
            .prop_map(|(flags, cancelled)| Op::Create { flags, cancelled }),
        8 => (h(), routine_strategy(), rarely())
            .prop_map(|(h, routine, dispatch)| Op::Arm { h, routine, dispatch }),
        4 => h().prop_map(|h| Op::Disarm { h }),
        6 => (h(), rarely()).prop_map(|(h, dispatch)| Op::Cancel { h, dispatch }),
        4 => h().prop_map(|h| Op::ClaimAtDispatch { h }),
        4 => (0..MAX_CLAIMS).prop_map(|c| Op::RunClaim { c }),
        6 => (id_strategy(), any::<bool>())
            .prop_map(|(id, dispatch)| Op::CancelById { id, dispatch }),
        2 => id_strategy().prop_map(|id| Op::Lookup { id }),
        4 => (h(), status_strategy(), 0..3usize)
            .prop_map(|(h, status, info)| Op::CompleteHandle { h, status, info }),
        4 => (id_strategy(), status_strategy(), 0..3usize, sometimes()).prop_map(
            |(id, status, info, dispatch)| Op::CompleteById { id, status, info, dispatch }
        ),
        2 => (h(), status_strategy(), 0..3usize)
            .prop_map(|(h, status, info)| Op::CompleteRx { h, status, info }),
        6 => (h(), any::<bool>()).prop_map(|(h, via_reference)| Op::Clone { h, via_reference }),
        6 => (h(), sometimes()).prop_map(|(h, dispatch)| Op::Drop { h, dispatch }),
        4 => h().prop_map(|h| Op::IntoId { h }),
        4 => (id_strategy(), sometimes())
            .prop_map(|(id, dispatch)| Op::DerefById { id, dispatch }),
        2 => h().prop_map(|h| Op::Reinitialize { h }),
        6 => (h(), 0..2usize).prop_map(|(h, q)| Op::Enqueue { h, q }),
        4 => (0..2usize).prop_map(|q| Op::Resume { q }),
        4 => Just(Op::RunPending),
        1 => Just(Op::StartDrain),
        2 => (h(), flags_strategy(), prop::bool::weighted(0.3))
            .prop_map(|(h, flags, cancelled)| Op::SetFlags { h, flags, cancelled }),
        2 => (h(), flags_strategy(), prop::bool::weighted(0.3))
            .prop_map(|(h, flags, cancelled)| Op::ClearFlags { h, flags, cancelled }),
    ]
}

// ---------------------------------------------------------------------------------------------
// The reference model
// ---------------------------------------------------------------------------------------------

/// One context, from creation to its final dereference (and across reinitialisations).
#[derive(Clone, Debug)]
struct MCtx {
    slot: u32,
    serial: u32,
    /// 1 + successful reinitialisations: the routine may run once per incarnation.
    incarnations: usize,
    /// Every counted reference: handles, ids, queue entries, deferred work, kept claims.
    refs: usize,
    /// How many of `refs` are kept by id.
    kept: usize,
    flags: ContextFlags,
    routine: Option<Routine>,
    /// The blocked queue the context is linked into.
    queue: Option<usize>,
    blocked: BlockedState,
    completed: bool,
    status: NtStatus,
    info: usize,
    calls: [usize; 2],
    above_apc: usize,
    refs_seen: usize,
}

impl MCtx {
    fn live(&self) -> bool {
        self.refs > 0
    }

    fn cancelled(&self) -> bool {
        self.flags.contains(ContextFlags::CANCELLED)
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            slot: self.slot,
            serial: self.serial,
            cancelled: self.cancelled(),
            completed: self.completed,
            status: self.status,
            info: self.info,
            refs: self.refs,
            has_routine: self.routine.is_some(),
            blocked: self.blocked,
            flags: self.flags,
        }
    }
}

/// The model's `CancelClaim`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum MClaim {
    Routine(Routine),
    NoRoutineArmed,
    BlockedOperationCancelled,
    AlreadyCancelled,
}

/// An expected bug check: code and parameters.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct ExpectedBugCheck {
    code: BugCheckCode,
    parameters: [usize; 4],
}

/// The bug check for a `<= APC_LEVEL` routine called at DISPATCH.
const D1_AT_DISPATCH: ExpectedBugCheck = ExpectedBugCheck {
    code: BugCheckCode::DRIVER_IRQL_NOT_LESS_OR_EQUAL,
    parameters: [0, 2, 1, 0],
};

#[derive(Debug)]
struct Model {
    ctxs: Vec<MCtx>,
    /// The object of each real handle, in the same order.
    handles: Vec<usize>,
    queues: [VecDeque<usize>; 2],
    /// Deferred cancels in the work queue: object and claimed routine.
    deferred: VecDeque<(usize, Routine)>,
    /// Kept claims: object and claim, in the same order as the real ones.
    claims: Vec<(usize, MClaim)>,
    next_serial: u32,
    draining: bool,
    bugchecks: Vec<ExpectedBugCheck>,
}

impl Model {
    fn new() -> Self {
        Model {
            ctxs: Vec::new(),
            handles: Vec::new(),
            queues: [VecDeque::new(), VecDeque::new()],
            deferred: VecDeque::new(),
            claims: Vec::new(),
            next_serial: 1,
            draining: false,
            bugchecks: Vec::new(),
        }
    }

    fn active(&self) -> usize {
        self.ctxs.iter().filter(|c| c.live()).count()
    }

    /// The live object an id names, if any.
    fn find(&self, id: RequestId) -> Option<usize> {
        self.ctxs
            .iter()
            .position(|c| c.live() && c.slot == id.slot() && c.serial == id.serial_number())
    }

    fn take_serial(&mut self) -> u32 {
        let serial = self.next_serial;
        self.next_serial += 1;
        serial
    }

    /// A new object in registry slot `slot`: which slot is the implementation's choice (the
    /// harness checks that no live context holds it), the serial number is the next one.
    fn create(&mut self, flags: ContextFlags, slot: u32) -> Result<usize, NtStatus> {
        if flags.contains(ContextFlags::CANCELLED) {
            return Err(NtStatus::INVALID_PARAMETER);
        }
        if self.draining {
            return Err(NtStatus::INVALID_DEVICE_STATE);
        }
        let serial = self.take_serial();
        self.ctxs.push(MCtx {
            slot,
            serial,
            incarnations: 1,
            refs: 1,
            kept: 0,
            flags,
            routine: None,
            queue: None,
            blocked: BlockedState::NotBlocked,
            completed: false,
            status: NtStatus::SUCCESS,
            info: 0,
            calls: [0, 0],
            above_apc: 0,
            refs_seen: 0,
        });
        Ok(self.ctxs.len() - 1)
    }

    /// Drops one reference; the last one frees the object (and so its slot).
    fn unref(&mut self, o: usize) -> Dereferenced {
        let c = &mut self.ctxs[o];
        assert!(c.refs > 0, "model: dereference of a freed object {o}");
        c.refs -= 1;
        if c.refs == 0 {
            assert!(c.queue.is_none(), "model: freed while queued");
            Dereferenced::Freed
        } else {
            Dereferenced::StillReferenced
        }
    }

    fn set_routine(&mut self, o: usize, routine: Option<Routine>) -> Result<(), Cancelled> {
        let c = &mut self.ctxs[o];
        if c.cancelled() {
            return Err(Cancelled);
        }
        c.routine = routine;
        Ok(())
    }

    fn complete(&mut self, o: usize, status: NtStatus, info: usize) -> Result<(), NtStatus> {
        let c = &mut self.ctxs[o];
        if c.completed {
            self.bugchecks.push(ExpectedBugCheck {
                code: BugCheckCode::MULTIPLE_IRP_COMPLETE_REQUESTS,
                parameters: [
                    c.serial as usize,
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

    /// The first half of a cancel (`claim_cancel`). The caller holds a reference.
    fn claim(&mut self, o: usize) -> MClaim {
        let c = &mut self.ctxs[o];
        if c.cancelled() {
            return MClaim::AlreadyCancelled;
        }
        c.flags |= ContextFlags::CANCELLED;
        let routine = c.routine.take();
        if let Some(q) = c.queue.take() {
            // Unlinked and completed with STATUS_CANCELLED; the armed routine is dropped.
            c.blocked = BlockedState::Cancelled;
            c.flags -= ContextFlags::IN_SERIALIZATION_QUEUE;
            let at = self.queues[q]
                .iter()
                .position(|&x| x == o)
                .expect("model: linked means queued");
            self.queues[q].remove(at);
            let _ = self.complete(o, NtStatus::CANCELLED, 0);
            // The queue's reference; the caller's keeps the object alive.
            let _ = self.unref(o);
            return MClaim::BlockedOperationCancelled;
        }
        match routine {
            Some(r) => MClaim::Routine(r),
            None => MClaim::NoRoutineArmed,
        }
    }

    /// Records a call of `routine` on `o` as the real routine would see it.
    fn call(&mut self, o: usize, routine: Routine, above_apc: bool) -> NtStatus {
        let c = &mut self.ctxs[o];
        c.calls[routine.index()] += 1;
        if above_apc {
            c.above_apc += 1;
        }
        c.refs_seen = c.refs;
        routine.status()
    }

    /// The second half of a cancel (`CancelClaim::run`).
    fn run_claim(&mut self, o: usize, claim: MClaim, above_apc: bool) -> CancelOutcome {
        match claim {
            MClaim::Routine(r) => CancelOutcome::RoutineCalled(self.call(o, r, above_apc)),
            MClaim::NoRoutineArmed => CancelOutcome::NoRoutineArmed,
            MClaim::BlockedOperationCancelled => CancelOutcome::BlockedOperationCancelled,
            MClaim::AlreadyCancelled => CancelOutcome::AlreadyCancelled,
        }
    }

    fn cancel_by_id(
        &mut self,
        id: RequestId,
        dispatch: bool,
    ) -> Result<CancelByIdOutcome, NtStatus> {
        let o = self.find(id).ok_or(NtStatus::NOT_FOUND)?;
        if self.ctxs[o].completed {
            return Ok(CancelByIdOutcome::AlreadyCompleted);
        }
        // The lookup's reference, held for the cancel.
        self.ctxs[o].refs += 1;
        let claim = self.claim(o);
        if dispatch {
            if let MClaim::Routine(r) = claim {
                // The reference moves into the deferred item.
                self.deferred.push_back((o, r));
                return Ok(CancelByIdOutcome::Deferred);
            }
        }
        let outcome = self.run_claim(o, claim, false);
        let _ = self.unref(o);
        Ok(CancelByIdOutcome::Cancelled(outcome))
    }

    fn dereference_by_id(&mut self, id: RequestId) -> Result<Dereferenced, NtStatus> {
        let o = self.find(id).ok_or(NtStatus::NOT_FOUND)?;
        if self.ctxs[o].kept == 0 {
            return Err(NtStatus::INVALID_PARAMETER);
        }
        self.ctxs[o].kept -= 1;
        Ok(self.unref(o))
    }

    fn reinitialize(&mut self, o: usize) -> Result<(u32, u32), NtStatus> {
        if self.ctxs[o].refs != 1 {
            return Err(NtStatus::INVALID_DEVICE_STATE);
        }
        let serial = self.take_serial();
        let c = &mut self.ctxs[o];
        assert!(
            c.queue.is_none() && c.kept == 0,
            "model: refs 1 but more held"
        );
        c.serial = serial;
        c.incarnations += 1;
        c.flags &= ContextFlags::PRESERVED | ContextFlags::INITIALIZATION;
        c.routine = None;
        c.blocked = BlockedState::NotBlocked;
        c.completed = false;
        c.status = NtStatus::SUCCESS;
        c.info = 0;
        Ok((c.slot, c.serial))
    }

    fn enqueue(&mut self, o: usize, q: usize) -> Result<(), NtStatus> {
        let c = &mut self.ctxs[o];
        if c.cancelled() {
            return Err(NtStatus::CANCELLED);
        }
        if c.queue.is_some() || c.routine.is_some() {
            return Err(NtStatus::INVALID_PARAMETER);
        }
        c.queue = Some(q);
        c.blocked = BlockedState::Waiting;
        c.flags |= ContextFlags::IN_SERIALIZATION_QUEUE;
        c.refs += 1;
        self.queues[q].push_back(o);
        Ok(())
    }

    /// Takes the next waiting object off queue `q`; its queue reference goes to the caller.
    fn resume(&mut self, q: usize) -> Option<usize> {
        let o = self.queues[q].pop_front()?;
        let c = &mut self.ctxs[o];
        c.queue = None;
        c.blocked = BlockedState::Resumed;
        c.flags -= ContextFlags::IN_SERIALIZATION_QUEUE;
        c.flags |= ContextFlags::BLOCKED_PIPE_RESUME;
        Some(o)
    }

    fn update_flags(
        &mut self,
        o: usize,
        flags: ContextFlags,
        set: bool,
    ) -> Result<ContextFlags, NtStatus> {
        if flags.contains(ContextFlags::CANCELLED) {
            return Err(NtStatus::INVALID_PARAMETER);
        }
        let c = &mut self.ctxs[o];
        let old = c.flags;
        if set {
            c.flags |= flags;
        } else {
            c.flags -= flags;
        }
        Ok(old)
    }

    fn drain_status(&self) -> DrainStatus {
        match (self.draining, self.active()) {
            (true, 0) => DrainStatus::Drained,
            (_, active) => DrainStatus::Active(active),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The real side and the comparison
// ---------------------------------------------------------------------------------------------

/// What the test can observe of one context.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Snapshot {
    slot: u32,
    serial: u32,
    cancelled: bool,
    completed: bool,
    status: NtStatus,
    info: usize,
    refs: usize,
    has_routine: bool,
    blocked: BlockedState,
    flags: ContextFlags,
}

fn snapshot(c: &RxContext<Probe>, id: RequestId) -> Snapshot {
    Snapshot {
        slot: id.slot(),
        serial: c.serial_number(),
        cancelled: c.is_cancelled(),
        completed: c.is_completed(),
        status: c.stored_status(),
        info: c.information(),
        refs: c.reference_count(),
        has_routine: c.has_cancel_routine(),
        blocked: c.blocked_state(),
        flags: c.flags(),
    }
}

fn claim_kind(claim: &CancelClaim<Probe>) -> &'static str {
    match claim {
        CancelClaim::Routine(_) => "Routine",
        CancelClaim::NoRoutineArmed => "NoRoutineArmed",
        CancelClaim::BlockedOperationCancelled => "BlockedOperationCancelled",
        CancelClaim::AlreadyCancelled => "AlreadyCancelled",
    }
}

fn mclaim_kind(claim: MClaim) -> &'static str {
    match claim {
        MClaim::Routine(_) => "Routine",
        MClaim::NoRoutineArmed => "NoRoutineArmed",
        MClaim::BlockedOperationCancelled => "BlockedOperationCancelled",
        MClaim::AlreadyCancelled => "AlreadyCancelled",
    }
}

/// Raises to DISPATCH for the guard's life if `dispatch`.
fn at(dispatch: bool) -> Option<IrqlGuard> {
    dispatch.then(|| irql::raise(Irql::DISPATCH))
}

fn pick(len: usize, i: usize) -> Option<usize> {
    (len > 0).then(|| i % len)
}

struct Harness {
    model: Model,
    rdbss: Rdbss<Probe>,
    work: Arc<ManualWorkQueue<Probe>>,
    queues: [BlockedQueue<Probe>; 2],
    handles: Vec<ContextRef<Probe>>,
    claims: Vec<(CancelClaim<Probe>, ContextRef<Probe>)>,
    /// Every object's counters, by object number.
    counters: Vec<Arc<Counters>>,
    /// Every id issued (from create, reinitialize, into_id), without duplicates.
    ids: Vec<RequestId>,
    /// `bugcheck::count()` after the previous step.
    bugchecks_seen: usize,
}

impl Harness {
    fn new() -> Self {
        let work = ManualWorkQueue::new();
        Harness {
            model: Model::new(),
            rdbss: Rdbss::with_work_queue(work.clone()),
            work,
            queues: [BlockedQueue::new(), BlockedQueue::new()],
            handles: Vec::new(),
            claims: Vec::new(),
            counters: Vec::new(),
            ids: Vec::new(),
            bugchecks_seen: 0,
        }
    }

    fn remember_id(&mut self, id: RequestId) {
        if !self.ids.contains(&id) {
            self.ids.push(id);
        }
    }

    fn resolve(&self, sel: IdSel) -> Option<RequestId> {
        match sel {
            IdSel::Issued(i) => pick(self.ids.len(), i).map(|i| self.ids[i]),
            IdSel::Forged(id) => Some(id),
        }
    }

    /// The object a real context belongs to, by its counters.
    fn object_of(&self, c: &RxContext<Probe>) -> Option<usize> {
        self.counters
            .iter()
            .position(|k| Arc::ptr_eq(k, &c.minirdr().counters))
    }

    fn ensure_object(&self, c: &RxContext<Probe>, o: usize, what: &str) -> Result<(), String> {
        ensure_eq!(self.object_of(c), Some(o), "{what}: which context");
        Ok(())
    }

    /// Keeps a handle the implementation gave out (object `o`), or drops it at once if the pool
    /// is full.
    fn keep_or_drop(&mut self, handle: ContextRef<Probe>, o: usize) -> Result<(), String> {
        if self.handles.len() < MAX_HANDLES {
            self.handles.push(handle);
            self.model.handles.push(o);
        } else {
            let real = handle.dereference();
            ensure_eq!(real, self.model.unref(o), "dropping an extra handle");
        }
        Ok(())
    }

    /// Runs one operation on both sides and compares the results. Returns a label of what
    /// happened (for the coverage tally), `None` if the operation was skipped.
    fn step(&mut self, op: &Op) -> Result<Option<String>, String> {
        let label = match *op {
            Op::Create { flags, cancelled } => {
                if self.handles.len() >= MAX_HANDLES {
                    return Ok(None);
                }
                let flags = if cancelled {
                    flags | ContextFlags::CANCELLED
                } else {
                    flags
                };
                let counters = Arc::new(Counters::default());
                let init = ContextInit {
                    // Ignored: the instance numbers contexts itself.
                    serial_number: 4242,
                    major_function: MajorFunction::READ,
                    minor_function: 0,
                    flags,
                };
                let real = self.rdbss.create_context(
                    init,
                    Probe {
                        counters: counters.clone(),
                    },
                );
                // The slot is the implementation's choice, but must not be in use.
                let slot = real.as_ref().map_or(u32::MAX, |h| h.id().slot());
                if real.is_ok() {
                    if let Some(other) = self
                        .model
                        .ctxs
                        .iter()
                        .position(|c| c.live() && c.slot == slot)
                    {
                        return Err(format!(
                            "create: slot {slot} is still held by live object {other}"
                        ));
                    }
                }
                let summary = match (real, self.model.create(flags, slot)) {
                    (Ok(handle), Ok(o)) => {
                        let c = &self.model.ctxs[o];
                        let id = handle.id();
                        ensure_eq!(
                            (id.slot(), id.serial_number()),
                            (c.slot, c.serial),
                            "create: id"
                        );
                        self.counters.push(counters);
                        self.handles.push(handle);
                        self.model.handles.push(o);
                        self.remember_id(id);
                        Ok(())
                    }
                    (Err((status, given_back)), Err(expected)) => {
                        ensure_eq!(status, expected, "create: status");
                        if !Arc::ptr_eq(&given_back.counters, &counters) {
                            return Err("create: the mini-redirector state handed back is not \
                                        the one given"
                                .into());
                        }
                        Err(status)
                    }
                    (real, expected) => {
                        return Err(format!(
                            "create: implementation {:?}, model {:?}",
                            real.map(|h| h.id()).map_err(|(s, _)| s),
                            expected
                        ))
                    }
                };
                label("create", &summary)
            }
            Op::Arm {
                h,
                routine,
                dispatch,
            } => {
                let Some(i) = pick(self.handles.len(), h) else {
                    return Ok(None);
                };
                let guard = at(dispatch);
                let real = self.handles[i].set_minirdr_cancel_routine(Some(routine.function()));
                drop(guard);
                if dispatch {
                    self.model.bugchecks.push(D1_AT_DISPATCH);
                }
                let o = self.model.handles[i];
                ensure_eq!(real, self.model.set_routine(o, Some(routine)), "arm");
                label(if dispatch { "arm at DISPATCH" } else { "arm" }, &real)
            }
            Op::Disarm { h } => {
                let Some(i) = pick(self.handles.len(), h) else {
                    return Ok(None);
                };
                let real = self.handles[i].set_minirdr_cancel_routine(None);
                let o = self.model.handles[i];
                ensure_eq!(real, self.model.set_routine(o, None), "disarm");
                label("disarm", &real)
            }
            Op::Cancel { h, dispatch } => {
                let Some(i) = pick(self.handles.len(), h) else {
                    return Ok(None);
                };
                let guard = at(dispatch);
                let real = self.handles[i].cancel();
                drop(guard);
                if dispatch {
                    self.model.bugchecks.push(D1_AT_DISPATCH);
                }
                let o = self.model.handles[i];
                let claim = self.model.claim(o);
                let expected = self.model.run_claim(o, claim, dispatch);
                ensure_eq!(real, expected, "cancel");
                label(
                    if dispatch {
                        "cancel at DISPATCH"
                    } else {
                        "cancel"
                    },
                    &real,
                )
            }
            Op::ClaimAtDispatch { h } => {
                let Some(i) = pick(self.handles.len(), h) else {
                    return Ok(None);
                };
                if self.claims.len() >= MAX_CLAIMS {
                    return Ok(None);
                }
                let guard = at(true);
                let real = self.handles[i].claim_cancel();
                drop(guard);
                let o = self.model.handles[i];
                let expected = self.model.claim(o);
                let kind = claim_kind(&real);
                // Kept even on a mismatch, so the routine is not silently lost.
                self.claims.push((real, self.handles[i].clone()));
                self.model.ctxs[o].refs += 1;
                self.model.claims.push((o, expected));
                ensure_eq!(kind, mclaim_kind(expected), "claim_cancel at DISPATCH");
                format!("claim_cancel at DISPATCH: {kind}")
            }
            Op::RunClaim { c } => {
                let Some(i) = pick(self.claims.len(), c) else {
                    return Ok(None);
                };
                let (claim, handle) = self.claims.remove(i);
                let (o, expected) = self.model.claims.remove(i);
                let outcome = claim.run(&handle);
                ensure_eq!(
                    outcome,
                    self.model.run_claim(o, expected, false),
                    "claim run"
                );
                let real = handle.dereference();
                ensure_eq!(real, self.model.unref(o), "claim's handle dropped");
                label("run claim", &outcome)
            }
            Op::CancelById { id, dispatch } => {
                let Some(id) = self.resolve(id) else {
                    return Ok(None);
                };
                let guard = at(dispatch);
                let real = self.rdbss.cancel_by_id(id);
                drop(guard);
                ensure_eq!(
                    real,
                    self.model.cancel_by_id(id, dispatch),
                    "cancel_by_id({id:?})"
                );
                let what = if dispatch {
                    "cancel_by_id at DISPATCH"
                } else {
                    "cancel_by_id"
                };
                label(what, &real)
            }
            Op::Lookup { id } => {
                let Some(id) = self.resolve(id) else {
                    return Ok(None);
                };
                match (self.rdbss.lookup(id), self.model.find(id)) {
                    (Ok(handle), Some(o)) => {
                        self.model.ctxs[o].refs += 1;
                        self.ensure_object(&handle, o, "lookup")?;
                        self.keep_or_drop(handle, o)?;
                        "lookup: found".to_string()
                    }
                    (Err(status), None) => {
                        ensure_eq!(status, NtStatus::NOT_FOUND, "lookup({id:?})");
                        label("lookup", &status)
                    }
                    (real, expected) => {
                        return Err(format!(
                            "lookup({id:?}): implementation {:?}, model object {:?}",
                            real.map(|h| h.id()),
                            expected
                        ))
                    }
                }
            }
            Op::CompleteHandle { h, status, info } => {
                let Some(i) = pick(self.handles.len(), h) else {
                    return Ok(None);
                };
                let handle = self.handles.remove(i);
                let o = self.model.handles.remove(i);
                let real = handle.complete_request(status, info);
                let expected = self.model.complete(o, status, info);
                let _ = self.model.unref(o);
                ensure_eq!(real, expected, "ContextRef::complete_request");
                label("ContextRef::complete_request", &real)
            }
            Op::CompleteById {
                id,
                status,
                info,
                dispatch,
            } => {
                let Some(id) = self.resolve(id) else {
                    return Ok(None);
                };
                let guard = at(dispatch);
                let real = self.rdbss.complete_by_id(id, status, info);
                drop(guard);
                let expected = match self.model.find(id) {
                    None => Err(NtStatus::NOT_FOUND),
                    Some(o) => self.model.complete(o, status, info),
                };
                ensure_eq!(real, expected, "complete_by_id({id:?})");
                let what = if dispatch {
                    "complete_by_id at DISPATCH"
                } else {
                    "complete_by_id"
                };
                label(what, &real)
            }
            Op::CompleteRx { h, status, info } => {
                let Some(i) = pick(self.handles.len(), h) else {
                    return Ok(None);
                };
                let real = RxContext::complete_request(&self.handles[i], status, info);
                let o = self.model.handles[i];
                ensure_eq!(
                    real,
                    self.model.complete(o, status, info),
                    "RxContext::complete_request"
                );
                label("RxContext::complete_request", &real)
            }
            Op::Clone { h, via_reference } => {
                let Some(i) = pick(self.handles.len(), h) else {
                    return Ok(None);
                };
                if self.handles.len() >= MAX_HANDLES {
                    return Ok(None);
                }
                let handle = if via_reference {
                    self.handles[i].reference()
                } else {
                    self.handles[i].clone()
                };
                let o = self.model.handles[i];
                self.model.ctxs[o].refs += 1;
                self.handles.push(handle);
                self.model.handles.push(o);
                "clone".to_string()
            }
            Op::Drop { h, dispatch } => {
                let Some(i) = pick(self.handles.len(), h) else {
                    return Ok(None);
                };
                let handle = self.handles.remove(i);
                let o = self.model.handles.remove(i);
                let guard = at(dispatch);
                let real = handle.dereference();
                drop(guard);
                ensure_eq!(real, self.model.unref(o), "dereference");
                let what = if dispatch {
                    "dereference at DISPATCH"
                } else {
                    "dereference"
                };
                label(what, &real)
            }
            Op::IntoId { h } => {
                let Some(i) = pick(self.handles.len(), h) else {
                    return Ok(None);
                };
                let handle = self.handles.remove(i);
                let o = self.model.handles.remove(i);
                let id = handle.into_id();
                self.model.ctxs[o].kept += 1;
                let c = &self.model.ctxs[o];
                ensure_eq!(
                    (id.slot(), id.serial_number()),
                    (c.slot, c.serial),
                    "into_id"
                );
                self.remember_id(id);
                "into_id".to_string()
            }
            Op::DerefById { id, dispatch } => {
                let Some(id) = self.resolve(id) else {
                    return Ok(None);
                };
                let guard = at(dispatch);
                let real = self.rdbss.dereference_by_id(id);
                drop(guard);
                ensure_eq!(
                    real,
                    self.model.dereference_by_id(id),
                    "dereference_by_id({id:?})"
                );
                let what = if dispatch {
                    "dereference_by_id at DISPATCH"
                } else {
                    "dereference_by_id"
                };
                label(what, &real)
            }
            Op::Reinitialize { h } => {
                let Some(i) = pick(self.handles.len(), h) else {
                    return Ok(None);
                };
                let real = self.handles[i].reinitialize();
                let o = self.model.handles[i];
                let expected = self.model.reinitialize(o);
                ensure_eq!(
                    real.map(|id| (id.slot(), id.serial_number())),
                    expected,
                    "reinitialize"
                );
                if let Ok(id) = real {
                    ensure_eq!(id, self.handles[i].id(), "reinitialize: returned id");
                    self.remember_id(id);
                }
                label("reinitialize", &real.map(|_| ()))
            }
            Op::Enqueue { h, q } => {
                let Some(i) = pick(self.handles.len(), h) else {
                    return Ok(None);
                };
                let real = self.queues[q].enqueue(&self.handles[i]);
                let o = self.model.handles[i];
                ensure_eq!(real, self.model.enqueue(o, q), "enqueue on queue {q}");
                label("enqueue", &real)
            }
            Op::Resume { q } => {
                let real = self.queues[q].resume_blocked_operations_serially();
                match (real, self.model.resume(q)) {
                    (None, None) => "resume: None".to_string(),
                    (Some(handle), Some(o)) => {
                        self.ensure_object(&handle, o, "resume")?;
                        self.keep_or_drop(handle, o)?;
                        "resume: Some".to_string()
                    }
                    (real, expected) => {
                        return Err(format!(
                            "resume on queue {q}: implementation {:?}, model object {:?}",
                            real.map(|h| h.id()),
                            expected
                        ))
                    }
                }
            }
            Op::RunPending => {
                let ran = self.work.run_pending();
                let expected = self.model.deferred.len();
                while let Some((o, r)) = self.model.deferred.pop_front() {
                    self.model.call(o, r, false);
                    let _ = self.model.unref(o);
                }
                ensure_eq!(ran, expected, "run_pending: items run");
                let what = if ran > 0 { "ran items" } else { "nothing" };
                format!("run_pending: {what}")
            }
            Op::StartDrain => {
                self.rdbss.start_drain();
                self.model.draining = true;
                "start_drain".to_string()
            }
            Op::SetFlags {
                h,
                flags,
                cancelled,
            }
            | Op::ClearFlags {
                h,
                flags,
                cancelled,
            } => {
                let Some(i) = pick(self.handles.len(), h) else {
                    return Ok(None);
                };
                let set = matches!(op, Op::SetFlags { .. });
                let flags = if cancelled {
                    flags | ContextFlags::CANCELLED
                } else {
                    flags
                };
                let real = if set {
                    self.handles[i].set_flags(flags)
                } else {
                    self.handles[i].clear_flags(flags)
                };
                let o = self.model.handles[i];
                ensure_eq!(
                    real,
                    self.model.update_flags(o, flags, set),
                    "{} {flags:?}",
                    if set { "set_flags" } else { "clear_flags" }
                );
                let what = if set { "set_flags" } else { "clear_flags" };
                label(what, &real.map(|_| ()))
            }
        };
        Ok(Some(label))
    }

    /// Compares everything observable with the model.
    fn check(&mut self) -> Result<(), String> {
        let m = &self.model;
        if irql::current() != Irql::PASSIVE {
            return Err(format!("IRQL left at {:?}", irql::current()));
        }
        ensure_eq!(self.rdbss.active_contexts(), m.active(), "active_contexts");
        ensure_eq!(self.rdbss.is_draining(), m.draining, "is_draining");
        ensure_eq!(self.rdbss.drain_status(), m.drain_status(), "drain_status");
        ensure_eq!(self.work.len(), m.deferred.len(), "work queue length");
        for q in 0..2 {
            ensure_eq!(self.queues[q].len(), m.queues[q].len(), "queue {q} length");
        }

        // Bug checks: the count, and the code and parameters of each new one.
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

        // Every live handle.
        for (i, (handle, &o)) in self.handles.iter().zip(&m.handles).enumerate() {
            self.ensure_object(handle, o, &format!("handle {i}"))?;
            ensure_eq!(
                snapshot(handle, handle.id()),
                m.ctxs[o].snapshot(),
                "handle {i} (object {o})"
            );
        }

        // Every id ever issued: found or not, which context, and its state.
        for &id in &self.ids {
            match (self.rdbss.lookup(id), m.find(id)) {
                (Ok(found), Some(o)) => {
                    self.ensure_object(&found, o, &format!("lookup({id:?})"))?;
                    let mut expected = m.ctxs[o].snapshot();
                    expected.refs += 1; // the lookup's own reference
                    ensure_eq!(
                        snapshot(&found, id),
                        expected,
                        "lookup({id:?}) (object {o})"
                    );
                }
                (Err(NtStatus::NOT_FOUND), None) => {}
                (real, expected) => {
                    return Err(format!(
                        "lookup({id:?}): implementation {:?}, model object {:?}",
                        real.map(|h| h.id()),
                        expected
                    ))
                }
            }
        }

        // Every object's routine calls, also of freed objects.
        for (o, (k, c)) in self.counters.iter().zip(&m.ctxs).enumerate() {
            let calls = [
                k.calls[0].load(Ordering::SeqCst),
                k.calls[1].load(Ordering::SeqCst),
            ];
            ensure_eq!(calls, c.calls, "object {o}: calls of routines [A, B]");
            ensure_eq!(
                k.above_apc.load(Ordering::SeqCst),
                c.above_apc,
                "object {o}: calls above APC_LEVEL"
            );
            ensure_eq!(
                k.not_cancelled.load(Ordering::SeqCst),
                0,
                "object {o}: calls on a context not CANCELLED"
            );
            ensure_eq!(
                k.still_armed.load(Ordering::SeqCst),
                0,
                "object {o}: calls that found a routine still armed"
            );
            ensure_eq!(
                k.refs_seen.load(Ordering::SeqCst),
                c.refs_seen,
                "object {o}: reference count seen by the last call"
            );
            // The model itself: at most one call per incarnation.
            if c.calls[0] + c.calls[1] > c.incarnations {
                return Err(format!("model: object {o} called more than once: {c:?}"));
            }
        }
        Ok(())
    }

    /// Releases everything (both sides) and checks that nothing is left.
    fn finish(mut self) -> Result<(), String> {
        while !self.claims.is_empty() {
            self.step(&Op::RunClaim { c: 0 })?;
        }
        for q in 0..2 {
            while let Some(handle) = self.queues[q].resume_blocked_operations_serially() {
                let o = self
                    .model
                    .resume(q)
                    .ok_or("final resume: model queue empty")?;
                self.ensure_object(&handle, o, "final resume")?;
                let real = handle.dereference();
                ensure_eq!(real, self.model.unref(o), "final resume: dereference");
            }
        }
        while !self.handles.is_empty() {
            self.step(&Op::Drop {
                h: 0,
                dispatch: false,
            })?;
        }
        for o in 0..self.model.ctxs.len() {
            while self.model.ctxs[o].kept > 0 {
                let c = &self.model.ctxs[o];
                let id = self
                    .ids
                    .iter()
                    .copied()
                    .find(|id| id.slot() == c.slot && id.serial_number() == c.serial)
                    .ok_or("model: a kept id was never issued")?;
                self.step(&Op::DerefById {
                    id: IdSel::Forged(id),
                    dispatch: false,
                })?;
            }
        }
        self.step(&Op::RunPending)?;
        self.check()?;
        ensure_eq!(
            self.rdbss.active_contexts(),
            0,
            "active_contexts at the end"
        );
        if self.model.draining {
            ensure_eq!(
                self.rdbss.drain_status(),
                DrainStatus::Drained,
                "drain_status at the end"
            );
        }

        // Once the instance is gone, every context (and its mini-redirector state) is freed.
        let counters = std::mem::take(&mut self.counters);
        drop(self);
        for (o, k) in counters.iter().enumerate() {
            ensure_eq!(
                Arc::strong_count(k),
                1,
                "object {o}: mini-redirector state still alive after the instance was dropped"
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

/// Outcomes the random sequences must reach (checked when at least [`DEFAULT_CASES`] run), so
/// the generator cannot quietly stop exercising a path.
const MUST_SEE: &[&str] = &[
    "create: Ok(())",
    "create: Err(STATUS_INVALID_PARAMETER)",
    "create: Err(STATUS_INVALID_DEVICE_STATE)",
    "arm: Ok(())",
    "arm: Err(Cancelled)",
    "arm at DISPATCH: Ok(())",
    "disarm: Ok(())",
    "disarm: Err(Cancelled)",
    "cancel: RoutineCalled(STATUS_REQUEST_ABORTED)",
    "cancel: RoutineCalled(STATUS_IO_TIMEOUT)",
    "cancel: NoRoutineArmed",
    "cancel: BlockedOperationCancelled",
    "cancel: AlreadyCancelled",
    "claim_cancel at DISPATCH: Routine",
    "claim_cancel at DISPATCH: NoRoutineArmed",
    "claim_cancel at DISPATCH: BlockedOperationCancelled",
    "claim_cancel at DISPATCH: AlreadyCancelled",
    "run claim: RoutineCalled(STATUS_REQUEST_ABORTED)",
    "cancel_by_id: Err(STATUS_NOT_FOUND)",
    "cancel_by_id: Ok(AlreadyCompleted)",
    "cancel_by_id: Ok(Cancelled(RoutineCalled(STATUS_REQUEST_ABORTED)))",
    "cancel_by_id: Ok(Cancelled(NoRoutineArmed))",
    "cancel_by_id: Ok(Cancelled(BlockedOperationCancelled))",
    "cancel_by_id: Ok(Cancelled(AlreadyCancelled))",
    "cancel_by_id at DISPATCH: Ok(Deferred)",
    "cancel_by_id at DISPATCH: Ok(Cancelled(NoRoutineArmed))",
    "cancel_by_id at DISPATCH: Ok(Cancelled(BlockedOperationCancelled))",
    "lookup: found",
    "lookup: STATUS_NOT_FOUND",
    "ContextRef::complete_request: Ok(())",
    "ContextRef::complete_request: Err(STATUS_INVALID_DEVICE_STATE)",
    "complete_by_id: Ok(())",
    "complete_by_id: Err(STATUS_NOT_FOUND)",
    "complete_by_id: Err(STATUS_INVALID_DEVICE_STATE)",
    "RxContext::complete_request: Ok(())",
    "RxContext::complete_request: Err(STATUS_INVALID_DEVICE_STATE)",
    "clone",
    "dereference: Freed",
    "dereference: StillReferenced",
    "dereference at DISPATCH: Freed",
    "into_id",
    "dereference_by_id: Ok(Freed)",
    "dereference_by_id: Ok(StillReferenced)",
    "dereference_by_id: Err(STATUS_INVALID_PARAMETER)",
    "dereference_by_id: Err(STATUS_NOT_FOUND)",
    "reinitialize: Ok(())",
    "reinitialize: Err(STATUS_INVALID_DEVICE_STATE)",
    "enqueue: Ok(())",
    "enqueue: Err(STATUS_CANCELLED)",
    "enqueue: Err(STATUS_INVALID_PARAMETER)",
    "resume: Some",
    "resume: None",
    "run_pending: ran items",
    "start_drain",
    "set_flags: Ok(())",
    "set_flags: Err(STATUS_INVALID_PARAMETER)",
    "clear_flags: Ok(())",
    "clear_flags: Err(STATUS_INVALID_PARAMETER)",
    "bug check: MULTIPLE_IRP_COMPLETE_REQUESTS (0x00000044)",
    "bug check: DRIVER_IRQL_NOT_LESS_OR_EQUAL (0x000000D1)",
];

/// Simpler versions of one operation: smaller indices, PASSIVE instead of DISPATCH, fewer flags.
fn simpler(op: &Op) -> Vec<Op> {
    let below = |n: usize| 0..n.min(16);
    let ids = |sel: IdSel| -> Vec<IdSel> {
        match sel {
            IdSel::Issued(i) => below(i).map(IdSel::Issued).collect(),
            IdSel::Forged(_) => (0..4).map(IdSel::Issued).collect(),
        }
    };
    let flag_sets =
        |flags: ContextFlags| -> Vec<ContextFlags> { flags.iter().map(|f| flags - f).collect() };
    let mut out = Vec::new();
    match *op {
        Op::Create { flags, cancelled } => {
            out.extend(
                flag_sets(flags)
                    .into_iter()
                    .map(|flags| Op::Create { flags, cancelled }),
            );
        }
        Op::Arm {
            h,
            routine,
            dispatch,
        } => {
            out.extend(below(h).map(|h| Op::Arm {
                h,
                routine,
                dispatch,
            }));
            if routine == Routine::B {
                out.push(Op::Arm {
                    h,
                    routine: Routine::A,
                    dispatch,
                });
            }
            if dispatch {
                out.push(Op::Arm {
                    h,
                    routine,
                    dispatch: false,
                });
            }
        }
        Op::Disarm { h } => out.extend(below(h).map(|h| Op::Disarm { h })),
        Op::Cancel { h, dispatch } => {
            out.extend(below(h).map(|h| Op::Cancel { h, dispatch }));
            if dispatch {
                out.push(Op::Cancel { h, dispatch: false });
            }
        }
        Op::ClaimAtDispatch { h } => out.extend(below(h).map(|h| Op::ClaimAtDispatch { h })),
        Op::RunClaim { c } => out.extend(below(c).map(|c| Op::RunClaim { c })),
        Op::CancelById { id, dispatch } => {
            out.extend(
                ids(id)
                    .into_iter()
                    .map(|id| Op::CancelById { id, dispatch }),
            );
            if dispatch {
                out.push(Op::CancelById {
                    id,
                    dispatch: false,
                });
            }
        }
        Op::Lookup { id } => out.extend(ids(id).into_iter().map(|id| Op::Lookup { id })),
        Op::CompleteHandle { h, status, info } => {
            out.extend(below(h).map(|h| Op::CompleteHandle { h, status, info }));
        }
        Op::CompleteById {
            id,
            status,
            info,
            dispatch,
        } => {
            out.extend(ids(id).into_iter().map(|id| Op::CompleteById {
                id,
                status,
                info,
                dispatch,
            }));
            if dispatch {
                out.push(Op::CompleteById {
                    id,
                    status,
                    info,
                    dispatch: false,
                });
            }
        }
        Op::CompleteRx { h, status, info } => {
            out.extend(below(h).map(|h| Op::CompleteRx { h, status, info }));
        }
        Op::Clone { h, via_reference } => {
            out.extend(below(h).map(|h| Op::Clone { h, via_reference }));
        }
        Op::Drop { h, dispatch } => {
            out.extend(below(h).map(|h| Op::Drop { h, dispatch }));
            if dispatch {
                out.push(Op::Drop { h, dispatch: false });
            }
        }
        Op::IntoId { h } => out.extend(below(h).map(|h| Op::IntoId { h })),
        Op::DerefById { id, dispatch } => {
            out.extend(ids(id).into_iter().map(|id| Op::DerefById { id, dispatch }));
            if dispatch {
                out.push(Op::DerefById {
                    id,
                    dispatch: false,
                });
            }
        }
        Op::Reinitialize { h } => out.extend(below(h).map(|h| Op::Reinitialize { h })),
        Op::Enqueue { h, q } => {
            out.extend(below(h).map(|h| Op::Enqueue { h, q }));
            out.extend(below(q).map(|q| Op::Enqueue { h, q }));
        }
        Op::Resume { q } => out.extend(below(q).map(|q| Op::Resume { q })),
        Op::RunPending | Op::StartDrain => {}
        Op::SetFlags {
            h,
            flags,
            cancelled,
        } => {
            out.extend(below(h).map(|h| Op::SetFlags {
                h,
                flags,
                cancelled,
            }));
            out.extend(flag_sets(flags).into_iter().map(|flags| Op::SetFlags {
                h,
                flags,
                cancelled,
            }));
        }
        Op::ClearFlags {
            h,
            flags,
            cancelled,
        } => {
            out.extend(below(h).map(|h| Op::ClearFlags {
                h,
                flags,
                cancelled,
            }));
            out.extend(flag_sets(flags).into_iter().map(|flags| Op::ClearFlags {
                h,
                flags,
                cancelled,
            }));
        }
    }
    out
}

#[test]
fn implementation_matches_the_model() {
    let sequences = prop::collection::vec(op_strategy(), 1..=MAX_OPS);
    model_harness::check_property(sequences, run_case, simpler, DEFAULT_CASES, MUST_SEE);
}

/// The model runs a fixed, hand-written sequence too, so a broken model is caught even when the
/// random cases happen to miss a path.
#[test]
fn a_hand_written_sequence_matches_the_model() {
    let none = ContextFlags::empty();
    let ops = [
        Op::Create {
            flags: ContextFlags::WAIT | ContextFlags::ASYNC_OPERATION,
            cancelled: false,
        },
        Op::Create {
            flags: none,
            cancelled: true,
        },
        Op::Arm {
            h: 0,
            routine: Routine::A,
            dispatch: false,
        },
        Op::Arm {
            h: 0,
            routine: Routine::B,
            dispatch: false,
        },
        Op::Clone {
            h: 0,
            via_reference: true,
        },
        Op::Reinitialize { h: 0 },
        Op::CancelById {
            id: IdSel::Issued(0),
            dispatch: true,
        },
        Op::Disarm { h: 0 },
        Op::RunPending,
        Op::CompleteRx {
            h: 0,
            status: NtStatus::CANCELLED,
            info: 0,
        },
        Op::CompleteRx {
            h: 1,
            status: NtStatus::SUCCESS,
            info: 1,
        },
        Op::Drop {
            h: 1,
            dispatch: true,
        },
        Op::Reinitialize { h: 0 },
        Op::Create {
            flags: none,
            cancelled: false,
        },
        Op::Enqueue { h: 1, q: 1 },
        Op::Arm {
            h: 1,
            routine: Routine::A,
            dispatch: false,
        },
        Op::Cancel {
            h: 1,
            dispatch: false,
        },
        Op::IntoId { h: 0 },
        Op::DerefById {
            id: IdSel::Issued(1),
            dispatch: false,
        },
        Op::DerefById {
            id: IdSel::Issued(1),
            dispatch: false,
        },
        Op::StartDrain,
        Op::Create {
            flags: none,
            cancelled: false,
        },
        Op::SetFlags {
            h: 0,
            flags: ContextFlags::WAIT,
            cancelled: true,
        },
    ];
    model_harness::check_sequence(&ops, run_case);
}

// ---------------------------------------------------------------------------------------------
// Regressions for bugs found by reading or by the model (ignored until fixed)
// ---------------------------------------------------------------------------------------------

/// Dropping a [`BlockedQueue`] while an operation waits in it leaks that operation: the queue's
/// shared part holds a [`ContextRef`] to the context and the context's slot links back to the
/// shared part (an `Arc` cycle), and `BlockedQueue` has no `Drop` that breaks it. The context
/// stays `Waiting` and counted in `active_contexts()` after its last handle is dropped, so
/// `drain` never completes; only a later `cancel_by_id` (if someone kept the id) frees it.
///
/// Expected: once the queue and the last handle are gone, nothing is left (whether the queue's
/// drop resumes, cancels or completes its waiters is the maintainer's choice). No bug check is
/// involved, so this test does not need [`model_harness::record_policy`].
#[test]
fn dropping_a_blocked_queue_with_a_waiter_releases_it() {
    let rdbss: Rdbss<()> = Rdbss::with_work_queue(ManualWorkQueue::new());
    let ctx = rdbss.create_context(ContextInit::default(), ()).unwrap();
    let queue = BlockedQueue::new();
    queue.enqueue(&ctx).unwrap();
    drop(queue);
    assert_eq!(ctx.dereference(), Dereferenced::Freed);
    assert_eq!(rdbss.active_contexts(), 0);
}
