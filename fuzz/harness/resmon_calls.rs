//! `resmon_calls`: sequences over `rdbss::resmon` (the cluster resource monitor and the DLL's
//! `Cancel`), decoded from the fuzzer's bytes with `arbitrary`: create resources with any
//! configuration (pending or not, any `PendingTimeout`), `Online` / `Offline` / `Cancel` (any
//! reserved flags) / `Terminate` on known and unknown ids, workers taking, reporting on,
//! checking, completing (success or error) or abandoning their item, the clock moving, the
//! pending timeout running.
//!
//! A model of each resource (state, pending operation with its previous state, last report and
//! checkpoint) and of each pending operation (cancelled or not, finished by its worker or not)
//! predicts every result. After every call: every return code matches (`ERROR_IO_PENDING`,
//! `ERROR_INVALID_STATE`, `ERROR_INVALID_PARAMETER`, `ERROR_RESOURCE_NOT_FOUND`, the exit states
//! told to workers), every resource's status (state, checkpoint, last report) matches, the work
//! queue and the clock match, no bug check was reported (so no operation's context was completed
//! twice), the IRQL is `PASSIVE_LEVEL`. At the end (every worker item taken and completed or
//! dropped, the clock moved past every timeout and the timeout run): every resource is in a
//! defined state (`Online`, `Offline` or `Failed`) with nothing pending, and every worker is told
//! to stop exactly when its operation was aborted.

use std::collections::VecDeque;

use arbitrary::{Arbitrary, Unstructured};

use rdbss::bugcheck::{self, BugCheckPolicy};
use rdbss::irql::{self, Irql};
use rdbss::resmon::{
    PendingKind, PendingWork, ResourceConfig, ResourceExitState, ResourceId, ResourceMonitor,
    ResourceState, ResourceStatus, Win32Error, MIN_PENDING_TIMEOUT_MS,
};

/// Operations per input, at most.
pub const MAX_OPS: usize = 128;
/// Resources at most.
const MAX_RESOURCES: usize = 8;

#[derive(Arbitrary, Clone, Debug)]
pub enum Op {
    Create {
        pending_online: bool,
        pending_offline: bool,
        timeout_ms: u16,
    },
    Online {
        r: u8,
    },
    Offline {
        r: u8,
    },
    Cancel {
        r: u8,
        flags: Option<u32>,
    },
    Terminate {
        r: u8,
    },
    NextWork,
    Report {
        w: u8,
    },
    CheckTerminate {
        w: u8,
    },
    Complete {
        w: u8,
        success: bool,
    },
    DropWork {
        w: u8,
    },
    Advance {
        ms: u16,
    },
    CheckTimeouts,
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

struct PendingModel {
    op: usize,
    kind: PendingKind,
    previous: ResourceState,
    last_report_ms: u64,
    checkpoint: u32,
}

struct ResModel {
    config: ResourceConfig,
    state: ResourceState,
    pending: Option<PendingModel>,
}

/// One pending operation ever started.
struct OpModel {
    resource: usize,
    cancelled: bool,
    /// The worker's disarm won.
    finished_by_worker: bool,
}

struct Harness {
    monitor: ResourceMonitor,
    now_ms: u64,
    res: Vec<ResModel>,
    ops: Vec<OpModel>,
    /// Work items queued in the monitor (operations), oldest first.
    queued: VecDeque<usize>,
    /// Work items the harness's workers hold.
    workers: Vec<(usize, PendingWork)>,
}

fn pick<T>(v: &[T], i: u8) -> Option<usize> {
    (!v.is_empty()).then(|| usize::from(i) % v.len())
}

fn target(kind: PendingKind) -> ResourceState {
    match kind {
        PendingKind::Online => ResourceState::Online,
        PendingKind::Offline => ResourceState::Offline,
    }
}

fn pending_state(kind: PendingKind) -> ResourceState {
    match kind {
        PendingKind::Online => ResourceState::OnlinePending,
        PendingKind::Offline => ResourceState::OfflinePending,
    }
}

impl Harness {
    /// An id: mostly a known resource, sometimes one past the end (unknown).
    fn id(&self, r: u8) -> (ResourceId, Option<usize>) {
        let n = self.res.len() + 1;
        let i = usize::from(r) % n;
        (ResourceId(i as u32), (i < self.res.len()).then_some(i))
    }

    /// Aborting operation `op` through the core (its routine runs once).
    fn abort(&mut self, op: usize) {
        let m = &mut self.ops[op];
        assert!(
            !m.cancelled && !m.finished_by_worker,
            "an ended operation was pending"
        );
        m.cancelled = true;
    }

    fn start(&mut self, r: u8, kind: PendingKind) {
        let (id, known) = self.id(r);
        let got = match kind {
            PendingKind::Online => self.monitor.online(id),
            PendingKind::Offline => self.monitor.offline(id),
        };
        let Some(i) = known else {
            assert_eq!(got, Win32Error::RESOURCE_NOT_FOUND);
            return;
        };
        let res = &mut self.res[i];
        let goes_pending = match (kind, res.state) {
            (_, s) if s == ResourceState::OnlinePending || s == ResourceState::OfflinePending => {
                assert_eq!(got, Win32Error::INVALID_STATE, "start while pending");
                return;
            }
            (PendingKind::Online, ResourceState::Online)
            | (PendingKind::Offline, ResourceState::Offline) => {
                assert_eq!(got, Win32Error::SUCCESS, "nothing to do");
                return;
            }
            (PendingKind::Offline, ResourceState::Failed) => false,
            (PendingKind::Online, _) => res.config.pending_online,
            (PendingKind::Offline, _) => res.config.pending_offline,
        };
        if !goes_pending {
            assert_eq!(got, Win32Error::SUCCESS, "immediate {kind:?}");
            res.state = target(kind);
            return;
        }
        assert_eq!(got, Win32Error::IO_PENDING, "pending {kind:?}");
        let op = self.ops.len();
        self.ops.push(OpModel {
            resource: i,
            cancelled: false,
            finished_by_worker: false,
        });
        let res = &mut self.res[i];
        res.pending = Some(PendingModel {
            op,
            kind,
            previous: res.state,
            last_report_ms: self.now_ms,
            checkpoint: 0,
        });
        res.state = pending_state(kind);
        self.queued.push_back(op);
    }

    fn step(&mut self, op: &Op) {
        match *op {
            Op::Create {
                pending_online,
                pending_offline,
                timeout_ms,
            } => {
                if self.res.len() >= MAX_RESOURCES {
                    return;
                }
                let config = ResourceConfig {
                    pending_online,
                    pending_offline,
                    pending_timeout_ms: u32::from(timeout_ms),
                };
                let got = self.monitor.create_resource(config);
                if config.pending_timeout_ms < MIN_PENDING_TIMEOUT_MS {
                    assert_eq!(got, Err(Win32Error::INVALID_PARAMETER));
                    return;
                }
                assert_eq!(got, Ok(ResourceId(self.res.len() as u32)));
                self.res.push(ResModel {
                    config,
                    state: ResourceState::Offline,
                    pending: None,
                });
            }
            Op::Online { r } => self.start(r, PendingKind::Online),
            Op::Offline { r } => self.start(r, PendingKind::Offline),
            Op::Cancel { r, flags } => {
                let flags = flags.unwrap_or(0);
                let (id, known) = self.id(r);
                let got = self.monitor.cancel(id, flags);
                if flags != 0 {
                    assert_eq!(got, Win32Error::INVALID_PARAMETER, "reserved flags");
                    return;
                }
                let Some(i) = known else {
                    assert_eq!(got, Win32Error::RESOURCE_NOT_FOUND);
                    return;
                };
                match self.res[i].pending.take() {
                    None => assert_eq!(
                        got,
                        Win32Error::INVALID_STATE,
                        "cancel with nothing pending"
                    ),
                    Some(p) => {
                        assert_eq!(got, Win32Error::SUCCESS, "cancel of a pending operation");
                        self.res[i].state = p.previous;
                        self.abort(p.op);
                    }
                }
            }
            Op::Terminate { r } => {
                let (id, known) = self.id(r);
                let got = self.monitor.terminate(id);
                let Some(i) = known else {
                    assert_eq!(got, Win32Error::RESOURCE_NOT_FOUND);
                    return;
                };
                assert_eq!(got, Win32Error::SUCCESS);
                self.res[i].state = ResourceState::Offline;
                if let Some(p) = self.res[i].pending.take() {
                    self.abort(p.op);
                }
            }
            Op::NextWork => {
                let got = self.monitor.next_work();
                match (self.queued.pop_front(), got) {
                    (None, None) => {}
                    (Some(op), Some(work)) => {
                        assert_eq!(work.resource(), ResourceId(self.ops[op].resource as u32));
                        self.workers.push((op, work));
                    }
                    (expected, got) => panic!("next_work: expected {expected:?}, got {got:?}"),
                }
            }
            Op::Report { w } => {
                let Some(w) = pick(&self.workers, w) else {
                    return;
                };
                let (op, ref work) = self.workers[w];
                let got = work.report_status();
                let r = self.ops[op].resource;
                let res = &mut self.res[r];
                match res.pending.as_mut() {
                    Some(p) if p.op == op && !self.ops[op].cancelled => {
                        assert_eq!(got, ResourceExitState::Continue, "report");
                        p.checkpoint += 1;
                        p.last_report_ms = self.now_ms;
                    }
                    _ => assert_eq!(got, ResourceExitState::Terminate, "report after the end"),
                }
            }
            Op::CheckTerminate { w } => {
                let Some(w) = pick(&self.workers, w) else {
                    return;
                };
                let (op, ref work) = self.workers[w];
                assert_eq!(
                    work.check_terminate(),
                    self.ops[op].cancelled,
                    "check_terminate"
                );
            }
            Op::Complete { w, success } => {
                let Some(w) = pick(&self.workers, w) else {
                    return;
                };
                let (op, work) = self.workers.remove(w);
                let result = if success {
                    Win32Error::SUCCESS
                } else {
                    Win32Error::OPERATION_ABORTED
                };
                let got = work.complete(result);
                if self.ops[op].cancelled {
                    assert_eq!(got, ResourceExitState::Terminate, "complete after an abort");
                    return;
                }
                assert!(!self.ops[op].finished_by_worker);
                self.ops[op].finished_by_worker = true;
                let r = self.ops[op].resource;
                let res = &mut self.res[r];
                let p = res
                    .pending
                    .take()
                    .filter(|p| p.op == op)
                    .expect("an operation neither aborted nor completed is pending");
                assert_eq!(got, ResourceExitState::Continue, "complete");
                res.state = if success {
                    target(p.kind)
                } else {
                    ResourceState::Failed
                };
            }
            Op::DropWork { w } => {
                let Some(w) = pick(&self.workers, w) else {
                    return;
                };
                drop(self.workers.remove(w));
            }
            Op::Advance { ms } => {
                let got = self.monitor.advance_clock(u64::from(ms));
                self.now_ms = self.now_ms.saturating_add(u64::from(ms));
                assert_eq!(got, self.now_ms);
            }
            Op::CheckTimeouts => {
                let got = self.monitor.check_pending_timeouts();
                let mut expected = 0;
                for i in 0..self.res.len() {
                    let timeout = u64::from(self.res[i].config.pending_timeout_ms);
                    let expired = self.res[i]
                        .pending
                        .as_ref()
                        .is_some_and(|p| self.now_ms.saturating_sub(p.last_report_ms) > timeout);
                    if expired {
                        let p = self.res[i].pending.take().unwrap();
                        self.res[i].state = ResourceState::Failed;
                        self.abort(p.op);
                        expected += 1;
                    }
                }
                assert_eq!(got, expected, "timeouts");
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
        assert_eq!(self.monitor.now_ms(), self.now_ms);
        assert_eq!(
            self.monitor.queued_work(),
            self.queued.len(),
            "queued work after {op:?}"
        );
        for (i, res) in self.res.iter().enumerate() {
            let expected = ResourceStatus {
                state: res.state,
                checkpoint: res.pending.as_ref().map_or(0, |p| p.checkpoint),
                last_report_ms: res.pending.as_ref().map(|p| p.last_report_ms),
            };
            assert_eq!(
                self.monitor.status(ResourceId(i as u32)),
                Ok(expected),
                "status of {i} after {op:?}"
            );
            assert_eq!(res.state.is_pending(), res.pending.is_some());
        }
        let unknown = ResourceId(self.res.len() as u32);
        assert_eq!(
            self.monitor.state(unknown),
            Err(Win32Error::RESOURCE_NOT_FOUND)
        );
        for (op_index, work) in &self.workers {
            assert_eq!(work.check_terminate(), self.ops[*op_index].cancelled);
        }
    }

    fn finish(mut self) {
        while !self.queued.is_empty() {
            self.step(&Op::NextWork);
        }
        // Half of the workers complete, the others abandon their item.
        let mut k = 0u8;
        while !self.workers.is_empty() {
            if k % 2 == 0 {
                self.step(&Op::Complete {
                    w: 0,
                    success: k % 4 == 0,
                });
            } else {
                self.step(&Op::DropWork { w: 0 });
            }
            k = k.wrapping_add(1);
        }
        // Past every timeout.
        for _ in 0..2 {
            self.step(&Op::Advance { ms: u16::MAX });
        }
        self.step(&Op::CheckTimeouts);
        for (i, res) in self.res.iter().enumerate() {
            assert!(res.pending.is_none(), "resource {i} still pending");
            assert!(
                matches!(
                    res.state,
                    ResourceState::Online | ResourceState::Offline | ResourceState::Failed
                ),
                "resource {i} in {:?}",
                res.state
            );
        }
        for (i, op) in self.ops.iter().enumerate() {
            assert!(
                op.cancelled != op.finished_by_worker,
                "operation {i} ended {} times",
                u8::from(op.cancelled) + u8::from(op.finished_by_worker)
            );
        }
        assert_eq!(bugcheck::count(), 0);
    }
}

/// Runs one input: decodes it and checks every call and the end state. Panics on a violation.
pub fn run(data: &[u8]) {
    bugcheck::set_policy(BugCheckPolicy::Record);
    bugcheck::clear();
    let ops = decode(data);
    let mut harness = Harness {
        monitor: ResourceMonitor::new(),
        now_ms: 0,
        res: Vec::new(),
        ops: Vec::new(),
        queued: VecDeque::new(),
        workers: Vec::new(),
    };
    for op in &ops {
        harness.step(op);
    }
    harness.finish();
}
