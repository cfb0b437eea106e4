//! The FUSE interrupt layer: FUSE request ids mapped to their `RX_CONTEXT`s, so that a
//! `FUSE_INTERRUPT` cancels the in-flight request through the core.
//!
//! It knows nothing about any FUSE library: an adapter (`rxfuse` on `fuse3`, or any other) calls
//! [`InterruptTable::register`] when a request arrives, [`InterruptTable::interrupt`] when a
//! `FUSE_INTERRUPT` arrives, and [`InterruptTable::unregister`] when it replies. What to write
//! back to the kernel is spelled out on each outcome (DESIGN.md section 5):
//!
//! - the interrupted request itself is answered by whoever completes its context: the minirdr
//!   cancel routine completes it with `STATUS_CANCELLED`, which the adapter answers `EINTR`;
//! - an interrupt whose request is not registered yet (it overtook its request inside the
//!   daemon) is *remembered*: a [`PendingInterrupt`]. If the request registers while it is
//!   remembered, the registration cancels it at once. After a short delay the adapter calls
//!   [`InterruptTable::settle`]; if the request still has not come, the interrupt is answered
//!   `EAGAIN`, so the kernel queues it again. Never at once: the kernel requeues an `EAGAIN`
//!   interrupt immediately, and an instant answer turns into a busy loop;
//! - nothing here ever answers `ENOSYS`, which would turn interrupts off for the whole
//!   connection.
//!
//! # Invariants
//!
//! 1. One lock guards the map; every decision about an id (register, interrupt, settle,
//!    unregister) is taken under it, so for one id these four are totally ordered. In particular
//!    an interrupt is either seen by the request's registration (it is remembered first) or finds
//!    the request registered; it is never missed by both.
//! 2. Nothing is called under the lock: a cancel runs the minirdr routine, which may complete the
//!    request and make the adapter unregister it, so cancelling under the lock could deadlock.
//!    The table clones the context's handle (a counted reference, as RDBSS's cancel takes one for
//!    the callback) under the lock, then cancels with the lock released.
//! 3. Handles are dropped outside the lock too: the last reference frees the context.
//! 4. An id is registered at most once at a time; a second registration of a live id is refused
//!    and changes nothing, and [`InterruptTable::unregister`] removes an entry only for the
//!    context that registered it, so a refused duplicate cannot unregister the original.
//! 5. A remembered interrupt is forgotten only by the registration that consumes it (which
//!    cancels the request) or by the [`settle`](InterruptTable::settle) of the latest interrupt
//!    for that id (which answers `EAGAIN`). So the table holds at most one entry per id, and
//!    with every pending interrupt settled and every request unregistered it is empty.
//! 6. FUSE ids are even and never zero: the kernel sets bit 0 ([`FUSE_INT_REQ_BIT`]) only in the
//!    header of an interrupt request itself. An id that is zero or has that bit set is refused
//!    as invalid and changes nothing.
//!
//! The FUSE kernel never reuses an id within one connection, so a remembered interrupt for a
//! request that was already answered (the interrupt and the reply crossed) is harmless: no other
//! request can take that id, and the entry goes at its settle.

use alloc::collections::BTreeMap;
use core::fmt;

use crate::context::CancelOutcome;
use crate::registry::ContextRef;
use crate::sync::Mutex;

/// The bit the kernel sets in the header id of a `FUSE_INTERRUPT` request (the id of the
/// interrupted request, in the body, never has it).
pub const FUSE_INT_REQ_BIT: u64 = 1;

/// Why the table refused an id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum InterruptTableError {
    /// Zero, or the interrupt bit set (invariant 6).
    InvalidId(u64),
    /// The id is already registered for another in-flight request (invariant 4).
    AlreadyRegistered(u64),
}

impl fmt::Display for InterruptTableError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InterruptTableError::InvalidId(id) => write!(
                f,
                "FUSE request id {id:#x} is invalid (zero, or the interrupt bit is set)"
            ),
            InterruptTableError::AlreadyRegistered(id) => {
                write!(f, "FUSE request id {id:#x} is already registered")
            }
        }
    }
}

impl core::error::Error for InterruptTableError {}

/// What [`InterruptTable::register`] did.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[must_use = "an interrupted registration means the request is already cancelled"]
pub enum Registration {
    /// Registered; no interrupt was waiting for it.
    Registered,
    /// Registered, and an interrupt was waiting for it: the context has been cancelled through
    /// the core (this is what the cancel did). A mini-redirector arming its routine afterwards
    /// gets `STATUS_CANCELLED`, so the request is answered `EINTR` without going out.
    Interrupted(CancelOutcome),
}

/// What [`InterruptTable::interrupt`] did.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a pending interrupt must be settled"]
pub enum InterruptOutcome {
    /// The request was in flight and has been cancelled through the core (this is what the
    /// cancel did; a request that already completed is only marked cancelled). The request is
    /// answered by whoever completes it; the interrupt itself needs no answer (`0` is harmless).
    Cancelled(CancelOutcome),
    /// The request is not registered (yet): the interrupt is remembered. Wait a short while,
    /// then [`settle`](InterruptTable::settle) it.
    Pending(PendingInterrupt),
    /// The id is zero or has the interrupt bit set: answer the interrupt `EINVAL`.
    InvalidId,
}

/// A remembered interrupt, to be settled after a short delay.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a pending interrupt stays in the table until it is settled"]
pub struct PendingInterrupt {
    unique: u64,
    generation: u64,
}

impl PendingInterrupt {
    /// The id of the interrupted request.
    pub fn unique(&self) -> u64 {
        self.unique
    }
}

/// What [`InterruptTable::settle`] decided.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Settled {
    /// The request registered meanwhile and was cancelled by its registration (or a later
    /// interrupt for the same id took over): answer this interrupt `0`, or not at all.
    Delivered,
    /// The request never came: answer the interrupt `EAGAIN`, so the kernel sends it again. If
    /// the request was in fact already answered, the kernel drops that answer (`ENOENT`).
    Retry,
}

/// What the table has counted since it was made.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, Debug)]
pub struct InterruptStats {
    /// Successful registrations.
    pub registered: u64,
    /// Interrupts received with a valid id.
    pub interrupts: u64,
    /// Interrupts that found their request in flight and cancelled it.
    pub cancelled_in_flight: u64,
    /// Interrupts remembered because their request was not registered.
    pub remembered: u64,
    /// Registrations that found an interrupt waiting and cancelled the request at once.
    pub cancelled_on_registration: u64,
    /// Settles that answered `EAGAIN`.
    pub retried: u64,
    /// Ids refused as invalid by [`InterruptTable::register`] or [`InterruptTable::interrupt`]
    /// (`settle` and `unregister` of an unknown id just find nothing).
    pub invalid_ids: u64,
    /// Registrations refused because the id was live.
    pub duplicate_registrations: u64,
}

enum Entry<M> {
    /// A registered, in-flight request and the table's reference to its context.
    InFlight(ContextRef<M>),
    /// An interrupt that came before its request; `generation` names the latest one.
    Interrupted { generation: u64 },
}

struct State<M> {
    entries: BTreeMap<u64, Entry<M>>,
    next_generation: u64,
    stats: InterruptStats,
}

/// FUSE request ids of in-flight requests mapped to their contexts, plus interrupts that came
/// before their request. See the [module docs](self) for the protocol.
///
/// ```
/// use rdbss::interrupt::{InterruptOutcome, InterruptTable, Registration, Settled};
/// use rdbss::{CancelOutcome, ContextInit, NtStatus, Rdbss, RxContext};
///
/// fn abort(ctx: &RxContext<()>) -> NtStatus {
///     ctx.complete_request(NtStatus::CANCELLED, 0).ok();
///     NtStatus::SUCCESS
/// }
///
/// let rdbss = Rdbss::<()>::new();
/// let table = InterruptTable::new();
/// let ctx = rdbss.create_context(ContextInit::default(), ()).unwrap();
/// assert_eq!(table.register(42, &ctx), Ok(Registration::Registered));
/// ctx.set_minirdr_cancel_routine(Some(abort)).unwrap();
/// // FUSE_INTERRUPT for 42: the routine runs and completes the request.
/// assert_eq!(
///     table.interrupt(42),
///     InterruptOutcome::Cancelled(CancelOutcome::RoutineCalled(NtStatus::SUCCESS))
/// );
/// assert_eq!(ctx.stored_status(), NtStatus::CANCELLED); // the adapter answers EINTR
/// drop(table.unregister(42, &ctx));
///
/// // An interrupt that overtakes its request is remembered, and the registration cancels it.
/// let InterruptOutcome::Pending(pending) = table.interrupt(44) else { unreachable!() };
/// let late = rdbss.create_context(ContextInit::default(), ()).unwrap();
/// assert!(matches!(table.register(44, &late), Ok(Registration::Interrupted(_))));
/// assert!(late.is_cancelled());
/// assert_eq!(table.settle(pending), Settled::Delivered);
/// drop(table.unregister(44, &late));
/// assert!(table.is_empty());
/// ```
pub struct InterruptTable<M> {
    state: Mutex<State<M>>,
}

fn valid(unique: u64) -> bool {
    unique != 0 && unique & FUSE_INT_REQ_BIT == 0
}

impl<M> InterruptTable<M> {
    /// An empty table.
    pub fn new() -> Self {
        InterruptTable {
            state: Mutex::new(State {
                entries: BTreeMap::new(),
                next_generation: 0,
                stats: InterruptStats::default(),
            }),
        }
    }

    /// Registers an arriving request under its FUSE id, with a reference to its context. Call it
    /// before the mini-redirector sends the request, so a cancel marks the context before the
    /// routine is armed and arming reports it.
    ///
    /// If an interrupt for this id is remembered, the context is cancelled now, through the core
    /// ([`Registration::Interrupted`]). Errors change nothing (invariants 4 and 6).
    pub fn register(
        &self,
        unique: u64,
        context: &ContextRef<M>,
    ) -> Result<Registration, InterruptTableError> {
        let interrupted = {
            let mut state = self.state.lock();
            if !valid(unique) {
                state.stats.invalid_ids += 1;
                return Err(InterruptTableError::InvalidId(unique));
            }
            let interrupted = match state.entries.get(&unique) {
                Some(Entry::InFlight(_)) => {
                    // Invariant 4: the original stays; nothing changes.
                    state.stats.duplicate_registrations += 1;
                    return Err(InterruptTableError::AlreadyRegistered(unique));
                }
                Some(Entry::Interrupted { .. }) => {
                    state.stats.cancelled_on_registration += 1;
                    consumes_remembered_interrupt()
                }
                None => false,
            };
            // Replaces a remembered interrupt, which holds no handle (invariant 5).
            state
                .entries
                .insert(unique, Entry::InFlight(context.reference()));
            state.stats.registered += 1;
            interrupted
        };
        if interrupted {
            // Invariant 2: cancel with the lock released.
            Ok(Registration::Interrupted(context.cancel()))
        } else {
            Ok(Registration::Registered)
        }
    }

    /// A `FUSE_INTERRUPT` for request `unique` (the id in the interrupt's body).
    ///
    /// Cancels the request through the core if it is registered; remembers the interrupt if it
    /// is not (invariant 1). Never answers `ENOSYS`.
    pub fn interrupt(&self, unique: u64) -> InterruptOutcome {
        let target = {
            let mut state = self.state.lock();
            if !valid(unique) {
                state.stats.invalid_ids += 1;
                return InterruptOutcome::InvalidId;
            }
            state.stats.interrupts += 1;
            let generation = state.next_generation;
            match state.entries.get_mut(&unique) {
                Some(Entry::InFlight(context)) => {
                    // Invariant 2: a counted reference for the duration of the cancel.
                    let context = context.reference();
                    state.stats.cancelled_in_flight += 1;
                    context
                }
                Some(Entry::Interrupted { generation: latest }) => {
                    // Another interrupt for an id still not registered: the newest takes over
                    // (invariant 5).
                    *latest = generation;
                    state.next_generation += 1;
                    state.stats.remembered += 1;
                    return InterruptOutcome::Pending(PendingInterrupt { unique, generation });
                }
                None => {
                    state
                        .entries
                        .insert(unique, Entry::Interrupted { generation });
                    state.next_generation += 1;
                    state.stats.remembered += 1;
                    return InterruptOutcome::Pending(PendingInterrupt { unique, generation });
                }
            }
        };
        let outcome = target.cancel();
        drop(target);
        InterruptOutcome::Cancelled(outcome)
    }

    /// Decides the answer to a remembered interrupt, after the adapter's short delay.
    ///
    /// [`Settled::Retry`] (answer `EAGAIN`) if its request still has not registered: the entry is
    /// forgotten, and the kernel sends the interrupt again. [`Settled::Delivered`] otherwise
    /// (invariant 5).
    pub fn settle(&self, pending: PendingInterrupt) -> Settled {
        let mut state = self.state.lock();
        match state.entries.get(&pending.unique) {
            Some(Entry::Interrupted { generation }) if *generation == pending.generation => {
                state.entries.remove(&pending.unique);
                state.stats.retried += 1;
                Settled::Retry
            }
            Some(Entry::Interrupted { .. }) => {
                // A later interrupt for the same id is remembered and will be settled itself;
                // this one is answered as if delivered.
                Settled::Delivered
            }
            Some(Entry::InFlight(_)) | None => Settled::Delivered,
        }
    }

    /// Removes request `unique` when the adapter has replied to it, and hands back the table's
    /// reference to its context (drop it when convenient). `None`, changing nothing, if `unique`
    /// is not registered for this very context (invariant 4).
    pub fn unregister(&self, unique: u64, context: &ContextRef<M>) -> Option<ContextRef<M>> {
        let mut state = self.state.lock();
        match state.entries.get(&unique) {
            Some(Entry::InFlight(registered)) if ContextRef::ptr_eq(registered, context) => {
                match state.entries.remove(&unique) {
                    Some(Entry::InFlight(registered)) => Some(registered),
                    _ => None,
                }
            }
            _ => None,
        }
        // The guard drops before the caller drops the handle (invariant 3).
    }

    /// Requests registered and not yet unregistered.
    pub fn in_flight(&self) -> usize {
        let state = self.state.lock();
        state
            .entries
            .values()
            .filter(|e| matches!(e, Entry::InFlight(_)))
            .count()
    }

    /// Interrupts remembered and not yet settled or consumed.
    pub fn remembered(&self) -> usize {
        let state = self.state.lock();
        state.entries.len()
            - state
                .entries
                .values()
                .filter(|e| matches!(e, Entry::InFlight(_)))
                .count()
    }

    /// Whether the table holds nothing: no request in flight, no interrupt remembered.
    pub fn is_empty(&self) -> bool {
        self.state.lock().entries.is_empty()
    }

    /// What the table has counted.
    pub fn stats(&self) -> InterruptStats {
        self.state.lock().stats
    }
}

/// Whether a registration that replaces a remembered interrupt cancels its request (invariant 1).
#[cfg(not(rdbss_mutant = "interrupt_register_forgets"))]
fn consumes_remembered_interrupt() -> bool {
    true
}

/// MUTANT (test-only): the registration drops a remembered interrupt without cancelling, so an
/// interrupt that overtook its request is lost.
#[cfg(rdbss_mutant = "interrupt_register_forgets")]
fn consumes_remembered_interrupt() -> bool {
    false
}

impl<M> Default for InterruptTable<M> {
    fn default() -> Self {
        Self::new()
    }
}

impl<M> fmt::Debug for InterruptTable<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state.lock();
        f.debug_struct("InterruptTable")
            .field("entries", &state.entries.len())
            .field("stats", &state.stats)
            .finish()
    }
}
