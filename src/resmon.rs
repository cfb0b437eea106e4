//! A failover-cluster resource monitor and the resource DLL's `Cancel` entry point
//! (`PCANCEL_ROUTINE`, seed `004_1b377948720d3f19`), built on the `RX_CONTEXT` core.
//!
//! The resource DLL's `Online` and `Offline` either finish at once (`ERROR_SUCCESS`) or return
//! `ERROR_IO_PENDING` and finish on a worker, which reports progress (`SetResourceStatus`) and
//! finally the outcome. Here the worker is a [`PendingWork`] item the embedder takes from the
//! monitor with [`ResourceMonitor::next_work`] and drives (a thread with `std`; an executor or a
//! test loop without): the model has no threads of its own and no clock of its own either, the
//! embedder advances it ([`ResourceMonitor::advance_clock`]).
//!
//! Each pending operation is one [`RxContext`] with a cancel routine armed before the operation
//! is published. `Cancel`, `Terminate` and the pending timeout all end the operation through the
//! core's [`RxContext::cancel`]; the worker ends it through the core's disarm
//! ([`RxContext::set_minirdr_cancel_routine`]`(None)`). The core decides which side owns the
//! end, exactly as it decides who completes a request.
//!
//! | entry point | result |
//! |---|---|
//! | [`online`](ResourceMonitor::online) / [`offline`](ResourceMonitor::offline) | `ERROR_SUCCESS` (done, or nothing to do), `ERROR_IO_PENDING` (a worker finishes it), `ERROR_INVALID_STATE` (an operation is pending) |
//! | [`cancel`](ResourceMonitor::cancel) | `ERROR_SUCCESS` (the pending operation is cancelled and the resource is back in the state it had before it), `ERROR_INVALID_STATE` (nothing pending to cancel), `ERROR_INVALID_PARAMETER` (reserved flags not zero) |
//! | [`terminate`](ResourceMonitor::terminate) | `ERROR_SUCCESS`: any pending operation is ended and the resource is `Offline` |
//! | [`check_pending_timeouts`](ResourceMonitor::check_pending_timeouts) | terminates each pending operation that did not report status within its `PendingTimeout`: `Failed` |
//!
//! Every entry point returns `ERROR_RESOURCE_NOT_FOUND` for an id the monitor did not issue.
//!
//! ```
//! use rdbss::resmon::{ResourceConfig, ResourceExitState, ResourceMonitor, ResourceState, Win32Error};
//!
//! let monitor = ResourceMonitor::new();
//! let disk = monitor.create_resource(ResourceConfig::default()).unwrap();
//! assert_eq!(monitor.online(disk), Win32Error::IO_PENDING);
//! assert_eq!(monitor.state(disk), Ok(ResourceState::OnlinePending));
//! let worker = monitor.next_work().unwrap();
//!
//! assert_eq!(monitor.cancel(disk, 0), Win32Error::SUCCESS);
//! assert_eq!(monitor.state(disk), Ok(ResourceState::Offline)); // back where it was
//! assert!(worker.check_terminate());
//! assert_eq!(worker.complete(Win32Error::SUCCESS), ResourceExitState::Terminate); // too late
//! assert_eq!(monitor.cancel(disk, 0), Win32Error::INVALID_STATE); // nothing pending
//! ```
//!
//! # Invariants
//!
//! 1. **A pending operation is a context.** Every `ERROR_IO_PENDING` operation owns one
//!    `RxContext`, armed with `pending_cancel_routine` before it is published as its resource's
//!    pending operation; a resource has at most one.
//! 2. **One arbiter.** Whether the worker or an abort (Cancel, Terminate, pending timeout) ends a
//!    pending operation is decided by the core: the worker's disarm succeeds, or the abort's
//!    `cancel` set `CANCELLED` first (core invariant 4). Exactly one side wins; the worker that
//!    loses changes nothing and is told to stop (`ResourceExitState::Terminate`).
//! 3. **State and pending operation change together**, under the monitor lock, and only by the
//!    side that owns the operation: the worker after a successful disarm, the routine of a
//!    `Cancel`, or `Terminate` / the timeout, which take the pending operation out and set the
//!    state before cancelling its context. A side that finds its operation no longer pending
//!    leaves the resource alone.
//! 4. **Defined end states.** Worker success: `Online` / `Offline`; worker error: `Failed`;
//!    `Cancel`: the state before the operation began; `Terminate`: `Offline`; pending timeout:
//!    `Failed`.
//! 5. **No core call under the monitor lock.** The monitor lock is a [`KSpinLock`] (held at
//!    `DISPATCH_LEVEL`); arming, disarming and cancelling need `<= APC_LEVEL`, so they happen with
//!    it released, and the routine takes it only after the core has released its own.
//! 6. **Completed once.** Each pending context's request is completed exactly once: by the worker
//!    that won the disarm, or by the routine (which every abort reaches, since the routine is
//!    armed from the start).
//!
//! [`KSpinLock`]: crate::KSpinLock

use alloc::collections::VecDeque;
use alloc::sync::{Arc, Weak};
use alloc::vec::Vec;
use core::fmt;

use crate::context::{CancelOutcome, ContextInit, MajorFunction, RxContext};
use crate::spinlock::KSpinLock;
use crate::status::NtStatus;
use crate::sync::{AtomicU32, Ordering};

// ---------------------------------------------------------------------------------------------
// Codes and states
// ---------------------------------------------------------------------------------------------

/// A Win32 error code (`DWORD`), as resource DLL entry points return them (`winerror.h`).
///
/// ```
/// use rdbss::resmon::Win32Error;
/// assert_eq!(Win32Error::IO_PENDING.0, 997);
/// assert_eq!(Win32Error::INVALID_STATE.to_string(), "ERROR_INVALID_STATE");
/// assert!(Win32Error::SUCCESS.is_success());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(transparent)]
pub struct Win32Error(pub u32);

macro_rules! win32_errors {
    ($( $(#[$doc:meta])* $name:ident ($wname:literal) = $value:literal, )*) => {
        impl Win32Error {
            $(
                $(#[$doc])*
                #[doc(alias = $wname)]
                pub const $name: Win32Error = Win32Error($value);
            )*

            /// The `ERROR_*` name of a known code, or `None`.
            pub const fn name(self) -> Option<&'static str> {
                match self.0 {
                    $( $value => Some($wname), )*
                    _ => None,
                }
            }
        }
    };
}

win32_errors! {
    /// The operation completed successfully (for `Cancel`: the pending operation was cancelled).
    SUCCESS ("ERROR_SUCCESS") = 0,
    /// A parameter is incorrect: here, a non-zero reserved `CancelFlags_RESERVED`, or a pending
    /// timeout below the minimum.
    INVALID_PARAMETER ("ERROR_INVALID_PARAMETER") = 87,
    /// The I/O operation was aborted (what a worker may report when it stops on request).
    OPERATION_ABORTED ("ERROR_OPERATION_ABORTED") = 995,
    /// Overlapped I/O is in progress: `Online` / `Offline` continue on a worker.
    IO_PENDING ("ERROR_IO_PENDING") = 997,
    /// The operation timed out.
    TIMEOUT ("ERROR_TIMEOUT") = 1460,
    /// The cluster resource could not be found: an id the monitor did not issue.
    RESOURCE_NOT_FOUND ("ERROR_RESOURCE_NOT_FOUND") = 5007,
    /// The group or resource is not in the correct state to perform the requested operation:
    /// `Cancel` with nothing pending, or `Online` / `Offline` while an operation is pending.
    INVALID_STATE ("ERROR_INVALID_STATE") = 5023,
}

impl Win32Error {
    /// Whether this is `ERROR_SUCCESS`.
    pub const fn is_success(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for Win32Error {
    /// The `ERROR_*` name, or the number for a code without a constant here.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "Win32 error {}", self.0),
        }
    }
}

impl fmt::Debug for Win32Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name}({})", self.0),
            None => write!(f, "Win32Error({})", self.0),
        }
    }
}

impl core::error::Error for Win32Error {}

/// `CLUSTER_RESOURCE_STATE`: the states a resource of this model can be in, with their
/// `clusapi.h` values.
#[doc(alias = "CLUSTER_RESOURCE_STATE")]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[repr(i32)]
pub enum ResourceState {
    /// `ClusterResourceOnline` (2).
    #[doc(alias = "ClusterResourceOnline")]
    Online = 2,
    /// `ClusterResourceOffline` (3): where a resource starts.
    #[doc(alias = "ClusterResourceOffline")]
    Offline = 3,
    /// `ClusterResourceFailed` (4).
    #[doc(alias = "ClusterResourceFailed")]
    Failed = 4,
    /// `ClusterResourceOnlinePending` (129): a worker is bringing it online.
    #[doc(alias = "ClusterResourceOnlinePending")]
    OnlinePending = 129,
    /// `ClusterResourceOfflinePending` (130): a worker is taking it offline.
    #[doc(alias = "ClusterResourceOfflinePending")]
    OfflinePending = 130,
}

impl ResourceState {
    /// Whether an operation is pending (`OnlinePending` or `OfflinePending`).
    pub const fn is_pending(self) -> bool {
        matches!(
            self,
            ResourceState::OnlinePending | ResourceState::OfflinePending
        )
    }
}

/// `RESOURCE_EXIT_STATE`: what `SetResourceStatus` tells a worker.
#[doc(alias = "RESOURCE_EXIT_STATE")]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[repr(u32)]
pub enum ResourceExitState {
    /// `ResourceExitStateContinue` (0): the operation goes on (or, for the final report, its
    /// outcome was applied).
    #[doc(alias = "ResourceExitStateContinue")]
    Continue = 0,
    /// `ResourceExitStateTerminate` (1): the operation was cancelled or terminated; the worker
    /// stops at once and its outcome is discarded.
    #[doc(alias = "ResourceExitStateTerminate")]
    Terminate = 1,
}

/// The two operations that can be pending.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum PendingKind {
    /// `Online`: success ends in `Online`.
    Online,
    /// `Offline`: success ends in `Offline`.
    Offline,
}

impl PendingKind {
    const fn pending_state(self) -> ResourceState {
        match self {
            PendingKind::Online => ResourceState::OnlinePending,
            PendingKind::Offline => ResourceState::OfflinePending,
        }
    }

    const fn target(self) -> ResourceState {
        match self {
            PendingKind::Online => ResourceState::Online,
            PendingKind::Offline => ResourceState::Offline,
        }
    }
}

/// A resource's id in its monitor.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct ResourceId(pub u32);

/// The `PendingTimeout` default: 180 000 ms.
pub const DEFAULT_PENDING_TIMEOUT_MS: u32 = 180_000;
/// The smallest `PendingTimeout`: 10 ms.
pub const MIN_PENDING_TIMEOUT_MS: u32 = 10;

/// How a resource's DLL behaves.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct ResourceConfig {
    /// `Online` returns `ERROR_IO_PENDING` and finishes on a worker (else it finishes at once).
    pub pending_online: bool,
    /// `Offline` returns `ERROR_IO_PENDING` and finishes on a worker (else it finishes at once).
    pub pending_offline: bool,
    /// `PendingTimeout`: the longest a pending operation may go without reporting status, in
    /// milliseconds of the monitor's clock. At least [`MIN_PENDING_TIMEOUT_MS`].
    pub pending_timeout_ms: u32,
}

impl Default for ResourceConfig {
    /// Both operations pending, the default `PendingTimeout`.
    fn default() -> Self {
        ResourceConfig {
            pending_online: true,
            pending_offline: true,
            pending_timeout_ms: DEFAULT_PENDING_TIMEOUT_MS,
        }
    }
}

/// A snapshot of a resource (`RESOURCE_STATUS`).
#[doc(alias = "RESOURCE_STATUS")]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct ResourceStatus {
    /// `ResourceState`.
    pub state: ResourceState,
    /// `CheckPoint`: status reports of the pending operation so far (0 when none is pending).
    pub checkpoint: u32,
    /// When the pending operation last reported (or started), on the monitor's clock.
    pub last_report_ms: Option<u64>,
}

// ---------------------------------------------------------------------------------------------
// The monitor
// ---------------------------------------------------------------------------------------------

/// The mini-redirector part of a pending operation's context.
struct PendingOp {
    monitor: Weak<Monitor>,
    resource: ResourceId,
    kind: PendingKind,
}

type OpContext = RxContext<PendingOp>;

/// A resource's pending operation, as the monitor records it.
struct Pending {
    op: Arc<OpContext>,
    /// The state before the operation began: where `Cancel` returns it (invariant 4).
    previous: ResourceState,
    last_report_ms: u64,
    checkpoint: u32,
}

struct Resource {
    config: ResourceConfig,
    state: ResourceState,
    pending: Option<Pending>,
}

impl Resource {
    /// Whether `op` is this resource's pending operation (invariant 3).
    fn is_pending(&self, op: &OpContext) -> bool {
        self.pending
            .as_ref()
            .is_some_and(|pending| core::ptr::eq(Arc::as_ptr(&pending.op), op))
    }
}

struct MonitorState {
    now_ms: u64,
    resources: Vec<Resource>,
    work: VecDeque<PendingWork>,
}

impl MonitorState {
    fn resource(&mut self, id: ResourceId) -> Result<&mut Resource, Win32Error> {
        self.resources
            .get_mut(id.0 as usize)
            .ok_or(Win32Error::RESOURCE_NOT_FOUND)
    }
}

struct Monitor {
    state: KSpinLock<MonitorState>,
    next_serial: AtomicU32,
}

/// The resource monitor: hosts resources, calls their DLL's entry points, runs the pending
/// timeout. Cloning gives another handle to the same monitor.
#[derive(Clone)]
pub struct ResourceMonitor {
    inner: Arc<Monitor>,
}

impl Default for ResourceMonitor {
    fn default() -> Self {
        Self::new()
    }
}

/// The routine every pending operation is armed with: an abort took it, so the abort side owns
/// the end (invariant 2). For `Cancel` it settles the resource back to where it was; after
/// `Terminate` or a timeout, which already took the operation out, it finds nothing to do there.
/// It completes the context either way (invariant 6).
fn pending_cancel_routine(op: &OpContext) -> NtStatus {
    let this = op.minirdr();
    if let Some(monitor) = this.monitor.upgrade() {
        let mut state = monitor.state.lock();
        if let Ok(resource) = state.resource(this.resource) {
            if resource.is_pending(op) {
                // Invariants 3 and 4.
                if let Some(pending) = resource.pending.take() {
                    resource.state = pending.previous;
                }
            }
        }
    }
    let _ = op.complete_request(NtStatus::CANCELLED, 0);
    NtStatus::CANCELLED
}

impl ResourceMonitor {
    /// A monitor with no resources, its clock at 0.
    pub fn new() -> Self {
        ResourceMonitor {
            inner: Arc::new(Monitor {
                state: KSpinLock::new(MonitorState {
                    now_ms: 0,
                    resources: Vec::new(),
                    work: VecDeque::new(),
                }),
                next_serial: AtomicU32::new(1),
            }),
        }
    }

    /// Opens a resource, `Offline`. `ERROR_INVALID_PARAMETER` if its `PendingTimeout` is below
    /// [`MIN_PENDING_TIMEOUT_MS`].
    #[doc(alias = "Open")]
    pub fn create_resource(&self, config: ResourceConfig) -> Result<ResourceId, Win32Error> {
        if config.pending_timeout_ms < MIN_PENDING_TIMEOUT_MS {
            return Err(Win32Error::INVALID_PARAMETER);
        }
        let mut state = self.inner.state.lock();
        let id = u32::try_from(state.resources.len()).map_err(|_| Win32Error::INVALID_STATE)?;
        state.resources.push(Resource {
            config,
            state: ResourceState::Offline,
            pending: None,
        });
        Ok(ResourceId(id))
    }

    /// The resource's state.
    pub fn state(&self, id: ResourceId) -> Result<ResourceState, Win32Error> {
        self.status(id).map(|status| status.state)
    }

    /// The resource's state and its pending operation's progress.
    pub fn status(&self, id: ResourceId) -> Result<ResourceStatus, Win32Error> {
        let mut state = self.inner.state.lock();
        let resource = state.resource(id)?;
        Ok(ResourceStatus {
            state: resource.state,
            checkpoint: resource.pending.as_ref().map_or(0, |p| p.checkpoint),
            last_report_ms: resource.pending.as_ref().map(|p| p.last_report_ms),
        })
    }

    /// `Online`: brings the resource online.
    ///
    /// From `Offline` or `Failed`: `ERROR_IO_PENDING` with the resource `OnlinePending` and a
    /// [`PendingWork`] queued for a worker, or, for a resource whose `Online` is not pending,
    /// `ERROR_SUCCESS` with the resource `Online`. Already `Online`: `ERROR_SUCCESS`, nothing
    /// done. An operation pending: `ERROR_INVALID_STATE`, nothing done.
    #[doc(alias = "Online")]
    #[doc(alias = "PONLINE_ROUTINE")]
    pub fn online(&self, id: ResourceId) -> Win32Error {
        self.start(id, PendingKind::Online)
    }

    /// `Offline`: takes the resource offline.
    ///
    /// From `Online`: `ERROR_IO_PENDING` with the resource `OfflinePending` and a
    /// [`PendingWork`] queued, or `ERROR_SUCCESS` with the resource `Offline` if its `Offline` is
    /// not pending. From `Failed`: `ERROR_SUCCESS`, `Offline` (nothing to take down). Already
    /// `Offline`: `ERROR_SUCCESS`, nothing done. An operation pending: `ERROR_INVALID_STATE`.
    #[doc(alias = "Offline")]
    #[doc(alias = "POFFLINE_ROUTINE")]
    pub fn offline(&self, id: ResourceId) -> Win32Error {
        self.start(id, PendingKind::Offline)
    }

    fn start(&self, id: ResourceId, kind: PendingKind) -> Win32Error {
        // Invariants 1 and 5: the context is made and armed before the lock, and used only if
        // the operation goes pending.
        let init = ContextInit {
            serial_number: self.inner.next_serial.fetch_add(1, Ordering::Relaxed),
            major_function: MajorFunction::DEVICE_CONTROL,
            minor_function: kind as u8,
            ..ContextInit::default()
        };
        let pending_op = PendingOp {
            monitor: Arc::downgrade(&self.inner),
            resource: id,
            kind,
        };
        // `try_new` refuses only initial flags containing CANCELLED, which these have not.
        let Ok(op) = RxContext::try_new(init, pending_op) else {
            return Win32Error::INVALID_STATE;
        };
        let op = Arc::new(op);
        if op
            .set_minirdr_cancel_routine(Some(pending_cancel_routine))
            .is_err()
        {
            // A fresh context is never cancelled; refuse rather than publish it unarmed.
            return Win32Error::INVALID_STATE;
        }
        let mut state = self.inner.state.lock();
        let now_ms = state.now_ms;
        let resource = match state.resource(id) {
            Ok(resource) => resource,
            Err(error) => return error,
        };
        let goes_pending = match (kind, resource.state) {
            (_, current) if current.is_pending() => return Win32Error::INVALID_STATE,
            (PendingKind::Online, ResourceState::Online)
            | (PendingKind::Offline, ResourceState::Offline) => return Win32Error::SUCCESS,
            (PendingKind::Offline, ResourceState::Failed) => false,
            (PendingKind::Online, _) => resource.config.pending_online,
            (PendingKind::Offline, _) => resource.config.pending_offline,
        };
        if !goes_pending {
            resource.state = kind.target();
            return Win32Error::SUCCESS;
        }
        resource.pending = Some(Pending {
            op: op.clone(),
            previous: resource.state,
            last_report_ms: now_ms,
            checkpoint: 0,
        });
        resource.state = kind.pending_state();
        state.work.push_back(PendingWork {
            op,
            monitor: Arc::downgrade(&self.inner),
        });
        Win32Error::IO_PENDING
    }

    /// `Cancel` (`PCANCEL_ROUTINE`): cancels the resource's pending operation.
    ///
    /// - `CancelFlags_RESERVED` is reserved: anything but 0 is `ERROR_INVALID_PARAMETER` and
    ///   changes nothing.
    /// - A pending operation: cancelled through the core (its context's routine runs once), and
    ///   the resource is back in the state it had before the operation began (`Offline` or
    ///   `Failed` for a cancelled `Online`, `Online` for a cancelled `Offline`); the worker is
    ///   told to stop and its outcome is discarded. `ERROR_SUCCESS`.
    /// - Nothing pending (never was, or the worker, `Terminate` or the timeout ended it first):
    ///   `ERROR_INVALID_STATE`, nothing changed: "the operation was not successfully canceled".
    #[doc(alias = "Cancel")]
    #[doc(alias = "PCANCEL_ROUTINE")]
    pub fn cancel(&self, id: ResourceId, cancel_flags_reserved: u32) -> Win32Error {
        if cancel_flags_reserved != 0 {
            return Win32Error::INVALID_PARAMETER;
        }
        let op = {
            let mut state = self.inner.state.lock();
            match state.resource(id) {
                Ok(resource) => match &resource.pending {
                    Some(pending) => pending.op.clone(),
                    None => return Win32Error::INVALID_STATE,
                },
                Err(error) => return error,
            }
        };
        // Invariants 2 and 5: through the core, with the monitor lock released.
        match op.cancel() {
            CancelOutcome::RoutineCalled(_) => Win32Error::SUCCESS,
            // The worker's disarm won (it completes), or another abort got there first.
            _ => Win32Error::INVALID_STATE,
        }
    }

    /// `Terminate`: ends any pending operation at once (through the core: the worker is told to
    /// stop, its outcome is discarded) and leaves the resource `Offline`, from any state.
    /// `ERROR_SUCCESS`.
    #[doc(alias = "Terminate")]
    #[doc(alias = "PTERMINATE_ROUTINE")]
    pub fn terminate(&self, id: ResourceId) -> Win32Error {
        self.end_pending(id, ResourceState::Offline)
    }

    /// Takes the pending operation out and sets `end` (invariant 3), then cancels its context.
    fn end_pending(&self, id: ResourceId, end: ResourceState) -> Win32Error {
        let pending = {
            let mut state = self.inner.state.lock();
            let resource = match state.resource(id) {
                Ok(resource) => resource,
                Err(error) => return error,
            };
            resource.state = end;
            resource.pending.take()
        };
        if let Some(pending) = pending {
            // The routine completes the context (invariant 6); the resource is already settled.
            let _ = pending.op.cancel();
        }
        Win32Error::SUCCESS
    }

    /// The next pending operation waiting for a worker, oldest first.
    pub fn next_work(&self) -> Option<PendingWork> {
        self.inner.state.lock().work.pop_front()
    }

    /// How many pending operations wait for a worker.
    pub fn queued_work(&self) -> usize {
        self.inner.state.lock().work.len()
    }

    /// The monitor's clock, in milliseconds.
    pub fn now_ms(&self) -> u64 {
        self.inner.state.lock().now_ms
    }

    /// Moves the monitor's clock forward by `ms` and returns the new time.
    pub fn advance_clock(&self, ms: u64) -> u64 {
        let mut state = self.inner.state.lock();
        state.now_ms = state.now_ms.saturating_add(ms);
        state.now_ms
    }

    /// The pending timeout: terminates every pending operation whose last status report (or
    /// start) is more than its resource's `PendingTimeout` ago, leaving the resource `Failed`.
    /// Returns how many were terminated.
    pub fn check_pending_timeouts(&self) -> usize {
        let expired: Vec<ResourceId> = {
            let state = self.inner.state.lock();
            let now_ms = state.now_ms;
            (0..)
                .zip(state.resources.iter())
                .filter(|(_, resource)| {
                    resource.pending.as_ref().is_some_and(|pending| {
                        now_ms.saturating_sub(pending.last_report_ms)
                            > u64::from(resource.config.pending_timeout_ms)
                    })
                })
                .map(|(index, _)| ResourceId(index))
                .collect()
        };
        let mut terminated = 0;
        for id in expired {
            let pending = {
                let mut state = self.inner.state.lock();
                let now_ms = state.now_ms;
                match state.resource(id) {
                    Ok(resource) => {
                        let timeout = u64::from(resource.config.pending_timeout_ms);
                        // Re-checked under the lock: a report or an end may have come between.
                        if resource
                            .pending
                            .as_ref()
                            .is_some_and(|p| now_ms.saturating_sub(p.last_report_ms) > timeout)
                        {
                            resource.state = ResourceState::Failed;
                            resource.pending.take()
                        } else {
                            None
                        }
                    }
                    Err(_) => None,
                }
            };
            if let Some(pending) = pending {
                let _ = pending.op.cancel();
                terminated += 1;
            }
        }
        terminated
    }
}

impl fmt::Debug for ResourceMonitor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.inner.state.lock();
        f.debug_struct("ResourceMonitor")
            .field("now_ms", &state.now_ms)
            .field("resources", &state.resources.len())
            .field("queued_work", &state.work.len())
            .finish()
    }
}

// ---------------------------------------------------------------------------------------------
// The worker's side
// ---------------------------------------------------------------------------------------------

/// A pending `Online` or `Offline`, for the worker that finishes it (`ClusWorkerCreate`'s
/// thread).
///
/// The worker reports progress with [`report_status`](Self::report_status), looks for a stop
/// request with [`check_terminate`](Self::check_terminate), and ends with
/// [`complete`](Self::complete). A worker that drops the item, or stops reporting, is terminated
/// by the pending timeout.
#[must_use = "a pending operation stays pending until its worker completes it (or it times out)"]
pub struct PendingWork {
    op: Arc<OpContext>,
    monitor: Weak<Monitor>,
}

impl PendingWork {
    /// The resource.
    pub fn resource(&self) -> ResourceId {
        self.op.minirdr().resource
    }

    /// `Online` or `Offline`.
    pub fn kind(&self) -> PendingKind {
        self.op.minirdr().kind
    }

    /// `ClusWorkerCheckTerminate`: whether the operation was cancelled or terminated (its
    /// context is `CANCELLED`), so the worker should stop.
    #[doc(alias = "ClusWorkerCheckTerminate")]
    pub fn check_terminate(&self) -> bool {
        self.op.is_cancelled() || self.monitor.strong_count() == 0
    }

    /// `SetResourceStatus` with the pending state: one more checkpoint, and the pending timeout
    /// starts again from now. `Terminate` if the operation was cancelled or terminated (nothing
    /// recorded then), else `Continue`.
    #[doc(alias = "SetResourceStatus")]
    pub fn report_status(&self) -> ResourceExitState {
        let Some(monitor) = self.monitor.upgrade() else {
            return ResourceExitState::Terminate;
        };
        let mut state = monitor.state.lock();
        let now_ms = state.now_ms;
        let Ok(resource) = state.resource(self.resource()) else {
            return ResourceExitState::Terminate;
        };
        if self.op.is_cancelled() || !resource.is_pending(&self.op) {
            return ResourceExitState::Terminate;
        }
        if let Some(pending) = resource.pending.as_mut() {
            pending.checkpoint = pending.checkpoint.saturating_add(1);
            pending.last_report_ms = now_ms;
        }
        ResourceExitState::Continue
    }

    /// The worker's final `SetResourceStatus`: the operation's outcome, `ERROR_SUCCESS` or an
    /// error.
    ///
    /// If the operation is still pending (the core's disarm succeeds: no abort came first), the
    /// resource becomes `Online` / `Offline` on success or `Failed` on error, and this returns
    /// `Continue`. If it was cancelled, terminated or timed out first, the outcome is discarded
    /// and this returns `Terminate`.
    #[doc(alias = "SetResourceStatus")]
    pub fn complete(self, result: Win32Error) -> ResourceExitState {
        if !self.disarm() {
            // Invariant 2: the abort owns the end; its routine completes the context.
            return ResourceExitState::Terminate;
        }
        let mut exit = ResourceExitState::Terminate;
        if let Some(monitor) = self.monitor.upgrade() {
            let mut state = monitor.state.lock();
            if let Ok(resource) = state.resource(self.resource()) {
                // Invariant 3: a Terminate or timeout that took the operation out between our
                // disarm and here has settled the resource already.
                if resource.is_pending(&self.op) {
                    resource.pending = None;
                    resource.state = if result.is_success() {
                        self.kind().target()
                    } else {
                        ResourceState::Failed
                    };
                    exit = ResourceExitState::Continue;
                }
            }
        }
        let status = if result.is_success() {
            NtStatus::SUCCESS
        } else {
            NtStatus::UNSUCCESSFUL
        };
        // Invariant 6: the disarm made this side the one completer.
        let _ = self.op.complete_request(status, result.0 as usize);
        exit
    }

    /// The core's disarm: `true` if the worker owns the end (invariant 2).
    #[cfg(not(rdbss_mutant = "resmon_complete_skips_disarm"))]
    fn disarm(&self) -> bool {
        self.op.set_minirdr_cancel_routine(None).is_ok()
    }

    /// MUTANT (test-only): asks "cancelled?" instead of disarming, so the routine stays armed and
    /// a cancel that comes right after the check also ends the operation: two owners, two
    /// completions.
    #[cfg(rdbss_mutant = "resmon_complete_skips_disarm")]
    fn disarm(&self) -> bool {
        !self.op.is_cancelled()
    }
}

impl fmt::Debug for PendingWork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingWork")
            .field("resource", &self.resource())
            .field("kind", &self.kind())
            .field("terminate", &self.check_terminate())
            .finish()
    }
}
