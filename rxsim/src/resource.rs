//! The share connection of each client as a failover-cluster resource, on [`rdbss::resmon`].
//!
//! Each shard has one [`ResourceMonitor`] holding one resource per client of the shard: the
//! client's session connection. The shard is the resource DLL's worker and the monitor's clock:
//!
//! | simulator event | resource monitor call |
//! |---|---|
//! | run start, server restart after a `--crash` | `online(resource)`: `ERROR_IO_PENDING`; the shard takes the [`PendingWork`](rdbss::resmon::PendingWork) and completes it after `--connect-latency` (`work.complete(ERROR_SUCCESS)`): `Continue` = the client is connected |
//! | requests while the connection is not online | wait in the client's blocked-operation queue of the core, as for a credit (a cancel completes them at once) |
//! | server crash | `terminate(resource)`: any pending `Online` ends, the resource is `Offline` |
//! | `--pending-timeout` after an `Online` started | the monitor's clock is moved to the run's clock (ms) and `check_pending_timeouts()`: a connect still pending is terminated, `Failed`; the client tries `Online` again |
//! | session teardown | `cancel(resource, 0)` for every client: `ERROR_SUCCESS` if an `Online` was pending (back to `Offline`), `ERROR_INVALID_STATE` if nothing was |
//!
//! Invariants:
//! 1. Only the owning shard calls `online`, `next_work`, `terminate`, `advance_clock` and
//!    `check_pending_timeouts` on its monitor, so the work `next_work` returns is the one its
//!    `online` queued; the teardown's `cancel` may come from any thread (the core arbitrates it
//!    against the worker's `complete`).
//! 2. Every [`PendingWork`](rdbss::resmon::PendingWork) is completed: by its `OnlineDone` event, or, if it was aborted first
//!    (cancel, terminate, timeout), by the next `Online` of its client or its timeout check.
//! 3. A client is connected exactly when its resource is `Online` (checked when the run ends).

use rdbss::resmon::{ResourceConfig, ResourceMonitor, ResourceState};
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};

/// What the resource layer counted.
#[derive(Default)]
pub(crate) struct ResourceCounters {
    pub(crate) online_started: AtomicU64,
    pub(crate) online_completed: AtomicU64,
    pub(crate) worker_stopped: AtomicU64,
    pub(crate) cancel_succeeded: AtomicU64,
    pub(crate) cancel_nothing_pending: AtomicU64,
    pub(crate) cancel_other: AtomicU64,
    pub(crate) terminations: AtomicU64,
    pub(crate) terminated_pending: AtomicU64,
    pub(crate) pending_timeouts: AtomicU64,
    pub(crate) retries: AtomicU64,
}

/// The monitors of a run, one per shard (invariant 1).
pub(crate) struct Connections {
    pub(crate) monitors: Box<[ResourceMonitor]>,
    /// Resources per monitor (ids `0..n`).
    pub(crate) per_monitor: Box<[u32]>,
    pub(crate) counters: ResourceCounters,
    /// The `PendingTimeout` of every resource, ms.
    pub(crate) pending_timeout_ms: u32,
}

impl Connections {
    /// One monitor per shard with a resource for each of its clients.
    pub(crate) fn new(shards: usize, clients: usize, pending_timeout_ms: u32) -> Self {
        let config = ResourceConfig {
            pending_online: true,
            pending_offline: false,
            pending_timeout_ms,
        };
        let mut per_monitor = Vec::with_capacity(shards);
        let monitors = (0..shards)
            .map(|shard| {
                let monitor = ResourceMonitor::new();
                let n = (shard..clients).step_by(shards).count();
                for _ in 0..n {
                    // Validated: the timeout is at least the minimum.
                    let _ = monitor.create_resource(config);
                }
                per_monitor.push(n as u32);
                monitor
            })
            .collect();
        Connections {
            monitors,
            per_monitor: per_monitor.into(),
            counters: ResourceCounters::default(),
            pending_timeout_ms,
        }
    }

    /// How many resources are in each state, and how many are pending.
    fn states(&self) -> (u64, u64, u64, u64) {
        let (mut online, mut offline, mut failed, mut pending) = (0, 0, 0, 0);
        for (monitor, &n) in self.monitors.iter().zip(self.per_monitor.iter()) {
            for id in 0..n {
                match monitor.state(rdbss::resmon::ResourceId(id)) {
                    Ok(ResourceState::Online) => online += 1,
                    Ok(ResourceState::Offline) => offline += 1,
                    Ok(ResourceState::Failed) => failed += 1,
                    _ => pending += 1,
                }
            }
        }
        (online, offline, failed, pending)
    }

    /// The counts, for the report.
    pub(crate) fn summary(&self) -> ResourceSummary {
        let c = &self.counters;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (online, offline, failed, pending) = self.states();
        ResourceSummary {
            resources: self.per_monitor.iter().map(|&n| u64::from(n)).sum(),
            pending_timeout_ms: self.pending_timeout_ms,
            online_started: n(&c.online_started),
            online_completed: n(&c.online_completed),
            online_ended_by_abort: n(&c.worker_stopped),
            online_cancelled: n(&c.cancel_succeeded),
            cancel_nothing_pending: n(&c.cancel_nothing_pending),
            cancel_other_errors: n(&c.cancel_other),
            terminations: n(&c.terminations),
            terminations_of_a_pending_online: n(&c.terminated_pending),
            pending_timeouts: n(&c.pending_timeouts),
            online_retries: n(&c.retries),
            online_at_end: online,
            offline_at_end: offline,
            failed_at_end: failed,
            pending_at_end: pending,
        }
    }
}

/// The resource layer's figures.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct ResourceSummary {
    /// Resources (one per client: its share connection).
    pub resources: u64,
    /// `PendingTimeout` of each, ms (`--pending-timeout`).
    pub pending_timeout_ms: u32,
    /// `Online` calls that returned `ERROR_IO_PENDING`.
    pub online_started: u64,
    /// Pending `Online`s the worker completed (`Continue`): the client connected.
    pub online_completed: u64,
    /// Pending `Online`s whose worker was told to stop (`Terminate`): cancelled, terminated or
    /// timed out first.
    pub online_ended_by_abort: u64,
    /// `Cancel` calls that returned `ERROR_SUCCESS`: a pending `Online` was cancelled.
    pub online_cancelled: u64,
    /// `Cancel` calls that returned `ERROR_INVALID_STATE`: nothing was pending.
    pub cancel_nothing_pending: u64,
    /// `Cancel` calls that returned anything else (0 expected).
    pub cancel_other_errors: u64,
    /// `Terminate` calls (server crashes).
    pub terminations: u64,
    /// Of those, ones that ended a pending `Online`.
    pub terminations_of_a_pending_online: u64,
    /// Pending `Online`s terminated by the pending timeout (`Failed`).
    pub pending_timeouts: u64,
    /// `Online` tried again after a pending timeout.
    pub online_retries: u64,
    /// Resources `Online` after the run.
    pub online_at_end: u64,
    /// Resources `Offline` after the run.
    pub offline_at_end: u64,
    /// Resources `Failed` after the run.
    pub failed_at_end: u64,
    /// Resources still pending after the run (0 expected).
    pub pending_at_end: u64,
}
