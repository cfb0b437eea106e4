//! The simulation engine: shards of clients driven by event loops, in virtual or real time.
//!
//! A run has one RDBSS instance ([`rdbss::Rdbss`]), one server and one network, shared by every
//! thread, and `n` shards. Each shard owns the clients `c` with `c % n == shard` and runs their
//! mini-redirector: issuing requests, dispatching exchanges, receiving replies and completing.
//! The server's work for a client's messages runs on that client's shard. What crosses shards —
//! a user cancel, a timeout, a reply that fires another client's change-notify, the CANCEL that a
//! cancel routine sends — goes through the target shard's inbox.
//!
//! - [`Mode::Deterministic`]: one shard on one thread, virtual time. Events are ordered by
//!   (time, sequence number) and every random draw comes from one seeded generator, so a seed
//!   gives the same run, event for event.
//! - [`Mode::Threads`]: one OS thread per shard and wall-clock time; user cancels and timeouts of
//!   a client's requests are issued from another shard's thread, and the session teardown from
//!   the controlling thread, so cancels race completion on the real spin lock and atomics.
//!
//! Invariants:
//! 1. A client's state is touched only by its shard's thread (no lock). Everything shared is the
//!    rdbss instance, the server (one mutex), the records (atomics) and the inboxes (one mutex
//!    each).
//! 2. Every `ContextRef` the engine holds lives in exactly one place: a scheduled event, a
//!    client's exchange table, or one of the client's two `BlockedQueue`s of the core (pipe
//!    order; waiting for a credit or the connection); dropping the shards therefore drops every
//!    handle the engine has.
//! 3. The run ends when every created request is completed, no exchange is open at the client
//!    or the server, the work queue is empty, and every shard's event queue has drained (a timer
//!    of a completed request is cancelled, not waited for).
//! 4. One run at a time per process: the bug-check policy and counter are process-wide, so runs
//!    hold `RUN_LOCK` and set the `Record` policy for their duration.
//! 5. Messages between a client and the server are delivered in order in each direction (one
//!    TCP connection per session); events at the same time run in the order they were scheduled.

use crate::config::{Bug, Config, Micros, Mode, OpKind};
use crate::mi::MiLayer;
use crate::minirdr::{mrx_cancel, MiniRequest};
use crate::net::{sample, Network};
use crate::record::{CancelEffect, CancelReason, Checker, Invariant, RequestRecord};
use crate::report::{self, Report};
use crate::resource::Connections;
use crate::server::{Op, Received, Reply, Request, Server};
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;
use rdbss::bugcheck::{self, BugCheckPolicy};
use rdbss::resmon::{PendingWork, ResourceExitState, ResourceId, ResourceState, Win32Error};
use rdbss::{
    irql, BlockedQueue, CancelByIdOutcome, CancelOutcome, ContextInit, ContextRef, DrainStatus,
    Irql, MajorFunction, ManualWorkQueue, NtStatus, Rdbss, RequestId, WorkQueue,
};
use std::cmp::Ordering as CmpOrdering;
use std::collections::{BTreeMap, BinaryHeap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Directories in the simulated share.
pub const SHARE_DIRS: u32 = 4;
/// Files per directory at the start.
pub const SHARE_FILES: u32 = 16;
/// Size of each file at the start.
pub const SHARE_FILE_SIZE: usize = 8192;

/// Serialises runs in one process (invariant 4).
static RUN_LOCK: Mutex<()> = Mutex::new(());

/// What a run produced.
#[derive(Debug)]
pub struct Outcome {
    /// Every figure of the run, and the invariants.
    pub report: Report,
    /// Wall-clock time the run took (not part of the report, which must be reproducible).
    pub wall: Duration,
}

impl Outcome {
    /// Whether every invariant held.
    pub fn passed(&self) -> bool {
        self.report.violations_total == 0
    }
}

/// The share's initial files: `dD/fF`, each `SHARE_FILE_SIZE` bytes of a pattern.
pub fn initial_share() -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    for d in 0..SHARE_DIRS {
        for f in 0..SHARE_FILES {
            let data = (0..SHARE_FILE_SIZE)
                .map(|i| (i as u32 ^ (d * 31 + f)) as u8)
                .collect();
            files.push((format!("d{d}/f{f}"), data));
        }
    }
    files
}

/// Runs one simulation. `progress(completed, total)` is called now and then.
///
/// `Err` only for a configuration that does not validate; a failed invariant is in the report.
pub fn run(config: &Config, progress: &(dyn Fn(u64, u64) + Sync)) -> Result<Outcome, String> {
    config.validate()?;
    let _exclusive = RUN_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let policy = bugcheck::set_policy(BugCheckPolicy::Record);
    let bug_checks_before = bugcheck::count();
    let started = Instant::now();

    let shards = config.shard_count();
    let work_queue = ManualWorkQueue::new();
    let shared = Arc::new(Shared {
        config: config.clone(),
        rdbss: Rdbss::with_work_queue(work_queue.clone() as Arc<dyn WorkQueue<MiniRequest>>),
        work_queue,
        server: Server::new(
            config.clients,
            config.credits,
            &initial_share(),
            config.bug == Some(Bug::ServerKeepsQuota),
        ),
        network: Network::new(config),
        records: (0..config.requests)
            .map(|_| RequestRecord::default())
            .collect(),
        inboxes: (0..shards).map(|_| Inbox::default()).collect(),
        clock: match config.mode {
            Mode::Deterministic => Clock::Virtual(AtomicU64::new(0)),
            Mode::Threads => Clock::Real(Instant::now()),
        },
        checker: Checker::default(),
        counters: Counters::default(),
        mi: MiLayer::new(config.mi_quota),
        connections: Connections::new(
            shards,
            config.clients,
            (config.pending_timeout / 1000) as u32,
        ),
    });

    let mut all: Vec<Shard> = (0..shards).map(|i| Shard::new(&shared, i)).collect();
    for shard in &mut all {
        shard.start();
    }
    match config.mode {
        Mode::Deterministic => {
            for mut shard in all {
                shard.run_deterministic(progress);
            }
        }
        Mode::Threads => run_threads(&shared, all, progress),
    }
    // Every shard, and with it every handle the engine held (invariant 2), is gone now.
    while shared.work_queue.run_pending() > 0 {}
    progress(
        shared.counters.completed.load(Ordering::Acquire),
        config.requests,
    );

    let report = shared.final_checks(bug_checks_before);
    bugcheck::set_policy(policy);
    Ok(Outcome {
        report,
        wall: started.elapsed(),
    })
}

/// Threads mode: one thread per shard; this thread tears the session down and decides the end.
fn run_threads(shared: &Arc<Shared>, shards: Vec<Shard>, progress: &(dyn Fn(u64, u64) + Sync)) {
    std::thread::scope(|scope| {
        for mut shard in shards {
            scope.spawn(move || shard.run_threads());
        }
        let mut last_sweep = Instant::now();
        let (mut last_completed, mut last_progress) = (0, Instant::now());
        // Long enough for several request lifetimes at the configured latencies.
        let stall = STALL.max(Duration::from_micros(4 * cancel_window(&shared.config)));
        loop {
            std::thread::sleep(Duration::from_micros(500));
            let c = &shared.counters;
            let completed = c.completed.load(Ordering::Acquire);
            progress(completed, shared.config.requests);
            // A broken variant can leave requests that never complete: after STALL without a
            // completion, tear down; after another, stop, and let the checks report them.
            let stalled = if completed != last_completed {
                (last_completed, last_progress) = (completed, Instant::now());
                false
            } else {
                last_progress.elapsed() > stall
            };
            if !c.teardown.load(Ordering::Acquire) {
                if shared.teardown_due() || stalled {
                    shared.teardown();
                    (last_sweep, last_progress) = (Instant::now(), Instant::now());
                }
                continue;
            }
            if shared.quiescent() || stalled {
                c.finished.store(true, Ordering::Release);
                for inbox in shared.inboxes.iter() {
                    inbox.wake.notify_all();
                }
                break;
            }
            // A request created just before the drain started may have been missed by the
            // sweep (its id was not recorded yet): sweep again now and then.
            if last_sweep.elapsed() > Duration::from_millis(10) {
                shared.sweep_teardown();
                last_sweep = Instant::now();
            }
        }
    });
}

/// Threads mode: how long without a completion counts as stalled (at least).
const STALL: Duration = Duration::from_secs(3);

enum Clock {
    Virtual(AtomicU64),
    Real(Instant),
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) next_index: AtomicU64,
    pub(crate) issued: AtomicU64,
    pub(crate) create_failed: AtomicU64,
    pub(crate) completed: AtomicU64,
    pub(crate) notify_open: AtomicU64,
    pub(crate) exchanges_in_flight: AtomicU64,
    pub(crate) teardown: AtomicBool,
    pub(crate) finished: AtomicBool,
    pub(crate) retransmits: AtomicU64,
    pub(crate) partitioned: AtomicU64,
    pub(crate) stale_replies: AtomicU64,
    pub(crate) disconnected: AtomicU64,
    pub(crate) last_completion: AtomicU64,
    /// `[reason][effect]`: what each cancel call did.
    pub(crate) cancel_calls: [[AtomicU64; 6]; 3],
}

#[derive(Default)]
struct Inbox {
    queue: Mutex<Vec<Incoming>>,
    wake: Condvar,
}

enum Incoming {
    /// Run the event at this time.
    At(Micros, Event),
    /// A message sent at this time: the receiving shard's network model decides its arrival.
    Net(Micros, Event),
}

enum Event {
    Issue {
        client: u32,
    },
    Dispatch {
        client: u32,
        ctx: ContextRef<MiniRequest>,
    },
    ServerReceive(Request),
    ServerFinish {
        client: u32,
        msg: u64,
        epoch: u32,
    },
    ServerCancel {
        client: u32,
        msg: u64,
        epoch: u32,
    },
    Response(Reply),
    Complete {
        ctx: ContextRef<MiniRequest>,
        status: NtStatus,
        info: usize,
    },
    UserCancel {
        index: u32,
    },
    Timeout {
        index: u32,
    },
    SlotFree {
        client: u32,
        index: u32,
    },
    Crash,
    Restart,
    Disconnect,
    Reconnect {
        epoch: u32,
    },
    Teardown,
    /// The connection resource's worker finishes its pending Online (`serial` names it).
    OnlineDone {
        client: u32,
        serial: u64,
    },
    /// The pending timeout of the client's Online `serial` may have expired.
    PendingTimeoutCheck {
        client: u32,
        serial: u64,
    },
}

/// State shared by every thread of a run.
pub struct Shared {
    pub(crate) config: Config,
    pub(crate) rdbss: Rdbss<MiniRequest>,
    work_queue: Arc<ManualWorkQueue<MiniRequest>>,
    pub(crate) server: Server,
    network: Network,
    records: Box<[RequestRecord]>,
    inboxes: Box<[Inbox]>,
    clock: Clock,
    pub(crate) checker: Checker,
    pub(crate) counters: Counters,
    /// The MI layer: directory enumeration and method calls as MI operations.
    pub(crate) mi: MiLayer,
    /// The clients' share connections as cluster resources.
    pub(crate) connections: Connections,
}

impl Shared {
    /// The run's clock (virtual or wall-clock microseconds).
    pub(crate) fn now(&self) -> Micros {
        match &self.clock {
            Clock::Virtual(t) => t.load(Ordering::Acquire),
            Clock::Real(start) => start.elapsed().as_micros() as Micros,
        }
    }

    pub(crate) fn record(&self, index: u32) -> &RequestRecord {
        &self.records[index as usize]
    }

    fn shard_of(&self, client: u32) -> usize {
        client as usize % self.inboxes.len()
    }

    fn post(&self, shard: usize, incoming: Incoming) {
        let inbox = &self.inboxes[shard];
        inbox
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(incoming);
        inbox.wake.notify_one();
    }

    /// The cancel routine's message: CANCEL for `(client, msg)`, over the network.
    pub(crate) fn send_server_cancel(&self, client: u32, msg: u64, epoch: u32) {
        self.post(
            self.shard_of(client),
            Incoming::Net(self.now(), Event::ServerCancel { client, msg, epoch }),
        );
    }

    /// Records a completion of request `index` with `status`, checking invariants 1 and 2 of the
    /// checker (exactly once; cancelled before start means STATUS_CANCELLED). Called just before
    /// the core's `complete_request`, or just after the core completed a blocked operation.
    pub(crate) fn note_completion(&self, index: u32, status: NtStatus) {
        let record = self.record(index);
        let now = self.now();
        let n = record.completions.fetch_add(1, Ordering::AcqRel) + 1;
        if n > 1 {
            record.second_status.store(status.code(), Ordering::Release);
            self.checker.fail(
                Invariant::ExactlyOnce,
                Some((index, record)),
                format!(
                    "completed {n} times: first with {}, then with {status}",
                    NtStatus::from_code(record.status.load(Ordering::Acquire))
                ),
            );
            return;
        }
        record.status.store(status.code(), Ordering::Release);
        record.completed.set(now);
        let before_start = record.refused.get().is_some()
            || record.effect() == Some(CancelEffect::BlockedOperationCancelled);
        if before_start && status != NtStatus::CANCELLED {
            self.checker.fail(
                Invariant::CancelledBeforeStart,
                Some((index, record)),
                format!("cancelled before its exchange started, but completed with {status}"),
            );
        }
        let c = &self.counters;
        c.last_completion.fetch_max(now, Ordering::AcqRel);
        if record.op_kind() == OpKind::ChangeNotify {
            c.notify_open.fetch_sub(1, Ordering::AcqRel);
        }
        c.completed.fetch_add(1, Ordering::AcqRel);
        let client = record.client.load(Ordering::Acquire);
        self.post(
            self.shard_of(client),
            Incoming::At(now, Event::SlotFree { client, index }),
        );
    }

    /// A cancel of request `index`: an MI operation is cancelled through `MI_Operation_Cancel`
    /// (its provider's callback then cancels the context), any other request's context directly.
    pub(crate) fn request_cancel(&self, index: u32, reason: CancelReason) {
        let record = self.record(index);
        if record.id.load(Ordering::Acquire) == 0 {
            return;
        }
        if reason == CancelReason::Timeout && record.completed.get().is_some() {
            // The timer was cancelled when the request completed: it never fires.
            return;
        }
        if self.mi.cancel(self, index, reason) {
            return;
        }
        self.cancel_rx(index, reason);
    }

    /// What RDBSS does when the I/O is cancelled: cancel the context by id. A timeout fires in a
    /// DPC, at DISPATCH_LEVEL, so its routine is deferred to the work queue.
    pub(crate) fn cancel_rx(&self, index: u32, reason: CancelReason) {
        let record = self.record(index);
        let raw = record.id.load(Ordering::Acquire);
        if raw == 0 {
            return;
        }
        if reason == CancelReason::Timeout && record.completed.get().is_some() {
            // The timer was cancelled when the request completed: it never fires.
            return;
        }
        record.note_cancel_requested(self.now(), reason);
        let id = RequestId::from_u64(raw);
        let outcome = {
            let _dpc = (reason == CancelReason::Timeout).then(|| irql::raise(Irql::DISPATCH));
            self.rdbss.cancel_by_id(id)
        };
        let effect = match outcome {
            Ok(CancelByIdOutcome::Cancelled(CancelOutcome::RoutineCalled(_))) => {
                CancelEffect::RoutineCalled
            }
            Ok(CancelByIdOutcome::Cancelled(CancelOutcome::NoRoutineArmed)) => {
                CancelEffect::NoRoutineArmed
            }
            Ok(CancelByIdOutcome::Cancelled(CancelOutcome::BlockedOperationCancelled)) => {
                CancelEffect::BlockedOperationCancelled
            }
            Ok(CancelByIdOutcome::Cancelled(CancelOutcome::AlreadyCancelled)) => {
                CancelEffect::AlreadyCancelled
            }
            Ok(CancelByIdOutcome::Deferred) => CancelEffect::Deferred,
            Ok(CancelByIdOutcome::AlreadyCompleted) | Err(_) => CancelEffect::TooLate,
        };
        record.note_cancel_effect(effect);
        self.counters.cancel_calls[reason as usize - 1][effect as usize - 1]
            .fetch_add(1, Ordering::Relaxed);
        if effect == CancelEffect::BlockedOperationCancelled {
            // The core unlinked the operation, completed it with STATUS_CANCELLED and dropped the
            // queue's handle, the only one (invariant 2).
            record.released.store(true, Ordering::Release);
            self.note_completion(index, NtStatus::CANCELLED);
        }
        if effect == CancelEffect::RoutineCalled && self.config.bug == Some(Bug::RoutineTwice) {
            if let Ok(ctx) = self.rdbss.lookup(id) {
                let _ = mrx_cancel(&ctx);
            }
        }
    }

    fn teardown_due(&self) -> bool {
        if let Some(at) = self.config.teardown_at {
            return self.now() >= at;
        }
        let c = &self.counters;
        let issued = c.issued.load(Ordering::Acquire);
        let all_issued = issued + c.create_failed.load(Ordering::Acquire) >= self.config.requests;
        // Only long-lived requests (change-notify) left: they end by cancel, so tear down.
        all_issued
            && issued == c.completed.load(Ordering::Acquire) + c.notify_open.load(Ordering::Acquire)
    }

    /// Session teardown: no new requests, and every request in flight is cancelled.
    pub(crate) fn teardown(&self) {
        if self.counters.teardown.swap(true, Ordering::AcqRel) {
            return;
        }
        self.rdbss.start_drain();
        self.mi.shutdown();
        // Each client's pending Online (if any) is cancelled: the connection is not wanted now.
        let rc = &self.connections.counters;
        for (monitor, &n) in self
            .connections
            .monitors
            .iter()
            .zip(self.connections.per_monitor.iter())
        {
            for id in 0..n {
                match monitor.cancel(ResourceId(id), 0) {
                    Win32Error::SUCCESS => &rc.cancel_succeeded,
                    Win32Error::INVALID_STATE => &rc.cancel_nothing_pending,
                    _ => &rc.cancel_other,
                }
                .fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sweep_teardown();
    }

    /// How many request indexes have been handed out (the records that may be in use).
    fn created(&self) -> u32 {
        self.counters
            .next_index
            .load(Ordering::Acquire)
            .min(self.config.requests) as u32
    }

    fn sweep_teardown(&self) {
        let created = self.created();
        for index in 0..created {
            let record = self.record(index);
            if !record.is_created() || record.completed.get().is_some() {
                continue;
            }
            // An MI operation not cancelled yet: MI_Operation_Cancel(MI_REASON_SHUTDOWN).
            if record.mi_cancel.get().is_none() {
                self.mi.cancel(self, index, CancelReason::Teardown);
            }
            // Already cancelled (by the user, a timeout, an MI callback or an earlier sweep) but
            // not completed yet: its completion is on its way. Else the context is cancelled
            // directly (an invoke's provider never registered a callback).
            if record.completed.get().is_none() && record.cancel_requested.get().is_none() {
                self.cancel_rx(index, CancelReason::Teardown);
            }
        }
    }

    /// Threads mode's end condition (invariant 3, apart from the shards' own queues).
    fn quiescent(&self) -> bool {
        let c = &self.counters;
        c.completed.load(Ordering::Acquire) == c.issued.load(Ordering::Acquire)
            && c.exchanges_in_flight.load(Ordering::Acquire) == 0
            && self.work_queue.is_empty()
            && self.server.open_exchanges() == 0
            && self.mi.open() == 0
    }

    /// After the run: no connection resource pending, and every pending Online ended once.
    fn connection_checks(&self) {
        let summary = self.connections.summary();
        if summary.pending_at_end > 0 {
            self.checker.fail(
                Invariant::ResourceSettled,
                None,
                format!(
                    "{} connection resource(s) still pending after the run",
                    summary.pending_at_end
                ),
            );
        }
        let ended = summary.online_completed + summary.online_ended_by_abort;
        if ended != summary.online_started {
            self.checker.fail(
                Invariant::ResourceSettled,
                None,
                format!(
                    "{} pending Online(s) started, {ended} ended (completed or told to stop)",
                    summary.online_started
                ),
            );
        }
        // Each abort that ended a pending Online told exactly one worker to stop. Exact only in
        // deterministic mode: in threads mode the teardown's Cancel may end an Online between a
        // crash's look at its state and its Terminate.
        let aborts = summary.online_cancelled
            + summary.pending_timeouts
            + summary.terminations_of_a_pending_online;
        if self.config.mode == Mode::Deterministic && aborts != summary.online_ended_by_abort {
            self.checker.fail(
                Invariant::ResourceSettled,
                None,
                format!(
                    "{aborts} abort(s) of a pending Online (cancel, timeout, terminate) but {}                      worker(s) told to stop",
                    summary.online_ended_by_abort
                ),
            );
        }
    }

    /// The after-run checks, then the report.
    fn final_checks(&self, bug_checks_before: usize) -> Report {
        let created = self.created();
        for index in 0..created {
            let record = self.record(index);
            if record.is_created() && record.completions.load(Ordering::Acquire) == 0 {
                self.checker.fail(
                    Invariant::ExactlyOnce,
                    Some((index, record)),
                    "never completed".into(),
                );
            }
        }
        self.rdbss.start_drain();
        if let DrainStatus::Active(n) = self.rdbss.drain_status() {
            let mut shown = 0;
            for index in 0..created {
                let record = self.record(index);
                if record.is_created() && !record.released.load(Ordering::Acquire) && shown < 3 {
                    shown += 1;
                    self.checker.fail(
                        Invariant::NoLeak,
                        Some((index, record)),
                        format!(
                            "{n} context(s) still alive after the run; this one was never released"
                        ),
                    );
                }
            }
            if shown == 0 {
                self.checker.fail(
                    Invariant::NoLeak,
                    None,
                    format!("{n} context(s) still alive after the run"),
                );
            }
        }
        let credits = self.server.credits_in_use();
        let open = self.server.open_exchange_list();
        if credits != 0 || !open.is_empty() {
            let detail = format!(
                "{credits} credit(s) still in use at the server, {} exchange(s) open",
                open.len()
            );
            let mut named = 0;
            for &(client, msg, kind, epoch) in open.iter().take(3) {
                let found = (0..created).find(|&i| {
                    let r = self.record(i);
                    r.client.load(Ordering::Relaxed) == client
                        && r.msg.load(Ordering::Relaxed) == msg
                        && r.dispatched.get().is_some()
                });
                if let Some(index) = found {
                    named += 1;
                    self.checker.fail(
                        Invariant::QuotaReturned,
                        Some((index, self.record(index))),
                        format!("{detail}; this one is {} (client {client}, message {msg}, epoch {epoch})", kind.name()),
                    );
                }
            }
            if named == 0 {
                self.checker.fail(Invariant::QuotaReturned, None, detail);
            }
        }
        self.mi.final_checks(self);
        self.connection_checks();
        let bug_checks = bugcheck::count().saturating_sub(bug_checks_before);
        if bug_checks > 0 {
            let mut recent: Vec<String> = bugcheck::recent()
                .iter()
                .rev()
                .take(bug_checks.min(16))
                .map(|b| b.to_string())
                .collect();
            recent.dedup();
            self.checker.fail(
                Invariant::NoBugChecks,
                None,
                format!(
                    "{bug_checks} emulated bug check(s); the latest distinct ones: {}",
                    recent.join(" | ")
                ),
            );
        }
        report::build(self, &self.records[..created as usize], bug_checks)
    }
}

/// One event, ordered by (time, sequence) with the earliest first in a `BinaryHeap`.
struct Scheduled {
    at: Micros,
    seq: u64,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

struct InFlight {
    ctx: ContextRef<MiniRequest>,
    armed: bool,
}

/// A client's session, owned by its shard (invariant 1).
struct Client {
    id: u32,
    outstanding: usize,
    connected: bool,
    epoch: u32,
    next_msg: u64,
    exchanges: BTreeMap<u64, InFlight>,
    /// Requests waiting for a credit or the connection: cancellable where they wait.
    waiting: BlockedQueue<MiniRequest>,
    pipe: BlockedQueue<MiniRequest>,
    pipe_busy: bool,
    /// When the last message to the server, and from it, arrives (in-order delivery).
    up_last: Micros,
    down_last: Micros,
    /// The request that holds the pipe while `pipe_busy`.
    pipe_active: Option<u32>,
    notify_open: bool,
    fids: Vec<u64>,
    /// The connection's cluster resource in the shard's monitor.
    resource: ResourceId,
    /// The worker of its pending Online, and which Online it is.
    work: Option<PendingWork>,
    work_serial: u64,
    /// The server's connection epoch to use once the pending Online completes.
    target_epoch: u32,
}

struct Shard {
    index: usize,
    count: usize,
    shared: Arc<Shared>,
    heap: BinaryHeap<Scheduled>,
    seq: u64,
    rng: Pcg64Mcg,
    clients: Vec<Client>,
}

impl Shard {
    fn new(shared: &Arc<Shared>, index: usize) -> Self {
        let count = shared.inboxes.len();
        // Distinct, reproducible streams per shard.
        let seed = shared.config.seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let clients = (index..shared.config.clients)
            .step_by(count)
            .enumerate()
            .map(|(local, id)| Client {
                id: id as u32,
                outstanding: 0,
                // Connected once its resource is Online (`start`).
                connected: false,
                epoch: 1,
                next_msg: 1,
                exchanges: BTreeMap::new(),
                waiting: BlockedQueue::new(),
                pipe: BlockedQueue::new(),
                pipe_busy: false,
                pipe_active: None,
                up_last: 0,
                down_last: 0,
                notify_open: false,
                fids: Vec::new(),
                resource: ResourceId(local as u32),
                work: None,
                work_serial: 0,
                target_epoch: 1,
            })
            .collect();
        Shard {
            index,
            count,
            shared: shared.clone(),
            heap: BinaryHeap::new(),
            seq: 0,
            rng: Pcg64Mcg::seed_from_u64(seed),
            clients,
        }
    }

    fn now(&self) -> Micros {
        self.shared.now()
    }

    fn schedule(&mut self, at: Micros, event: Event) {
        self.seq += 1;
        self.heap.push(Scheduled {
            at,
            seq: self.seq,
            event,
        });
    }

    /// Sends a message over the network to this shard.
    fn send_net(&mut self, sent: Micros, event: Event) {
        let mut delivery = self.shared.network.deliver(sent, &mut self.rng);
        // A session is one TCP connection: each direction delivers in order (invariant 5), so a
        // CANCEL never overtakes its request, and a lost message holds back those behind it.
        let channel = match &event {
            Event::ServerReceive(request) => Some((request.client, true)),
            Event::ServerCancel { client, .. } => Some((*client, true)),
            Event::Response(reply) => Some((reply.client, false)),
            _ => None,
        };
        if let Some((client, up)) = channel {
            let c = self.local(client);
            let last = if up {
                &mut self.clients[c].up_last
            } else {
                &mut self.clients[c].down_last
            };
            delivery.at = delivery.at.max(*last);
            *last = delivery.at;
        }
        let c = &self.shared.counters;
        if delivery.retransmits > 0 {
            c.retransmits
                .fetch_add(u64::from(delivery.retransmits), Ordering::Relaxed);
        }
        if delivery.partitioned {
            c.partitioned.fetch_add(1, Ordering::Relaxed);
        }
        self.schedule(delivery.at, event);
    }

    fn local(&self, client: u32) -> usize {
        client as usize / self.count
    }

    fn start(&mut self) {
        let now = self.now();
        // Each issue schedules the next until the client has `depth` outstanding.
        for c in 0..self.clients.len() {
            let client = self.clients[c].id;
            self.bring_online(c);
            self.schedule(now, Event::Issue { client });
        }
        if self.index == 0 {
            if let Some(at) = self.shared.config.teardown_at {
                if self.shared.config.mode == Mode::Deterministic {
                    self.schedule(at, Event::Teardown);
                }
            }
            for window in self.shared.config.crashes.clone() {
                self.schedule(window.start, Event::Crash);
                self.schedule(window.end(), Event::Restart);
            }
        }
    }

    fn drain_inbox(&mut self) -> bool {
        let incoming = std::mem::take(
            &mut *self.shared.inboxes[self.index]
                .queue
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        let any = !incoming.is_empty();
        for item in incoming {
            match item {
                Incoming::At(at, event) => self.schedule(at, event),
                Incoming::Net(sent, event) => self.send_net(sent, event),
            }
        }
        any
    }

    /// A timer of a completed request (cancelled: it never fires), or a crash or restart after
    /// the session ended (invariant 3).
    fn is_stale(&self, scheduled: &Scheduled) -> bool {
        match scheduled.event {
            Event::Timeout { index } => self.shared.record(index).completed.get().is_some(),
            Event::Crash | Event::Restart | Event::PendingTimeoutCheck { .. } => {
                self.shared.counters.finished.load(Ordering::Acquire)
            }
            _ => false,
        }
    }

    fn run_deterministic(&mut self, progress: &(dyn Fn(u64, u64) + Sync)) {
        let mut events: u64 = 0;
        let mut teardown_scheduled = self.shared.config.teardown_at.is_some();
        loop {
            self.drain_inbox();
            if self.shared.work_queue.run_pending() > 0 {
                continue;
            }
            let Some(next) = self.heap.pop() else { break };
            if self.is_stale(&next) {
                continue;
            }
            if let Clock::Virtual(t) = &self.shared.clock {
                t.store(next.at.max(t.load(Ordering::Acquire)), Ordering::Release);
            }
            self.handle(next.event);
            if !teardown_scheduled && self.shared.teardown_due() {
                teardown_scheduled = true;
                let now = self.now();
                self.schedule(now, Event::Teardown);
            } else if self.shared.counters.teardown.load(Ordering::Acquire)
                && self.shared.quiescent()
            {
                self.shared.counters.finished.store(true, Ordering::Release);
            }
            events += 1;
            if events.is_multiple_of(8192) {
                progress(
                    self.shared.counters.completed.load(Ordering::Acquire),
                    self.shared.config.requests,
                );
            }
        }
        self.check_connections();
    }

    fn run_threads(&mut self) {
        loop {
            self.drain_inbox();
            self.shared.work_queue.run_pending();
            let now = self.now();
            let mut ran = 0u32;
            while self.heap.peek().is_some_and(|s| s.at <= now) {
                let Some(next) = self.heap.pop() else { break };
                if !self.is_stale(&next) {
                    self.handle(next.event);
                }
                ran += 1;
                if ran.is_multiple_of(64) {
                    self.drain_inbox();
                }
            }
            if ran > 0 {
                continue;
            }
            if self.shared.counters.finished.load(Ordering::Acquire) {
                let events = std::mem::take(&mut self.heap).into_vec();
                let live: Vec<Scheduled> =
                    events.into_iter().filter(|s| !self.is_stale(s)).collect();
                self.heap = live.into();
                if self.heap.is_empty() && !self.drain_inbox() {
                    self.check_connections();
                    return;
                }
                continue;
            }
            let wait = self
                .heap
                .peek()
                .map_or(1000, |s| s.at.saturating_sub(self.now()).min(1000));
            let inbox = &self.shared.inboxes[self.index];
            let queue = inbox.queue.lock().unwrap_or_else(|e| e.into_inner());
            if queue.is_empty() && wait > 0 {
                let _ = inbox
                    .wake
                    .wait_timeout(queue, Duration::from_micros(wait))
                    .unwrap_or_else(|e| e.into_inner());
            }
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Issue { client } => self.issue(client),
            Event::Dispatch { client, ctx } => self.dispatch(client, ctx),
            Event::ServerReceive(request) => self.server_receive(request),
            Event::ServerFinish { client, msg, epoch } => {
                for reply in self.shared.server.finish(client, msg, epoch) {
                    self.send_reply(reply);
                }
            }
            Event::ServerCancel { client, msg, epoch } => {
                if let Some(reply) = self.shared.server.cancel(client, msg, epoch) {
                    self.send_reply(reply);
                }
            }
            Event::Response(reply) => self.response(reply),
            Event::Complete { ctx, status, info } => self.complete(ctx, status, info),
            Event::UserCancel { index } => self.shared.request_cancel(index, CancelReason::User),
            Event::Timeout { index } => self.shared.request_cancel(index, CancelReason::Timeout),
            Event::SlotFree { client, index } => {
                let c = self.local(client);
                let record = self.shared.record(index);
                // An MI operation's request is over: its provider posts the final result and
                // its client reads the rest and closes.
                if record.op_kind().mi_kind().is_some() {
                    self.shared
                        .mi
                        .request_done(&self.shared, index, record.final_status());
                }
                let state = &mut self.clients[c];
                state.outstanding -= 1;
                if record.op_kind() == OpKind::ChangeNotify {
                    state.notify_open = false;
                }
                // The pipe's holder was cancelled while it waited for a credit: the core
                // completed it, so the pipe is free for the next one.
                if state.pipe_active == Some(index) && record.dispatched.get().is_none() {
                    self.pipe_next(c);
                }
                self.issue(client);
            }
            Event::Crash => {
                self.shared.server.crash();
                let now = self.now();
                for shard in 0..self.count {
                    self.shared
                        .post(shard, Incoming::At(now, Event::Disconnect));
                }
            }
            Event::Restart => {
                self.shared.server.restart();
                let (now, epoch) = (self.now(), self.shared.server.epoch());
                for shard in 0..self.count {
                    self.shared
                        .post(shard, Incoming::At(now, Event::Reconnect { epoch }));
                }
            }
            Event::Disconnect => {
                for c in 0..self.clients.len() {
                    self.disconnect(c);
                    self.terminate_connection(c);
                }
            }
            Event::Reconnect { epoch } => {
                for c in 0..self.clients.len() {
                    self.clients[c].target_epoch = epoch;
                    self.bring_online(c);
                }
            }
            Event::Teardown => {
                self.shared.teardown();
            }
            Event::OnlineDone { client, serial } => self.online_done(client, serial),
            Event::PendingTimeoutCheck { client, serial } => {
                self.pending_timeout_check(client, serial)
            }
        }
    }

    // ----- the application: issuing requests -------------------------------------------------

    fn pick_op(&mut self, c: usize, index: u32) -> (OpKind, Op) {
        let config = &self.shared.config;
        let mut roll = self.rng.random_range(0..config.mix.total());
        let mut kind = OpKind::Read;
        for (k, w) in &config.mix.0 {
            if roll < *w {
                kind = *k;
                break;
            }
            roll -= w;
        }
        let client = &self.clients[c];
        if kind == OpKind::ChangeNotify && (client.notify_open || config.depth < 2) {
            kind = OpKind::QueryInfo;
        }
        if kind == OpKind::Close && client.fids.is_empty() {
            kind = OpKind::Create;
        }
        let dir = self.rng.random_range(0..SHARE_DIRS);
        let file = self.rng.random_range(0..SHARE_FILES);
        let path = format!("d{dir}/f{file}");
        let op = match kind {
            OpKind::Create => {
                // Now and then a new file, which fires the directory's change-notifies.
                let path = if self.rng.random_bool(0.25) {
                    format!("d{dir}/n{}", self.rng.random_range(0..64u32))
                } else {
                    path
                };
                Op::Create { path }
            }
            OpKind::Read => Op::Read {
                path,
                offset: self.rng.random_range(0..SHARE_FILE_SIZE as u64),
                len: 4096,
            },
            OpKind::Write => {
                let len = self.rng.random_range(512..=4096usize);
                Op::Write {
                    path,
                    offset: self.rng.random_range(0..SHARE_FILE_SIZE as u64),
                    data: vec![index as u8; len],
                }
            }
            OpKind::QueryInfo => Op::QueryInfo { path },
            OpKind::DirEnum => Op::DirEnum {
                dir: format!("d{dir}"),
            },
            OpKind::ChangeNotify => Op::ChangeNotify {
                dir: format!("d{dir}"),
            },
            OpKind::PipeTransact => Op::PipeTransact {
                data: vec![index as u8; 64],
            },
            OpKind::Close => Op::Close {
                fid: self.clients[c].fids.pop().unwrap_or(0),
            },
            // RPC over a named pipe: not cancellable at the server.
            OpKind::MethodCall => Op::PipeTransact {
                data: vec![!(index as u8); 64],
            },
        };
        (kind, op)
    }

    fn issue(&mut self, client: u32) {
        let c = self.local(client);
        let shared = self.shared.clone();
        let config = &shared.config;
        if shared.counters.teardown.load(Ordering::Acquire)
            || self.clients[c].outstanding >= config.depth
        {
            return;
        }
        let index = shared.counters.next_index.fetch_add(1, Ordering::AcqRel);
        if index >= config.requests {
            return;
        }
        let index = index as u32;
        let (kind, op) = self.pick_op(c, index);
        let (major_function, minor_function) = match kind {
            OpKind::Create => (MajorFunction::CREATE, 0),
            OpKind::Read => (MajorFunction::READ, 0),
            OpKind::Write => (MajorFunction::WRITE, 0),
            OpKind::QueryInfo => (MajorFunction::QUERY_INFORMATION, 0),
            OpKind::DirEnum => (MajorFunction::DIRECTORY_CONTROL, 1), // IRP_MN_QUERY_DIRECTORY
            OpKind::ChangeNotify => (MajorFunction::DIRECTORY_CONTROL, 2), // IRP_MN_NOTIFY_CHANGE_DIRECTORY
            OpKind::PipeTransact => (MajorFunction::FILE_SYSTEM_CONTROL, 0),
            OpKind::Close => (MajorFunction::CLOSE, 0),
            OpKind::MethodCall => (MajorFunction::FILE_SYSTEM_CONTROL, 1),
        };
        let mini = MiniRequest {
            shared: Arc::downgrade(&shared),
            index,
            client,
            kind,
            msg: AtomicU64::new(0),
            epoch: Default::default(),
            op: Mutex::new(Some(op)),
        };
        let init = ContextInit {
            major_function,
            minor_function,
            ..ContextInit::default()
        };
        let ctx = match shared.rdbss.create_context(init, mini) {
            Ok(ctx) => ctx,
            Err(_) => {
                // Draining (teardown raced this issue) or out of slots: the request never exists.
                shared.counters.create_failed.fetch_add(1, Ordering::AcqRel);
                return;
            }
        };
        let now = self.now();
        let record = shared.record(index);
        record.client.store(client, Ordering::Relaxed);
        record.kind.store(kind.index(), Ordering::Relaxed);
        record.created.set(now);
        if kind == OpKind::ChangeNotify {
            shared.counters.notify_open.fetch_add(1, Ordering::AcqRel);
            self.clients[c].notify_open = true;
        }
        record.id.store(ctx.id().as_u64(), Ordering::Release);
        shared.counters.issued.fetch_add(1, Ordering::AcqRel);
        self.clients[c].outstanding += 1;
        if let Some(mi_kind) = kind.mi_kind() {
            if let Err(status) = shared.mi.start(index, client, mi_kind) {
                // The MI session refused the operation (quota, or shutting down): the request
                // fails at once and never reaches the network.
                self.complete(ctx, status, 0);
                return;
            }
        }

        let other = (self.index + 1) % self.count;
        let dispatch_delay = sample(config.dispatch_delay, &mut self.rng);
        if config.cancel_rate > 0.0 && self.rng.random_bool(config.cancel_rate) {
            let delay = if dispatch_delay > 0 && self.rng.random_bool(0.25) {
                // Aimed before dispatch.
                self.rng.random_range(0..dispatch_delay)
            } else {
                self.rng.random_range(0..=cancel_window(config))
            };
            shared.post(
                other,
                Incoming::At(now + delay, Event::UserCancel { index }),
            );
        }
        if let Some(timeout) = config.timeout {
            if kind != OpKind::ChangeNotify {
                shared.post(other, Incoming::At(now + timeout, Event::Timeout { index }));
            }
        }
        self.schedule(now + dispatch_delay, Event::Dispatch { client, ctx });
        // Closed loop: keep `depth` requests outstanding.
        if self.clients[c].outstanding < config.depth {
            self.schedule(now, Event::Issue { client });
        }
    }

    // ----- the mini-redirector ------------------------------------------------------------------

    fn dispatch(&mut self, client: u32, ctx: ContextRef<MiniRequest>) {
        let c = self.local(client);
        if ctx.minirdr().kind.mi_kind().is_some() {
            // The MI provider starts its work: it registers its cancel callback (which may run
            // at once if the client cancelled already, cancelling this context).
            self.shared
                .mi
                .provider_start(&self.shared, ctx.minirdr().index);
        }
        if ctx.minirdr().kind == OpKind::PipeTransact {
            if self.clients[c].pipe_busy {
                self.enqueue(c, ctx, true);
                return;
            }
            self.clients[c].pipe_busy = true;
            self.clients[c].pipe_active = Some(ctx.minirdr().index);
            if !self.start_exchange(c, ctx) {
                self.pipe_next(c);
            }
            return;
        }
        self.start_exchange(c, ctx);
    }

    /// Starts the exchange, or queues it for a credit or the connection. `false` if the request
    /// completed at once instead (cancelled before it started).
    fn start_exchange(&mut self, c: usize, ctx: ContextRef<MiniRequest>) -> bool {
        let client = &self.clients[c];
        if client.connected && client.exchanges.len() < self.shared.config.credits as usize {
            return self.send(c, ctx);
        }
        self.enqueue(c, ctx, false)
    }

    /// Queues a request in the client's pipe queue or credit queue (the core's blocked-operation
    /// queue, which a cancel unlinks and completes at once). `false` if the core refused it and it
    /// was completed.
    fn enqueue(&mut self, c: usize, ctx: ContextRef<MiniRequest>, pipe: bool) -> bool {
        let client = &self.clients[c];
        let queue = if pipe { &client.pipe } else { &client.waiting };
        let record = self.shared.record(ctx.minirdr().index);
        match queue.enqueue(&ctx) {
            // The queue holds the request's handle now (invariant 2).
            Ok(()) => {
                record.blocked.set(self.now());
                true
            }
            Err(status) => {
                if status == NtStatus::CANCELLED {
                    record.refused.set(self.now());
                }
                self.complete(ctx, status, 0);
                false
            }
        }
    }

    /// Arms the cancel routine and sends the request. `false` if arming found the request
    /// already cancelled and it was completed with STATUS_CANCELLED.
    fn send(&mut self, c: usize, ctx: ContextRef<MiniRequest>) -> bool {
        let shared = self.shared.clone();
        let now = self.now();
        let client = &mut self.clients[c];
        let msg = client.next_msg;
        client.next_msg += 1;
        let epoch = client.epoch;
        let m = ctx.minirdr();
        let record = shared.record(m.index);
        // The routine may run the moment it is armed: its message id must be there first.
        m.msg.store(msg, Ordering::Release);
        m.epoch.store(epoch, Ordering::Release);
        record.msg.store(msg, Ordering::Relaxed);
        let mut armed = false;
        if shared.config.arm_cancel_routines {
            match ctx.set_minirdr_cancel_routine(Some(mrx_cancel)) {
                Ok(()) => armed = true,
                Err(_cancelled) => {
                    record.refused.set(now);
                    if shared.config.bug != Some(Bug::IgnoreArmRefusal) {
                        self.complete(ctx, NtStatus::CANCELLED, 0);
                        return false;
                    }
                }
            }
        }
        record.dispatched.set(now);
        let op = m.take_op().unwrap_or(Op::QueryInfo {
            path: String::new(),
        });
        let request = Request {
            client: client.id,
            msg,
            epoch,
            op,
        };
        client.exchanges.insert(msg, InFlight { ctx, armed });
        shared
            .counters
            .exchanges_in_flight
            .fetch_add(1, Ordering::AcqRel);
        self.send_net(now, Event::ServerReceive(request));
        true
    }

    /// The client's pipe is free: run the next queued pipe operation, if any.
    fn pipe_next(&mut self, c: usize) {
        loop {
            let Some(next) = self.clients[c].pipe.resume_blocked_operations_serially() else {
                self.clients[c].pipe_busy = false;
                self.clients[c].pipe_active = None;
                return;
            };
            self.clients[c].pipe_active = Some(next.minirdr().index);
            self.shared
                .record(next.minirdr().index)
                .resumed
                .set(self.now());
            if self.start_exchange(c, next) {
                return;
            }
        }
    }

    /// Credits or the connection came back: send what waits for them.
    fn start_waiting(&mut self, c: usize) {
        loop {
            let client = &mut self.clients[c];
            if !client.connected || client.exchanges.len() >= self.shared.config.credits as usize {
                return;
            }
            let Some(ctx) = client.waiting.resume_blocked_operations_serially() else {
                return;
            };
            self.shared
                .record(ctx.minirdr().index)
                .resumed
                .set(self.now());
            let pipe = ctx.minirdr().kind == OpKind::PipeTransact;
            if !self.send(c, ctx) && pipe {
                self.pipe_next(c);
            }
        }
    }

    fn response(&mut self, reply: Reply) {
        let c = self.local(reply.client);
        let now = self.now();
        let client = &mut self.clients[c];
        if reply.epoch != client.epoch {
            self.shared
                .counters
                .stale_replies
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        let Some(InFlight { ctx, armed }) = client.exchanges.remove(&reply.msg) else {
            self.shared
                .counters
                .stale_replies
                .fetch_add(1, Ordering::Relaxed);
            return;
        };
        self.shared
            .counters
            .exchanges_in_flight
            .fetch_sub(1, Ordering::AcqRel);
        let kind = ctx.minirdr().kind;
        let record = self.shared.record(ctx.minirdr().index);
        record
            .response_status
            .store(reply.status.code(), Ordering::Relaxed);
        record.response.set(now);
        if kind == OpKind::Create && reply.status.is_success() {
            client.fids.push(reply.info);
        }
        let info = reply.data.len();
        self.exchange_done(ctx, armed, reply.status, info, reply.data);
        if kind == OpKind::PipeTransact {
            self.pipe_next(c);
        }
        self.start_waiting(c);
    }

    /// The exchange is over (reply or disconnect): disarm, and complete if disarming won.
    fn exchange_done(
        &mut self,
        ctx: ContextRef<MiniRequest>,
        armed: bool,
        status: NtStatus,
        info: usize,
        data: Vec<u8>,
    ) {
        if !armed {
            self.complete_later(ctx, status, info);
            return;
        }
        let bug = self.shared.config.bug;
        let disarmed = {
            let _dpc = (bug == Some(Bug::DisarmAtDispatch)).then(|| irql::raise(Irql::DISPATCH));
            ctx.set_minirdr_cancel_routine(None)
        };
        let record = self.shared.record(ctx.minirdr().index);
        match disarmed {
            Ok(()) => {
                record.disarm_won.set(self.now());
                if ctx.minirdr().kind == OpKind::DirEnum && status.is_success() {
                    // The enumeration's provider posts each entry as an instance.
                    self.shared.mi.post_instances(ctx.minirdr().index, data);
                }
                self.complete_later(ctx, status, info);
            }
            Err(_cancelled) => {
                // The cancel side owns completion: the routine completed the request.
                record.disarm_lost.set(self.now());
                match bug {
                    Some(Bug::CompleteTwice) => self.complete(ctx, status, info),
                    Some(Bug::LeakReference) => std::mem::forget(ctx),
                    _ => {
                        record.released.store(true, Ordering::Release);
                        drop(ctx);
                    }
                }
            }
        }
    }

    /// Completes after the client-side post-processing time (the window where a cancel arrives
    /// after the disarm and loses the race).
    fn complete_later(&mut self, ctx: ContextRef<MiniRequest>, status: NtStatus, info: usize) {
        let delay = sample(self.shared.config.completion_delay, &mut self.rng);
        if delay == 0 {
            self.complete(ctx, status, info);
        } else {
            let at = self.now() + delay;
            self.schedule(at, Event::Complete { ctx, status, info });
        }
    }

    /// `RxCompleteRequest` with the request's own handle.
    fn complete(&mut self, ctx: ContextRef<MiniRequest>, status: NtStatus, info: usize) {
        let index = ctx.minirdr().index;
        self.shared.note_completion(index, status);
        self.shared
            .record(index)
            .released
            .store(true, Ordering::Release);
        let _ = ctx.complete_request(status, info);
    }

    fn disconnect(&mut self, c: usize) {
        let client = &mut self.clients[c];
        client.connected = false;
        let exchanges = std::mem::take(&mut client.exchanges);
        let mut pipe = false;
        for (_, InFlight { ctx, armed }) in exchanges {
            self.shared
                .counters
                .exchanges_in_flight
                .fetch_sub(1, Ordering::AcqRel);
            self.shared
                .counters
                .disconnected
                .fetch_add(1, Ordering::Relaxed);
            pipe |= ctx.minirdr().kind == OpKind::PipeTransact;
            self.exchange_done(ctx, armed, NtStatus::CONNECTION_DISCONNECTED, 0, Vec::new());
        }
        if pipe {
            self.pipe_next(c);
        }
    }

    // ----- the share connection as a cluster resource -------------------------------------------

    fn monitor(&self) -> &rdbss::resmon::ResourceMonitor {
        &self.shared.connections.monitors[self.index]
    }

    /// Moves the monitor's clock (ms) to the run's clock.
    fn sync_monitor_clock(&self) {
        let now_ms = self.now() / 1000;
        let monitor = self.monitor();
        let current = monitor.now_ms();
        if now_ms > current {
            monitor.advance_clock(now_ms - current);
        }
    }

    /// `Online` for client `c`'s connection: pending, finished by `OnlineDone` after the connect
    /// latency. Not after the teardown (nothing will use the connection).
    fn bring_online(&mut self, c: usize) {
        if self.shared.counters.teardown.load(Ordering::Acquire) {
            return;
        }
        let rc = &self.shared.connections.counters;
        // The worker of an aborted Online is told to stop now (resource invariant 2).
        if let Some(work) = self.clients[c].work.take() {
            if work.check_terminate() {
                let _ = work.complete(Win32Error::OPERATION_ABORTED);
                rc.worker_stopped.fetch_add(1, Ordering::Relaxed);
            } else {
                // Still pending: `online` would say ERROR_INVALID_STATE; it finishes on its own.
                self.clients[c].work = Some(work);
                return;
            }
        }
        self.sync_monitor_clock();
        let resource = self.clients[c].resource;
        match self.monitor().online(resource) {
            Win32Error::IO_PENDING => {
                let Some(work) = self.monitor().next_work() else {
                    return;
                };
                rc.online_started.fetch_add(1, Ordering::Relaxed);
                let now = self.now();
                let latency = sample(self.shared.config.connect_latency, &mut self.rng);
                let timeout = u64::from(self.shared.connections.pending_timeout_ms + 1) * 1000;
                let client = &mut self.clients[c];
                client.work_serial += 1;
                client.work = Some(work);
                let (id, serial) = (client.id, client.work_serial);
                self.schedule(now + latency, Event::OnlineDone { client: id, serial });
                self.schedule(
                    now + timeout,
                    Event::PendingTimeoutCheck { client: id, serial },
                );
            }
            Win32Error::SUCCESS => self.connected(c),
            _ => {}
        }
    }

    /// The resource is Online: the client's session is connected.
    fn connected(&mut self, c: usize) {
        let client = &mut self.clients[c];
        client.connected = true;
        client.epoch = client.target_epoch;
        self.start_waiting(c);
    }

    /// The worker of Online `serial` finishes: `complete(ERROR_SUCCESS)`.
    fn online_done(&mut self, client: u32, serial: u64) {
        let c = self.local(client);
        if self.clients[c].work_serial != serial {
            return;
        }
        let Some(work) = self.clients[c].work.take() else {
            return;
        };
        let rc = &self.shared.connections.counters;
        self.sync_monitor_clock();
        match work.complete(Win32Error::SUCCESS) {
            ResourceExitState::Continue => {
                rc.online_completed.fetch_add(1, Ordering::Relaxed);
                self.connected(c);
            }
            ResourceExitState::Terminate => {
                rc.worker_stopped.fetch_add(1, Ordering::Relaxed);
                self.after_abort(c);
            }
        }
    }

    /// An Online of client `c` was aborted: after a pending timeout (`Failed`) try again; after a
    /// cancel (teardown) or a terminate (crash: the restart brings it online) nothing.
    fn after_abort(&mut self, c: usize) {
        let resource = self.clients[c].resource;
        if self.monitor().state(resource) == Ok(ResourceState::Failed)
            && !self.shared.counters.teardown.load(Ordering::Acquire)
        {
            self.shared
                .connections
                .counters
                .retries
                .fetch_add(1, Ordering::Relaxed);
            self.bring_online(c);
        }
    }

    /// The Resource Monitor's pending timeout for Online `serial` of `client`.
    fn pending_timeout_check(&mut self, client: u32, serial: u64) {
        let c = self.local(client);
        if self.clients[c].work_serial != serial || self.clients[c].work.is_none() {
            return;
        }
        self.sync_monitor_clock();
        let rc = &self.shared.connections.counters;
        let n = self.monitor().check_pending_timeouts();
        rc.pending_timeouts.fetch_add(n as u64, Ordering::Relaxed);
        // This client's worker may have been terminated by this check or an earlier one (another
        // client's): it is told to stop now, and the client tries again.
        if self.clients[c]
            .work
            .as_ref()
            .is_some_and(PendingWork::check_terminate)
        {
            if let Some(work) = self.clients[c].work.take() {
                let _ = work.complete(Win32Error::TIMEOUT);
                rc.worker_stopped.fetch_add(1, Ordering::Relaxed);
            }
            self.after_abort(c);
        }
    }

    /// The server crashed: the connection resource is terminated (`Offline`).
    fn terminate_connection(&mut self, c: usize) {
        let resource = self.clients[c].resource;
        let rc = &self.shared.connections.counters;
        if self
            .monitor()
            .state(resource)
            .is_ok_and(ResourceState::is_pending)
        {
            rc.terminated_pending.fetch_add(1, Ordering::Relaxed);
        }
        self.monitor().terminate(resource);
        rc.terminations.fetch_add(1, Ordering::Relaxed);
    }

    /// When the shard's run is over: each client connected exactly when its resource is Online,
    /// and no worker left (resource invariants 2 and 3).
    fn check_connections(&self) {
        let mut bad = Vec::new();
        for client in &self.clients {
            let state = self.monitor().state(client.resource);
            let online = state == Ok(ResourceState::Online);
            if online != client.connected || client.work.is_some() {
                bad.push(format!(
                    "client {}: resource {state:?}, connected {}, worker left {}",
                    client.id,
                    client.connected,
                    client.work.is_some()
                ));
            }
        }
        if !bad.is_empty() {
            self.shared.checker.fail(
                Invariant::ResourceSettled,
                None,
                format!(
                    "{} client(s) out of step with their connection resource: {}",
                    bad.len(),
                    bad.iter().take(3).cloned().collect::<Vec<_>>().join("; ")
                ),
            );
        }
    }

    // ----- the server side ----------------------------------------------------------------------

    fn server_receive(&mut self, request: Request) {
        let (client, msg, epoch) = (request.client, request.msg, request.epoch);
        match self.shared.server.receive(request) {
            Received::Started { finishes: true } => {
                let at = self.now() + sample(self.shared.config.service, &mut self.rng);
                self.schedule(at, Event::ServerFinish { client, msg, epoch });
            }
            Received::Started { finishes: false } | Received::Dropped => {}
            Received::Rejected(reply) => self.send_reply(reply),
        }
    }

    fn send_reply(&mut self, reply: Reply) {
        let shard = self.shared.shard_of(reply.client);
        let now = self.now();
        if shard == self.index {
            self.send_net(now, Event::Response(reply));
        } else {
            self.shared
                .post(shard, Incoming::Net(now, Event::Response(reply)));
        }
    }
}

/// The span over which a user cancel lands: twice a typical request's life, so cancels fall
/// before dispatch, mid-exchange, around completion and after it.
fn cancel_window(config: &Config) -> Micros {
    let one_way = config.latency.mean() + config.jitter / 2;
    let life = config.dispatch_delay.mean()
        + 2 * one_way
        + config.service.mean()
        + config.completion_delay.mean();
    (2 * life).max(1)
}
