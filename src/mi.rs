//! Windows Management Infrastructure (MI) cancellation, built on the `RX_CONTEXT` core:
//! `MI_Operation_Cancel` and `MI_Operation_Close` on the client side, `MI_Context_RegisterCancel`
//! on the provider side (seeds `000_da496c08758d5fa8`, `001_3462e7512256ceba`,
//! `003_335bf68c77d4b8ae`).
//!
//! An [`MiSession`] is an [`Rdbss`] instance plus a quota of concurrent operations. Each
//! operation it starts is one registry context ([`ContextRef`]): the client holds it as an
//! [`MiOperation`], the provider as an [`MiContext`]. MI cancellation *is* the core's:
//!
//! | MI | `RX_CONTEXT` core |
//! |---|---|
//! | `MI_Operation_Cancel` | [`RxContext::cancel`]: sets `CANCELLED`, takes and calls the armed routine once, outside the lock |
//! | `MI_Context_RegisterCancel` | store the callback in the provider slot, then [`RxContext::set_minirdr_cancel_routine`] arms a fixed routine that takes and calls it |
//! | registering after the cancel | the core refuses the arm with `STATUS_CANCELLED`: the callback is called at once |
//! | `MI_Context_PostResult` | disarm (`set_minirdr_cancel_routine(None)`): `Ok` = the provider's result is final; `Err(Cancelled)` = the cancel won |
//! | quota of running operations | one unit per operation, released by the completion of its context ([`RxContext::complete_request`], exactly once) |
//!
//! ```
//! use rdbss::mi::{MiCallerId, MiCancellationReason, MiDelivery, MiOperationKind, MiResult, MiSession};
//! use std::sync::atomic::{AtomicBool, Ordering};
//! use std::sync::Arc;
//!
//! let session: MiSession<&str> = MiSession::new(4);
//! let me = MiCallerId(1);
//! let (operation, provider) = session.start_operation(me, MiOperationKind::Enumerate).unwrap();
//!
//! let stopped = Arc::new(AtomicBool::new(false));
//! let flag = stopped.clone();
//! provider.register_cancel_with(move |_reason| flag.store(true, Ordering::SeqCst)).unwrap();
//! provider.post_instance("first").unwrap();
//!
//! operation.cancel(me, MiCancellationReason::Timeout).unwrap();
//! assert!(stopped.load(Ordering::SeqCst)); // the provider was told
//! // A result produced before the cancel is still delivered; the final result follows.
//! assert!(matches!(operation.get_result(), MiDelivery::Instance("first")));
//! assert!(matches!(operation.get_result(), MiDelivery::Final(f) if f.cancelled.is_some()));
//! operation.close(me).map_err(|(e, _)| e).unwrap(); // a cancelled operation is still closed
//! assert_eq!(session.operations_in_use(), 0);
//! ```
//!
//! # Invariants
//!
//! 1. **Built on one context.** Every operation owns one registry context of its session's
//!    instance. Its `CANCELLED` flag is the operation's cancellation and only the core's `cancel`
//!    sets it; every MI cancel (typed, by id, or the implicit one of close) goes through it.
//! 2. **One provider slot, one lock.** The provider's callback and the slot's flags (`armed`,
//!    `delivered`, `posted`, `cancel_completes`) are only touched with the slot lock held.
//!    `register_cancel` stores the callback *before* arming the core's routine, in the same
//!    critical section; `post_result` disarms and acts on the result in one critical section.
//! 3. **Callback at most once.** A callback is called only after being taken out of the slot,
//!    with `delivered` set in the same critical section: by the routine (which the cancel took
//!    because `armed` was set before it) or by a registration the core refused while nothing was
//!    armed. Once `CANCELLED` is set no arm succeeds, so these two never both happen; once
//!    `delivered` is set no callback is stored again.
//! 4. **Never after completion.** `post_result` takes the callback out of the slot in the critical
//!    section of its disarm and sets `posted`, after which nothing is stored: once the provider
//!    has posted its final result, no callback starts.
//! 5. **Never lost.** A callback stored before the cancel is in the slot when the routine looks
//!    (invariant 2: stored before armed). One registered after the cancel is refused by the core
//!    and then either called at once (nothing was armed), or left in the slot for the routine
//!    already taken by the cancel (`armed`), or dropped because the cancel was already delivered
//!    to an earlier callback (`delivered`): the cancel reaches the provider exactly once.
//! 6. **One completer, one quota release.** The context's request is completed exactly once: by
//!    `post_result` whose disarm succeeded (the provider's result), by the routine (the cancel
//!    took it), or, if the cancel found nothing armed, by the first provider call that learns of
//!    it (a refused registration, which sets `cancel_completes`, or `post_result`). The quota
//!    unit is released by that completion only (`finish`; core invariant 7 makes it once), so
//!    an operation holds quota until its provider has noticed the cancel or completed.
//! 7. **One final result for the client.** The client's final result is set once (first writer
//!    wins, under the results lock): the provider's only after its disarm succeeded, a cancelled
//!    one only after `CANCELLED` is set. A cancel that found nothing armed sets it while holding
//!    the slot lock, so it cannot overtake a `post_result` whose disarm already succeeded.
//! 8. **Lock order.** Slot lock, then the core's slot spin lock or the results lock; never the
//!    other way. The routine takes the slot lock only after the core released its own, and every
//!    callback runs with no lock held, so a callback may call back into the operation.

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::sync::Arc;
use core::fmt;

use crate::context::{CancelOutcome, Cancelled, ContextInit, MajorFunction, RxContext};
use crate::registry::{ContextRef, Rdbss, RequestId};
use crate::status::NtStatus;
use crate::sync::{AtomicBool, AtomicU8, AtomicUsize, Mutex, Ordering};
use crate::workqueue::ManualWorkQueue;

// ---------------------------------------------------------------------------------------------
// MI_Result
// ---------------------------------------------------------------------------------------------

/// `MI_Result`: an MI function return code, with the values of `mi.h`
/// (<https://learn.microsoft.com/windows/win32/api/mi/ne-mi-mi_result>; the codes are the CIM
/// status codes of DMTF DSP0200, 18 and 19 unassigned).
///
/// ```
/// use rdbss::mi::MiResult;
/// assert_eq!(MiResult::SERVER_LIMITS_EXCEEDED.0, 27);
/// assert_eq!(MiResult::ACCESS_DENIED.to_string(), "MI_RESULT_ACCESS_DENIED");
/// assert!(MiResult::OK.is_ok());
/// ```
#[doc(alias = "MI_Result")]
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(transparent)]
pub struct MiResult(pub u32);

macro_rules! mi_results {
    ($( $(#[$doc:meta])* $name:ident ($wname:literal) = $value:literal, )*) => {
        impl MiResult {
            $(
                $(#[$doc])*
                #[doc(alias = $wname)]
                pub const $name: MiResult = MiResult($value);
            )*

            /// The `MI_RESULT_*` name of a known code, or `None`.
            pub const fn name(self) -> Option<&'static str> {
                match self.0 {
                    $( $value => Some($wname), )*
                    _ => None,
                }
            }
        }
    };
}

mi_results! {
    /// The operation was successful.
    OK ("MI_RESULT_OK") = 0,
    /// A general error, not covered by a more specific code. Also the final result of a
    /// cancelled operation (see [`MiFinalResult::cancelled`]).
    FAILED ("MI_RESULT_FAILED") = 1,
    /// Access denied: here, a cancel or close from another caller identity than the one that
    /// started the operation.
    ACCESS_DENIED ("MI_RESULT_ACCESS_DENIED") = 2,
    /// The target namespace does not exist.
    INVALID_NAMESPACE ("MI_RESULT_INVALID_NAMESPACE") = 3,
    /// A parameter is not valid: here, a closed or unknown operation handle, an unknown
    /// cancellation reason, or a provider context used after its final result.
    INVALID_PARAMETER ("MI_RESULT_INVALID_PARAMETER") = 4,
    /// The specified class does not exist.
    INVALID_CLASS ("MI_RESULT_INVALID_CLASS") = 5,
    /// The requested object cannot be found.
    NOT_FOUND ("MI_RESULT_NOT_FOUND") = 6,
    /// The requested operation is not supported: here, registering a cancel callback on an
    /// operation whose cancellation does not reach the provider (invoke).
    NOT_SUPPORTED ("MI_RESULT_NOT_SUPPORTED") = 7,
    /// The class has subclasses.
    CLASS_HAS_CHILDREN ("MI_RESULT_CLASS_HAS_CHILDREN") = 8,
    /// The class has instances.
    CLASS_HAS_INSTANCES ("MI_RESULT_CLASS_HAS_INSTANCES") = 9,
    /// The superclass does not exist.
    INVALID_SUPERCLASS ("MI_RESULT_INVALID_SUPERCLASS") = 10,
    /// The object already exists.
    ALREADY_EXISTS ("MI_RESULT_ALREADY_EXISTS") = 11,
    /// The property does not exist.
    NO_SUCH_PROPERTY ("MI_RESULT_NO_SUCH_PROPERTY") = 12,
    /// The value is not compatible with the type.
    TYPE_MISMATCH ("MI_RESULT_TYPE_MISMATCH") = 13,
    /// The query language is not supported.
    QUERY_LANGUAGE_NOT_SUPPORTED ("MI_RESULT_QUERY_LANGUAGE_NOT_SUPPORTED") = 14,
    /// The query is not valid.
    INVALID_QUERY ("MI_RESULT_INVALID_QUERY") = 15,
    /// The extrinsic method cannot be invoked.
    METHOD_NOT_AVAILABLE ("MI_RESULT_METHOD_NOT_AVAILABLE") = 16,
    /// The extrinsic method does not exist.
    METHOD_NOT_FOUND ("MI_RESULT_METHOD_NOT_FOUND") = 17,
    /// The namespace is not empty.
    NAMESPACE_NOT_EMPTY ("MI_RESULT_NAMESPACE_NOT_EMPTY") = 20,
    /// The enumeration context is not valid.
    INVALID_ENUMERATION_CONTEXT ("MI_RESULT_INVALID_ENUMERATION_CONTEXT") = 21,
    /// The operation time-out is not supported.
    INVALID_OPERATION_TIMEOUT ("MI_RESULT_INVALID_OPERATION_TIMEOUT") = 22,
    /// The pull operation has been abandoned.
    PULL_HAS_BEEN_ABANDONED ("MI_RESULT_PULL_HAS_BEEN_ABANDONED") = 23,
    /// The pull operation cannot be abandoned.
    PULL_CANNOT_BE_ABANDONED ("MI_RESULT_PULL_CANNOT_BE_ABANDONED") = 24,
    /// Filtered enumeration is not supported.
    FILTERED_ENUMERATION_NOT_SUPPORTED ("MI_RESULT_FILTERED_ENUMERATION_NOT_SUPPORTED") = 25,
    /// Continuation on error is not supported.
    CONTINUATION_ON_ERROR_NOT_SUPPORTED ("MI_RESULT_CONTINUATION_ON_ERROR_NOT_SUPPORTED") = 26,
    /// Server limits were exceeded: here, the session's quota of running operations is used up.
    SERVER_LIMITS_EXCEEDED ("MI_RESULT_SERVER_LIMITS_EXCEEDED") = 27,
    /// The server is shutting down: here, the session was shut down.
    SERVER_IS_SHUTTING_DOWN ("MI_RESULT_SERVER_IS_SHUTTING_DOWN") = 28,
}

impl MiResult {
    /// Whether this is `MI_RESULT_OK`.
    pub const fn is_ok(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for MiResult {
    /// The `MI_RESULT_*` name, or `MI_Result(n)` for a code without a constant here.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "MI_Result({})", self.0),
        }
    }
}

impl fmt::Debug for MiResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name}({})", self.0),
            None => write!(f, "MiResult({})", self.0),
        }
    }
}

impl core::error::Error for MiResult {}

// ---------------------------------------------------------------------------------------------
// MI_CancellationReason, caller identity, operation kinds
// ---------------------------------------------------------------------------------------------

/// `MI_CancellationReason`: why an operation is cancelled, passed on to the provider's callback.
#[doc(alias = "MI_CancellationReason")]
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[repr(u32)]
pub enum MiCancellationReason {
    /// `MI_REASON_NONE` (0): no particular reason.
    #[doc(alias = "MI_REASON_NONE")]
    None = 0,
    /// `MI_REASON_TIMEOUT` (1): the operation timed out.
    #[doc(alias = "MI_REASON_TIMEOUT")]
    Timeout = 1,
    /// `MI_REASON_SHUTDOWN` (2): the client or server is shutting down.
    #[doc(alias = "MI_REASON_SHUTDOWN")]
    Shutdown = 2,
    /// `MI_REASON_SERVICESTOP` (3): the service is stopping.
    #[doc(alias = "MI_REASON_SERVICESTOP")]
    ServiceStop = 3,
}

impl MiCancellationReason {
    /// The reason with `mi.h` value `raw`; any other value is `MI_RESULT_INVALID_PARAMETER`.
    pub const fn from_raw(raw: u32) -> Result<Self, MiResult> {
        match raw {
            0 => Ok(MiCancellationReason::None),
            1 => Ok(MiCancellationReason::Timeout),
            2 => Ok(MiCancellationReason::Shutdown),
            3 => Ok(MiCancellationReason::ServiceStop),
            _ => Err(MiResult::INVALID_PARAMETER),
        }
    }

    /// The `mi.h` value.
    pub const fn as_raw(self) -> u32 {
        self as u32
    }
}

impl TryFrom<u32> for MiCancellationReason {
    type Error = MiResult;
    fn try_from(raw: u32) -> Result<Self, MiResult> {
        Self::from_raw(raw)
    }
}

/// `reason` of an operation that has not been cancelled (not an `MI_CancellationReason` value).
const NOT_CANCELLED: u8 = u8::MAX;

/// The caller's identity (its security context), opaque to the model: the one given when an
/// operation starts is the only one allowed to cancel or close it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct MiCallerId(pub u64);

/// What kind of operation a session runs; it decides whether cancellation reaches the provider
/// ("enum can, but invoke cannot", seed 001).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum MiOperationKind {
    /// An enumeration (`MI_Session_EnumerateInstances`): the provider can register a cancel
    /// callback, and a cancel reaches it.
    #[doc(alias = "MI_Session_EnumerateInstances")]
    Enumerate,
    /// A method invocation (`MI_Session_Invoke`): the provider cannot register a cancel callback;
    /// a cancel gives the client its final result at once but the provider runs to completion.
    #[doc(alias = "MI_Session_Invoke")]
    Invoke,
}

impl MiOperationKind {
    /// Whether the provider can register a cancel callback (a cancel reaches it).
    pub const fn cancel_reaches_provider(self) -> bool {
        matches!(self, MiOperationKind::Enumerate)
    }
}

/// `MI_CancelCallback` with its `callbackData`: called at most once, with the reason of the
/// first cancel.
#[doc(alias = "MI_CancelCallback")]
pub type MiCancelCallback<D> = fn(MiCancellationReason, D);

/// A registered callback, owning its data.
type Callback = Box<dyn FnOnce(MiCancellationReason) + Send>;

// ---------------------------------------------------------------------------------------------
// Results as the client sees them
// ---------------------------------------------------------------------------------------------

/// The final result of an operation, as the client receives it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct MiFinalResult {
    /// The result code: the provider's, or `MI_RESULT_FAILED` for a cancelled operation.
    pub result: MiResult,
    /// `Some(reason)` if the operation was cancelled before its provider posted a result.
    pub cancelled: Option<MiCancellationReason>,
}

impl MiFinalResult {
    /// The final result of an operation cancelled for `reason`: `MI_RESULT_FAILED`, with the
    /// reason (mi.h has no "cancelled" code; the client tells the two apart by `cancelled`).
    pub const fn cancelled(reason: MiCancellationReason) -> Self {
        MiFinalResult {
            result: MiResult::FAILED,
            cancelled: Some(reason),
        }
    }
}

/// One result read by [`MiOperation::get_result`].
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum MiDelivery<T> {
    /// An instance the provider posted (delivered in posting order, before the final result).
    Instance(T),
    /// The final result: every instance has been read. Returned again by later calls.
    Final(MiFinalResult),
    /// Nothing yet: the operation is still running.
    NotYet,
}

/// What [`MiContext::register_cancel`] did.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum MiRegistration {
    /// The callback is stored, replacing any earlier one; it is called if the operation is
    /// cancelled before the provider posts its final result.
    Registered,
    /// The operation had already been cancelled and nothing had told the provider: the callback
    /// was called before this returned (a late registration is never lost).
    CalledAtOnce,
    /// The cancel had already been delivered to an earlier callback: this one is dropped unused
    /// (the provider is told once).
    AlreadyDelivered,
}

/// What [`MiContext::post_result`] did.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum MiPosted {
    /// The provider's result is the operation's final result.
    Delivered,
    /// The operation had been cancelled first: the client's final result is the cancellation's,
    /// and this result is discarded.
    Discarded,
}

// ---------------------------------------------------------------------------------------------
// Per-operation state: the mini-redirector part of the operation's context
// ---------------------------------------------------------------------------------------------

/// The quota of one session: how many operations may hold a unit at once.
struct Quota {
    limit: usize,
    in_use: AtomicUsize,
}

impl Quota {
    fn try_acquire(&self) -> bool {
        self.in_use
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .is_ok()
    }

    fn release(&self) {
        self.in_use.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The provider slot (invariant 2).
struct ProviderSlot {
    /// The last registered callback, until a cancel or the final result takes it.
    callback: Option<Callback>,
    /// The core's routine is armed by a registration and not disarmed: a cancel takes it.
    armed: bool,
    /// A callback has been taken to be called (invariant 3).
    delivered: bool,
    /// The provider posted its final result (invariant 4).
    posted: bool,
    /// A refused registration delivered the cancel and completed the request (invariant 6).
    cancel_completes: bool,
}

/// What the client reads.
struct Results<T> {
    instances: VecDeque<T>,
    final_result: Option<MiFinalResult>,
}

/// The mini-redirector part of an operation's context.
struct MiOperationState<T> {
    kind: MiOperationKind,
    owner: MiCallerId,
    /// The first cancel's reason, or `NOT_CANCELLED`.
    reason: AtomicU8,
    quota: Arc<Quota>,
    provider: Mutex<ProviderSlot>,
    results: Mutex<Results<T>>,
    /// The client closed its handle.
    closed: AtomicBool,
}

impl<T> MiOperationState<T> {
    fn reason(&self) -> MiCancellationReason {
        match MiCancellationReason::from_raw(u32::from(self.reason.load(Ordering::Acquire))) {
            Ok(reason) => reason,
            // Cancelled through the core directly, without an MI reason.
            Err(_) => MiCancellationReason::None,
        }
    }

    /// Records `reason` if no cancel did before (the first cancel's reason is the one delivered).
    fn record_reason(&self, reason: MiCancellationReason) {
        let _ = self.reason.compare_exchange(
            NOT_CANCELLED,
            reason.as_raw() as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// Sets the client's final result unless one is set (invariant 7).
    fn set_final(&self, result: MiFinalResult) {
        let mut results = self.results.lock();
        if results.final_result.is_none() {
            results.final_result = Some(result);
        }
    }

    fn final_result(&self) -> Option<MiFinalResult> {
        self.results.lock().final_result
    }
}

type OpContext<T> = RxContext<MiOperationState<T>>;

/// Completes the operation's request and releases its quota unit (invariant 6).
fn finish<T>(ctx: &OpContext<T>, status: NtStatus, result: MiResult) {
    // Core invariant 7: only the first completion succeeds, so the unit goes back once.
    if ctx.complete_request(status, result.0 as usize).is_ok() {
        ctx.minirdr().quota.release();
    }
}

/// The fixed routine every registration arms: the cancel took it, so the cancel side owns the
/// request (core invariant 4). Gives the client its final result, tells the provider, completes.
fn mi_cancel_routine<T>(ctx: &OpContext<T>) -> NtStatus {
    let state = ctx.minirdr();
    let reason = state.reason();
    // The client disconnects as soon as possible (invariant 7: CANCELLED is set).
    state.set_final(MiFinalResult::cancelled(reason));
    let callback = {
        let mut slot = state.provider.lock();
        // Invariants 3 and 4: taken with `delivered` set; absent if `post_result` came first.
        let callback = slot.callback.take();
        if callback.is_some() {
            slot.delivered = true;
        }
        callback
    };
    // Invariant 8: no lock held.
    if let Some(callback) = callback {
        callback(reason);
    }
    // The provider has noticed: its quota goes back with the completion (invariant 6).
    finish(ctx, NtStatus::CANCELLED, MiResult::FAILED);
    NtStatus::CANCELLED
}

/// `MI_Operation_Cancel` on `ctx`, identity already checked.
fn cancel_operation<T>(ctx: &OpContext<T>, reason: MiCancellationReason) {
    let state = ctx.minirdr();
    state.record_reason(reason);
    // Invariant 1: through the core. A routine it calls has done everything (invariant 6).
    if ctx.cancel() == CancelOutcome::NoRoutineArmed {
        // Nothing armed: the provider has not registered (or cannot), or its disarm already
        // succeeded. The slot lock orders this after such a `post_result` (invariant 7).
        let _slot = state.provider.lock();
        state.set_final(MiFinalResult::cancelled(state.reason()));
    }
}

/// `MI_Context_RegisterCancel` on `ctx`.
fn register<T>(ctx: &OpContext<T>, callback: Callback) -> Result<MiRegistration, MiResult> {
    let state = ctx.minirdr();
    if !state.kind.cancel_reaches_provider() {
        // "This would mean the operation will run to completion."
        return Err(MiResult::NOT_SUPPORTED);
    }
    store_and_arm(ctx, callback)
}

#[cfg(not(rdbss_mutant = "mi_arm_before_store"))]
fn store_and_arm<T>(ctx: &OpContext<T>, callback: Callback) -> Result<MiRegistration, MiResult> {
    let state = ctx.minirdr();
    let mut slot = state.provider.lock();
    if slot.posted {
        // The context is no longer valid once the final result is posted (invariant 4).
        return Err(MiResult::INVALID_PARAMETER);
    }
    if slot.delivered {
        return Ok(MiRegistration::AlreadyDelivered);
    }
    // Invariant 2: stored first, then armed, in one critical section; the last one wins.
    let replaced = slot.callback.replace(callback);
    let armed = ctx.set_minirdr_cancel_routine(Some(mi_cancel_routine::<T>));
    let outcome = after_arm(ctx, slot, armed);
    drop(replaced);
    outcome
}

/// MUTANT (test-only): arms the core's routine before the callback is in the slot, outside the
/// slot lock, so a cancel in between runs the routine on an empty slot and the callback that is
/// stored afterwards is never called, although registration reported it registered.
#[cfg(rdbss_mutant = "mi_arm_before_store")]
fn store_and_arm<T>(ctx: &OpContext<T>, callback: Callback) -> Result<MiRegistration, MiResult> {
    let armed = ctx.set_minirdr_cancel_routine(Some(mi_cancel_routine::<T>));
    let state = ctx.minirdr();
    let mut slot = state.provider.lock();
    if slot.posted {
        return Err(MiResult::INVALID_PARAMETER);
    }
    if slot.delivered {
        return Ok(MiRegistration::AlreadyDelivered);
    }
    let replaced = slot.callback.replace(callback);
    let outcome = after_arm(ctx, slot, armed);
    drop(replaced);
    outcome
}

/// The rest of a registration, with the slot lock held and the arm's result in hand.
fn after_arm<T>(
    ctx: &OpContext<T>,
    mut slot: crate::sync::MutexGuard<'_, ProviderSlot>,
    armed: Result<(), Cancelled>,
) -> Result<MiRegistration, MiResult> {
    match armed {
        Ok(()) => {
            slot.armed = true;
            Ok(MiRegistration::Registered)
        }
        // Armed by an earlier registration, and the cancel took that routine: it runs (or is
        // about to) and takes this callback from the slot (invariant 5).
        Err(Cancelled) if slot.armed => Ok(MiRegistration::Registered),
        // Registered after a cancel that found nothing armed: the core refused, so nobody else
        // will call it. Call it now (invariant 5) and complete for the cancel side (invariant 6).
        Err(Cancelled) => {
            let callback = slot.callback.take();
            slot.delivered = true;
            slot.cancel_completes = true;
            drop(slot);
            let state = ctx.minirdr();
            let reason = state.reason();
            state.set_final(MiFinalResult::cancelled(reason));
            if let Some(callback) = callback {
                callback(reason);
            }
            finish(ctx, NtStatus::CANCELLED, MiResult::FAILED);
            Ok(MiRegistration::CalledAtOnce)
        }
    }
}

/// `MI_Context_PostResult` on `ctx`.
fn post_final<T>(ctx: &OpContext<T>, result: MiResult) -> Result<MiPosted, MiResult> {
    let state = ctx.minirdr();
    let mut slot = state.provider.lock();
    if slot.posted {
        return Err(MiResult::INVALID_PARAMETER);
    }
    slot.posted = true;
    // Invariant 4: no callback starts after this critical section.
    let callback = slot.callback.take();
    let posted = match ctx.set_minirdr_cancel_routine(None) {
        // Core invariant 4: the routine never runs; this side completes.
        Ok(()) => {
            slot.armed = false;
            state.set_final(MiFinalResult {
                result,
                cancelled: None,
            });
            let status = if result.is_ok() {
                NtStatus::SUCCESS
            } else {
                NtStatus::UNSUCCESSFUL
            };
            finish(ctx, status, result);
            MiPosted::Delivered
        }
        // The cancel won. If it took a routine, or a registration already completed, the cancel
        // side completes; else this is the provider noticing the cancel (invariant 6).
        Err(Cancelled) => {
            if !(slot.armed || slot.cancel_completes) {
                state.set_final(MiFinalResult::cancelled(state.reason()));
                finish(ctx, NtStatus::CANCELLED, MiResult::FAILED);
            }
            MiPosted::Discarded
        }
    };
    drop(slot);
    drop(callback);
    Ok(posted)
}

// ---------------------------------------------------------------------------------------------
// The session
// ---------------------------------------------------------------------------------------------

/// `MI_Session`: starts operations, each on one context of its own [`Rdbss`] instance, within a
/// quota of running operations. Cloning gives another handle to the same session.
#[doc(alias = "MI_Session")]
pub struct MiSession<T> {
    rdbss: Rdbss<MiOperationState<T>>,
    quota: Arc<Quota>,
}

impl<T> Clone for MiSession<T> {
    fn clone(&self) -> Self {
        MiSession {
            rdbss: self.rdbss.clone(),
            quota: self.quota.clone(),
        }
    }
}

impl<T: Send + 'static> MiSession<T> {
    /// A session allowing `max_operations` operations to hold quota at once.
    pub fn new(max_operations: usize) -> Self {
        MiSession {
            // MI calls never cancel at DISPATCH_LEVEL, so nothing is ever posted to this queue.
            rdbss: Rdbss::with_work_queue(ManualWorkQueue::new()),
            quota: Arc::new(Quota {
                limit: max_operations,
                in_use: AtomicUsize::new(0),
            }),
        }
    }

    /// Starts an operation for `caller`: the client's handle and the provider's context.
    ///
    /// Takes one unit of quota, held until the operation's request completes (invariant 6).
    /// Errors: `MI_RESULT_SERVER_LIMITS_EXCEEDED` when the quota is used up (including by
    /// cancelled operations whose provider has not noticed yet),
    /// `MI_RESULT_SERVER_IS_SHUTTING_DOWN` after [`shutdown`](Self::shutdown).
    #[doc(alias = "MI_Session_EnumerateInstances")]
    #[doc(alias = "MI_Session_Invoke")]
    pub fn start_operation(
        &self,
        caller: MiCallerId,
        kind: MiOperationKind,
    ) -> Result<(MiOperation<T>, MiContext<T>), MiResult> {
        if !self.quota.try_acquire() {
            return Err(MiResult::SERVER_LIMITS_EXCEEDED);
        }
        let state = MiOperationState {
            kind,
            owner: caller,
            reason: AtomicU8::new(NOT_CANCELLED),
            quota: self.quota.clone(),
            provider: Mutex::new(ProviderSlot {
                callback: None,
                armed: false,
                delivered: false,
                posted: false,
                cancel_completes: false,
            }),
            results: Mutex::new(Results {
                instances: VecDeque::new(),
                final_result: None,
            }),
            closed: AtomicBool::new(false),
        };
        let init = ContextInit {
            major_function: MajorFunction::DEVICE_CONTROL,
            minor_function: kind as u8,
            ..ContextInit::default()
        };
        match self.rdbss.create_context(init, state) {
            Ok(client) => {
                let provider = client.reference();
                Ok((
                    MiOperation { ctx: client },
                    MiContext {
                        handle: Arc::new(ProviderHandle { ctx: provider }),
                    },
                ))
            }
            Err((status, _)) => {
                self.quota.release();
                Err(if status == NtStatus::INVALID_DEVICE_STATE {
                    MiResult::SERVER_IS_SHUTTING_DOWN
                } else {
                    MiResult::SERVER_LIMITS_EXCEEDED
                })
            }
        }
    }

    /// `MI_Operation_Cancel`, Windows-shaped: the operation by its id, the reason by its `mi.h`
    /// value, the result as a code.
    ///
    /// `MI_RESULT_INVALID_PARAMETER` for an id that names no open operation of this session
    /// (closed, finished and gone, or never issued) or an unknown reason;
    /// `MI_RESULT_ACCESS_DENIED` for another caller than the one that started it; else as
    /// [`MiOperation::cancel`], `MI_RESULT_OK`. The checks run in that order: an unknown reason
    /// from the wrong caller is `MI_RESULT_INVALID_PARAMETER`, and nothing changes either way.
    #[doc(alias = "MI_Operation_Cancel")]
    pub fn operation_cancel(&self, id: RequestId, caller: MiCallerId, reason: u32) -> MiResult {
        let Ok(ctx) = self.rdbss.lookup(id) else {
            return MiResult::INVALID_PARAMETER;
        };
        let state = ctx.minirdr();
        if state.closed.load(Ordering::Acquire) {
            return MiResult::INVALID_PARAMETER;
        }
        let reason = match MiCancellationReason::from_raw(reason) {
            Ok(reason) => reason,
            Err(error) => return error,
        };
        if caller != state.owner {
            return MiResult::ACCESS_DENIED;
        }
        cancel_operation(&ctx, reason);
        MiResult::OK
    }

    /// How many operations hold a unit of quota.
    pub fn operations_in_use(&self) -> usize {
        self.quota.in_use.load(Ordering::Acquire)
    }

    /// The quota: how many operations may run at once.
    pub fn max_operations(&self) -> usize {
        self.quota.limit
    }

    /// How many operations still have resources: not yet both closed by the client and
    /// finished with by the provider (the contexts alive in the session's instance).
    pub fn live_operations(&self) -> usize {
        self.rdbss.active_contexts()
    }

    /// Stops accepting operations: from now on `start_operation` is
    /// `MI_RESULT_SERVER_IS_SHUTTING_DOWN`. Running operations are untouched.
    pub fn shutdown(&self) {
        self.rdbss.start_drain();
    }
}

impl<T> fmt::Debug for MiSession<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MiSession")
            .field("max_operations", &self.quota.limit)
            .field("in_use", &self.quota.in_use.load(Ordering::Acquire))
            .finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------------------------------------
// The client's operation handle
// ---------------------------------------------------------------------------------------------

/// `MI_Operation`: the client's handle to a running operation.
///
/// [`close`](Self::close) consumes it, so a cancel or close on a closed handle cannot be written;
/// through an id ([`MiSession::operation_cancel`]) it is `MI_RESULT_INVALID_PARAMETER`. Dropping
/// the handle closes it as [`close`](Self::close) does.
///
/// ```compile_fail,E0382
/// use rdbss::mi::{MiCallerId, MiCancellationReason, MiOperationKind, MiSession};
///
/// let session: MiSession<()> = MiSession::new(1);
/// let me = MiCallerId(1);
/// let (operation, _provider) = session.start_operation(me, MiOperationKind::Enumerate).unwrap();
/// let _ = operation.close(me);
/// let _ = operation.cancel(me, MiCancellationReason::None); // use of a moved (closed) handle
/// ```
#[doc(alias = "MI_Operation")]
pub struct MiOperation<T> {
    ctx: ContextRef<MiOperationState<T>>,
}

impl<T> MiOperation<T> {
    /// The operation's id (its context's request id), for [`MiSession::operation_cancel`].
    pub fn id(&self) -> RequestId {
        self.ctx.id()
    }

    /// The kind of operation.
    pub fn kind(&self) -> MiOperationKind {
        self.ctx.minirdr().kind
    }

    /// The caller that started it.
    pub fn owner(&self) -> MiCallerId {
        self.ctx.minirdr().owner
    }

    /// Whether the operation has been cancelled (its context's `CANCELLED` flag).
    pub fn is_cancelled(&self) -> bool {
        self.ctx.is_cancelled()
    }

    /// `MI_Operation_Cancel`: cancels the operation, asynchronously.
    ///
    /// `MI_RESULT_ACCESS_DENIED` (nothing done) if `caller` is not the one that started it.
    /// Otherwise `Ok`: the operation's context is cancelled through the core, the provider's
    /// callback, if one is registered, is called with `reason` (at most once ever, and never
    /// after the provider posted its final result), and unless the provider's final result is
    /// already in, the client's final result is [`MiFinalResult::cancelled`], available at once.
    /// Instances posted before it are still delivered first. The operation keeps its quota until
    /// its provider notices (its callback returned, or it posted its result). A second cancel is
    /// harmless: `Ok`, nothing more happens, and the first reason stays. A cancel after the final
    /// result was delivered is harmless too: `Ok`, no callback, the final result stays as it was
    /// (not cancelled); only the context is marked cancelled (so `is_cancelled` reports `true`
    /// on both sides and the provider's `cancellation_reason` names this reason), as a core cancel
    /// of a completed request does. The operation must still be [closed](Self::close).
    #[doc(alias = "MI_Operation_Cancel")]
    pub fn cancel(&self, caller: MiCallerId, reason: MiCancellationReason) -> Result<(), MiResult> {
        if caller != self.owner() {
            return Err(MiResult::ACCESS_DENIED);
        }
        cancel_operation(&self.ctx, reason);
        Ok(())
    }

    /// `MI_Operation_GetInstance` without blocking: the next instance, then the final result
    /// (again on every later call), or [`MiDelivery::NotYet`].
    #[doc(alias = "MI_Operation_GetInstance")]
    pub fn get_result(&self) -> MiDelivery<T> {
        let mut results = self.ctx.minirdr().results.lock();
        if let Some(instance) = results.instances.pop_front() {
            return MiDelivery::Instance(instance);
        }
        match results.final_result {
            Some(final_result) => MiDelivery::Final(final_result),
            None => MiDelivery::NotYet,
        }
    }

    /// The final result, if the operation has one (instances may still be unread).
    pub fn final_result(&self) -> Option<MiFinalResult> {
        self.ctx.minirdr().final_result()
    }

    /// `MI_Operation_Close`: closes the handle; this is where the client's resources go (its
    /// reference to the operation's context and every unread instance).
    ///
    /// `Err((MI_RESULT_ACCESS_DENIED, self))` if `caller` is not the one that started it: the
    /// handle is handed back, still open. An operation without a final result yet is cancelled
    /// first (`MI_REASON_NONE`), so close never blocks (the asynchronous form of
    /// `MI_Operation_Close`). The operation's quota is not released by closing: that waits for
    /// its provider, as for any cancel.
    #[doc(alias = "MI_Operation_Close")]
    pub fn close(self, caller: MiCallerId) -> Result<(), (MiResult, MiOperation<T>)> {
        if caller != self.owner() {
            return Err((MiResult::ACCESS_DENIED, self));
        }
        // The work is in `Drop`, so a dropped handle is closed the same way.
        drop(self);
        Ok(())
    }
}

impl<T> Drop for MiOperation<T> {
    fn drop(&mut self) {
        let state = self.ctx.minirdr();
        if state.final_result().is_none() {
            cancel_operation(&self.ctx, MiCancellationReason::None);
        }
        state.closed.store(true, Ordering::Release);
        let unread = core::mem::take(&mut state.results.lock().instances);
        // Dropped without the lock held; the context reference goes with `self.ctx`.
        drop(unread);
    }
}

impl<T> fmt::Debug for MiOperation<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MiOperation")
            .field("id", &self.id())
            .field("kind", &self.kind())
            .field("owner", &self.owner())
            .field("cancelled", &self.is_cancelled())
            .field("final_result", &self.final_result())
            .finish()
    }
}

// ---------------------------------------------------------------------------------------------
// The provider's request context
// ---------------------------------------------------------------------------------------------

/// `MI_Context`: the provider's side of one operation. Clone it to hand it to other threads;
/// [`post_result`](Self::post_result) consumes one clone, and the others are then stale
/// (`MI_RESULT_INVALID_PARAMETER`).
///
/// When the last clone is dropped without a final result, `MI_RESULT_FAILED` is posted, so an
/// abandoned operation still ends and gives its quota back.
#[doc(alias = "MI_Context")]
pub struct MiContext<T> {
    handle: Arc<ProviderHandle<T>>,
}

struct ProviderHandle<T> {
    ctx: ContextRef<MiOperationState<T>>,
}

impl<T> Drop for ProviderHandle<T> {
    fn drop(&mut self) {
        // `Err` means a final result was posted already: nothing to do.
        let _ = post_final(&self.ctx, MiResult::FAILED);
    }
}

impl<T> Clone for MiContext<T> {
    fn clone(&self) -> Self {
        MiContext {
            handle: self.handle.clone(),
        }
    }
}

impl<T> MiContext<T> {
    fn ctx(&self) -> &OpContext<T> {
        &self.handle.ctx
    }

    /// The operation's id.
    pub fn id(&self) -> RequestId {
        self.handle.ctx.id()
    }

    /// The kind of operation.
    pub fn kind(&self) -> MiOperationKind {
        self.ctx().minirdr().kind
    }

    /// Whether the operation has been cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.ctx().is_cancelled()
    }

    /// The reason of the first cancel, if the operation has been cancelled.
    pub fn cancellation_reason(&self) -> Option<MiCancellationReason> {
        self.is_cancelled().then(|| self.ctx().minirdr().reason())
    }

    /// `MI_Context_RegisterCancel`: registers `callback`, called with `callback_data` if the
    /// operation is cancelled. See [`register_cancel_with`](Self::register_cancel_with).
    #[doc(alias = "MI_Context_RegisterCancel")]
    pub fn register_cancel<D: Send + 'static>(
        &self,
        callback: MiCancelCallback<D>,
        callback_data: D,
    ) -> Result<MiRegistration, MiResult> {
        self.register_cancel_with(move |reason| callback(reason, callback_data))
    }

    /// `MI_Context_RegisterCancel` with a closure that owns its data.
    ///
    /// - Registering again replaces the previous callback: only the last one is called.
    /// - `Err(MI_RESULT_NOT_SUPPORTED)` for an operation whose cancellation cannot reach the
    ///   provider ([`MiOperationKind::Invoke`]): nothing is registered and the operation runs to
    ///   completion.
    /// - `Err(MI_RESULT_INVALID_PARAMETER)` once the provider has posted its final result: the
    ///   operation has completed and a callback is never called.
    /// - Registered after the operation was cancelled: the callback is called at once, before
    ///   this returns ([`MiRegistration::CalledAtOnce`]), unless the cancel already reached an
    ///   earlier callback ([`MiRegistration::AlreadyDelivered`]). Never lost, never twice.
    ///
    /// The callback runs with no lock held, on the cancelling thread (or on this one when called
    /// at once), and may call back into the context, e.g. to post the final result.
    #[doc(alias = "MI_Context_RegisterCancel")]
    pub fn register_cancel_with(
        &self,
        callback: impl FnOnce(MiCancellationReason) + Send + 'static,
    ) -> Result<MiRegistration, MiResult> {
        register(self.ctx(), Box::new(callback))
    }

    /// `MI_Context_PostInstance`: queues a result for the client.
    ///
    /// `Err(MI_RESULT_FAILED)` once the client has its final result (cancelled or closed: the
    /// instance is dropped and the provider should stop); `Err(MI_RESULT_INVALID_PARAMETER)`
    /// after the final result was posted through this context.
    #[doc(alias = "MI_Context_PostInstance")]
    pub fn post_instance(&self, instance: T) -> Result<(), MiResult> {
        let state = self.ctx().minirdr();
        let slot = state.provider.lock();
        if slot.posted {
            return Err(MiResult::INVALID_PARAMETER);
        }
        let mut results = state.results.lock();
        if results.final_result.is_some() {
            return Err(MiResult::FAILED);
        }
        results.instances.push_back(instance);
        Ok(())
    }

    /// `MI_Context_PostResult`: posts the final result and ends the provider's part.
    ///
    /// [`MiPosted::Delivered`] if it is the operation's final result; [`MiPosted::Discarded`] if
    /// the operation was cancelled first (the client's final result is the cancellation's). Either
    /// way no cancel callback starts afterwards, and if the operation still held quota it is
    /// released now (the provider has finished). `Err(MI_RESULT_INVALID_PARAMETER)` if a final
    /// result was already posted through another clone.
    #[doc(alias = "MI_Context_PostResult")]
    pub fn post_result(self, result: MiResult) -> Result<MiPosted, MiResult> {
        post_final(self.ctx(), result)
    }
}

impl<T> fmt::Debug for MiContext<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MiContext")
            .field("id", &self.id())
            .field("kind", &self.kind())
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}
