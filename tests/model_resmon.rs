//! Model-based property test of the failover-cluster resource monitor (`rdbss::resmon`): random
//! sequences of monitor, resource-DLL and worker calls, valid and invalid, run against a real
//! [`ResourceMonitor`] and against a small reference model written here, compared after every
//! step. Same conventions as `tests/model.rs`.
//!
//! # The model
//!
//! [`Model`] keeps the clock, every resource (its config, state and pending operation: which
//! operation, the state before it, the last report time and the checkpoint), every pending
//! operation ever started (an *object*: resource, kind, the core's `CANCELLED` flag and armed
//! routine, completed), the work queue and the workers the test took from it. The rules are the
//! numbered invariants and the entry-point docs of `src/resmon.rs` and the documented choices of
//! `docs/mi_and_cluster.md` (seed 004 for `PCANCEL_ROUTINE`).
//!
//! # The operations
//!
//! [`Op`]: `create_resource` (pending or immediate `Online` / `Offline`, `PendingTimeout` also
//! below the minimum), `online`, `offline`, `cancel` (flags 0 or non-zero reserved flags),
//! `terminate`, all four also on ids the monitor did not issue; `next_work`, and for a worker
//! the test holds: `report_status`, `check_terminate`, `complete` (success or an error) and
//! dropping it; `advance_clock` and `check_pending_timeouts`.
//!
//! # What is compared
//!
//! After every step: every result exactly (`Win32Error`, `ResourceExitState`, the new time, the
//! number of operations timed out, which work item `next_work` gave); then `now_ms`,
//! `queued_work`, the `status()` of every resource (state, checkpoint, last report) and of two
//! unknown ids; for every worker the test holds its resource, kind and `check_terminate()` (so
//! which pending operations were cancelled or terminated); and `bugcheck::count()` (none
//! expected: each pending context is completed exactly once, invariant 6). At the end every
//! resource is terminated and every worker completes (`Terminate`): every object must have been
//! completed once.
//!
//! A tally of outcomes (shown with `--nocapture`) must reach every entry of [`MUST_SEE`]. A
//! failing sequence is shrunk by proptest and then by `minimize` (with [`simpler`]), and printed
//! numbered. The property runs under `BugCheckPolicy::Record` holding the lock of
//! `common::exclusive`. That machinery is `tests/common/model_harness.rs`, shared with
//! `tests/model.rs` ([`model_harness::check_property`], [`model_harness::run_sequence`]).
//!
//! Left out: concurrency (loom covers Cancel ∥ completion, Terminate ∥ completion and the
//! timeout ∥ a report), a monitor dropped while workers run.
//!
//! Cases: `RDBSS_MODEL_CASES` (default 2 000) sequences of 1 to [`MAX_OPS`] operations.

#![cfg(feature = "std")]

use std::collections::VecDeque;
use std::fmt;

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use rdbss::bugcheck;
use rdbss::irql::{self, Irql};
use rdbss::resmon::{
    PendingKind, PendingWork, ResourceConfig, ResourceExitState, ResourceId, ResourceMonitor,
    ResourceState, ResourceStatus, Win32Error,
};

mod common;
use common::model_harness::{self, ensure_eq, Tally};

/// Resources per sequence, at most.
const MAX_RESOURCES: usize = 4;
/// Workers the test holds at most (`next_work` is skipped beyond).
const MAX_WORKERS: usize = 4;
/// Operations per sequence, at most.
const MAX_OPS: usize = 50;
/// Cases when `RDBSS_MODEL_CASES` is not set.
const DEFAULT_CASES: u32 = 2_000;

/// `PendingTimeout` choices: one below the 10 ms minimum, the minimum, a small one, the default.
const TIMEOUTS: [u32; 4] = [5, 10, 50, 180_000];
/// Clock steps, around the timeouts.
const STEPS: [u64; 6] = [1, 5, 10, 11, 60, 180_001];
/// `CancelFlags_RESERVED` values: 0 (the only valid one) and two non-zero ones.
const FLAGS: [u32; 3] = [0, 1, 0x8000_0000];
/// Worker results.
const RESULTS: [Win32Error; 3] = [
    Win32Error::SUCCESS,
    Win32Error::OPERATION_ABORTED,
    Win32Error::TIMEOUT,
];
/// Ids the monitor never issues in a sequence.
const UNKNOWN: [ResourceId; 2] = [ResourceId(MAX_RESOURCES as u32), ResourceId(u32::MAX)];

// ---------------------------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------------------------

/// A resource argument: one created earlier (modulo their number) or an unknown id.
#[derive(Clone, Copy, Debug)]
enum Res {
    Created(usize),
    Unknown(usize),
}

/// One call. `w` picks a worker the test holds (modulo their number; skipped if none).
#[derive(Clone, Debug)]
enum Op {
    /// `create_resource` with pending `Online` / `Offline` and `TIMEOUTS[t]`.
    Create {
        pending_online: bool,
        pending_offline: bool,
        t: usize,
    },
    Online {
        r: Res,
    },
    Offline {
        r: Res,
    },
    /// `cancel(r, FLAGS[f])`.
    Cancel {
        r: Res,
        f: usize,
    },
    Terminate {
        r: Res,
    },
    /// `next_work`; the item is kept.
    NextWork,
    ReportStatus {
        w: usize,
    },
    CheckTerminate {
        w: usize,
    },
    /// `complete(RESULTS[result])`.
    Complete {
        w: usize,
        result: usize,
    },
    /// Drops the worker's item without completing.
    DropWork {
        w: usize,
    },
    /// `advance_clock(STEPS[s])`.
    Advance {
        s: usize,
    },
    CheckTimeouts,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let r = || {
        prop_oneof![
            12 => (0..MAX_RESOURCES).prop_map(Res::Created),
            1 => (0..UNKNOWN.len()).prop_map(Res::Unknown),
        ]
    };
    let w = || 0..MAX_WORKERS;
    prop_oneof![
        8 => (prop::bool::weighted(0.6), prop::bool::weighted(0.8), prop_oneof![
            1 => Just(0usize), 3 => 1..3usize, 2 => Just(3usize)
        ])
            .prop_map(|(pending_online, pending_offline, t)| Op::Create {
                pending_online,
                pending_offline,
                t
            }),
        10 => r().prop_map(|r| Op::Online { r }),
        6 => r().prop_map(|r| Op::Offline { r }),
        5 => (r(), prop_oneof![6 => Just(0usize), 1 => 1..FLAGS.len()])
            .prop_map(|(r, f)| Op::Cancel { r, f }),
        2 => r().prop_map(|r| Op::Terminate { r }),
        6 => Just(Op::NextWork),
        4 => w().prop_map(|w| Op::ReportStatus { w }),
        2 => w().prop_map(|w| Op::CheckTerminate { w }),
        6 => (w(), 0..RESULTS.len()).prop_map(|(w, result)| Op::Complete { w, result }),
        1 => w().prop_map(|w| Op::DropWork { w }),
        6 => (0..STEPS.len()).prop_map(|s| Op::Advance { s }),
        5 => Just(Op::CheckTimeouts),
    ]
}

// ---------------------------------------------------------------------------------------------
// The reference model
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct MPending {
    op: usize,
    previous: ResourceState,
    last_report_ms: u64,
    checkpoint: u32,
}

#[derive(Clone, Debug)]
struct MRes {
    config: ResourceConfig,
    state: ResourceState,
    pending: Option<MPending>,
}

/// One pending operation (its context).
#[derive(Clone, Debug)]
struct MOp {
    resource: usize,
    kind: PendingKind,
    cancelled: bool,
    armed: bool,
    completed: bool,
}

#[derive(Debug, Default)]
struct Model {
    now_ms: u64,
    resources: Vec<MRes>,
    ops: Vec<MOp>,
    queue: VecDeque<usize>,
    workers: Vec<usize>,
}

fn target(kind: PendingKind) -> ResourceState {
    match kind {
        PendingKind::Online => ResourceState::Online,
        PendingKind::Offline => ResourceState::Offline,
    }
}

impl Model {
    fn resolve(&self, r: Res) -> Option<usize> {
        match r {
            Res::Created(i) => (!self.resources.is_empty()).then(|| i % self.resources.len()),
            Res::Unknown(_) => None,
        }
    }

    fn status(&self, r: usize) -> ResourceStatus {
        let res = &self.resources[r];
        ResourceStatus {
            state: res.state,
            checkpoint: res.pending.map_or(0, |p| p.checkpoint),
            last_report_ms: res.pending.map(|p| p.last_report_ms),
        }
    }

    /// Completes `op`'s request; a second completion is a model error (and a bug check in the
    /// implementation, which `check` would see).
    fn complete(&mut self, op: usize) -> Result<(), String> {
        if std::mem::replace(&mut self.ops[op].completed, true) {
            return Err(format!("model: operation {op} completed twice"));
        }
        Ok(())
    }

    fn is_pending(&self, op: usize) -> bool {
        self.resources[self.ops[op].resource]
            .pending
            .is_some_and(|p| p.op == op)
    }

    /// The core's cancel of `op`: `true` if it called `pending_cancel_routine`.
    fn cancel_op(&mut self, op: usize) -> Result<bool, String> {
        let o = &mut self.ops[op];
        if o.cancelled {
            return Ok(false);
        }
        o.cancelled = true;
        if !std::mem::take(&mut o.armed) {
            return Ok(false);
        }
        // The routine: settles the resource back if the operation is still its pending one.
        if self.is_pending(op) {
            let res = &mut self.resources[self.ops[op].resource];
            let pending = res.pending.take().expect("pending");
            res.state = pending.previous;
        }
        self.complete(op)?;
        Ok(true)
    }

    fn create(&mut self, config: ResourceConfig) -> Result<usize, Win32Error> {
        if config.pending_timeout_ms < 10 {
            return Err(Win32Error::INVALID_PARAMETER);
        }
        self.resources.push(MRes {
            config,
            state: ResourceState::Offline,
            pending: None,
        });
        Ok(self.resources.len() - 1)
    }

    fn start(&mut self, r: Option<usize>, kind: PendingKind) -> Win32Error {
        let Some(r) = r else {
            return Win32Error::RESOURCE_NOT_FOUND;
        };
        let now_ms = self.now_ms;
        let res = &mut self.resources[r];
        let goes_pending = match (kind, res.state) {
            (_, state) if state.is_pending() => return Win32Error::INVALID_STATE,
            (PendingKind::Online, ResourceState::Online)
            | (PendingKind::Offline, ResourceState::Offline) => return Win32Error::SUCCESS,
            (PendingKind::Offline, ResourceState::Failed) => false,
            (PendingKind::Online, _) => res.config.pending_online,
            (PendingKind::Offline, _) => res.config.pending_offline,
        };
        if !goes_pending {
            res.state = target(kind);
            return Win32Error::SUCCESS;
        }
        let op = self.ops.len();
        res.pending = Some(MPending {
            op,
            previous: res.state,
            last_report_ms: now_ms,
            checkpoint: 0,
        });
        res.state = match kind {
            PendingKind::Online => ResourceState::OnlinePending,
            PendingKind::Offline => ResourceState::OfflinePending,
        };
        self.ops.push(MOp {
            resource: r,
            kind,
            cancelled: false,
            armed: true,
            completed: false,
        });
        self.queue.push_back(op);
        Win32Error::IO_PENDING
    }

    fn cancel(&mut self, r: Option<usize>, flags: u32) -> Result<Win32Error, String> {
        if flags != 0 {
            return Ok(Win32Error::INVALID_PARAMETER);
        }
        let Some(r) = r else {
            return Ok(Win32Error::RESOURCE_NOT_FOUND);
        };
        let Some(pending) = self.resources[r].pending else {
            return Ok(Win32Error::INVALID_STATE);
        };
        Ok(if self.cancel_op(pending.op)? {
            Win32Error::SUCCESS
        } else {
            Win32Error::INVALID_STATE
        })
    }

    /// `Terminate` (`end` = `Offline`) and the pending timeout (`end` = `Failed`).
    fn end_pending(&mut self, r: usize, end: ResourceState) -> Result<(), String> {
        let res = &mut self.resources[r];
        res.state = end;
        if let Some(pending) = res.pending.take() {
            self.cancel_op(pending.op)?;
        }
        Ok(())
    }

    fn check_timeouts(&mut self) -> Result<usize, String> {
        let now_ms = self.now_ms;
        let expired: Vec<usize> = (0..self.resources.len())
            .filter(|&r| {
                let res = &self.resources[r];
                res.pending.is_some_and(|p| {
                    now_ms.saturating_sub(p.last_report_ms)
                        > u64::from(res.config.pending_timeout_ms)
                })
            })
            .collect();
        for &r in &expired {
            self.end_pending(r, ResourceState::Failed)?;
        }
        Ok(expired.len())
    }

    fn report(&mut self, op: usize) -> ResourceExitState {
        if self.ops[op].cancelled || !self.is_pending(op) {
            return ResourceExitState::Terminate;
        }
        let now_ms = self.now_ms;
        let pending = self.resources[self.ops[op].resource]
            .pending
            .as_mut()
            .expect("pending");
        pending.checkpoint = pending.checkpoint.saturating_add(1);
        pending.last_report_ms = now_ms;
        ResourceExitState::Continue
    }

    fn complete_work(
        &mut self,
        op: usize,
        result: Win32Error,
    ) -> Result<ResourceExitState, String> {
        if self.ops[op].cancelled {
            return Ok(ResourceExitState::Terminate);
        }
        self.ops[op].armed = false;
        let mut exit = ResourceExitState::Terminate;
        if self.is_pending(op) {
            let kind = self.ops[op].kind;
            let res = &mut self.resources[self.ops[op].resource];
            res.pending = None;
            res.state = if result.is_success() {
                target(kind)
            } else {
                ResourceState::Failed
            };
            exit = ResourceExitState::Continue;
        }
        self.complete(op)?;
        Ok(exit)
    }
}

// ---------------------------------------------------------------------------------------------
// The real side and the comparison
// ---------------------------------------------------------------------------------------------

/// `what: result` for the coverage tally.
fn label(what: &str, result: &impl fmt::Debug) -> String {
    format!("{what}: {result:?}")
}

fn pick(len: usize, i: usize) -> Option<usize> {
    (len > 0).then(|| i % len)
}

struct Harness {
    model: Model,
    monitor: ResourceMonitor,
    ids: Vec<ResourceId>,
    workers: Vec<PendingWork>,
}

impl Harness {
    fn new() -> Self {
        Harness {
            model: Model::default(),
            monitor: ResourceMonitor::new(),
            ids: Vec::new(),
            workers: Vec::new(),
        }
    }

    /// The real id and the model's index; `None` (the operation is skipped) for a created
    /// resource when there is none yet.
    fn resolve(&self, r: Res) -> Option<(ResourceId, Option<usize>)> {
        match (r, self.model.resolve(r)) {
            (_, Some(i)) => Some((self.ids[i], Some(i))),
            (Res::Unknown(u), None) => Some((UNKNOWN[u], None)),
            (Res::Created(_), None) => None,
        }
    }

    fn step(&mut self, op: &Op) -> Result<Option<String>, String> {
        let label = match *op {
            Op::Create {
                pending_online,
                pending_offline,
                t,
            } => {
                if self.ids.len() >= MAX_RESOURCES {
                    return Ok(None);
                }
                let config = ResourceConfig {
                    pending_online,
                    pending_offline,
                    pending_timeout_ms: TIMEOUTS[t],
                };
                let real = self.monitor.create_resource(config);
                let expected = self.model.create(config);
                ensure_eq!(
                    real.map(|id| id.0 as usize),
                    expected,
                    "create_resource({config:?})"
                );
                if let Ok(id) = real {
                    self.ids.push(id);
                }
                label("create", &real.map(|_| ()))
            }
            Op::Online { r } | Op::Offline { r } => {
                let Some((id, i)) = self.resolve(r) else {
                    return Ok(None);
                };
                let (kind, what) = match op {
                    Op::Online { .. } => (PendingKind::Online, "online"),
                    _ => (PendingKind::Offline, "offline"),
                };
                let before = i.map(|i| self.model.resources[i].state);
                let real = match kind {
                    PendingKind::Online => self.monitor.online(id),
                    PendingKind::Offline => self.monitor.offline(id),
                };
                ensure_eq!(real, self.model.start(i, kind), "{what}({id:?})");
                match before {
                    Some(state) => format!("{what} from {state:?}: {real:?}"),
                    None => label(what, &real),
                }
            }
            Op::Cancel { r, f } => {
                let Some((id, i)) = self.resolve(r) else {
                    return Ok(None);
                };
                let real = self.monitor.cancel(id, FLAGS[f]);
                let expected = self.model.cancel(i, FLAGS[f])?;
                ensure_eq!(real, expected, "cancel({id:?}, {:#x})", FLAGS[f]);
                match i {
                    Some(i) if real.is_success() => {
                        format!(
                            "cancel: {real:?}, back to {:?}",
                            self.model.resources[i].state
                        )
                    }
                    _ => label("cancel", &real),
                }
            }
            Op::Terminate { r } => {
                let Some((id, i)) = self.resolve(r) else {
                    return Ok(None);
                };
                let real = self.monitor.terminate(id);
                let pending = i.is_some_and(|i| self.model.resources[i].pending.is_some());
                let expected = match i {
                    Some(i) => {
                        self.model.end_pending(i, ResourceState::Offline)?;
                        Win32Error::SUCCESS
                    }
                    None => Win32Error::RESOURCE_NOT_FOUND,
                };
                ensure_eq!(real, expected, "terminate({id:?})");
                if pending {
                    label("terminate pending", &real)
                } else {
                    label("terminate", &real)
                }
            }
            Op::NextWork => {
                if self.workers.len() >= MAX_WORKERS {
                    return Ok(None);
                }
                let real = self.monitor.next_work();
                let expected = self.model.queue.pop_front();
                match (real, expected) {
                    (Some(work), Some(op)) => {
                        let m = &self.model.ops[op];
                        ensure_eq!(
                            (work.resource(), work.kind()),
                            (self.ids[m.resource], m.kind),
                            "next_work"
                        );
                        self.workers.push(work);
                        self.model.workers.push(op);
                        "next_work: Some".to_string()
                    }
                    (None, None) => "next_work: None".to_string(),
                    (real, expected) => {
                        return Err(format!(
                            "next_work: implementation {real:?}, model {expected:?}"
                        ))
                    }
                }
            }
            Op::ReportStatus { w } => {
                let Some(w) = pick(self.workers.len(), w) else {
                    return Ok(None);
                };
                let real = self.workers[w].report_status();
                let expected = self.model.report(self.model.workers[w]);
                ensure_eq!(real, expected, "report_status of worker {w}");
                label("report_status", &real)
            }
            Op::CheckTerminate { w } => {
                let Some(w) = pick(self.workers.len(), w) else {
                    return Ok(None);
                };
                let real = self.workers[w].check_terminate();
                let expected = self.model.ops[self.model.workers[w]].cancelled;
                ensure_eq!(real, expected, "check_terminate of worker {w}");
                label("check_terminate", &real)
            }
            Op::Complete { w, result } => {
                let Some(w) = pick(self.workers.len(), w) else {
                    return Ok(None);
                };
                let result = RESULTS[result];
                let real = self.workers.remove(w).complete(result);
                let op = self.model.workers.remove(w);
                let expected = self.model.complete_work(op, result)?;
                ensure_eq!(real, expected, "complete({result:?}) of worker {w}");
                label("complete", &real)
            }
            Op::DropWork { w } => {
                let Some(w) = pick(self.workers.len(), w) else {
                    return Ok(None);
                };
                drop(self.workers.remove(w));
                self.model.workers.remove(w);
                "drop work".to_string()
            }
            Op::Advance { s } => {
                let real = self.monitor.advance_clock(STEPS[s]);
                self.model.now_ms = self.model.now_ms.saturating_add(STEPS[s]);
                ensure_eq!(real, self.model.now_ms, "advance_clock({})", STEPS[s]);
                "advance_clock".to_string()
            }
            Op::CheckTimeouts => {
                let real = self.monitor.check_pending_timeouts();
                ensure_eq!(real, self.model.check_timeouts()?, "check_pending_timeouts");
                format!("check_pending_timeouts: {}", real.min(2))
            }
        };
        Ok(Some(label))
    }

    fn check(&self) -> Result<(), String> {
        let m = &self.model;
        ensure_eq!(irql::current(), Irql::PASSIVE, "IRQL");
        ensure_eq!(bugcheck::count(), 0, "bugcheck::count()");
        ensure_eq!(self.monitor.now_ms(), m.now_ms, "now_ms");
        ensure_eq!(self.monitor.queued_work(), m.queue.len(), "queued_work");
        for (i, &id) in self.ids.iter().enumerate() {
            ensure_eq!(
                self.monitor.status(id),
                Ok(m.status(i)),
                "status of resource {i}"
            );
        }
        for id in UNKNOWN {
            ensure_eq!(
                self.monitor.status(id),
                Err(Win32Error::RESOURCE_NOT_FOUND),
                "status({id:?})"
            );
        }
        for (w, (work, &op)) in self.workers.iter().zip(&m.workers).enumerate() {
            let o = &m.ops[op];
            ensure_eq!(
                (work.resource(), work.kind(), work.check_terminate()),
                (self.ids[o.resource], o.kind, o.cancelled),
                "worker {w} (operation {op}): resource, kind, check_terminate"
            );
        }
        Ok(())
    }

    /// Terminates every resource and completes every worker; every operation must have been
    /// completed exactly once.
    fn finish(mut self) -> Result<(), String> {
        for i in 0..self.ids.len() {
            self.step(&Op::Terminate { r: Res::Created(i) })?;
            self.check()?;
        }
        loop {
            while !self.workers.is_empty() {
                self.step(&Op::Complete { w: 0, result: 0 })?;
                self.check()?;
            }
            if self.monitor.queued_work() == 0 {
                break;
            }
            self.step(&Op::NextWork)?;
            self.check()?;
        }
        for (op, o) in self.model.ops.iter().enumerate() {
            if !o.completed {
                return Err(format!("model: operation {op} never completed"));
            }
        }
        ensure_eq!(bugcheck::count(), 0, "bug checks at the end");
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
    "create: Ok(())",
    "create: Err(ERROR_INVALID_PARAMETER(87))",
    "online from Offline: ERROR_IO_PENDING(997)",
    "online from Offline: ERROR_SUCCESS(0)",
    "online from Failed: ERROR_IO_PENDING(997)",
    "online from Failed: ERROR_SUCCESS(0)",
    "online from Online: ERROR_SUCCESS(0)",
    "online from OnlinePending: ERROR_INVALID_STATE(5023)",
    "online from OfflinePending: ERROR_INVALID_STATE(5023)",
    "online: ERROR_RESOURCE_NOT_FOUND(5007)",
    "offline from Online: ERROR_IO_PENDING(997)",
    "offline from Online: ERROR_SUCCESS(0)",
    "offline from Offline: ERROR_SUCCESS(0)",
    "offline from Failed: ERROR_SUCCESS(0)",
    "offline from OnlinePending: ERROR_INVALID_STATE(5023)",
    "offline: ERROR_RESOURCE_NOT_FOUND(5007)",
    "cancel: ERROR_SUCCESS(0), back to Offline",
    "cancel: ERROR_SUCCESS(0), back to Online",
    "cancel: ERROR_SUCCESS(0), back to Failed",
    "cancel: ERROR_INVALID_STATE(5023)",
    "cancel: ERROR_INVALID_PARAMETER(87)",
    "cancel: ERROR_RESOURCE_NOT_FOUND(5007)",
    "terminate: ERROR_SUCCESS(0)",
    "terminate pending: ERROR_SUCCESS(0)",
    "terminate: ERROR_RESOURCE_NOT_FOUND(5007)",
    "next_work: Some",
    "next_work: None",
    "report_status: Continue",
    "report_status: Terminate",
    "check_terminate: true",
    "check_terminate: false",
    "complete: Continue",
    "complete: Terminate",
    "drop work",
    "advance_clock",
    "check_pending_timeouts: 0",
    "check_pending_timeouts: 1",
    "check_pending_timeouts: 2",
];

/// Simpler versions of one operation: smaller indices.
fn simpler(op: &Op) -> Vec<Op> {
    let below = |n: usize| 0..n;
    let res = |r: Res| -> Vec<Res> {
        match r {
            Res::Created(i) => below(i).map(Res::Created).collect(),
            Res::Unknown(u) => below(u).map(Res::Unknown).collect(),
        }
    };
    match *op {
        Op::Create {
            pending_online,
            pending_offline,
            t,
        } => below(t)
            .map(|t| Op::Create {
                pending_online,
                pending_offline,
                t,
            })
            .collect(),
        Op::Online { r } => res(r).into_iter().map(|r| Op::Online { r }).collect(),
        Op::Offline { r } => res(r).into_iter().map(|r| Op::Offline { r }).collect(),
        Op::Cancel { r, f } => res(r)
            .into_iter()
            .map(|r| Op::Cancel { r, f })
            .chain(below(f).map(|f| Op::Cancel { r, f }))
            .collect(),
        Op::Terminate { r } => res(r).into_iter().map(|r| Op::Terminate { r }).collect(),
        Op::NextWork | Op::CheckTimeouts => vec![],
        Op::ReportStatus { w } => below(w).map(|w| Op::ReportStatus { w }).collect(),
        Op::CheckTerminate { w } => below(w).map(|w| Op::CheckTerminate { w }).collect(),
        Op::Complete { w, result } => below(w)
            .map(|w| Op::Complete { w, result })
            .chain(below(result).map(|result| Op::Complete { w, result }))
            .collect(),
        Op::DropWork { w } => below(w).map(|w| Op::DropWork { w }).collect(),
        Op::Advance { s } => below(s).map(|s| Op::Advance { s }).collect(),
    }
}

#[test]
fn resource_monitor_matches_the_model() {
    let sequences = prop::collection::vec(op_strategy(), 1..=MAX_OPS);
    model_harness::check_property(sequences, run_case, simpler, DEFAULT_CASES, MUST_SEE);
}

/// A fixed sequence through the main paths, so a broken model is caught even if the random
/// cases miss a path.
#[test]
fn a_hand_written_sequence_matches_the_model() {
    let r0 = Res::Created(0);
    let ops = [
        Op::Create {
            pending_online: true,
            pending_offline: true,
            t: 2,
        },
        Op::Online { r: r0 },
        Op::NextWork,
        Op::ReportStatus { w: 0 },
        Op::Cancel { r: r0, f: 1 },
        Op::Cancel { r: r0, f: 0 },
        Op::CheckTerminate { w: 0 },
        Op::Complete { w: 0, result: 0 },
        Op::Cancel { r: r0, f: 0 },
        Op::Online { r: r0 },
        Op::NextWork,
        Op::Complete { w: 0, result: 0 },
        Op::Offline { r: r0 },
        Op::Advance { s: 5 },
        Op::CheckTimeouts,
        Op::NextWork,
        Op::Complete { w: 0, result: 1 },
        Op::Online { r: Res::Unknown(1) },
        Op::Terminate { r: r0 },
        Op::Create {
            pending_online: false,
            pending_offline: false,
            t: 0,
        },
    ];
    model_harness::check_sequence(&ops, run_case);
}
