//! `context_calls`: sequences of core API calls on one `Rdbss` instance, valid and invalid,
//! decoded from the fuzzer's bytes with `arbitrary`.
//!
//! The harness keeps what it needs to *predict* every result: for each context it created (an
//! object) its current id, the references it knows of (handles it holds, references kept by id,
//! the blocked queue's, the deferred cancels'), the routine it armed, whether it is cancelled,
//! queued, completed (and with what). Every call's result is compared with the prediction, and
//! after every call:
//!
//! - the IRQL is back at `PASSIVE_LEVEL`;
//! - the bug checks recorded during the call are exactly the ones a documented rule gives
//!   (`MULTIPLE_IRP_COMPLETE_REQUESTS` 0x44 for a second completion, `DRIVER_IRQL_NOT_LESS_OR_EQUAL`
//!   0xD1 for arming / cancelling at DISPATCH); the run is under `BugCheckPolicy::Record`;
//! - every routine call is the one expected (the routine armed last, once per request life,
//!   never after a successful disarm), saw `CANCELLED`, an empty slot, a live reference, and ran
//!   at or below `APC_LEVEL` unless the call that ran it was itself reported (0xD1);
//! - a request is completed at most once (the first completion's status and information stay);
//! - every error status is the documented one for the call (and a named `STATUS_*`);
//! - every live handle's reference count, flags, cancel flag, completion, armed routine and
//!   blocked state match; `active_contexts` counts exactly the live objects; queue lengths match.
//!
//! At the end everything is released (claims run, deferred work run, queues resumed, every live
//! request completed by the protocol, kept ids dereferenced, handles dropped): then every request
//! alive at the end was completed exactly once, `active_contexts()` is 0, the drained instance
//! refuses creation, and once the instance is dropped every mini-redirector state was dropped
//! (no leak).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arbitrary::{Arbitrary, Unstructured};

use rdbss::bugcheck::{self, BugCheckCode, BugCheckPolicy};
use rdbss::irql::{self, Irql};
use rdbss::{
    BlockedQueue, BlockedState, CancelByIdOutcome, CancelClaim, CancelOutcome, CancelRoutine,
    Cancelled, ContextFlags, ContextInit, ContextRef, Dereferenced, DrainStatus, MajorFunction,
    ManualWorkQueue, NtStatus, Rdbss, RequestId, RxContext,
};

/// Operations per input, at most.
pub const MAX_OPS: usize = 128;
/// Live handles the harness holds at most.
const MAX_HANDLES: usize = 8;
/// Routine claims kept at most.
const MAX_CLAIMS: usize = 3;

const STATUSES: [NtStatus; 4] = [
    NtStatus::SUCCESS,
    NtStatus::END_OF_FILE,
    NtStatus::CANCELLED,
    NtStatus::UNSUCCESSFUL,
];

/// Which of the two test routines: A completes the request with `STATUS_CANCELLED` (as a
/// mini-redirector that owns the cancel side does), B only aborts (returns).
#[derive(Arbitrary, Clone, Copy, PartialEq, Eq, Debug)]
pub enum Routine {
    A,
    B,
}

impl Routine {
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

/// An id: one issued by the instance (any, also stale ones), or any 64-bit value.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum IdSel {
    Issued(u8),
    Raw(u64),
}

/// One call.
#[derive(Arbitrary, Clone, Debug)]
pub enum Op {
    Create {
        flags: u32,
        major: u8,
    },
    Arm {
        h: u8,
        routine: Routine,
        dispatch: bool,
    },
    Disarm {
        h: u8,
    },
    Cancel {
        h: u8,
        dispatch: bool,
    },
    ClaimAtDispatch {
        h: u8,
    },
    RunClaim {
        c: u8,
    },
    CancelById {
        id: IdSel,
        dispatch: bool,
    },
    Lookup {
        id: IdSel,
    },
    CompleteHandle {
        h: u8,
        status: u8,
        info: u16,
    },
    CompleteById {
        id: IdSel,
        status: u8,
        info: u16,
        dispatch: bool,
    },
    CompleteRx {
        h: u8,
        status: u8,
        info: u16,
    },
    Clone {
        h: u8,
    },
    Drop {
        h: u8,
        dispatch: bool,
    },
    IntoId {
        h: u8,
    },
    DerefById {
        id: IdSel,
        dispatch: bool,
    },
    Reinitialize {
        h: u8,
    },
    Enqueue {
        h: u8,
        q: bool,
    },
    Resume {
        q: bool,
    },
    RunPending,
    StartDrain,
    SetFlags {
        h: u8,
        flags: u32,
    },
    ClearFlags {
        h: u8,
        flags: u32,
    },
    /// The protocol's completion: disarm, then complete if the disarm won (`Ok`), or, if the
    /// cancel won and nothing completed yet (routine B, or no routine), complete as the cancel
    /// side with `STATUS_CANCELLED`.
    Finish {
        h: u8,
        status: u8,
    },
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

// ---------------------------------------------------------------------------------------------
// The mini-redirector state and routines
// ---------------------------------------------------------------------------------------------

/// What a routine call saw.
#[derive(Debug)]
struct RoutineCall {
    obj: usize,
    routine: Routine,
    serial: u32,
    irql: Irql,
    cancelled: bool,
    still_armed: bool,
    refs: usize,
    /// Routine A's completion: was the request completed before, and what completion returned.
    completion: Option<(bool, Result<(), NtStatus>)>,
}

#[derive(Default)]
struct Shared {
    calls: Mutex<Vec<RoutineCall>>,
    dropped: AtomicUsize,
}

/// The per-request state: which object, and the shared log.
pub struct Probe {
    obj: usize,
    shared: Arc<Shared>,
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.shared.dropped.fetch_add(1, Ordering::SeqCst);
    }
}

fn record(ctx: &RxContext<Probe>, routine: Routine) -> NtStatus {
    let probe = ctx.minirdr();
    let mut call = RoutineCall {
        obj: probe.obj,
        routine,
        serial: ctx.serial_number(),
        irql: irql::current(),
        cancelled: ctx.is_cancelled(),
        // Takes the slot lock: called under it, this is the fatal SPIN_LOCK_ALREADY_OWNED.
        still_armed: ctx.has_cancel_routine(),
        refs: ctx.reference_count(),
        completion: None,
    };
    if routine == Routine::A {
        let before = ctx.is_completed();
        call.completion = Some((before, ctx.complete_request(NtStatus::CANCELLED, 0)));
    }
    probe.shared.calls.lock().unwrap().push(call);
    routine.status()
}

fn routine_a(ctx: &RxContext<Probe>) -> NtStatus {
    record(ctx, Routine::A)
}

fn routine_b(ctx: &RxContext<Probe>) -> NtStatus {
    record(ctx, Routine::B)
}

// ---------------------------------------------------------------------------------------------
// The harness's knowledge
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct Obj {
    id: RequestId,
    /// Handles the harness holds (in `handles` and in kept claims).
    handles: usize,
    kept: usize,
    queued: Option<usize>,
    deferred: usize,
    armed: Option<Routine>,
    cancelled: bool,
    completed: Option<(NtStatus, usize)>,
    completions: u32,
    routine_calls: u32,
    flags: ContextFlags,
    blocked: BlockedState,
}

impl Obj {
    fn refs(&self) -> usize {
        self.handles + self.kept + usize::from(self.queued.is_some()) + self.deferred
    }
    fn live(&self) -> bool {
        self.refs() > 0
    }
}

/// What one call may legitimately produce.
#[derive(Default)]
struct Expect {
    bugchecks: Vec<u32>,
    calls: Vec<(usize, Routine)>,
    /// The call deliberately runs at DISPATCH where `<= APC_LEVEL` is required (reported 0xD1).
    at_dispatch: bool,
}

struct Harness {
    rdbss: Rdbss<Probe>,
    work: Arc<ManualWorkQueue<Probe>>,
    queues: [BlockedQueue<Probe>; 2],
    /// The queues' contents, in order (objects).
    fifo: [VecDeque<usize>; 2],
    handles: Vec<(usize, ContextRef<Probe>)>,
    claims: Vec<(usize, Routine, CancelClaim<Probe>, ContextRef<Probe>)>,
    /// Deferred cancels posted, in order: (object, routine).
    deferred: VecDeque<(usize, Routine)>,
    objs: Vec<Obj>,
    /// Every id ever issued (create, reinitialise).
    issued: Vec<RequestId>,
    draining: bool,
    shared: Arc<Shared>,
    created: usize,
}

/// `flags` without `remove`, keeping undefined bits (bitflags' `!` would drop them).
fn without(flags: ContextFlags, remove: ContextFlags) -> ContextFlags {
    ContextFlags::from_bits_retain(flags.bits() & !remove.bits())
}

fn pick<T>(v: &[T], i: u8) -> Option<usize> {
    (!v.is_empty()).then(|| usize::from(i) % v.len())
}

fn dispatch_guard(dispatch: bool) -> Option<irql::IrqlGuard> {
    dispatch.then(|| irql::raise(Irql::DISPATCH))
}

impl Harness {
    fn new() -> Self {
        let work = ManualWorkQueue::new();
        let rdbss = Rdbss::with_work_queue(work.clone());
        Harness {
            rdbss,
            work,
            queues: [BlockedQueue::new(), BlockedQueue::new()],
            fifo: [VecDeque::new(), VecDeque::new()],
            handles: Vec::new(),
            claims: Vec::new(),
            deferred: VecDeque::new(),
            objs: Vec::new(),
            issued: Vec::new(),
            draining: false,
            shared: Arc::new(Shared::default()),
            created: 0,
        }
    }

    fn resolve(&self, id: IdSel) -> RequestId {
        match id {
            IdSel::Issued(i) => match pick(&self.issued, i) {
                Some(i) => self.issued[i],
                None => RequestId::from_u64(u64::from(i)),
            },
            IdSel::Raw(raw) => RequestId::from_u64(raw),
        }
    }

    /// The live object with this id now.
    fn live_obj(&self, id: RequestId) -> Option<usize> {
        self.objs.iter().position(|o| o.live() && o.id == id)
    }

    fn obj_of(&self, handle: &ContextRef<Probe>) -> usize {
        let o = handle.minirdr().obj;
        assert_eq!(self.objs[o].id, handle.id(), "handle designates object {o}");
        o
    }

    /// Keeps a handle of object `o` (already counted by the caller) or drops it if full.
    fn keep(&mut self, o: usize, handle: ContextRef<Probe>) {
        assert_eq!(handle.minirdr().obj, o);
        if self.handles.len() < MAX_HANDLES {
            self.handles.push((o, handle));
        } else {
            let last = self.objs[o].refs() == 1;
            self.objs[o].handles -= 1;
            let d = handle.dereference();
            assert_eq!(d == Dereferenced::Freed, last, "dereference result");
        }
    }

    /// Records a completion attempt's outcome on object `o`.
    fn completion(
        &mut self,
        o: usize,
        before: bool,
        result: Result<(), NtStatus>,
        status: NtStatus,
        info: usize,
        e: &mut Expect,
    ) {
        let obj = &mut self.objs[o];
        assert_eq!(before, obj.completed.is_some(), "completion state of {o}");
        if before {
            assert_eq!(
                result,
                Err(NtStatus::INVALID_DEVICE_STATE),
                "second completion"
            );
            e.bugchecks
                .push(BugCheckCode::MULTIPLE_IRP_COMPLETE_REQUESTS.0);
        } else {
            assert_eq!(result, Ok(()), "first completion");
            obj.completed = Some((status, info));
            obj.completions += 1;
            assert_eq!(obj.completions, 1, "a request completed twice");
        }
    }

    /// What a cancel of object `o` does to the harness's knowledge, given the claim kind.
    /// Returns the routine taken (to be run) if any.
    fn predict_claim(
        &mut self,
        o: usize,
        e: &mut Expect,
    ) -> Result<Option<Routine>, CancelOutcome> {
        let obj = &mut self.objs[o];
        if obj.cancelled {
            return Err(CancelOutcome::AlreadyCancelled);
        }
        obj.cancelled = true;
        obj.flags |= ContextFlags::CANCELLED;
        let routine = obj.armed.take();
        if let Some(q) = obj.queued.take() {
            // Unlinked and completed with STATUS_CANCELLED; the routine (armed while waiting) is
            // dropped, not called.
            let at = self.fifo[q].iter().position(|&x| x == o).expect("queued");
            self.fifo[q].remove(at);
            let obj = &mut self.objs[o];
            obj.blocked = BlockedState::Cancelled;
            obj.flags = without(obj.flags, ContextFlags::IN_SERIALIZATION_QUEUE);
            let before = obj.completed.is_some();
            let result = if before {
                Err(NtStatus::INVALID_DEVICE_STATE)
            } else {
                Ok(())
            };
            self.completion(o, before, result, NtStatus::CANCELLED, 0, e);
            return Err(CancelOutcome::BlockedOperationCancelled);
        }
        match routine {
            Some(r) => Ok(Some(r)),
            None => Err(CancelOutcome::NoRoutineArmed),
        }
    }

    /// A cancel that runs the routine now: the expected outcome.
    fn predict_cancel(&mut self, o: usize, e: &mut Expect) -> CancelOutcome {
        match self.predict_claim(o, e) {
            Ok(Some(r)) => {
                e.calls.push((o, r));
                CancelOutcome::RoutineCalled(r.status())
            }
            Ok(None) => unreachable!(),
            Err(outcome) => outcome,
        }
    }

    fn step(&mut self, op: &Op) {
        bugcheck::clear();
        let mut e = Expect::default();
        self.apply(op, &mut e);
        self.check_after(op, e);
    }

    fn apply(&mut self, op: &Op, e: &mut Expect) {
        match *op {
            Op::Create { flags, major } => {
                let flags = ContextFlags::from_bits_retain(flags);
                let init = ContextInit {
                    serial_number: 0xdead,
                    major_function: MajorFunction(major),
                    minor_function: major,
                    flags,
                };
                let obj = self.objs.len();
                let probe = Probe {
                    obj,
                    shared: self.shared.clone(),
                };
                self.created += 1;
                let result = self.rdbss.create_context(init, probe);
                if flags.contains(ContextFlags::CANCELLED) {
                    let (status, _) = result.err().expect("CANCELLED initial flags refused");
                    assert_eq!(status, NtStatus::INVALID_PARAMETER);
                    return;
                }
                if self.draining {
                    let (status, _) = result.err().expect("create while draining refused");
                    assert_eq!(status, NtStatus::INVALID_DEVICE_STATE);
                    return;
                }
                let handle = result.map_err(|(s, _)| s).expect("create");
                let id = handle.id();
                assert!(self.live_obj(id).is_none(), "a new id names a live context");
                assert!(!self.issued.contains(&id), "an id was issued twice");
                assert_eq!(handle.serial_number(), id.serial_number());
                assert_eq!(handle.major_function(), MajorFunction(major));
                self.issued.push(id);
                self.objs.push(Obj {
                    id,
                    handles: 1,
                    kept: 0,
                    queued: None,
                    deferred: 0,
                    armed: None,
                    cancelled: false,
                    completed: None,
                    completions: 0,
                    routine_calls: 0,
                    flags,
                    blocked: BlockedState::NotBlocked,
                });
                self.keep(obj, handle);
            }
            Op::Arm {
                h,
                routine,
                dispatch,
            } => {
                let Some(i) = pick(&self.handles, h) else {
                    return;
                };
                let o = self.handles[i].0;
                if dispatch {
                    e.bugchecks
                        .push(BugCheckCode::DRIVER_IRQL_NOT_LESS_OR_EQUAL.0);
                }
                let result = {
                    let _g = dispatch_guard(dispatch);
                    self.handles[i]
                        .1
                        .set_minirdr_cancel_routine(Some(routine.function()))
                };
                let obj = &mut self.objs[o];
                if obj.cancelled {
                    assert_eq!(result, Err(Cancelled), "arming a cancelled context");
                } else {
                    assert_eq!(result, Ok(()), "arming");
                    obj.armed = Some(routine);
                }
            }
            Op::Disarm { h } => {
                let Some(i) = pick(&self.handles, h) else {
                    return;
                };
                let o = self.handles[i].0;
                let result = self.handles[i].1.set_minirdr_cancel_routine(None);
                let obj = &mut self.objs[o];
                if obj.cancelled {
                    assert_eq!(result, Err(Cancelled), "disarming a cancelled context");
                } else {
                    assert_eq!(result, Ok(()), "disarming");
                    obj.armed = None;
                }
            }
            Op::Cancel { h, dispatch } => {
                let Some(i) = pick(&self.handles, h) else {
                    return;
                };
                let o = self.handles[i].0;
                if dispatch {
                    e.bugchecks
                        .push(BugCheckCode::DRIVER_IRQL_NOT_LESS_OR_EQUAL.0);
                    e.at_dispatch = true;
                }
                let expected = self.predict_cancel(o, e);
                let got = {
                    let _g = dispatch_guard(dispatch);
                    self.handles[i].1.cancel()
                };
                assert_eq!(got, expected, "cancel outcome");
            }
            Op::ClaimAtDispatch { h } => {
                let Some(i) = pick(&self.handles, h) else {
                    return;
                };
                let o = self.handles[i].0;
                let expected = self.predict_claim(o, e);
                let claim = {
                    let _g = irql::raise(Irql::DISPATCH);
                    self.handles[i].1.claim_cancel()
                };
                match (expected, claim) {
                    (Ok(Some(r)), claim @ CancelClaim::Routine(_)) => {
                        if self.claims.len() < MAX_CLAIMS {
                            let handle = self.handles[i].1.clone();
                            self.objs[o].handles += 1;
                            self.claims.push((o, r, claim, handle));
                        } else {
                            e.calls.push((o, r));
                            let got = claim.run(&self.handles[i].1);
                            assert_eq!(got, CancelOutcome::RoutineCalled(r.status()));
                        }
                    }
                    (Err(CancelOutcome::AlreadyCancelled), CancelClaim::AlreadyCancelled)
                    | (Err(CancelOutcome::NoRoutineArmed), CancelClaim::NoRoutineArmed)
                    | (
                        Err(CancelOutcome::BlockedOperationCancelled),
                        CancelClaim::BlockedOperationCancelled,
                    ) => {}
                    (expected, claim) => panic!("claim: expected {expected:?}, got {claim:?}"),
                }
            }
            Op::RunClaim { c } => {
                let Some(i) = pick(&self.claims, c) else {
                    return;
                };
                let (o, r, claim, handle) = self.claims.remove(i);
                e.calls.push((o, r));
                let got = claim.run(&handle);
                assert_eq!(got, CancelOutcome::RoutineCalled(r.status()));
                let last = self.objs[o].refs() == 1;
                self.objs[o].handles -= 1;
                assert_eq!(handle.dereference() == Dereferenced::Freed, last);
            }
            Op::CancelById { id, dispatch } => {
                let id = self.resolve(id);
                let target = self.live_obj(id);
                let result = {
                    let _g = dispatch_guard(dispatch);
                    self.rdbss.cancel_by_id(id)
                };
                let Some(o) = target else {
                    assert_eq!(result, Err(NtStatus::NOT_FOUND), "cancel_by_id of {id:?}");
                    return;
                };
                if self.objs[o].completed.is_some() {
                    assert_eq!(result, Ok(CancelByIdOutcome::AlreadyCompleted));
                    return;
                }
                let expected = if dispatch {
                    match self.predict_claim(o, e) {
                        Ok(Some(r)) => {
                            self.objs[o].deferred += 1;
                            self.deferred.push_back((o, r));
                            CancelByIdOutcome::Deferred
                        }
                        Ok(None) => unreachable!(),
                        Err(outcome) => CancelByIdOutcome::Cancelled(outcome),
                    }
                } else {
                    CancelByIdOutcome::Cancelled(self.predict_cancel(o, e))
                };
                assert_eq!(result, Ok(expected), "cancel_by_id outcome");
            }
            Op::Lookup { id } => {
                let id = self.resolve(id);
                let target = self.live_obj(id);
                let result = self.rdbss.lookup(id);
                match (target, result) {
                    (None, Err(status)) => assert_eq!(status, NtStatus::NOT_FOUND),
                    (Some(o), Ok(handle)) => {
                        assert_eq!(self.obj_of(&handle), o);
                        self.objs[o].handles += 1;
                        self.keep(o, handle);
                    }
                    (target, result) => {
                        panic!(
                            "lookup {id:?}: expected {target:?}, got {:?}",
                            result.map(|h| h.id())
                        )
                    }
                }
            }
            Op::CompleteHandle { h, status, info } => {
                let Some(i) = pick(&self.handles, h) else {
                    return;
                };
                let (o, handle) = self.handles.remove(i);
                let status = STATUSES[usize::from(status) % 4];
                let before = handle.is_completed();
                let result = handle.complete_request(status, usize::from(info));
                self.objs[o].handles -= 1;
                self.completion(o, before, result, status, usize::from(info), e);
            }
            Op::CompleteById {
                id,
                status,
                info,
                dispatch,
            } => {
                let id = self.resolve(id);
                let status = STATUSES[usize::from(status) % 4];
                let target = self.live_obj(id);
                let result = {
                    let _g = dispatch_guard(dispatch);
                    self.rdbss.complete_by_id(id, status, usize::from(info))
                };
                match target {
                    None => assert_eq!(result, Err(NtStatus::NOT_FOUND), "complete_by_id"),
                    Some(o) => {
                        let before = self.objs[o].completed.is_some();
                        self.completion(o, before, result, status, usize::from(info), e);
                    }
                }
            }
            Op::CompleteRx { h, status, info } => {
                let Some(i) = pick(&self.handles, h) else {
                    return;
                };
                let o = self.handles[i].0;
                let status = STATUSES[usize::from(status) % 4];
                let ctx: &RxContext<Probe> = &self.handles[i].1;
                let before = ctx.is_completed();
                let result = ctx.complete_request(status, usize::from(info));
                self.completion(o, before, result, status, usize::from(info), e);
            }
            Op::Clone { h } => {
                let Some(i) = pick(&self.handles, h) else {
                    return;
                };
                let o = self.handles[i].0;
                let handle = self.handles[i].1.reference();
                assert!(ContextRef::ptr_eq(&handle, &self.handles[i].1));
                self.objs[o].handles += 1;
                self.keep(o, handle);
            }
            Op::Drop { h, dispatch } => {
                let Some(i) = pick(&self.handles, h) else {
                    return;
                };
                let (o, handle) = self.handles.remove(i);
                let last = self.objs[o].refs() == 1;
                self.objs[o].handles -= 1;
                let d = {
                    let _g = dispatch_guard(dispatch);
                    handle.dereference()
                };
                assert_eq!(d == Dereferenced::Freed, last, "dereference result");
            }
            Op::IntoId { h } => {
                let Some(i) = pick(&self.handles, h) else {
                    return;
                };
                let (o, handle) = self.handles.remove(i);
                let id = handle.into_id();
                assert_eq!(id, self.objs[o].id);
                self.objs[o].handles -= 1;
                self.objs[o].kept += 1;
            }
            Op::DerefById { id, dispatch } => {
                let id = self.resolve(id);
                let target = self.live_obj(id);
                let result = {
                    let _g = dispatch_guard(dispatch);
                    self.rdbss.dereference_by_id(id)
                };
                match target {
                    None => assert_eq!(result, Err(NtStatus::NOT_FOUND), "dereference_by_id"),
                    Some(o) if self.objs[o].kept == 0 => {
                        assert_eq!(result, Err(NtStatus::INVALID_PARAMETER), "deref below zero")
                    }
                    Some(o) => {
                        let last = self.objs[o].refs() == 1;
                        self.objs[o].kept -= 1;
                        let expected = if last {
                            Dereferenced::Freed
                        } else {
                            Dereferenced::StillReferenced
                        };
                        assert_eq!(result, Ok(expected), "dereference_by_id");
                    }
                }
            }
            Op::Reinitialize { h } => {
                let Some(i) = pick(&self.handles, h) else {
                    return;
                };
                let o = self.handles[i].0;
                let only = self.objs[o].refs() == 1;
                let old = self.objs[o].id;
                let result = self.handles[i].1.reinitialize();
                if !only {
                    assert_eq!(result, Err(NtStatus::INVALID_DEVICE_STATE), "reinitialize");
                    return;
                }
                let new = result.expect("reinitialize of the only reference");
                assert_eq!(new.slot(), old.slot(), "reinitialize keeps the slot");
                assert!(!self.issued.contains(&new), "reinitialize reissued an id");
                self.issued.push(new);
                let obj = &mut self.objs[o];
                obj.id = new;
                obj.armed = None;
                obj.cancelled = false;
                obj.completed = None;
                obj.completions = 0;
                obj.routine_calls = 0;
                obj.flags &= ContextFlags::PRESERVED | ContextFlags::INITIALIZATION;
                obj.blocked = BlockedState::NotBlocked;
            }
            Op::Enqueue { h, q } => {
                let Some(i) = pick(&self.handles, h) else {
                    return;
                };
                let q = usize::from(q);
                let o = self.handles[i].0;
                let result = self.queues[q].enqueue(&self.handles[i].1);
                let obj = &mut self.objs[o];
                if obj.cancelled {
                    assert_eq!(result, Err(NtStatus::CANCELLED), "enqueue cancelled");
                } else if obj.queued.is_some() || obj.armed.is_some() {
                    assert_eq!(result, Err(NtStatus::INVALID_PARAMETER), "enqueue busy");
                } else {
                    assert_eq!(result, Ok(()), "enqueue");
                    obj.queued = Some(q);
                    obj.blocked = BlockedState::Waiting;
                    obj.flags |= ContextFlags::IN_SERIALIZATION_QUEUE;
                    self.fifo[q].push_back(o);
                }
            }
            Op::Resume { q } => {
                let q = usize::from(q);
                let expected = self.fifo[q].pop_front();
                let got = self.queues[q].resume_blocked_operations_serially();
                match (expected, got) {
                    (None, None) => {}
                    (Some(o), Some(handle)) => {
                        assert_eq!(self.obj_of(&handle), o, "resume order");
                        let obj = &mut self.objs[o];
                        obj.queued = None;
                        obj.handles += 1;
                        obj.blocked = BlockedState::Resumed;
                        obj.flags = without(obj.flags, ContextFlags::IN_SERIALIZATION_QUEUE);
                        obj.flags |= ContextFlags::BLOCKED_PIPE_RESUME;
                        self.keep(o, handle);
                    }
                    (expected, got) => {
                        panic!(
                            "resume: expected {expected:?}, got {:?}",
                            got.map(|h| h.id())
                        )
                    }
                }
            }
            Op::RunPending => {
                let ran = self.work.run_pending();
                assert_eq!(ran, self.deferred.len(), "deferred items run");
                while let Some((o, r)) = self.deferred.pop_front() {
                    e.calls.push((o, r));
                    self.objs[o].deferred -= 1;
                }
            }
            Op::StartDrain => {
                self.rdbss.start_drain();
                self.draining = true;
            }
            Op::SetFlags { h, flags } | Op::ClearFlags { h, flags } => {
                let Some(i) = pick(&self.handles, h) else {
                    return;
                };
                let o = self.handles[i].0;
                let flags = ContextFlags::from_bits_retain(flags);
                let set = matches!(op, Op::SetFlags { .. });
                let ctx = &self.handles[i].1;
                let result = if set {
                    ctx.set_flags(flags)
                } else {
                    ctx.clear_flags(flags)
                };
                let obj = &mut self.objs[o];
                if flags.contains(ContextFlags::CANCELLED) {
                    assert_eq!(
                        result,
                        Err(NtStatus::INVALID_PARAMETER),
                        "flags with CANCELLED"
                    );
                } else {
                    assert_eq!(result, Ok(obj.flags), "flags before");
                    if set {
                        obj.flags |= flags;
                    } else {
                        obj.flags = without(obj.flags, flags);
                    }
                }
            }
            Op::Finish { h, status } => {
                let Some(i) = pick(&self.handles, h) else {
                    return;
                };
                let o = self.handles[i].0;
                let status = STATUSES[usize::from(status) % 4];
                let ctx: &RxContext<Probe> = &self.handles[i].1;
                let disarm = ctx.set_minirdr_cancel_routine(None);
                let obj = &mut self.objs[o];
                assert_eq!(disarm.is_err(), obj.cancelled, "disarm at completion");
                if disarm.is_ok() {
                    obj.armed = None;
                }
                let before = ctx.is_completed();
                let status = if disarm.is_ok() {
                    status
                } else if before {
                    // The cancel side completed already (routine A or a blocked cancel).
                    return;
                } else {
                    NtStatus::CANCELLED
                };
                let result = ctx.complete_request(status, 7);
                self.completion(o, before, result, status, 7, e);
            }
        }
    }

    fn check_after(&mut self, op: &Op, mut e: Expect) {
        assert_eq!(irql::current(), Irql::PASSIVE, "IRQL after {op:?}");
        // Routine calls.
        let calls = std::mem::take(&mut *self.shared.calls.lock().unwrap());
        assert_eq!(
            calls.iter().map(|c| (c.obj, c.routine)).collect::<Vec<_>>(),
            e.calls,
            "routine calls of {op:?}"
        );
        for call in &calls {
            let o = call.obj;
            assert_eq!(
                call.serial,
                self.objs[o].id.serial_number(),
                "routine on a stale request"
            );
            assert!(call.cancelled, "routine ran on a context not CANCELLED");
            assert!(!call.still_armed, "routine ran with a routine still armed");
            assert!(call.refs >= 1, "routine ran on an unreferenced context");
            assert!(
                call.irql <= Irql::APC || e.at_dispatch,
                "routine ran at {:?} without a bug check",
                call.irql
            );
            self.objs[o].routine_calls += 1;
            assert_eq!(
                self.objs[o].routine_calls, 1,
                "routine called twice in one request life"
            );
            if let Some((before, result)) = call.completion {
                self.completion(o, before, result, NtStatus::CANCELLED, 0, &mut e);
            }
        }
        // Bug checks.
        let mut got: Vec<u32> = bugcheck::recent().iter().map(|b| b.code.0).collect();
        assert_eq!(
            bugcheck::count(),
            got.len(),
            "more bug checks than the ring holds"
        );
        got.sort_unstable();
        e.bugchecks.sort_unstable();
        assert_eq!(got, e.bugchecks, "bug checks of {op:?}");
        // Live handles.
        for (o, handle) in &self.handles {
            let obj = &self.objs[*o];
            assert_eq!(handle.id(), obj.id);
            assert_eq!(
                handle.reference_count(),
                obj.refs(),
                "reference count of {o}"
            );
            assert_eq!(handle.is_cancelled(), obj.cancelled, "CANCELLED of {o}");
            assert_eq!(handle.flags(), obj.flags, "flags of {o}");
            assert_eq!(
                handle.has_cancel_routine(),
                obj.armed.is_some(),
                "slot of {o}"
            );
            assert_eq!(handle.blocked_state(), obj.blocked, "blocked state of {o}");
            match obj.completed {
                Some((status, info)) => {
                    assert!(handle.is_completed());
                    assert_eq!(handle.stored_status(), status, "first completion's status");
                    assert_eq!(handle.information(), info, "first completion's information");
                }
                None => assert!(!handle.is_completed()),
            }
        }
        let live = self.objs.iter().filter(|o| o.live()).count();
        assert_eq!(self.rdbss.active_contexts(), live, "active contexts");
        assert_eq!(self.rdbss.is_draining(), self.draining);
        let expected_drain = if self.draining && live == 0 {
            DrainStatus::Drained
        } else {
            DrainStatus::Active(live)
        };
        assert_eq!(self.rdbss.drain_status(), expected_drain);
        assert_eq!(self.queues[0].len(), self.fifo[0].len());
        assert_eq!(self.queues[1].len(), self.fifo[1].len());
        assert_eq!(self.work.len(), self.deferred.len());
    }

    /// Releases everything and checks the end state.
    fn finish(mut self) {
        // Kept claims and deferred work run (below DISPATCH).
        while !self.claims.is_empty() {
            self.step(&Op::RunClaim { c: 0 });
        }
        self.step(&Op::RunPending);
        for q in [false, true] {
            while !self.fifo[usize::from(q)].is_empty() {
                self.step(&Op::Resume { q });
                // Resume keeps the handle if there is room; make room.
                if self.handles.len() >= MAX_HANDLES {
                    self.step(&Op::Drop {
                        h: 0,
                        dispatch: false,
                    });
                }
            }
        }
        // Every live request is completed by the protocol, through a handle.
        for o in 0..self.objs.len() {
            if !self.objs[o].live() {
                continue;
            }
            let handle = match self.handles.iter().position(|(x, _)| *x == o) {
                Some(i) => self.handles.remove(i).1,
                None => {
                    let h = self
                        .rdbss
                        .lookup(self.objs[o].id)
                        .expect("live object found");
                    self.objs[o].handles += 1;
                    h
                }
            };
            self.handles.insert(0, (o, handle));
            self.step(&Op::Finish { h: 0, status: 0 });
            assert_eq!(
                self.objs[o].completions, 1,
                "a live request not completed exactly once"
            );
            let kept = self.objs[o].kept;
            let id = self.objs[o].id;
            for _ in 0..kept {
                let r = self.rdbss.dereference_by_id(id);
                assert_eq!(r, Ok(Dereferenced::StillReferenced));
                self.objs[o].kept -= 1;
            }
            self.step(&Op::Drop {
                h: 0,
                dispatch: false,
            });
        }
        while !self.handles.is_empty() {
            self.step(&Op::Drop {
                h: 0,
                dispatch: false,
            });
        }
        assert_eq!(self.rdbss.active_contexts(), 0, "contexts leaked");
        self.rdbss.start_drain();
        assert_eq!(self.rdbss.drain_status(), DrainStatus::Drained);
        let probe = Probe {
            obj: usize::MAX,
            shared: self.shared.clone(),
        };
        self.created += 1;
        let refused = self.rdbss.create_context(ContextInit::default(), probe);
        assert!(matches!(refused, Err((NtStatus::INVALID_DEVICE_STATE, _))));
        drop(refused);
        let shared = self.shared.clone();
        let created = self.created;
        drop(self);
        assert_eq!(
            shared.dropped.load(Ordering::SeqCst),
            created,
            "mini-redirector states not dropped with the instance"
        );
        assert_eq!(irql::current(), Irql::PASSIVE);
    }
}

/// Runs one input: decodes it and checks every call and the end state. Panics on a violation.
pub fn run(data: &[u8]) {
    bugcheck::set_policy(BugCheckPolicy::Record);
    bugcheck::clear();
    let ops = decode(data);
    let mut harness = Harness::new();
    for op in &ops {
        harness.step(op);
    }
    harness.finish();
    bugcheck::clear();
}
