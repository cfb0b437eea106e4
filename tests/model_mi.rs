//! Model-based property test of MI cancellation (`rdbss::mi`): random sequences of client and
//! provider calls, valid and invalid, run against a real [`MiSession`] and against a small
//! reference model written here, compared after every step. Same conventions as
//! `tests/model.rs`.
//!
//! # The model
//!
//! [`Model`] keeps the session (quota [`QUOTA`], `draining`) and, for every operation started (an
//! *object*, numbered in start order): kind, owner, id, the first cancel's reason, the core's
//! `CANCELLED` flag and armed routine, whether its request is completed (which is what holds the
//! quota unit), the provider slot (`callback` as the tag of the registration that stored it,
//! `armed`, `delivered`, `posted`, `cancel_completes`), the unread instances and the client's
//! final result, whether the client closed, whether the client handle and how many provider
//! clones the test holds, and every callback call (tag and reason). The rules are the numbered
//! invariants of `src/mi.rs` and the documented choices of `docs/mi_and_cluster.md`; the MI
//! statements are seeds 000, 001 and 003.
//!
//! # The operations
//!
//! [`Op`]: `start_operation` (enumerate or invoke, caller [`ALICE`] or [`BOB`], also beyond the
//! quota and after shutdown), `register_cancel` (again: replacing; on invoke; after the post),
//! cloning and dropping provider contexts (the last drop posts `MI_RESULT_FAILED`),
//! `post_instance`, `post_result`, `MiOperation::cancel` (also from the wrong caller),
//! `MiSession::operation_cancel` with raw reasons (also invalid ones) on live, closed, finished
//! and forged ids, `get_result`, `close` (the wrong caller gets the handle back) or dropping the
//! client handle, and `shutdown`.
//!
//! # What is compared
//!
//! After every step: every result exactly (`MiResult`, `MiRegistration`, `MiPosted`,
//! `MiDelivery`, the started operation's id); then `operations_in_use`, `live_operations`; for
//! every object the client sees (`id`, `kind`, `owner`, `is_cancelled`, `final_result`) and what
//! each provider clone sees (`is_cancelled`, `cancellation_reason`); every callback call with
//! its registration's tag and the reason it got; how many callbacks are alive (registered
//! closures not yet called or dropped) against the model's stored callbacks; and
//! `bugcheck::count()` (none expected: every completion is the first). At the end every client
//! is closed and every provider clone dropped: quota and live operations must be 0, every
//! request completed, every closure dropped, at most one callback call per operation.
//!
//! A tally of outcomes (shown with `--nocapture`) must reach every entry of [`MUST_SEE`]. A
//! failing sequence is shrunk by proptest and then by `minimize` (with [`simpler`]), and printed
//! numbered. The property runs under `BugCheckPolicy::Record` holding the lock of
//! `common::exclusive`. That machinery is `tests/common/model_harness.rs`, shared with
//! `tests/model.rs` ([`model_harness::check_property`], [`model_harness::run_sequence`]).
//!
//! Left out: concurrency (loom covers register ∥ cancel ∥ post), the typed `register_cancel`
//! (`register_cancel_with` is the same path), the Windows `MI_Operation_Close` blocking form.
//!
//! Cases: `RDBSS_MODEL_CASES` (default 2 000) sequences of 1 to [`MAX_OPS`] operations.

#![cfg(feature = "std")]

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use rdbss::bugcheck;
use rdbss::irql::{self, Irql};
use rdbss::mi::{
    MiCallerId, MiCancellationReason, MiContext, MiDelivery, MiFinalResult, MiOperation,
    MiOperationKind, MiPosted, MiRegistration, MiResult, MiSession,
};
use rdbss::RequestId;

mod common;
use common::model_harness::{self, ensure_eq, Tally};

/// The caller that starts most operations.
const ALICE: MiCallerId = MiCallerId(1);
/// Another caller.
const BOB: MiCallerId = MiCallerId(2);
/// The session's quota of running operations.
const QUOTA: usize = 3;
/// Operations started per sequence, at most (a start beyond that is skipped).
const MAX_OBJECTS: usize = 10;
/// Provider clones per operation, at most.
const MAX_CLONES: usize = 3;
/// Operations per sequence, at most.
const MAX_OPS: usize = 50;
/// Cases when `RDBSS_MODEL_CASES` is not set.
const DEFAULT_CASES: u32 = 2_000;

/// Raw reasons for `operation_cancel`: the four `mi.h` values and three invalid ones.
const RAW_REASONS: [u32; 7] = [0, 1, 2, 3, 4, 99, u32::MAX];
const REASONS: [MiCancellationReason; 4] = [
    MiCancellationReason::None,
    MiCancellationReason::Timeout,
    MiCancellationReason::Shutdown,
    MiCancellationReason::ServiceStop,
];
/// Results a provider posts.
const RESULTS: [MiResult; 3] = [MiResult::OK, MiResult::FAILED, MiResult::NOT_FOUND];
/// Forged operation ids (slot 0 is never issued; the others may name a live operation).
const FORGED: [u64; 3] = [0, (1 << 32) | 1, u64::MAX];

// ---------------------------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------------------------

/// Which caller.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Who {
    Alice,
    Bob,
}

impl Who {
    fn id(self) -> MiCallerId {
        match self {
            Who::Alice => ALICE,
            Who::Bob => BOB,
        }
    }
}

/// The target of `operation_cancel`: an operation started earlier (any, also closed or gone),
/// or a forged id.
#[derive(Clone, Copy, Debug)]
enum Target {
    Started(usize),
    Forged(u64),
}

/// One call. `c` picks among the operations whose client handle the test holds, `o` among those
/// with provider clones (`p` a clone), modulo their number; skipped if there is none.
#[derive(Clone, Debug)]
enum Op {
    /// `start_operation(who, Enumerate or Invoke)`.
    Start { who: Who, invoke: bool },
    /// `register_cancel_with` on clone `p` of operation `o`.
    Register { o: usize, p: usize },
    /// Clones provider clone `p`.
    CloneProvider { o: usize, p: usize },
    /// Drops provider clone `p` (the last one posts `MI_RESULT_FAILED`).
    DropProvider { o: usize, p: usize },
    /// `post_instance(value)`.
    PostInstance { o: usize, p: usize, value: u32 },
    /// `post_result(RESULTS[r])` (consumes the clone).
    PostResult { o: usize, p: usize, r: usize },
    /// `MiOperation::cancel(who, REASONS[reason])`.
    Cancel { c: usize, who: Who, reason: usize },
    /// `MiSession::operation_cancel(target, who, RAW_REASONS[raw])`.
    CancelById {
        target: Target,
        who: Who,
        raw: usize,
    },
    /// `get_result`.
    GetResult { c: usize },
    /// `close(who)`, or dropping the handle if `drop`.
    Close { c: usize, who: Who, drop: bool },
    /// `shutdown`.
    Shutdown,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let i = || 0..8usize;
    let p = || 0..MAX_CLONES;
    let who = || prop_oneof![4 => Just(Who::Alice), 1 => Just(Who::Bob)];
    let target = prop_oneof![
        6 => (0..MAX_OBJECTS).prop_map(Target::Started),
        1 => prop::sample::select(&FORGED[..]).prop_map(Target::Forged),
    ];
    prop_oneof![
        10 => (who(), prop::bool::weighted(0.3))
            .prop_map(|(who, invoke)| Op::Start { who, invoke }),
        8 => (i(), p()).prop_map(|(o, p)| Op::Register { o, p }),
        2 => (i(), p()).prop_map(|(o, p)| Op::CloneProvider { o, p }),
        3 => (i(), p()).prop_map(|(o, p)| Op::DropProvider { o, p }),
        5 => (i(), p(), 0..100u32).prop_map(|(o, p, value)| Op::PostInstance { o, p, value }),
        5 => (i(), p(), 0..RESULTS.len()).prop_map(|(o, p, r)| Op::PostResult { o, p, r }),
        6 => (i(), who(), 0..REASONS.len())
            .prop_map(|(c, who, reason)| Op::Cancel { c, who, reason }),
        5 => (target, who(), prop_oneof![4 => 0..4usize, 1 => 4..RAW_REASONS.len()])
            .prop_map(|(target, who, raw)| Op::CancelById { target, who, raw }),
        5 => i().prop_map(|c| Op::GetResult { c }),
        4 => (i(), who(), prop::bool::weighted(0.3))
            .prop_map(|(c, who, drop)| Op::Close { c, who, drop }),
        1 => Just(Op::Shutdown),
    ]
}

// ---------------------------------------------------------------------------------------------
// The reference model
// ---------------------------------------------------------------------------------------------

/// One operation.
#[derive(Clone, Debug)]
struct MOp {
    kind: MiOperationKind,
    owner: MiCallerId,
    id: RequestId,
    /// The first cancel's reason.
    reason: Option<MiCancellationReason>,
    /// The core's `CANCELLED`.
    cancelled: bool,
    /// The core's routine slot holds `mi_cancel_routine`.
    core_armed: bool,
    /// The request is completed (the quota unit is back).
    completed: bool,
    // The provider slot.
    callback: Option<usize>,
    armed: bool,
    delivered: bool,
    posted: bool,
    cancel_completes: bool,
    // What the client reads.
    instances: VecDeque<u32>,
    final_result: Option<MiFinalResult>,
    closed: bool,
    /// The test holds the client handle.
    client: bool,
    /// Provider clones the test holds.
    providers: usize,
    /// Callback calls: the registration's tag and the reason.
    calls: Vec<(usize, MiCancellationReason)>,
}

impl MOp {
    fn live(&self) -> bool {
        self.client || self.providers > 0
    }

    fn reason(&self) -> MiCancellationReason {
        self.reason.unwrap_or(MiCancellationReason::None)
    }

    fn set_final(&mut self, result: MiFinalResult) {
        if self.final_result.is_none() {
            self.final_result = Some(result);
        }
    }

    /// `finish`: completes the request (the quota unit goes back). A second completion would be
    /// the `MULTIPLE_IRP_COMPLETE_REQUESTS` bug check, which the model never expects.
    fn finish(&mut self) -> Result<(), String> {
        if self.completed {
            return Err(format!("model: operation {:?} completed twice", self.id));
        }
        self.completed = true;
        Ok(())
    }
}

#[derive(Debug, Default)]
struct Model {
    ops: Vec<MOp>,
    draining: bool,
}

impl Model {
    fn in_use(&self) -> usize {
        self.ops.iter().filter(|o| !o.completed).count()
    }

    fn live(&self) -> usize {
        self.ops.iter().filter(|o| o.live()).count()
    }

    fn callbacks_stored(&self) -> usize {
        self.ops.iter().filter(|o| o.callback.is_some()).count()
    }

    fn start(&self) -> Result<(), MiResult> {
        if self.in_use() >= QUOTA {
            return Err(MiResult::SERVER_LIMITS_EXCEEDED);
        }
        if self.draining {
            return Err(MiResult::SERVER_IS_SHUTTING_DOWN);
        }
        Ok(())
    }

    /// `cancel_operation`: the reason (first wins), then the core's cancel.
    fn cancel(&mut self, o: usize, reason: MiCancellationReason) -> Result<(), String> {
        let op = &mut self.ops[o];
        op.reason.get_or_insert(reason);
        if op.cancelled {
            return Ok(());
        }
        op.cancelled = true;
        if std::mem::take(&mut op.core_armed) {
            // `mi_cancel_routine`.
            let reason = op.reason();
            op.set_final(MiFinalResult::cancelled(reason));
            if let Some(tag) = op.callback.take() {
                op.delivered = true;
                op.calls.push((tag, reason));
            }
            op.finish()?;
        } else {
            op.set_final(MiFinalResult::cancelled(op.reason()));
        }
        Ok(())
    }

    fn register(
        &mut self,
        o: usize,
        tag: usize,
    ) -> Result<Result<MiRegistration, MiResult>, String> {
        let op = &mut self.ops[o];
        if op.kind == MiOperationKind::Invoke {
            return Ok(Err(MiResult::NOT_SUPPORTED));
        }
        if op.posted {
            return Ok(Err(MiResult::INVALID_PARAMETER));
        }
        if op.delivered {
            return Ok(Ok(MiRegistration::AlreadyDelivered));
        }
        op.callback = Some(tag);
        if !op.cancelled {
            op.core_armed = true;
            op.armed = true;
            return Ok(Ok(MiRegistration::Registered));
        }
        if op.armed {
            return Ok(Ok(MiRegistration::Registered));
        }
        let tag = op.callback.take();
        op.delivered = true;
        op.cancel_completes = true;
        let reason = op.reason();
        op.set_final(MiFinalResult::cancelled(reason));
        if let Some(tag) = tag {
            op.calls.push((tag, reason));
        }
        op.finish()?;
        Ok(Ok(MiRegistration::CalledAtOnce))
    }

    fn post_instance(&mut self, o: usize, value: u32) -> Result<(), MiResult> {
        let op = &mut self.ops[o];
        if op.posted {
            return Err(MiResult::INVALID_PARAMETER);
        }
        if op.final_result.is_some() {
            return Err(MiResult::FAILED);
        }
        op.instances.push_back(value);
        Ok(())
    }

    fn post_final(
        &mut self,
        o: usize,
        result: MiResult,
    ) -> Result<Result<MiPosted, MiResult>, String> {
        let op = &mut self.ops[o];
        if op.posted {
            return Ok(Err(MiResult::INVALID_PARAMETER));
        }
        op.posted = true;
        op.callback = None;
        if !op.cancelled {
            op.core_armed = false;
            op.armed = false;
            op.set_final(MiFinalResult {
                result,
                cancelled: None,
            });
            op.finish()?;
            Ok(Ok(MiPosted::Delivered))
        } else {
            if !(op.armed || op.cancel_completes) {
                op.set_final(MiFinalResult::cancelled(op.reason()));
                op.finish()?;
            }
            Ok(Ok(MiPosted::Discarded))
        }
    }

    /// One provider clone goes; the last one posts `MI_RESULT_FAILED`.
    fn drop_provider(&mut self, o: usize) -> Result<(), String> {
        self.ops[o].providers -= 1;
        if self.ops[o].providers == 0 {
            let _ = self.post_final(o, MiResult::FAILED)?;
        }
        Ok(())
    }

    fn operation_cancel(
        &mut self,
        id: RequestId,
        caller: MiCallerId,
        raw: u32,
    ) -> Result<MiResult, String> {
        let Some(o) = self.ops.iter().position(|op| op.live() && op.id == id) else {
            return Ok(MiResult::INVALID_PARAMETER);
        };
        if self.ops[o].closed {
            return Ok(MiResult::INVALID_PARAMETER);
        }
        let reason = match MiCancellationReason::from_raw(raw) {
            Ok(reason) => reason,
            Err(error) => return Ok(error),
        };
        if caller != self.ops[o].owner {
            return Ok(MiResult::ACCESS_DENIED);
        }
        self.cancel(o, reason)?;
        Ok(MiResult::OK)
    }

    fn get_result(&mut self, o: usize) -> MiDelivery<u32> {
        let op = &mut self.ops[o];
        if let Some(value) = op.instances.pop_front() {
            return MiDelivery::Instance(value);
        }
        match op.final_result {
            Some(f) => MiDelivery::Final(f),
            None => MiDelivery::NotYet,
        }
    }

    /// A successful close, or a drop of the client handle.
    fn close(&mut self, o: usize) -> Result<(), String> {
        if self.ops[o].final_result.is_none() {
            self.cancel(o, MiCancellationReason::None)?;
        }
        let op = &mut self.ops[o];
        op.closed = true;
        op.instances.clear();
        op.client = false;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The real side and the comparison
// ---------------------------------------------------------------------------------------------

type Calls = Arc<Mutex<Vec<(usize, MiCancellationReason)>>>;

/// Counts the drops of registered closures (called or not).
struct DropCount(Arc<AtomicUsize>);

impl Drop for DropCount {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// The test's handles of one operation.
struct Real {
    client: Option<MiOperation<u32>>,
    providers: Vec<MiContext<u32>>,
    calls: Calls,
}

/// `what: result` for the coverage tally.
fn label(what: &str, result: &impl fmt::Debug) -> String {
    format!("{what}: {result:?}")
}

struct Harness {
    model: Model,
    session: MiSession<u32>,
    reals: Vec<Real>,
    /// Closures registered so far, and how many of them were dropped.
    closures: usize,
    dropped: Arc<AtomicUsize>,
}

impl Harness {
    fn new() -> Self {
        Harness {
            model: Model::default(),
            session: MiSession::new(QUOTA),
            reals: Vec::new(),
            closures: 0,
            dropped: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The `i`-th operation whose client handle the test holds.
    fn client(&self, i: usize) -> Option<usize> {
        let with: Vec<usize> = (0..self.reals.len())
            .filter(|&o| self.reals[o].client.is_some())
            .collect();
        (!with.is_empty()).then(|| with[i % with.len()])
    }

    /// The `i`-th operation with provider clones, and clone `p` of it.
    fn provider(&self, i: usize, p: usize) -> Option<(usize, usize)> {
        let with: Vec<usize> = (0..self.reals.len())
            .filter(|&o| !self.reals[o].providers.is_empty())
            .collect();
        (!with.is_empty()).then(|| {
            let o = with[i % with.len()];
            (o, p % self.reals[o].providers.len())
        })
    }

    fn step(&mut self, op: &Op) -> Result<Option<String>, String> {
        let label = match *op {
            Op::Start { who, invoke } => {
                if self.reals.len() >= MAX_OBJECTS {
                    return Ok(None);
                }
                let kind = if invoke {
                    MiOperationKind::Invoke
                } else {
                    MiOperationKind::Enumerate
                };
                let real = self.session.start_operation(who.id(), kind);
                let expected = self.model.start();
                ensure_eq!(real.as_ref().map(|_| ()).map_err(|e| *e), expected, "start");
                let text = label("start", &expected);
                if let Ok((client, provider)) = real {
                    ensure_eq!(provider.id(), client.id(), "start: the provider's id");
                    self.model.ops.push(MOp {
                        kind,
                        owner: who.id(),
                        id: client.id(),
                        reason: None,
                        cancelled: false,
                        core_armed: false,
                        completed: false,
                        callback: None,
                        armed: false,
                        delivered: false,
                        posted: false,
                        cancel_completes: false,
                        instances: VecDeque::new(),
                        final_result: None,
                        closed: false,
                        client: true,
                        providers: 1,
                        calls: Vec::new(),
                    });
                    self.reals.push(Real {
                        client: Some(client),
                        providers: vec![provider],
                        calls: Calls::default(),
                    });
                }
                text
            }
            Op::Register { o, p } => {
                let Some((o, p)) = self.provider(o, p) else {
                    return Ok(None);
                };
                let tag = self.closures;
                self.closures += 1;
                let calls = self.reals[o].calls.clone();
                let guard = DropCount(self.dropped.clone());
                let real = self.reals[o].providers[p].register_cancel_with(move |reason| {
                    let _guard = guard;
                    calls.lock().unwrap().push((tag, reason));
                });
                ensure_eq!(real, self.model.register(o, tag)?, "register_cancel");
                label("register_cancel", &real)
            }
            Op::CloneProvider { o, p } => {
                let Some((o, p)) = self.provider(o, p) else {
                    return Ok(None);
                };
                if self.reals[o].providers.len() >= MAX_CLONES {
                    return Ok(None);
                }
                let clone = self.reals[o].providers[p].clone();
                self.reals[o].providers.push(clone);
                self.model.ops[o].providers += 1;
                "clone provider".to_string()
            }
            Op::DropProvider { o, p } => {
                let Some((o, p)) = self.provider(o, p) else {
                    return Ok(None);
                };
                drop(self.reals[o].providers.remove(p));
                self.model.drop_provider(o)?;
                if self.model.ops[o].providers == 0 {
                    "drop provider: last".to_string()
                } else {
                    "drop provider: not last".to_string()
                }
            }
            Op::PostInstance { o, p, value } => {
                let Some((o, p)) = self.provider(o, p) else {
                    return Ok(None);
                };
                let real = self.reals[o].providers[p].post_instance(value);
                ensure_eq!(real, self.model.post_instance(o, value), "post_instance");
                label("post_instance", &real)
            }
            Op::PostResult { o, p, r } => {
                let Some((o, p)) = self.provider(o, p) else {
                    return Ok(None);
                };
                let real = self.reals[o].providers.remove(p).post_result(RESULTS[r]);
                let expected = self.model.post_final(o, RESULTS[r])?;
                self.model.drop_provider(o)?;
                ensure_eq!(real, expected, "post_result({:?})", RESULTS[r]);
                label("post_result", &real)
            }
            Op::Cancel { c, who, reason } => {
                let Some(o) = self.client(c) else {
                    return Ok(None);
                };
                let reason = REASONS[reason];
                let client = self.reals[o].client.as_ref().expect("client");
                let real = client.cancel(who.id(), reason);
                let expected = if who.id() == self.model.ops[o].owner {
                    self.model.cancel(o, reason)?;
                    Ok(())
                } else {
                    Err(MiResult::ACCESS_DENIED)
                };
                ensure_eq!(real, expected, "cancel({who:?}, {reason:?})");
                label("cancel", &real)
            }
            Op::CancelById { target, who, raw } => {
                let id = match target {
                    Target::Started(i) => {
                        if self.model.ops.is_empty() {
                            return Ok(None);
                        }
                        self.model.ops[i % self.model.ops.len()].id
                    }
                    Target::Forged(raw) => RequestId::from_u64(raw),
                };
                let raw = RAW_REASONS[raw];
                let real = self.session.operation_cancel(id, who.id(), raw);
                let expected = self.model.operation_cancel(id, who.id(), raw)?;
                ensure_eq!(real, expected, "operation_cancel({id:?}, {who:?}, {raw})");
                label("operation_cancel", &real)
            }
            Op::GetResult { c } => {
                let Some(o) = self.client(c) else {
                    return Ok(None);
                };
                let real = self.reals[o].client.as_ref().expect("client").get_result();
                let expected = self.model.get_result(o);
                ensure_eq!(real, expected, "get_result");
                match real {
                    MiDelivery::Instance(_) => "get_result: Instance".to_string(),
                    MiDelivery::Final(f) => label("get_result: Final", &f),
                    MiDelivery::NotYet => "get_result: NotYet".to_string(),
                }
            }
            Op::Close { c, who, drop } => {
                let Some(o) = self.client(c) else {
                    return Ok(None);
                };
                let client = self.reals[o].client.take().expect("client");
                if drop {
                    std::mem::drop(client);
                    self.model.close(o)?;
                    "drop client".to_string()
                } else {
                    let real = client.close(who.id());
                    let real = match real {
                        Ok(()) => Ok(()),
                        Err((error, back)) => {
                            ensure_eq!(back.id(), self.model.ops[o].id, "close: handed back");
                            self.reals[o].client = Some(back);
                            Err(error)
                        }
                    };
                    let expected = if who.id() == self.model.ops[o].owner {
                        self.model.close(o)?;
                        Ok(())
                    } else {
                        Err(MiResult::ACCESS_DENIED)
                    };
                    ensure_eq!(real, expected, "close({who:?})");
                    label("close", &real)
                }
            }
            Op::Shutdown => {
                self.session.shutdown();
                self.model.draining = true;
                "shutdown".to_string()
            }
        };
        Ok(Some(label))
    }

    fn check(&self) -> Result<(), String> {
        let m = &self.model;
        ensure_eq!(irql::current(), Irql::PASSIVE, "IRQL");
        ensure_eq!(bugcheck::count(), 0, "bugcheck::count()");
        ensure_eq!(
            self.session.operations_in_use(),
            m.in_use(),
            "operations_in_use"
        );
        ensure_eq!(self.session.live_operations(), m.live(), "live_operations");
        ensure_eq!(self.session.max_operations(), QUOTA, "max_operations");
        ensure_eq!(
            self.closures - self.dropped.load(Ordering::SeqCst),
            m.callbacks_stored(),
            "callbacks alive (registered, not yet called or dropped)"
        );
        for (o, (real, op)) in self.reals.iter().zip(&m.ops).enumerate() {
            ensure_eq!(
                *real.calls.lock().unwrap(),
                op.calls,
                "operation {o}: callback calls (tag, reason)"
            );
            if op.calls.len() > 1 {
                return Err(format!("model: operation {o}: more than one callback call"));
            }
            ensure_eq!(
                real.client.is_some(),
                op.client,
                "operation {o}: client held"
            );
            ensure_eq!(
                real.providers.len(),
                op.providers,
                "operation {o}: clones held"
            );
            if let Some(client) = &real.client {
                ensure_eq!(
                    (client.id(), client.kind(), client.owner()),
                    (op.id, op.kind, op.owner),
                    "operation {o}: id, kind, owner"
                );
                ensure_eq!(
                    client.is_cancelled(),
                    op.cancelled,
                    "operation {o}: cancelled"
                );
                ensure_eq!(
                    client.final_result(),
                    op.final_result,
                    "operation {o}: final result"
                );
            }
            for (p, provider) in real.providers.iter().enumerate() {
                ensure_eq!(
                    (provider.is_cancelled(), provider.cancellation_reason()),
                    (op.cancelled, op.cancelled.then(|| op.reason())),
                    "operation {o}, provider clone {p}: cancelled, reason"
                );
            }
        }
        Ok(())
    }

    /// Closes every client, drops every provider clone, and checks that nothing is left.
    fn finish(mut self) -> Result<(), String> {
        while let Some(o) = self.client(0) {
            let who = if self.model.ops[o].owner == ALICE {
                Who::Alice
            } else {
                Who::Bob
            };
            self.step(&Op::Close {
                c: 0,
                who,
                drop: false,
            })?;
            self.check()?;
        }
        while self.provider(0, 0).is_some() {
            self.step(&Op::DropProvider { o: 0, p: 0 })?;
            self.check()?;
        }
        ensure_eq!(self.session.operations_in_use(), 0, "quota at the end");
        ensure_eq!(
            self.session.live_operations(),
            0,
            "live operations at the end"
        );
        ensure_eq!(
            self.dropped.load(Ordering::SeqCst),
            self.closures,
            "closures dropped at the end"
        );
        for (o, op) in self.model.ops.iter().enumerate() {
            if !op.completed {
                return Err(format!("model: operation {o} never completed"));
            }
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
        |harness| harness.check(),
        |harness| &harness.model,
        Harness::finish,
    )
}

/// Outcomes the random sequences must reach (checked when at least [`DEFAULT_CASES`] run).
const MUST_SEE: &[&str] = &[
    "start: Ok(())",
    "start: Err(MI_RESULT_SERVER_LIMITS_EXCEEDED(27))",
    "start: Err(MI_RESULT_SERVER_IS_SHUTTING_DOWN(28))",
    "register_cancel: Ok(Registered)",
    "register_cancel: Ok(CalledAtOnce)",
    "register_cancel: Ok(AlreadyDelivered)",
    "register_cancel: Err(MI_RESULT_NOT_SUPPORTED(7))",
    "register_cancel: Err(MI_RESULT_INVALID_PARAMETER(4))",
    "clone provider",
    "drop provider: last",
    "drop provider: not last",
    "post_instance: Ok(())",
    "post_instance: Err(MI_RESULT_FAILED(1))",
    "post_instance: Err(MI_RESULT_INVALID_PARAMETER(4))",
    "post_result: Ok(Delivered)",
    "post_result: Ok(Discarded)",
    "post_result: Err(MI_RESULT_INVALID_PARAMETER(4))",
    "cancel: Ok(())",
    "cancel: Err(MI_RESULT_ACCESS_DENIED(2))",
    "operation_cancel: MI_RESULT_OK(0)",
    "operation_cancel: MI_RESULT_ACCESS_DENIED(2)",
    "operation_cancel: MI_RESULT_INVALID_PARAMETER(4)",
    "get_result: Instance",
    "get_result: NotYet",
    "get_result: Final: MiFinalResult { result: MI_RESULT_OK(0), cancelled: None }",
    "get_result: Final: MiFinalResult { result: MI_RESULT_FAILED(1), cancelled: None }",
    "get_result: Final: MiFinalResult { result: MI_RESULT_FAILED(1), cancelled: Some(Timeout) }",
    "close: Ok(())",
    "close: Err(MI_RESULT_ACCESS_DENIED(2))",
    "drop client",
    "shutdown",
];

/// Simpler versions of one operation: smaller indices, Alice instead of Bob.
fn simpler(op: &Op) -> Vec<Op> {
    let below = |n: usize| 0..n;
    let mut out = Vec::new();
    match *op {
        Op::Start { who, invoke } => {
            if who == Who::Bob {
                out.push(Op::Start {
                    who: Who::Alice,
                    invoke,
                });
            }
        }
        Op::Register { o, p } => {
            out.extend(below(o).map(|o| Op::Register { o, p }));
            out.extend(below(p).map(|p| Op::Register { o, p }));
        }
        Op::CloneProvider { o, p } => out.extend(below(o).map(|o| Op::CloneProvider { o, p })),
        Op::DropProvider { o, p } => {
            out.extend(below(o).map(|o| Op::DropProvider { o, p }));
            out.extend(below(p).map(|p| Op::DropProvider { o, p }));
        }
        Op::PostInstance { o, p, value } => {
            out.extend(below(o).map(|o| Op::PostInstance { o, p, value }));
            out.extend(below(p).map(|p| Op::PostInstance { o, p, value }));
        }
        Op::PostResult { o, p, r } => {
            out.extend(below(o).map(|o| Op::PostResult { o, p, r }));
            out.extend(below(p).map(|p| Op::PostResult { o, p, r }));
            out.extend(below(r).map(|r| Op::PostResult { o, p, r }));
        }
        Op::Cancel { c, who, reason } => {
            out.extend(below(c).map(|c| Op::Cancel { c, who, reason }));
            out.extend(below(reason).map(|reason| Op::Cancel { c, who, reason }));
        }
        Op::CancelById { target, who, raw } => {
            if let Target::Started(i) = target {
                out.extend(below(i).map(|i| Op::CancelById {
                    target: Target::Started(i),
                    who,
                    raw,
                }));
            }
            out.extend(below(raw).map(|raw| Op::CancelById { target, who, raw }));
        }
        Op::GetResult { c } => out.extend(below(c).map(|c| Op::GetResult { c })),
        Op::Close { c, who, drop } => out.extend(below(c).map(|c| Op::Close { c, who, drop })),
        Op::Shutdown => {}
    }
    out
}

#[test]
fn mi_matches_the_model() {
    let sequences = prop::collection::vec(op_strategy(), 1..=MAX_OPS);
    model_harness::check_property(sequences, run_case, simpler, DEFAULT_CASES, MUST_SEE);
}

/// A fixed sequence through the main paths, so a broken model is caught even if the random
/// cases miss a path.
#[test]
fn a_hand_written_sequence_matches_the_model() {
    let ops = [
        Op::Start {
            who: Who::Alice,
            invoke: false,
        },
        Op::Register { o: 0, p: 0 },
        Op::Register { o: 0, p: 0 },
        Op::PostInstance {
            o: 0,
            p: 0,
            value: 7,
        },
        Op::Cancel {
            c: 0,
            who: Who::Bob,
            reason: 1,
        },
        Op::Cancel {
            c: 0,
            who: Who::Alice,
            reason: 1,
        },
        Op::Register { o: 0, p: 0 },
        Op::GetResult { c: 0 },
        Op::GetResult { c: 0 },
        Op::Start {
            who: Who::Bob,
            invoke: true,
        },
        Op::Register { o: 1, p: 0 },
        Op::CancelById {
            target: Target::Started(1),
            who: Who::Bob,
            raw: 4,
        },
        Op::CancelById {
            target: Target::Started(1),
            who: Who::Bob,
            raw: 3,
        },
        Op::Start {
            who: Who::Alice,
            invoke: false,
        },
        Op::Start {
            who: Who::Alice,
            invoke: false,
        },
        Op::PostResult { o: 1, p: 0, r: 0 },
        Op::Close {
            c: 0,
            who: Who::Bob,
            drop: false,
        },
        Op::Close {
            c: 0,
            who: Who::Alice,
            drop: false,
        },
        Op::CancelById {
            target: Target::Started(0),
            who: Who::Alice,
            raw: 0,
        },
        Op::Shutdown,
        Op::Start {
            who: Who::Alice,
            invoke: false,
        },
    ];
    model_harness::check_sequence(&ops, run_case);
}
