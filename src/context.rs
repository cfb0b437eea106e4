//! `RX_CONTEXT` and the mini-redirector cancel-routine protocol (`RxSetMinirdrCancelRoutine`).
//!
//! A mini-redirector that starts a network exchange arms a cancel routine on the request's
//! context; when the request is cancelled, RDBSS marks the context `CANCELLED` and calls the
//! armed routine, which aborts the exchange. When the exchange completes, the mini-redirector
//! disarms the routine; whether disarming succeeds decides who completes the request.
//!
//! ```text
//!                 arm(r): Ok                     cancel(): routine r called (outside the lock)
//!   ┌─────────┐ ─────────────▶ ┌──────────┐ ────────────────────────────────▶ ┌────────────────────┐
//!   │  Idle   │                │ Armed(r) │                                   │      Cancelled     │
//!   │ (slot   │ ◀───────────── │          │                                   │  slot empty, flag  │
//!   │  empty) │ disarm(): Ok   └──────────┘                                   │  CANCELLED set,    │
//!   └─────────┘  (completer                                                   │  forever           │
//!        │        owns completion)                                            └────────────────────┘
//!        │ cancel(): no routine armed                                            ▲  arm / disarm:
//!        └───────────────────────────────────────────────────────────────────────┘  Err(Cancelled),
//!                                                                                   nothing stored;
//!                                                                                   cancel(): AlreadyCancelled
//! ```
//!
//! # Invariants
//!
//! 1. **One arbiter.** The cancel-routine slot is only read or written with the context's spin
//!    lock held, and the `CANCELLED` bit is only set with it held. So "is it cancelled?" and
//!    "store / take the routine" are one atomic step, on both the arming and the cancelling side.
//! 2. **Sticky cancel.** Once `CANCELLED` is set it stays set for the context's lifetime (only
//!    reinitialisation for reuse, which needs `&mut`, clears it). After it is set the slot is empty
//!    and stays empty: arming reports `STATUS_CANCELLED` and stores nothing.
//! 3. **At most once.** The routine is taken out of the slot by the cancel that sets `CANCELLED`;
//!    since that happens once (2), the routine is called at most once, by that cancel.
//! 4. **Exactly one completer.** A disarm that returns `Ok` emptied the slot before any cancel could
//!    take it, so the routine never runs afterwards and the completing side owns completion; a
//!    disarm that returns `Err(Cancelled)` means a cancel took (or found nothing in) the slot, and
//!    the cancel side owns completion.
//! 5. **Never under the lock.** The routine is called after the lock guard is dropped, with the
//!    caller's IRQL restored, and never at `DISPATCH_LEVEL` or above.
//! 6. **Atomic flag word.** Every flag update is a single `fetch_or` / `fetch_and`, so concurrent
//!    updates of different bits never lose one another (the original RDBSS did a plain
//!    read-modify-write of `Flags` and could lose `CANCELLED`).
//! 7. **Completed once.** `completion` goes from pending to completed once, by compare-exchange;
//!    a second completion is the `MULTIPLE_IRP_COMPLETE_REQUESTS` bug check and changes nothing
//!    (the first status and information stay).
//! 8. **Blocked link.** The slot's `blocked` link (the serialisation queue a blocked operation
//!    waits in) is set by `BlockedQueue::enqueue` and taken by whoever holds that queue's lock
//!    and gets there first: `resume_blocked_operations_serially` or the cancel of the operation.
//!    Lock order: a blocked queue's lock, then the context's slot lock; `claim_cancel` never holds
//!    both at once for one context (it re-takes them in that order), so there is no cycle.

use alloc::sync::Arc;
use core::fmt;

use crate::blocked::{self, BlockedShared, BlockedState};
use crate::bugcheck::{self, BugCheck, BugCheckCode};
use crate::irql::{self, Irql};
use crate::spinlock::KSpinLock;
use crate::status::NtStatus;
use crate::sync::{AtomicI32, AtomicU32, AtomicU8, AtomicUsize, Ordering};

bitflags::bitflags! {
    /// `RX_CONTEXT_FLAGS`: the context's flag word, with the values of `rxcontx.h`.
    #[doc(alias = "RX_CONTEXT_FLAGS")]
    #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
    pub struct ContextFlags: u32 {
        /// The context was allocated from pool.
        #[doc(alias = "RX_CONTEXT_FLAG_FROM_POOL")]
        const FROM_POOL = 0x0000_0001;
        /// The caller can wait for the operation.
        #[doc(alias = "RX_CONTEXT_FLAG_WAIT")]
        const WAIT = 0x0000_0002;
        /// Write through to the server.
        #[doc(alias = "RX_CONTEXT_FLAG_WRITE_THROUGH")]
        const WRITE_THROUGH = 0x0000_0004;
        /// Floppy media.
        #[doc(alias = "RX_CONTEXT_FLAG_FLOPPY")]
        const FLOPPY = 0x0000_0008;
        /// A recursive call.
        #[doc(alias = "RX_CONTEXT_FLAG_RECURSIVE_CALL")]
        const RECURSIVE_CALL = 0x0000_0010;
        /// This device is the top-level component.
        #[doc(alias = "RX_CONTEXT_FLAG_THIS_DEVICE_TOP_LEVEL")]
        const THIS_DEVICE_TOP_LEVEL = 0x0000_0020;
        /// A deferred write.
        #[doc(alias = "RX_CONTEXT_FLAG_DEFERRED_WRITE")]
        const DEFERRED_WRITE = 0x0000_0040;
        /// Verify the read.
        #[doc(alias = "RX_CONTEXT_FLAG_VERIFY_READ")]
        const VERIFY_READ = 0x0000_0080;
        /// The context is on the stack (the header spells it `CONTEZT`).
        #[doc(alias = "RX_CONTEXT_FLAG_STACK_IO_CONTEZT")]
        const STACK_IO_CONTEXT = 0x0000_0100;
        /// Running in the file system process (a worker thread).
        #[doc(alias = "RX_CONTEXT_FLAG_IN_FSP")]
        const IN_FSP = 0x0000_0200;
        /// Creating a mailslot.
        #[doc(alias = "RX_CONTEXT_FLAG_CREATE_MAILSLOT")]
        const CREATE_MAILSLOT = 0x0000_0400;
        /// A mailslot reparse.
        #[doc(alias = "RX_CONTEXT_FLAG_MAILSLOT_REPARSE")]
        const MAILSLOT_REPARSE = 0x0000_0800;
        /// An asynchronous operation.
        #[doc(alias = "RX_CONTEXT_FLAG_ASYNC_OPERATION")]
        const ASYNC_OPERATION = 0x0000_1000;
        /// Do not complete from the FSP.
        #[doc(alias = "RX_CONTEXT_FLAG_NO_COMPLETE_FROM_FSP")]
        const NO_COMPLETE_FROM_FSP = 0x0000_2000;
        /// Post when the condition is stable.
        #[doc(alias = "RX_CONTEXT_FLAG_POST_ON_STABLE_CONDITION")]
        const POST_ON_STABLE_CONDITION = 0x0000_4000;
        /// Queued on the FSP's delayed overflow queue.
        #[doc(alias = "RX_CONTEXT_FLAG_FSP_DELAYED_OVERFLOW_QUEUE")]
        const FSP_DELAYED_OVERFLOW_QUEUE = 0x0000_8000;
        /// Queued on the FSP's critical overflow queue.
        #[doc(alias = "RX_CONTEXT_FLAG_FSP_CRITICAL_OVERFLOW_QUEUE")]
        const FSP_CRITICAL_OVERFLOW_QUEUE = 0x0001_0000;
        /// The mini-redirector was invoked.
        #[doc(alias = "RX_CONTEXT_FLAG_MINIRDR_INVOKED")]
        const MINIRDR_INVOKED = 0x0002_0000;
        /// Waiting for a resource.
        #[doc(alias = "RX_CONTEXT_FLAG_WAITING_FOR_RESOURCE")]
        const WAITING_FOR_RESOURCE = 0x0004_0000;
        /// The operation was cancelled. Only [`RxContext::cancel`] sets it (invariant 1).
        #[doc(alias = "RX_CONTEXT_FLAG_CANCELLED")]
        const CANCELLED = 0x0008_0000;
        /// There are waiters on the synchronous event.
        #[doc(alias = "RX_CONTEXT_FLAG_SYNC_EVENT_WAITERS")]
        const SYNC_EVENT_WAITERS = 0x0010_0000;
        /// No preposting is needed.
        #[doc(alias = "RX_CONTEXT_FLAG_NO_PREPOSTING_NEEDED")]
        const NO_PREPOSTING_NEEDED = 0x0020_0000;
        /// Bypass the valid-operation check.
        #[doc(alias = "RX_CONTEXT_FLAG_BYPASS_VALIDOP_CHECK")]
        const BYPASS_VALIDOP_CHECK = 0x0040_0000;
        /// A blocked pipe operation is being resumed.
        #[doc(alias = "RX_CONTEXT_FLAG_BLOCKED_PIPE_RESUME")]
        const BLOCKED_PIPE_RESUME = 0x0080_0000;
        /// In a serialisation (blocked-operation) queue.
        #[doc(alias = "RX_CONTEXT_FLAG_IN_SERIALIZATION_QUEUE")]
        const IN_SERIALIZATION_QUEUE = 0x0100_0000;
        /// Do not break on exceptions.
        #[doc(alias = "RX_CONTEXT_FLAG_NO_EXCEPTION_BREAKPOINT")]
        const NO_EXCEPTION_BREAKPOINT = 0x0200_0000;
        /// A reconnect is needed.
        #[doc(alias = "RX_CONTEXT_FLAG_NEEDRECONNECT")]
        const NEED_RECONNECT = 0x0400_0000;
        /// The operation must succeed.
        #[doc(alias = "RX_CONTEXT_FLAG_MUST_SUCCEED")]
        const MUST_SUCCEED = 0x0800_0000;
        /// The operation must succeed without blocking.
        #[doc(alias = "RX_CONTEXT_FLAG_MUST_SUCCEED_NONBLOCKING")]
        const MUST_SUCCEED_NONBLOCKING = 0x1000_0000;
        /// Allocated from the must-succeed reserve.
        #[doc(alias = "RX_CONTEXT_FLAG_MUST_SUCCEED_ALLOCATED")]
        const MUST_SUCCEED_ALLOCATED = 0x2000_0000;
        /// Initiated by the mini-redirector.
        #[doc(alias = "RX_CONTEXT_FLAG_MINIRDR_INITIATED")]
        const MINIRDR_INITIATED = 0x8000_0000;
    }
}

impl ContextFlags {
    /// `RX_CONTEXT_PRESERVED_FLAGS`: kept when a context is reinitialised for reuse.
    #[doc(alias = "RX_CONTEXT_PRESERVED_FLAGS")]
    pub const PRESERVED: ContextFlags = ContextFlags::FROM_POOL
        .union(ContextFlags::MUST_SUCCEED_ALLOCATED)
        .union(ContextFlags::IN_FSP);
    /// `RX_CONTEXT_INITIALIZATION_FLAGS`: the caller-supplied flags kept on reuse.
    #[doc(alias = "RX_CONTEXT_INITIALIZATION_FLAGS")]
    pub const INITIALIZATION: ContextFlags = ContextFlags::WAIT
        .union(ContextFlags::MUST_SUCCEED)
        .union(ContextFlags::MUST_SUCCEED_NONBLOCKING);
}

/// `IRP_MJ_*`: the major function of the request a context carries.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(transparent)]
pub struct MajorFunction(pub u8);

macro_rules! major_functions {
    ($( $name:ident ($wname:literal) = $value:literal, )*) => {
        impl MajorFunction {
            $(
                #[doc = concat!("`", $wname, "` (", stringify!($value), ").")]
                #[doc(alias = $wname)]
                pub const $name: MajorFunction = MajorFunction($value);
            )*

            /// The `IRP_MJ_*` name, or `None` for an unknown code.
            pub const fn name(self) -> Option<&'static str> {
                match self.0 {
                    $( $value => Some($wname), )*
                    _ => None,
                }
            }
        }
    };
}

major_functions! {
    CREATE ("IRP_MJ_CREATE") = 0x00,
    CREATE_NAMED_PIPE ("IRP_MJ_CREATE_NAMED_PIPE") = 0x01,
    CLOSE ("IRP_MJ_CLOSE") = 0x02,
    READ ("IRP_MJ_READ") = 0x03,
    WRITE ("IRP_MJ_WRITE") = 0x04,
    QUERY_INFORMATION ("IRP_MJ_QUERY_INFORMATION") = 0x05,
    SET_INFORMATION ("IRP_MJ_SET_INFORMATION") = 0x06,
    QUERY_EA ("IRP_MJ_QUERY_EA") = 0x07,
    SET_EA ("IRP_MJ_SET_EA") = 0x08,
    FLUSH_BUFFERS ("IRP_MJ_FLUSH_BUFFERS") = 0x09,
    QUERY_VOLUME_INFORMATION ("IRP_MJ_QUERY_VOLUME_INFORMATION") = 0x0a,
    SET_VOLUME_INFORMATION ("IRP_MJ_SET_VOLUME_INFORMATION") = 0x0b,
    DIRECTORY_CONTROL ("IRP_MJ_DIRECTORY_CONTROL") = 0x0c,
    FILE_SYSTEM_CONTROL ("IRP_MJ_FILE_SYSTEM_CONTROL") = 0x0d,
    DEVICE_CONTROL ("IRP_MJ_DEVICE_CONTROL") = 0x0e,
    INTERNAL_DEVICE_CONTROL ("IRP_MJ_INTERNAL_DEVICE_CONTROL") = 0x0f,
    SHUTDOWN ("IRP_MJ_SHUTDOWN") = 0x10,
    LOCK_CONTROL ("IRP_MJ_LOCK_CONTROL") = 0x11,
    CLEANUP ("IRP_MJ_CLEANUP") = 0x12,
    CREATE_MAILSLOT ("IRP_MJ_CREATE_MAILSLOT") = 0x13,
    QUERY_SECURITY ("IRP_MJ_QUERY_SECURITY") = 0x14,
    SET_SECURITY ("IRP_MJ_SET_SECURITY") = 0x15,
    POWER ("IRP_MJ_POWER") = 0x16,
    SYSTEM_CONTROL ("IRP_MJ_SYSTEM_CONTROL") = 0x17,
    DEVICE_CHANGE ("IRP_MJ_DEVICE_CHANGE") = 0x18,
    QUERY_QUOTA ("IRP_MJ_QUERY_QUOTA") = 0x19,
    SET_QUOTA ("IRP_MJ_SET_QUOTA") = 0x1a,
    PNP ("IRP_MJ_PNP") = 0x1b,
}

impl fmt::Debug for MajorFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "IRP_MJ({:#04x})", self.0),
        }
    }
}

/// `PMRX_CALLDOWN`: a mini-redirector cancel routine. A plain function pointer, as in Windows, so
/// arming allocates nothing; per-request state lives in the context's mini-redirector part.
#[doc(alias = "PMRX_CALLDOWN")]
#[doc(alias = "MRxCancelRoutine")]
pub type CancelRoutine<M = ()> = fn(&RxContext<M>) -> NtStatus;

/// `set_minirdr_cancel_routine` found the context already cancelled: nothing was stored.
///
/// Converts into [`NtStatus::CANCELLED`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Cancelled;

impl fmt::Display for Cancelled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the context was already cancelled (STATUS_CANCELLED)")
    }
}

impl core::error::Error for Cancelled {}

impl From<Cancelled> for NtStatus {
    fn from(_: Cancelled) -> NtStatus {
        NtStatus::CANCELLED
    }
}

/// What [`RxContext::cancel`] did.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum CancelOutcome {
    /// This call cancelled the context and called the armed routine, which returned this status.
    RoutineCalled(NtStatus),
    /// This call cancelled the context; no routine was armed, so none was called.
    NoRoutineArmed,
    /// This call cancelled a blocked (serialised) operation: it was unlinked from its queue and
    /// completed with `STATUS_CANCELLED`.
    BlockedOperationCancelled,
    /// The context had already been cancelled; nothing happened.
    AlreadyCancelled,
}

impl CancelOutcome {
    /// Whether this call is the one that cancelled the context.
    pub fn cancelled_now(self) -> bool {
        !matches!(self, CancelOutcome::AlreadyCancelled)
    }
}

/// The first half of a cancel, done under the lock by [`RxContext::claim_cancel`]: the context is
/// now `CANCELLED`, and the routine (if one was armed) is owned by whoever holds this claim.
///
/// Lets a caller running at `DISPATCH_LEVEL` mark the context at once and run the routine later,
/// below DISPATCH (RDBSS defers such cancels to a worker). Dropping a claim with a routine in it
/// loses that routine's only call, hence `#[must_use]`.
#[must_use = "the claimed cancel routine runs only if the claim is run"]
pub enum CancelClaim<M = ()> {
    /// The context was cancelled by this claim and this routine was armed: call [`Self::run`].
    Routine(CancelRoutine<M>),
    /// The context was cancelled by this claim; no routine was armed.
    NoRoutineArmed,
    /// The context was cancelled by this claim and was a blocked operation, which the claim
    /// unlinked and completed with `STATUS_CANCELLED` (allowed at DISPATCH: spin locks only).
    BlockedOperationCancelled,
    /// The context had already been cancelled.
    AlreadyCancelled,
}

impl<M> CancelClaim<M> {
    /// Calls the claimed routine, if any, on `context`, and reports what happened.
    ///
    /// Must be called below `DISPATCH_LEVEL` (invariant 5): at DISPATCH or above this is the
    /// `DRIVER_IRQL_NOT_LESS_OR_EQUAL` bug check. `context` must be the context the claim came from.
    #[track_caller]
    pub fn run(self, context: &RxContext<M>) -> CancelOutcome {
        if let CancelClaim::Routine(_) = self {
            irql::require_at_most(
                Irql::APC,
                "minirdr cancel routine called at DISPATCH_LEVEL or above",
            );
        }
        self.run_checked(context)
    }

    /// [`run`](Self::run) for a caller that has already checked the IRQL, so a violation is
    /// reported once, not twice.
    fn run_checked(self, context: &RxContext<M>) -> CancelOutcome {
        match self {
            CancelClaim::Routine(routine) => CancelOutcome::RoutineCalled(routine(context)),
            CancelClaim::NoRoutineArmed => CancelOutcome::NoRoutineArmed,
            CancelClaim::BlockedOperationCancelled => CancelOutcome::BlockedOperationCancelled,
            CancelClaim::AlreadyCancelled => CancelOutcome::AlreadyCancelled,
        }
    }
}

impl<M> fmt::Debug for CancelClaim<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CancelClaim::Routine(_) => "Routine(..)",
            CancelClaim::NoRoutineArmed => "NoRoutineArmed",
            CancelClaim::BlockedOperationCancelled => "BlockedOperationCancelled",
            CancelClaim::AlreadyCancelled => "AlreadyCancelled",
        })
    }
}

/// The fields a context starts with (`RxInitializeContext`'s inputs).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct ContextInit {
    /// `SerialNumber`: assigned by whoever creates contexts (the RDBSS instance uses a counter).
    pub serial_number: u32,
    /// `MajorFunction`.
    pub major_function: MajorFunction,
    /// `MinorFunction`.
    pub minor_function: u8,
    /// Initial flags. `CANCELLED` is refused: a context is born uncancelled.
    pub flags: ContextFlags,
}

/// `RX_CONTEXT`: one I/O request as RDBSS and the mini-redirector see it.
///
/// `M` is the mini-redirector's own per-request state (`MRxContext[]` in Windows), available to
/// the cancel routine through [`RxContext::minirdr`]; use atomics or locks inside it for anything
/// the routine changes.
#[doc(alias = "RX_CONTEXT")]
pub struct RxContext<M = ()> {
    // Invariant 6: only changed by fetch_or / fetch_and.
    flags: AtomicU32,
    // Invariant 1: the cancel-routine slot (and invariant 8's blocked link), only touched under
    // this lock.
    cancel_slot: KSpinLock<CancelSlot<M>>,
    stored_status: AtomicI32,
    // Changed only by reinitialisation for reuse (`registry`), which excludes every other user.
    serial_number: AtomicU32,
    major_function: MajorFunction,
    minor_function: u8,
    pub(crate) life: Lifecycle,
    minirdr: M,
}

/// What the cancel slot lock protects (invariants 1 and 8).
pub(crate) struct CancelSlot<M> {
    pub(crate) routine: Option<CancelRoutine<M>>,
    pub(crate) blocked: Option<Arc<BlockedShared<M>>>,
}

/// The lifecycle fields the RDBSS instance (`registry`) uses; inert on a standalone context.
pub(crate) struct Lifecycle {
    /// `ReferenceCount`, plus the registry's `REUSING` bit while a reinitialisation runs.
    pub(crate) refs: AtomicUsize,
    /// [`Completion`] as a `u8` (invariant 7).
    completion: AtomicU8,
    /// `InformationToReturn`, stored by completion.
    information: AtomicUsize,
    /// How many of `refs` are kept by request id (`ContextRef::into_id`).
    pub(crate) kept_by_id: AtomicUsize,
    /// [`BlockedState`] as a `u8` (invariant 8).
    pub(crate) blocked_state: AtomicU8,
    /// This context's slot in its instance's registry (0 for a standalone context).
    pub(crate) slot: u32,
}

const PENDING: u8 = 0;
const COMPLETED: u8 = 1;

impl<M> RxContext<M> {
    /// A new context (`RxInitializeContext`), not cancelled, with no routine armed.
    ///
    /// `init.flags` containing `CANCELLED` is `Err(STATUS_INVALID_PARAMETER)`, and `minirdr` is
    /// handed back so nothing is lost.
    pub fn try_new(init: ContextInit, minirdr: M) -> Result<Self, (NtStatus, M)> {
        if init.flags.contains(ContextFlags::CANCELLED) {
            return Err((NtStatus::INVALID_PARAMETER, minirdr));
        }
        Ok(Self::new_unchecked(init, minirdr))
    }

    /// A new context with default fields apart from `major_function` (serial number 0).
    pub fn new(major_function: MajorFunction, minirdr: M) -> Self {
        Self::new_unchecked(
            ContextInit {
                major_function,
                ..ContextInit::default()
            },
            minirdr,
        )
    }

    fn new_unchecked(init: ContextInit, minirdr: M) -> Self {
        Self::new_in_slot(init, 0, 0, minirdr)
    }

    /// A context for the registry: reference count `refs`, in registry slot `slot`.
    pub(crate) fn new_in_slot(init: ContextInit, refs: usize, slot: u32, minirdr: M) -> Self {
        RxContext {
            flags: AtomicU32::new(init.flags.bits()),
            cancel_slot: KSpinLock::new(CancelSlot {
                routine: None,
                blocked: None,
            }),
            stored_status: AtomicI32::new(NtStatus::SUCCESS.0),
            serial_number: AtomicU32::new(init.serial_number),
            major_function: init.major_function,
            minor_function: init.minor_function,
            life: Lifecycle {
                refs: AtomicUsize::new(refs),
                completion: AtomicU8::new(PENDING),
                information: AtomicUsize::new(0),
                kept_by_id: AtomicUsize::new(0),
                blocked_state: AtomicU8::new(BlockedState::NotBlocked as u8),
                slot,
            },
            minirdr,
        }
    }

    /// `RxReinitializeContext`'s reset: keeps only `PRESERVED | INITIALIZATION` flags (so
    /// `CANCELLED` is lost), empties the cancel slot, makes the request pending again with status
    /// `SUCCESS` and information 0, and takes the new serial number. The caller guarantees nobody
    /// else uses the context meanwhile (the registry's `REUSING` bit, or `&mut`).
    pub(crate) fn reset_for_reuse(&self, serial_number: u32) {
        let keep = ContextFlags::PRESERVED | ContextFlags::INITIALIZATION;
        self.flags.fetch_and(keep.bits(), Ordering::AcqRel);
        {
            let mut slot = self.cancel_slot.lock();
            slot.routine = None;
            slot.blocked = None;
        }
        self.stored_status
            .store(NtStatus::SUCCESS.0, Ordering::Release);
        self.life.completion.store(PENDING, Ordering::Release);
        self.life.information.store(0, Ordering::Release);
        self.life
            .blocked_state
            .store(BlockedState::NotBlocked as u8, Ordering::Release);
        self.serial_number.store(serial_number, Ordering::Release);
    }

    /// Reinitialises a standalone context for reuse (`RxReinitializeContext`): keeps only the
    /// `PRESERVED | INITIALIZATION` flags, so `CANCELLED` is lost; empties the cancel slot; makes
    /// the request pending again; takes `serial_number`. The `&mut` proves nobody else uses it.
    #[doc(alias = "RxReinitializeContext")]
    #[doc(alias = "RxPrepareContextForReuse")]
    pub fn reinitialize(&mut self, serial_number: u32) {
        self.reset_for_reuse(serial_number);
    }

    /// `SerialNumber`.
    pub fn serial_number(&self) -> u32 {
        self.serial_number.load(Ordering::Acquire)
    }

    /// `ReferenceCount` (0 for a standalone context, which the registry does not count).
    pub fn reference_count(&self) -> usize {
        self.life.refs.load(Ordering::Acquire) & !crate::registry::REUSING
    }

    /// Whether the request has been completed ([`complete_request`](Self::complete_request)).
    pub fn is_completed(&self) -> bool {
        self.life.completion.load(Ordering::Acquire) == COMPLETED
    }

    /// `InformationToReturn`, as stored by completion (0 before).
    pub fn information(&self) -> usize {
        self.life.information.load(Ordering::Acquire)
    }

    /// Where this context stands in a blocked-operation queue.
    pub fn blocked_state(&self) -> BlockedState {
        BlockedState::from_u8(self.life.blocked_state.load(Ordering::Acquire))
    }

    /// `RxCompleteRequest`: completes the request with its final `status` and `information`.
    ///
    /// Exactly once per request (invariant 7): a second completion is the
    /// `MULTIPLE_IRP_COMPLETE_REQUESTS` (0x44) bug check (parameters: serial number, the first
    /// status, the second status, 0); under `BugCheckPolicy::Record` it returns
    /// `Err(STATUS_INVALID_DEVICE_STATE)` and changes nothing. Callable at or below
    /// `DISPATCH_LEVEL`, like `IoCompleteRequest`.
    ///
    /// On a registry context, [`ContextRef::complete_request`](crate::ContextRef::complete_request)
    /// also drops the caller's reference.
    #[doc(alias = "RxCompleteRequest")]
    #[track_caller]
    pub fn complete_request(&self, status: NtStatus, information: usize) -> Result<(), NtStatus> {
        irql::require_at_most(
            Irql::DISPATCH,
            "RxCompleteRequest called above DISPATCH_LEVEL",
        );
        if self
            .life
            .completion
            .compare_exchange(PENDING, COMPLETED, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            bugcheck::report(BugCheck {
                code: BugCheckCode::MULTIPLE_IRP_COMPLETE_REQUESTS,
                parameters: [
                    self.serial_number() as usize,
                    self.stored_status().code() as usize,
                    status.code() as usize,
                    0,
                ],
                description: "RxCompleteRequest on a request that is already completed",
            });
            return Err(NtStatus::INVALID_DEVICE_STATE);
        }
        self.stored_status.store(status.0, Ordering::Release);
        self.life.information.store(information, Ordering::Release);
        Ok(())
    }

    /// Locks the cancel slot (for `blocked`).
    pub(crate) fn lock_slot(&self) -> crate::spinlock::KSpinLockGuard<'_, CancelSlot<M>> {
        self.cancel_slot.lock()
    }

    /// `MajorFunction`.
    pub fn major_function(&self) -> MajorFunction {
        self.major_function
    }

    /// `MinorFunction`.
    pub fn minor_function(&self) -> u8 {
        self.minor_function
    }

    /// The mini-redirector's per-request state.
    pub fn minirdr(&self) -> &M {
        &self.minirdr
    }

    /// The mini-redirector's per-request state, mutably (the `&mut` proves exclusive access).
    pub fn minirdr_mut(&mut self) -> &mut M {
        &mut self.minirdr
    }

    /// `StoredStatus`.
    pub fn stored_status(&self) -> NtStatus {
        NtStatus(self.stored_status.load(Ordering::Acquire))
    }

    /// Sets `StoredStatus` and returns the previous value.
    pub fn set_stored_status(&self, status: NtStatus) -> NtStatus {
        NtStatus(self.stored_status.swap(status.0, Ordering::AcqRel))
    }

    /// The flag word, as one atomic snapshot.
    #[inline]
    pub fn flags(&self) -> ContextFlags {
        ContextFlags::from_bits_retain(self.flags.load(Ordering::Acquire))
    }

    /// Whether `RX_CONTEXT_FLAG_CANCELLED` is set.
    #[inline]
    pub fn is_cancelled(&self) -> bool {
        self.flags().contains(ContextFlags::CANCELLED)
    }

    /// Sets `flags` atomically (invariant 6) and returns the flags as they were before.
    ///
    /// `CANCELLED` can only be set by [`cancel`](Self::cancel), which also takes the armed routine:
    /// asking for it here is `Err(STATUS_INVALID_PARAMETER)` and changes nothing.
    pub fn set_flags(&self, flags: ContextFlags) -> Result<ContextFlags, NtStatus> {
        if flags.contains(ContextFlags::CANCELLED) {
            return Err(NtStatus::INVALID_PARAMETER);
        }
        Ok(self.update_flags(flags, true))
    }

    /// Clears `flags` atomically (invariant 6) and returns the flags as they were before.
    ///
    /// `CANCELLED` is sticky (invariant 2): asking to clear it is `Err(STATUS_INVALID_PARAMETER)`
    /// and changes nothing.
    pub fn clear_flags(&self, flags: ContextFlags) -> Result<ContextFlags, NtStatus> {
        if flags.contains(ContextFlags::CANCELLED) {
            return Err(NtStatus::INVALID_PARAMETER);
        }
        Ok(self.update_flags(flags, false))
    }

    #[cfg(not(rdbss_mutant = "flags_plain_rmw"))]
    fn update_flags(&self, flags: ContextFlags, set: bool) -> ContextFlags {
        // Invariant 6: one atomic read-modify-write.
        let old = if set {
            self.flags.fetch_or(flags.bits(), Ordering::AcqRel)
        } else {
            self.flags.fetch_and(!flags.bits(), Ordering::AcqRel)
        };
        ContextFlags::from_bits_retain(old)
    }

    /// MUTANT (test-only): the original RDBSS bug, a plain read-modify-write of the flag word.
    #[cfg(rdbss_mutant = "flags_plain_rmw")]
    fn update_flags(&self, flags: ContextFlags, set: bool) -> ContextFlags {
        let old = self.flags.load(Ordering::Acquire);
        let new = if set {
            old | flags.bits()
        } else {
            old & !flags.bits()
        };
        self.flags.store(new, Ordering::Release);
        ContextFlags::from_bits_retain(old)
    }

    /// `RxSetMinirdrCancelRoutine`: arms (`Some`) or disarms (`None`) the cancel routine.
    ///
    /// Under the context's spin lock: if the context is already cancelled, returns
    /// `Err(Cancelled)` (`STATUS_CANCELLED`) and stores nothing; otherwise stores `routine`,
    /// replacing any armed one, and returns `Ok(())` (`STATUS_SUCCESS`).
    ///
    /// Disarming at completion decides who completes the request (invariant 4): `Ok` means the
    /// routine will never run and the caller completes; `Err(Cancelled)` means the cancel side
    /// has it.
    ///
    /// Must be called at or below `APC_LEVEL`; above, this is the `DRIVER_IRQL_NOT_LESS_OR_EQUAL`
    /// bug check.
    ///
    /// ```
    /// use rdbss::{Cancelled, CancelOutcome, MajorFunction, NtStatus, RxContext};
    ///
    /// fn abort_exchange(_: &RxContext) -> NtStatus { NtStatus::SUCCESS }
    ///
    /// let ctx = RxContext::new(MajorFunction::READ, ());
    /// assert_eq!(ctx.set_minirdr_cancel_routine(Some(abort_exchange)), Ok(()));
    /// assert_eq!(ctx.cancel(), CancelOutcome::RoutineCalled(NtStatus::SUCCESS));
    /// // Completion lost the race: the cancel side completes the request.
    /// assert_eq!(ctx.set_minirdr_cancel_routine(None), Err(Cancelled));
    /// ```
    #[doc(alias = "RxSetMinirdrCancelRoutine")]
    #[inline]
    #[track_caller]
    pub fn set_minirdr_cancel_routine(
        &self,
        routine: Option<CancelRoutine<M>>,
    ) -> Result<(), Cancelled> {
        let now = irql::require_at_most(
            Irql::APC,
            "RxSetMinirdrCancelRoutine called above APC_LEVEL",
        );
        self.store_routine(now, routine)
    }

    #[cfg(not(rdbss_mutant = "arm_check_outside_lock"))]
    #[inline]
    fn store_routine(&self, now: Irql, routine: Option<CancelRoutine<M>>) -> Result<(), Cancelled> {
        // Invariant 1: the check and the store are one step under the lock.
        let mut slot = self.cancel_slot.lock_from(now);
        if self.is_cancelled() {
            // Invariant 2: nothing stored.
            return Err(Cancelled);
        }
        slot.routine = routine;
        Ok(())
    }

    /// MUTANT (test-only): checks `CANCELLED` before taking the lock, so a cancel can slip in
    /// between the check and the store and the armed routine is never called.
    #[cfg(rdbss_mutant = "arm_check_outside_lock")]
    #[inline]
    fn store_routine(&self, now: Irql, routine: Option<CancelRoutine<M>>) -> Result<(), Cancelled> {
        if self.is_cancelled() {
            return Err(Cancelled);
        }
        let mut slot = self.cancel_slot.lock_from(now);
        slot.routine = routine;
        Ok(())
    }

    /// Whether a cancel routine is armed right now (a snapshot; it may change at once).
    pub fn has_cancel_routine(&self) -> bool {
        self.cancel_slot.lock().routine.is_some()
    }

    /// The first half of a cancel: under the lock, sets `CANCELLED` and takes the armed routine.
    ///
    /// Callable at or below `DISPATCH_LEVEL` (it only takes the spin lock). The routine, if any,
    /// must then be run below DISPATCH with [`CancelClaim::run`]. [`cancel`](Self::cancel) does
    /// both at once.
    #[track_caller]
    pub fn claim_cancel(&self) -> CancelClaim<M> {
        let (routine, blocked) = {
            let mut slot = self.cancel_slot.lock();
            // Invariant 2: a second cancel finds the flag and does nothing.
            if self.is_cancelled() {
                return CancelClaim::AlreadyCancelled;
            }
            // Invariants 1 and 6: set under the lock, as one atomic fetch_or.
            self.flags
                .fetch_or(ContextFlags::CANCELLED.bits(), Ordering::AcqRel);
            // Invariant 3: the routine leaves the slot exactly once. Invariant 8: the blocked
            // link is only looked at here; it is taken under the queue's lock.
            (slot.routine.take(), slot.blocked.clone())
            // The guard drops here, before anyone can run the routine (invariant 5).
        };
        let unlinked = blocked.is_some_and(|queue| blocked::cancel_blocked(&queue, self));
        match routine {
            // The cancel completed the blocked operation; a routine armed while it waited has no
            // exchange to abort, and calling it could complete the request a second time.
            _ if unlinked => CancelClaim::BlockedOperationCancelled,
            Some(routine) => CancelClaim::Routine(routine),
            None => CancelClaim::NoRoutineArmed,
        }
    }

    /// Cancels the context, as RDBSS's IRP cancel routine does, and reports what happened.
    ///
    /// Under the lock: if already cancelled, does nothing; else sets `CANCELLED` and takes the
    /// armed routine. Then, with the lock released and the caller's IRQL restored, calls the
    /// routine. The routine runs at most once over the context's life.
    ///
    /// Must be called below `DISPATCH_LEVEL` (the routine is never run at DISPATCH): at or above,
    /// this is the `DRIVER_IRQL_NOT_LESS_OR_EQUAL` bug check. A caller at DISPATCH uses
    /// [`claim_cancel`](Self::claim_cancel) and defers the routine.
    #[doc(alias = "RxCancelRoutine")]
    #[track_caller]
    pub fn cancel(&self) -> CancelOutcome {
        irql::require_at_most(
            Irql::APC,
            "RX_CONTEXT cancel (runs the minirdr routine) called at DISPATCH_LEVEL or above",
        );
        self.claim_cancel().run_checked(self)
    }
}

impl<M: Default> Default for RxContext<M> {
    fn default() -> Self {
        Self::new_unchecked(ContextInit::default(), M::default())
    }
}

impl<M: fmt::Debug> fmt::Debug for RxContext<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RxContext")
            .field("serial_number", &self.serial_number())
            .field("major_function", &self.major_function)
            .field("minor_function", &self.minor_function)
            .field("flags", &self.flags())
            .field("stored_status", &self.stored_status())
            .field("completed", &self.is_completed())
            .field("minirdr", &self.minirdr)
            .finish_non_exhaustive()
    }
}

/// `RxSetMinirdrCancelRoutine`, Windows-shaped: `STATUS_SUCCESS` or `STATUS_CANCELLED`.
///
/// Same rules as [`RxContext::set_minirdr_cancel_routine`].
#[doc(alias = "RxSetMinirdrCancelRoutine")]
#[track_caller]
pub fn rx_set_minirdr_cancel_routine<M>(
    context: &RxContext<M>,
    routine: Option<CancelRoutine<M>>,
) -> NtStatus {
    match context.set_minirdr_cancel_routine(routine) {
        Ok(()) => NtStatus::SUCCESS,
        Err(cancelled) => cancelled.into(),
    }
}
