//! The MI layer of the batch simulator: directory enumeration as an `MI_Session_EnumerateInstances`
//! operation and the method call as an `MI_Session_Invoke` operation, on [`rdbss::mi`].
//!
//! Each `dir_enum` or `method_call` request of the workload is one MI operation of the run's
//! [`MiSession`] (caller identity = the client) *and* one `RX_CONTEXT` exchange, as today: the MI
//! operation sits on top of the exchange. The MI provider is the code that turns the operation
//! into the exchange (a provider implemented over the redirector); its work is the exchange.
//!
//! | simulator event | MI call |
//! |---|---|
//! | issue | `start_operation(client, Enumerate / Invoke)`; `MI_RESULT_SERVER_LIMITS_EXCEEDED` (quota) or `..._SERVER_IS_SHUTTING_DOWN` completes the request at once with `STATUS_QUOTA_EXCEEDED` / `STATUS_INVALID_DEVICE_STATE` |
//! | dispatch (the provider starts) | `register_cancel_with(callback)`: the callback cancels the request's `RX_CONTEXT` through the existing path (`cancel_by_id`, the minirdr routine, CANCEL to the server); refused with `MI_RESULT_NOT_SUPPORTED` for an invoke, which then runs to completion |
//! | user cancel / timeout / teardown | `MiOperation::cancel` with `MI_REASON_NONE` / `MI_REASON_TIMEOUT` / `MI_REASON_SHUTDOWN` (instead of cancelling the `RX_CONTEXT` directly) |
//! | the reply, disarm won (enumerate) | each directory entry is posted as an instance (`post_instance`) |
//! | the request completed | the provider posts its final result (`post_result`: the request's status), then the client reads every result left and closes |
//! | a cancel that gives the client its final result at once | the client reads every result left and closes right there (it does not wait for the provider) |
//!
//! Invariants:
//! 1. The client handle of an operation is used (cancel, read, close) only with its entry's
//!    `client` mutex held, and is closed by whoever holds it first after the final result is in:
//!    exactly once. Nothing called with that mutex held takes it again (the provider's callback
//!    only cancels the `RX_CONTEXT`, whose completion is handed to the owning shard as an event).
//! 2. The provider posts its final result exactly once, on the shard that owns the client, after
//!    the request completed; its handle is taken out of the entry to do so.
//! 3. An entry leaves the table when both its provider has posted and its client has closed; the
//!    run is over only when the table is empty (the quota is then back to zero).

use crate::engine::Shared;
use crate::record::{CancelReason, Invariant};
use rdbss::mi::{
    MiCallerId, MiCancellationReason, MiContext, MiDelivery, MiOperation, MiOperationKind,
    MiPosted, MiRegistration, MiResult, MiSession,
};
use rdbss::NtStatus;
use serde::Serialize;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

/// An instance an enumeration posts: one directory entry, a slice of its reply's listing (shared,
/// so posting an entry costs no copy).
#[derive(Clone, Debug)]
pub struct DirEntry {
    listing: Arc<[u8]>,
    range: Range<usize>,
}

impl DirEntry {
    /// The entry's name (a subdirectory ends with `/`).
    pub fn name(&self) -> &[u8] {
        &self.listing[self.range.clone()]
    }
}

/// One MI operation: the client's handle and the provider's context.
struct MiEntry {
    kind: MiOperationKind,
    caller: MiCallerId,
    /// `MI_Operation`; `None` once closed (invariant 1).
    client: Mutex<Option<MiOperation<DirEntry>>>,
    /// `MI_Context`; `None` once the final result is posted (invariant 2).
    provider: Mutex<Option<MiContext<DirEntry>>>,
    /// The client called `MI_Operation_Cancel`.
    cancelled: AtomicBool,
    /// Times the provider's cancel callback ran.
    callbacks: AtomicU32,
    /// The provider's final result was delivered (`MiPosted::Delivered`).
    delivered: AtomicBool,
}

/// What the MI layer counted (atomics; see [`MiSummary`] for the meaning of each).
#[derive(Default)]
struct MiCounters {
    started_enumerate: AtomicU64,
    started_invoke: AtomicU64,
    refused_quota: AtomicU64,
    refused_shutting_down: AtomicU64,
    cancels: [AtomicU64; 3],
    cancel_after_close: AtomicU64,
    registered: AtomicU64,
    called_at_once: AtomicU64,
    already_delivered: AtomicU64,
    not_supported: AtomicU64,
    callbacks: AtomicU64,
    instances_posted: AtomicU64,
    instances_refused: AtomicU64,
    instances_read: AtomicU64,
    results_after_cancel: AtomicU64,
    final_delivered: AtomicU64,
    final_cancelled: AtomicU64,
    closed_early: AtomicU64,
    closes: AtomicU64,
    posted_delivered: AtomicU64,
    posted_discarded: AtomicU64,
    enumerations_cancelled: AtomicU64,
    invokes_cancelled: AtomicU64,
    invoke_ran_to_completion: AtomicU64,
    max_in_use: AtomicU64,
}

/// The MI layer of a run: one session, the operations in flight by request index.
pub(crate) struct MiLayer {
    session: MiSession<DirEntry>,
    table: Mutex<HashMap<u32, Arc<MiEntry>>>,
    counters: MiCounters,
}

/// The MI reason of a simulator cancel reason.
pub fn mi_reason(reason: CancelReason) -> MiCancellationReason {
    match reason {
        CancelReason::User => MiCancellationReason::None,
        CancelReason::Timeout => MiCancellationReason::Timeout,
        CancelReason::Teardown => MiCancellationReason::Shutdown,
    }
}

/// The simulator cancel reason of an MI reason (the reason the `RX_CONTEXT` is cancelled with).
fn rx_reason(reason: MiCancellationReason) -> CancelReason {
    match reason {
        MiCancellationReason::Timeout => CancelReason::Timeout,
        MiCancellationReason::Shutdown | MiCancellationReason::ServiceStop => {
            CancelReason::Teardown
        }
        MiCancellationReason::None => CancelReason::User,
    }
}

impl MiLayer {
    pub(crate) fn new(quota: usize) -> Self {
        MiLayer {
            session: MiSession::new(quota),
            table: Mutex::new(HashMap::new()),
            counters: MiCounters::default(),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<MiEntry>>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn entry(&self, index: u32) -> Option<Arc<MiEntry>> {
        self.table().get(&index).cloned()
    }

    /// Operations not yet both closed and posted (invariant 3).
    pub(crate) fn open(&self) -> usize {
        self.table().len()
    }

    /// `MI_Session_EnumerateInstances` / `MI_Session_Invoke` for request `index` of `client`.
    /// `Err` with the request's status if the session refused it.
    pub(crate) fn start(
        &self,
        index: u32,
        client: u32,
        kind: MiOperationKind,
    ) -> Result<(), NtStatus> {
        let caller = MiCallerId(u64::from(client));
        let c = &self.counters;
        match self.session.start_operation(caller, kind) {
            Ok((operation, provider)) => {
                let entry = Arc::new(MiEntry {
                    kind,
                    caller,
                    client: Mutex::new(Some(operation)),
                    provider: Mutex::new(Some(provider)),
                    cancelled: AtomicBool::new(false),
                    callbacks: AtomicU32::new(0),
                    delivered: AtomicBool::new(false),
                });
                self.table().insert(index, entry);
                match kind {
                    MiOperationKind::Enumerate => &c.started_enumerate,
                    MiOperationKind::Invoke => &c.started_invoke,
                }
                .fetch_add(1, Ordering::Relaxed);
                c.max_in_use
                    .fetch_max(self.session.operations_in_use() as u64, Ordering::Relaxed);
                Ok(())
            }
            Err(MiResult::SERVER_LIMITS_EXCEEDED) => {
                c.refused_quota.fetch_add(1, Ordering::Relaxed);
                Err(NtStatus::QUOTA_EXCEEDED)
            }
            Err(_) => {
                c.refused_shutting_down.fetch_add(1, Ordering::Relaxed);
                Err(NtStatus::INVALID_DEVICE_STATE)
            }
        }
    }

    /// `MI_Operation_Cancel` for request `index`, if it is an MI operation still in the table
    /// (`false`: not one; cancel its `RX_CONTEXT` directly).
    pub(crate) fn cancel(&self, shared: &Shared, index: u32, reason: CancelReason) -> bool {
        let Some(entry) = self.entry(index) else {
            return false;
        };
        shared.record(index).mi_cancel.set(shared.now());
        let c = &self.counters;
        // Invariant 1: the handle is used with its mutex held; the callback this may call only
        // cancels the RX_CONTEXT.
        let mut client = entry.client.lock().unwrap_or_else(|e| e.into_inner());
        let Some(operation) = client.as_ref() else {
            // Closed already (its final result was in): nothing to cancel.
            c.cancel_after_close.fetch_add(1, Ordering::Relaxed);
            return true;
        };
        if !entry.cancelled.swap(true, Ordering::AcqRel) {
            match entry.kind {
                MiOperationKind::Enumerate => &c.enumerations_cancelled,
                MiOperationKind::Invoke => &c.invokes_cancelled,
            }
            .fetch_add(1, Ordering::Relaxed);
        }
        let reason = mi_reason(reason);
        c.cancels[reason.as_raw() as usize].fetch_add(1, Ordering::Relaxed);
        if operation.cancel(entry.caller, reason).is_err() {
            shared.checker.fail(
                Invariant::MiClosedOnce,
                Some((index, shared.record(index))),
                "MI_Operation_Cancel by the operation's own caller was refused".into(),
            );
        }
        // "The client does disconnect from the server as soon as possible": with its final
        // result in, it reads what is left and closes now, without waiting for the provider.
        if operation.final_result().is_some() {
            if let Some(operation) = client.take() {
                c.closed_early.fetch_add(1, Ordering::Relaxed);
                self.read_and_close(shared, index, &entry, operation);
            }
        }
        drop(client);
        self.forget_if_done(index, &entry);
        true
    }

    /// The provider starts (the request is dispatched): `MI_Context_RegisterCancel`.
    pub(crate) fn provider_start(&self, shared: &Arc<Shared>, index: u32) {
        let Some(entry) = self.entry(index) else {
            return;
        };
        let provider = entry
            .provider
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(provider) = provider else {
            return;
        };
        let weak_shared: Weak<Shared> = Arc::downgrade(shared);
        let weak_entry = Arc::downgrade(&entry);
        let registered = provider.register_cancel_with(move |reason| {
            let (Some(shared), Some(entry)) = (weak_shared.upgrade(), weak_entry.upgrade()) else {
                return;
            };
            shared.mi.provider_cancelled(&shared, index, &entry, reason);
        });
        let c = &self.counters;
        match registered {
            Ok(MiRegistration::Registered) => &c.registered,
            Ok(MiRegistration::CalledAtOnce) => &c.called_at_once,
            Ok(MiRegistration::AlreadyDelivered) => &c.already_delivered,
            Err(MiResult::NOT_SUPPORTED) => &c.not_supported,
            Err(error) => {
                shared.checker.fail(
                    Invariant::MiCallbackNotAfterCompletion,
                    Some((index, shared.record(index))),
                    format!("MI_Context_RegisterCancel before the final result said {error}"),
                );
                return;
            }
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    /// The provider's cancel callback: abort the server work by cancelling the `RX_CONTEXT`.
    fn provider_cancelled(
        &self,
        shared: &Shared,
        index: u32,
        entry: &MiEntry,
        reason: MiCancellationReason,
    ) {
        self.counters.callbacks.fetch_add(1, Ordering::Relaxed);
        let calls = entry.callbacks.fetch_add(1, Ordering::AcqRel) + 1;
        if calls > 1 || entry.delivered.load(Ordering::Acquire) {
            shared.checker.fail(
                Invariant::MiCallbackNotAfterCompletion,
                Some((index, shared.record(index))),
                format!(
                    "the provider's cancel callback ran (call {calls}) after the final result was \
                     delivered or more than once"
                ),
            );
        }
        shared.cancel_rx(index, rx_reason(reason));
    }

    /// The reply of an enumeration came back and its disarm won: each entry is an instance.
    pub(crate) fn post_instances(&self, index: u32, listing: Vec<u8>) {
        let Some(entry) = self.entry(index) else {
            return;
        };
        let provider = entry
            .provider
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let Some(provider) = provider else {
            return;
        };
        let c = &self.counters;
        let listing: Arc<[u8]> = listing.into();
        let mut start = 0;
        while start < listing.len() {
            let end = listing[start..]
                .iter()
                .position(|b| *b == b'\n')
                .map_or(listing.len(), |n| start + n);
            let range = start..end;
            start = end + 1;
            if range.is_empty() {
                continue;
            }
            let entry = DirEntry {
                listing: listing.clone(),
                range,
            };
            match provider.post_instance(entry) {
                Ok(()) => c.instances_posted.fetch_add(1, Ordering::Relaxed),
                // The client has its final result (cancelled): the provider stops.
                Err(_) => {
                    c.instances_refused.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            };
        }
    }

    /// The request completed with `status` (on its client's shard): the provider posts its
    /// final result, then the client reads what is left and closes (invariants 2 and 3).
    pub(crate) fn request_done(&self, shared: &Shared, index: u32, status: Option<NtStatus>) {
        let Some(entry) = self.entry(index) else {
            return;
        };
        let c = &self.counters;
        let provider = entry
            .provider
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(provider) = provider {
            let result = match status {
                Some(s) if s.is_success() => MiResult::OK,
                _ => MiResult::FAILED,
            };
            match provider.post_result(result) {
                Ok(MiPosted::Delivered) => {
                    entry.delivered.store(true, Ordering::Release);
                    c.posted_delivered.fetch_add(1, Ordering::Relaxed);
                    if entry.callbacks.load(Ordering::Acquire) > 0 {
                        shared.checker.fail(
                            Invariant::MiCallbackNotAfterCompletion,
                            Some((index, shared.record(index))),
                            "the final result was delivered after the cancel callback ran".into(),
                        );
                    }
                }
                Ok(MiPosted::Discarded) => {
                    c.posted_discarded.fetch_add(1, Ordering::Relaxed);
                    if entry.kind == MiOperationKind::Invoke
                        && status.is_some_and(|s| s != NtStatus::CANCELLED)
                    {
                        // "Invoke cannot": the call ran to completion after the client's cancel.
                        c.invoke_ran_to_completion.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(error) => shared.checker.fail(
                    Invariant::MiClosedOnce,
                    Some((index, shared.record(index))),
                    format!("MI_Context_PostResult said {error}"),
                ),
            }
        }
        let operation = entry
            .client
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(operation) = operation {
            self.read_and_close(shared, index, &entry, operation);
        }
        self.forget_if_done(index, &entry);
    }

    /// Reads every result left, then `MI_Operation_Close` (invariant 1).
    fn read_and_close(
        &self,
        shared: &Shared,
        index: u32,
        entry: &MiEntry,
        operation: MiOperation<DirEntry>,
    ) {
        let c = &self.counters;
        let cancelled = entry.cancelled.load(Ordering::Acquire);
        loop {
            match operation.get_result() {
                MiDelivery::Instance(entry) => {
                    debug_assert!(!entry.name().is_empty());
                    c.instances_read.fetch_add(1, Ordering::Relaxed);
                    if cancelled {
                        c.results_after_cancel.fetch_add(1, Ordering::Relaxed);
                    }
                }
                MiDelivery::Final(f) => {
                    if f.cancelled.is_some() {
                        c.final_cancelled.fetch_add(1, Ordering::Relaxed);
                    } else {
                        c.final_delivered.fetch_add(1, Ordering::Relaxed);
                    }
                    break;
                }
                MiDelivery::NotYet => {
                    shared.checker.fail(
                        Invariant::MiClosedOnce,
                        Some((index, shared.record(index))),
                        "closed before its final result was in".into(),
                    );
                    break;
                }
            }
        }
        match operation.close(entry.caller) {
            Ok(()) => {
                c.closes.fetch_add(1, Ordering::Relaxed);
            }
            Err((error, _)) => shared.checker.fail(
                Invariant::MiClosedOnce,
                Some((index, shared.record(index))),
                format!("MI_Operation_Close by its own caller said {error}"),
            ),
        }
    }

    /// Drops the entry once both sides are done (invariant 3).
    fn forget_if_done(&self, index: u32, entry: &Arc<MiEntry>) {
        let mut table = self.table();
        let provider_done = entry
            .provider
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none();
        let client_done = entry
            .client
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none();
        if provider_done && client_done {
            if let Some(current) = table.get(&index) {
                if Arc::ptr_eq(current, entry) {
                    table.remove(&index);
                }
            }
        }
    }

    /// Stops accepting operations (session teardown).
    pub(crate) fn shutdown(&self) {
        self.session.shutdown();
    }

    /// The after-run checks: every operation closed exactly once, quota back to zero.
    pub(crate) fn final_checks(&self, shared: &Shared) {
        let open: Vec<u32> = {
            let mut keys: Vec<u32> = self.table().keys().copied().collect();
            keys.sort_unstable();
            keys
        };
        for &index in open.iter().take(3) {
            shared.checker.fail(
                Invariant::MiClosedOnce,
                Some((index, shared.record(index))),
                format!(
                    "{} MI operation(s) not closed or not posted after the run",
                    open.len()
                ),
            );
        }
        let c = &self.counters;
        let started =
            c.started_enumerate.load(Ordering::Relaxed) + c.started_invoke.load(Ordering::Relaxed);
        let closes = c.closes.load(Ordering::Relaxed);
        if open.is_empty() && closes != started {
            shared.checker.fail(
                Invariant::MiClosedOnce,
                None,
                format!("{started} MI operation(s) started but {closes} closed"),
            );
        }
        let (in_use, live) = (
            self.session.operations_in_use(),
            self.session.live_operations(),
        );
        if in_use != 0 || live != 0 {
            shared.checker.fail(
                Invariant::MiQuotaReturned,
                None,
                format!(
                    "after the run the MI session still has {in_use} unit(s) of quota in use and \
                     {live} operation(s) alive"
                ),
            );
        }
    }

    /// The counts, for the report.
    pub(crate) fn summary(&self) -> MiSummary {
        let c = &self.counters;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        MiSummary {
            quota: self.session.max_operations() as u64,
            started_enumerate: n(&c.started_enumerate),
            started_invoke: n(&c.started_invoke),
            refused_server_limits_exceeded: n(&c.refused_quota),
            refused_shutting_down: n(&c.refused_shutting_down),
            max_quota_in_use: n(&c.max_in_use),
            cancels_reason_none: n(&c.cancels[0]),
            cancels_reason_timeout: n(&c.cancels[1]),
            cancels_reason_shutdown: n(&c.cancels[2]),
            cancels_after_close: n(&c.cancel_after_close),
            enumerations_cancelled: n(&c.enumerations_cancelled),
            invokes_cancelled: n(&c.invokes_cancelled),
            registered: n(&c.registered),
            registered_after_cancel_called_at_once: n(&c.called_at_once),
            registered_already_delivered: n(&c.already_delivered),
            register_not_supported: n(&c.not_supported),
            callbacks: n(&c.callbacks),
            instances_posted: n(&c.instances_posted),
            instances_refused: n(&c.instances_refused),
            instances_read: n(&c.instances_read),
            results_after_cancel: n(&c.results_after_cancel),
            final_results_delivered: n(&c.final_delivered),
            final_results_cancelled: n(&c.final_cancelled),
            posted_delivered: n(&c.posted_delivered),
            posted_discarded: n(&c.posted_discarded),
            invokes_ran_to_completion_after_cancel: n(&c.invoke_ran_to_completion),
            closed_at_cancel: n(&c.closed_early),
            closes: n(&c.closes),
            quota_in_use_at_end: self.session.operations_in_use() as u64,
            live_operations_at_end: self.session.live_operations() as u64,
        }
    }
}

/// The MI layer's figures.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct MiSummary {
    /// The session's quota of running operations (`--mi-quota`).
    pub quota: u64,
    /// Enumerations (`dir_enum` requests) started.
    pub started_enumerate: u64,
    /// Invocations (`method_call` requests) started.
    pub started_invoke: u64,
    /// Starts refused with `MI_RESULT_SERVER_LIMITS_EXCEEDED`: the quota was used up, often by
    /// cancelled operations whose provider had not noticed yet.
    pub refused_server_limits_exceeded: u64,
    /// Starts refused with `MI_RESULT_SERVER_IS_SHUTTING_DOWN` (session teardown).
    pub refused_shutting_down: u64,
    /// The most units of quota in use at once (seen at starts).
    pub max_quota_in_use: u64,
    /// `MI_Operation_Cancel` calls with `MI_REASON_NONE` (user cancels).
    pub cancels_reason_none: u64,
    /// `MI_Operation_Cancel` calls with `MI_REASON_TIMEOUT`.
    pub cancels_reason_timeout: u64,
    /// `MI_Operation_Cancel` calls with `MI_REASON_SHUTDOWN` (session teardown).
    pub cancels_reason_shutdown: u64,
    /// Cancels that found the operation already closed by its client (nothing done).
    pub cancels_after_close: u64,
    /// Enumerations the client cancelled.
    pub enumerations_cancelled: u64,
    /// Invocations the client cancelled.
    pub invokes_cancelled: u64,
    /// `MI_Context_RegisterCancel`: registered.
    pub registered: u64,
    /// Registered after the cancel: the callback was called at once.
    pub registered_after_cancel_called_at_once: u64,
    /// Registered after the cancel was delivered to an earlier callback.
    pub registered_already_delivered: u64,
    /// Refused with `MI_RESULT_NOT_SUPPORTED` (invoke: cannot be cancelled at the provider).
    pub register_not_supported: u64,
    /// Provider cancel callbacks that ran (each cancelled its request's `RX_CONTEXT`).
    pub callbacks: u64,
    /// Instances (directory entries) the providers posted.
    pub instances_posted: u64,
    /// Instances refused because the client already had its final result (the provider stopped).
    pub instances_refused: u64,
    /// Instances the clients read.
    pub instances_read: u64,
    /// Of those, read after the client had cancelled ("a few extra results may still get
    /// delivered").
    pub results_after_cancel: u64,
    /// Final results the clients read: the provider's.
    pub final_results_delivered: u64,
    /// Final results the clients read: cancelled (`MI_RESULT_FAILED` with a reason).
    pub final_results_cancelled: u64,
    /// `MI_Context_PostResult`: the operation's final result.
    pub posted_delivered: u64,
    /// `MI_Context_PostResult`: discarded, the cancel had won.
    pub posted_discarded: u64,
    /// Cancelled invocations whose call ran to completion with its real result anyway.
    pub invokes_ran_to_completion_after_cancel: u64,
    /// Operations the client closed at its cancel, before the provider finished.
    pub closed_at_cancel: u64,
    /// `MI_Operation_Close` calls (one per started operation).
    pub closes: u64,
    /// Quota units in use after the run (0 expected).
    pub quota_in_use_at_end: u64,
    /// Operations still alive in the session after the run (0 expected).
    pub live_operations_at_end: u64,
}
