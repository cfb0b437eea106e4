//! The RDBSS instance: creates contexts, keeps the active-context registry, finds a context by
//! request id in O(1), counts references, defers DISPATCH-level cancels, and drains.
//!
//! A context lives in a node allocated by the instance; a [`ContextRef`] is one counted reference
//! to it (`RxReferenceRxContext` / `RxDereferenceAndDeleteRxContext`). The registry is a table of
//! slots, one per live context, addressed by the slot index in the [`RequestId`]; the id also
//! carries the context's serial number, so an id whose slot was freed and reused no longer
//! matches. Lookups do not lock: they read the slot under an epoch guard of the instance's own
//! `crossbeam_epoch::Collector`, and a node is freed only once no guard that could have seen it
//! is left.
//!
//! # Invariants
//!
//! 1. **Live while referenced.** A node is destroyed only after its reference count reached zero
//!    and it was unlinked from its slot; destruction is deferred through the instance's epoch
//!    collector. A [`ContextRef`] holds one count, so its node is alive for as long as it exists.
//! 2. **No resurrection.** A lookup takes a reference only by compare-exchange from a non-zero
//!    count without the `REUSING` bit, so once a count reaches zero nobody takes a new one, and the
//!    final dereference is the only one that unlinks and frees.
//! 3. **Safe lookups.** A lookup reads a slot only while pinned, so the node it reads cannot be
//!    freed under it (1); it then checks the serial number *after* taking its reference, and drops
//!    the reference if the id no longer matches, so it never returns a reused context under a stale
//!    id.
//! 4. **Slots are stable.** The slot table grows in buckets of doubling size that are never moved
//!    or freed before the instance, so a slot address stays valid for the instance's life. Buckets
//!    are created only with the allocator lock held; readers only read them.
//! 5. **Unlink before reuse of a slot.** The final dereference clears the slot before returning
//!    its index to the free list, so a new context stored there is never overwritten.
//! 6. **Reuse is exclusive.** Reinitialisation moves the count from exactly 1 to `1 | REUSING`
//!    by compare-exchange, so no lookup can take a reference while the fields are reset.
//! 7. **Draining.** `active` counts contexts from creation to the final dereference. A creation
//!    first counts itself, then checks `draining`, and backs out if it is set; so once `draining`
//!    is set and `active` reads zero, no context can appear.
//!
//! Lock order: a blocked queue's lock, then a context's slot lock (`blocked`); the allocator lock
//! is only taken alone.

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;
use core::ops::Deref;
use core::ptr::NonNull;

use crate::context::{CancelClaim, CancelOutcome, ContextFlags, ContextInit, RxContext};
use crate::irql::{self, Irql};
use crate::spinlock::KSpinLock;
use crate::status::NtStatus;
use crate::sync::epoch::{self, Atomic, Owned};
use crate::sync::{fence, AtomicBool, AtomicU32, AtomicUsize, Ordering};
use crate::workqueue::{DeferredCancel, WorkQueue};

/// Set in a context's reference count while it is being reinitialised (invariant 6).
pub(crate) const REUSING: usize = 1 << (usize::BITS - 1);

/// Slots in the first bucket; bucket `b` has `BUCKET_BASE << b` slots.
const BUCKET_BASE: usize = 32;
/// Enough buckets for every `u32` index below [`MAX_SLOTS`].
const BUCKETS: usize = 27;
/// The number of slots the table can have: `BUCKET_BASE * (2^BUCKETS - 1)`.
const MAX_SLOTS: usize = BUCKET_BASE * ((1 << BUCKETS) - 1);

/// Identifies one request: its context's registry slot and serial number.
///
/// Stays valid for as long as the context lives and is not reinitialised; after that, every
/// id-based call with it returns `STATUS_NOT_FOUND`. An id means something only to the instance
/// that issued it: each instance numbers its slots and serials from the start, so another
/// instance's id may name one of this instance's requests.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(u64);

impl RequestId {
    fn new(slot: u32, serial_number: u32) -> Self {
        RequestId((u64::from(serial_number) << 32) | u64::from(slot))
    }

    /// The id as one number (for logs, FUSE unique ids, wire formats).
    pub fn as_u64(self) -> u64 {
        self.0
    }

    /// Rebuilds an id from [`as_u64`](Self::as_u64). Any value is accepted: an id that names no
    /// live context is `STATUS_NOT_FOUND` wherever it is used.
    pub fn from_u64(raw: u64) -> Self {
        RequestId(raw)
    }

    /// The registry slot.
    pub fn slot(self) -> u32 {
        self.0 as u32
    }

    /// The context's serial number.
    pub fn serial_number(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestId({}#{})", self.slot(), self.serial_number())
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.slot(), self.serial_number())
    }
}

/// What [`Rdbss::cancel_by_id`] did.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum CancelByIdOutcome {
    /// The protocol's `cancel` ran now; this is what it reported.
    Cancelled(CancelOutcome),
    /// Called at `DISPATCH_LEVEL`: the context is marked `CANCELLED` now and its routine was
    /// queued to the instance's work queue, which runs it below DISPATCH.
    Deferred,
    /// The request was already completed: nothing to cancel. Not an error.
    AlreadyCompleted,
}

/// What dropping a reference did.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Dereferenced {
    /// That was the last reference: the context was unlinked and will be freed.
    Freed,
    /// Other references remain.
    StillReferenced,
}

/// Whether an instance has drained.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum DrainStatus {
    /// Draining, and no context is left.
    Drained,
    /// These many contexts are still alive (or the instance is not draining).
    Active(usize),
}

struct Slot<M> {
    context: Atomic<RxContext<M>>,
}

struct Allocator {
    free: Vec<u32>,
    next: usize,
}

struct Instance<M> {
    collector: epoch::Collector,
    buckets: [spin::Once<Box<[Slot<M>]>>; BUCKETS],
    allocator: KSpinLock<Allocator>,
    next_serial: AtomicU32,
    active: AtomicUsize,
    draining: AtomicBool,
    work_queue: Arc<dyn WorkQueue<M>>,
    #[cfg(all(feature = "std", not(loom)))]
    drained: crate::sync::WaitPoint,
}

impl<M> Drop for Instance<M> {
    fn drop(&mut self) {
        // `sync` invariant 5: this thread's cached handle must not outlive the collector's owner,
        // or the collector (and the contexts it still has to free) would live on in it.
        crate::sync::forget_cached_handle(&self.collector);
    }
}

/// Bucket and offset of slot `index`.
fn locate(index: usize) -> (usize, usize) {
    let k = index / BUCKET_BASE + 1;
    let bucket = (usize::BITS - 1 - k.leading_zeros()) as usize;
    (bucket, index - BUCKET_BASE * ((1 << bucket) - 1))
}

impl<M> Instance<M> {
    fn slot(&self, index: u32) -> Option<&Slot<M>> {
        let (bucket, offset) = locate(index as usize);
        // Invariant 4: a bucket, once there, stays.
        self.buckets.get(bucket)?.get()?.get(offset)
    }

    fn pin(&self) -> epoch::Guard {
        crate::sync::pin(&self.collector)
    }

    /// Takes a free slot index, growing the table if needed (invariant 4).
    fn allocate_slot(&self) -> Option<u32> {
        let mut allocator = self.allocator.lock();
        if let Some(index) = allocator.free.pop() {
            return Some(index);
        }
        let index = allocator.next;
        if index >= MAX_SLOTS {
            return None;
        }
        let (bucket, _) = locate(index);
        // Only ever initialised here, with the allocator lock held, so `call_once` never waits.
        self.buckets[bucket].call_once(|| {
            (0..BUCKET_BASE << bucket)
                .map(|_| Slot {
                    context: Atomic::null(),
                })
                .collect()
        });
        allocator.next = index + 1;
        Some(index as u32)
    }

    fn next_serial(&self) -> u32 {
        self.next_serial.fetch_add(1, Ordering::Relaxed)
    }

    /// One context fewer (invariant 7); wakes a drain waiter at zero.
    fn finish_one(&self) {
        if self.active.fetch_sub(1, Ordering::SeqCst) == 1 && self.draining.load(Ordering::SeqCst) {
            #[cfg(all(feature = "std", not(loom)))]
            self.drained.notify();
        }
    }

    /// The final dereference: unlink, free the slot, defer the node's destruction.
    fn release(&self, node: NonNull<RxContext<M>>) {
        // SAFETY: invariant 1. The count just reached zero, so no `ContextRef` or lookup holds
        // it and invariant 2 keeps it there; the node is still allocated (it is destroyed only
        // below, deferred).
        let index = unsafe { node.as_ref() }.life.slot;
        let guard = self.pin();
        if let Some(slot) = self.slot(index) {
            // Invariant 5: clear the slot before its index can be handed out again.
            slot.context.store(epoch::Shared::null(), Ordering::Release);
        }
        self.allocator.lock().free.push(index);
        // SAFETY: the node is unlinked (its slot no longer points at it) and its count is zero
        // for good (invariant 2), so nobody can reach it any more except lookups that loaded the
        // slot before we cleared it; they are pinned, and the collector runs this destructor only
        // after every such guard is gone (invariant 1).
        unsafe { guard.defer_destroy(epoch::Shared::from(node.as_ptr() as *const RxContext<M>)) };
        drop(guard);
        self.finish_one();
    }
}

/// An RDBSS instance (the device object and its state): no process-wide globals, so one process
/// can run several independent redirectors.
///
/// `M` is the mini-redirector's per-request state. Cloning an `Rdbss` gives another handle to the
/// same instance.
///
/// ```
/// use rdbss::{CancelByIdOutcome, CancelOutcome, ContextInit, MajorFunction, NtStatus, Rdbss};
///
/// let rdbss: Rdbss<()> = Rdbss::new();
/// let read = rdbss
///     .create_context(ContextInit { major_function: MajorFunction::READ, ..Default::default() }, ())
///     .unwrap();
/// let id = read.id();
/// assert_eq!(rdbss.cancel_by_id(id), Ok(CancelByIdOutcome::Cancelled(CancelOutcome::NoRoutineArmed)));
/// read.complete_request(NtStatus::CANCELLED, 0).unwrap(); // drops the last reference
/// assert_eq!(rdbss.cancel_by_id(id), Err(NtStatus::NOT_FOUND));
/// assert_eq!(rdbss.active_contexts(), 0);
/// ```
#[doc(alias = "RDBSS_DEVICE_OBJECT")]
pub struct Rdbss<M> {
    shared: Arc<Instance<M>>,
}

impl<M> Clone for Rdbss<M> {
    fn clone(&self) -> Self {
        Rdbss {
            shared: self.shared.clone(),
        }
    }
}

#[cfg(all(feature = "std", not(loom)))]
impl<M: Send + Sync + 'static> Default for Rdbss<M> {
    fn default() -> Self {
        Self::new()
    }
}

impl<M: Send + Sync + 'static> Rdbss<M> {
    /// An instance whose DISPATCH-level cancels run on one worker thread
    /// ([`ThreadWorkQueue`](crate::workqueue::ThreadWorkQueue)).
    #[cfg(all(feature = "std", not(loom)))]
    pub fn new() -> Self {
        Self::with_work_queue(crate::workqueue::ThreadWorkQueue::new(1))
    }

    /// An instance whose DISPATCH-level cancels are posted to `work_queue`.
    pub fn with_work_queue(work_queue: Arc<dyn WorkQueue<M>>) -> Self {
        Rdbss {
            shared: Arc::new(Instance {
                collector: epoch::Collector::new(),
                buckets: core::array::from_fn(|_| spin::Once::new()),
                allocator: KSpinLock::new(Allocator {
                    free: Vec::new(),
                    next: 0,
                }),
                next_serial: AtomicU32::new(1),
                active: AtomicUsize::new(0),
                draining: AtomicBool::new(false),
                work_queue,
                #[cfg(all(feature = "std", not(loom)))]
                drained: crate::sync::WaitPoint::default(),
            }),
        }
    }

    /// `RxCreateRxContext`: a new context with reference count 1 (the returned handle) and the
    /// next serial number (`init.serial_number` is ignored), registered as active.
    ///
    /// Errors hand `minirdr` back: `STATUS_INVALID_DEVICE_STATE` while draining,
    /// `STATUS_INVALID_PARAMETER` if `init.flags` contains `CANCELLED`,
    /// `STATUS_INSUFFICIENT_RESOURCES` when every registry slot is taken.
    #[doc(alias = "RxCreateRxContext")]
    pub fn create_context(
        &self,
        init: ContextInit,
        minirdr: M,
    ) -> Result<ContextRef<M>, (NtStatus, M)> {
        if init.flags.contains(ContextFlags::CANCELLED) {
            return Err((NtStatus::INVALID_PARAMETER, minirdr));
        }
        let shared = &self.shared;
        // Invariant 7: count first, then check.
        shared.active.fetch_add(1, Ordering::SeqCst);
        if shared.draining.load(Ordering::SeqCst) {
            shared.finish_one();
            return Err((NtStatus::INVALID_DEVICE_STATE, minirdr));
        }
        let Some(index) = shared.allocate_slot() else {
            shared.finish_one();
            return Err((NtStatus::INSUFFICIENT_RESOURCES, minirdr));
        };
        let serial_number = shared.next_serial();
        let init = ContextInit {
            serial_number,
            ..init
        };
        let owned = Owned::new(RxContext::new_in_slot(init, 1, index, minirdr));
        // The heap address stays the same through `into_shared`.
        let node_ptr = NonNull::from(&*owned);
        let guard = shared.pin();
        let node = owned.into_shared(&guard);
        // Invariant 4: the slot exists (`allocate_slot` made it) and is empty (invariant 5).
        if let Some(slot) = shared.slot(index) {
            slot.context.store(node, Ordering::Release);
        }
        drop(guard);
        Ok(ContextRef {
            shared: shared.clone(),
            node: node_ptr,
        })
    }

    /// Finds the context of `id` and takes a reference to it (O(1), lock-free).
    ///
    /// `STATUS_NOT_FOUND` if no live context has that id: never created, freed, or reinitialised
    /// since (invariant 3).
    pub fn lookup(&self, id: RequestId) -> Result<ContextRef<M>, NtStatus> {
        let shared = &self.shared;
        let slot = shared.slot(id.slot()).ok_or(NtStatus::NOT_FOUND)?;
        let guard = shared.pin();
        let node = slot.context.load(Ordering::Acquire, &guard);
        // SAFETY: invariant 3. We are pinned, so a node still reachable from the slot when we
        // loaded it is not destroyed before `guard` drops (invariant 1).
        let context = unsafe { node.as_ref() }.ok_or(NtStatus::NOT_FOUND)?;
        if !try_reference(&context.life.refs) {
            return Err(NtStatus::NOT_FOUND);
        }
        let found = ContextRef {
            shared: shared.clone(),
            node: NonNull::from(context),
        };
        drop(guard);
        // Invariant 3: check the id with the reference held.
        #[cfg(not(rdbss_mutant = "lookup_skips_recheck"))]
        if found.serial_number() != id.serial_number() {
            return Err(NtStatus::NOT_FOUND);
        }
        Ok(found)
    }

    /// What RDBSS's IRP cancel routine does: find the context of `id` in O(1), hold a reference for
    /// the duration, and cancel it.
    ///
    /// Below `DISPATCH_LEVEL` the minirdr routine runs now. At DISPATCH the context is marked
    /// `CANCELLED` at once and the routine is posted to the instance's work queue
    /// ([`CancelByIdOutcome::Deferred`]), which runs it below DISPATCH. A request already completed
    /// gives [`CancelByIdOutcome::AlreadyCompleted`]; an unknown id `STATUS_NOT_FOUND`.
    #[doc(alias = "RxCancelRoutine")]
    pub fn cancel_by_id(&self, id: RequestId) -> Result<CancelByIdOutcome, NtStatus> {
        let context = self.lookup(id)?;
        if context.is_completed() {
            return Ok(CancelByIdOutcome::AlreadyCompleted);
        }
        if irql::current() >= Irql::DISPATCH {
            return Ok(match context.claim_cancel() {
                CancelClaim::Routine(routine) => {
                    self.shared
                        .work_queue
                        .post(DeferredCancel::new(context, routine));
                    CancelByIdOutcome::Deferred
                }
                // No routine to run: nothing to defer.
                other => CancelByIdOutcome::Cancelled(other.run(&context)),
            });
        }
        Ok(CancelByIdOutcome::Cancelled(context.cancel()))
    }

    /// `RxCompleteRequest` by id: `STATUS_NOT_FOUND` if the context is gone (completion after
    /// free), else as [`RxContext::complete_request`].
    pub fn complete_by_id(
        &self,
        id: RequestId,
        status: NtStatus,
        information: usize,
    ) -> Result<(), NtStatus> {
        self.lookup(id)?.complete_request(status, information)
    }

    /// Drops one reference that was kept by id with [`ContextRef::into_id`].
    ///
    /// `STATUS_NOT_FOUND` if the context is gone; `STATUS_INVALID_PARAMETER` if no reference is
    /// kept by id (a dereference below zero), in both cases changing nothing.
    #[doc(alias = "RxDereferenceAndDeleteRxContext")]
    pub fn dereference_by_id(&self, id: RequestId) -> Result<Dereferenced, NtStatus> {
        let context = self.lookup(id)?;
        context
            .life
            .kept_by_id
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |kept| {
                kept.checked_sub(1)
            })
            .map_err(|_| NtStatus::INVALID_PARAMETER)?;
        // The kept reference is ours now; `context` holds another, so this is never the last.
        context.life.refs.fetch_sub(1, Ordering::Release);
        Ok(context.dereference())
    }

    /// How many contexts are alive (created and not yet freed).
    #[doc(alias = "NumberOfActiveContexts")]
    pub fn active_contexts(&self) -> usize {
        self.shared.active.load(Ordering::SeqCst)
    }

    /// Stops accepting new contexts: from now on `create_context` is
    /// `STATUS_INVALID_DEVICE_STATE`. Contexts in flight are untouched.
    pub fn start_drain(&self) {
        self.shared.draining.store(true, Ordering::SeqCst);
    }

    /// Whether [`start_drain`](Self::start_drain) was called.
    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::SeqCst)
    }

    /// Reports, without waiting, whether the instance has drained.
    pub fn drain_status(&self) -> DrainStatus {
        match (self.is_draining(), self.active_contexts()) {
            (true, 0) => DrainStatus::Drained,
            (_, active) => DrainStatus::Active(active),
        }
    }

    /// Stops accepting new contexts and waits (below `DISPATCH_LEVEL`) until every active one is
    /// freed or `timeout` passes. `Err(n)` if `n` contexts are still alive at the deadline.
    #[cfg(all(feature = "std", not(loom)))]
    pub fn drain(&self, timeout: core::time::Duration) -> Result<(), usize> {
        irql::require_can_wait("Rdbss::drain");
        self.start_drain();
        self.shared
            .drained
            .wait_until(timeout, || self.active_contexts() == 0);
        match self.active_contexts() {
            0 => Ok(()),
            active => Err(active),
        }
    }
}

impl<M> fmt::Debug for Rdbss<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rdbss")
            .field(
                "active_contexts",
                &self.shared.active.load(Ordering::SeqCst),
            )
            .field("draining", &self.shared.draining.load(Ordering::SeqCst))
            .finish_non_exhaustive()
    }
}

/// One counted reference to a context of an [`Rdbss`] instance (`ReferenceCount`).
///
/// Clone to take another reference (`RxReferenceRxContext`), drop to release it
/// (`RxDereferenceAndDeleteRxContext`); the last one unlinks the context from the registry and
/// frees it. Derefs to the [`RxContext`], so the whole cancel protocol is available on it.
pub struct ContextRef<M> {
    shared: Arc<Instance<M>>,
    node: NonNull<RxContext<M>>,
}

// SAFETY: a `ContextRef` is a shared, counted handle to an `RxContext<M>`, like `Arc<RxContext<M>>`:
// it gives out only `&RxContext<M>` and its count is atomic, so it may move to and be used from
// any thread when the context is `Send + Sync`, which `M: Send + Sync` makes it.
unsafe impl<M: Send + Sync> Send for ContextRef<M> {}
// SAFETY: as for `Send`: only shared access is given out.
unsafe impl<M: Send + Sync> Sync for ContextRef<M> {}

impl<M> ContextRef<M> {
    /// The request's id, for [`Rdbss::lookup`], [`Rdbss::cancel_by_id`] and friends.
    pub fn id(&self) -> RequestId {
        RequestId::new(self.life.slot, self.serial_number())
    }

    /// Takes another reference (`RxReferenceRxContext`); the same as `clone`.
    #[doc(alias = "RxReferenceRxContext")]
    pub fn reference(&self) -> ContextRef<M> {
        self.clone()
    }

    /// Drops this reference (`RxDereferenceAndDeleteRxContext`) and reports whether it was the
    /// last one.
    #[doc(alias = "RxDereferenceAndDeleteRxContext")]
    pub fn dereference(self) -> Dereferenced {
        let this = core::mem::ManuallyDrop::new(self);
        // SAFETY: `this` is never used again and its `Drop` does not run (ManuallyDrop), so the
        // `Arc` is moved out exactly once.
        let shared = unsafe { core::ptr::read(&this.shared) };
        release_one(&shared, this.node)
    }

    /// Keeps this reference counted under the request id instead of a handle; release it with
    /// [`Rdbss::dereference_by_id`]. For embedders that pass ids, not handles (FUSE unique ids).
    pub fn into_id(self) -> RequestId {
        // One more count, owned by the id; dropping the handle then releases the handle's own,
        // so the total is unchanged (never zero here: the handle's count is still held).
        self.life.refs.fetch_add(1, Ordering::Relaxed);
        self.life.kept_by_id.fetch_add(1, Ordering::AcqRel);
        self.id()
    }

    /// `RxCompleteRequest`: completes the request ([`RxContext::complete_request`]) and drops this
    /// reference, the request's. A second completion is the `MULTIPLE_IRP_COMPLETE_REQUESTS` bug
    /// check; the reference is dropped either way.
    #[doc(alias = "RxCompleteRequest")]
    pub fn complete_request(self, status: NtStatus, information: usize) -> Result<(), NtStatus> {
        RxContext::complete_request(&self, status, information)
    }

    /// `RxReinitializeContext`: resets the context for a new request and returns its new id.
    ///
    /// Keeps only the `PRESERVED | INITIALIZATION` flags (so `CANCELLED` is lost), empties the
    /// cancel slot, makes the request pending, and takes a new serial number, so the old id is
    /// `STATUS_NOT_FOUND` from now on. Needs this to be the only reference:
    /// `Err(STATUS_INVALID_DEVICE_STATE)` otherwise, changing nothing.
    #[doc(alias = "RxReinitializeContext")]
    #[doc(alias = "RxPrepareContextForReuse")]
    pub fn reinitialize(&mut self) -> Result<RequestId, NtStatus> {
        let refs = &self.life.refs;
        // Invariant 6.
        if refs
            .compare_exchange(1, 1 | REUSING, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return Err(NtStatus::INVALID_DEVICE_STATE);
        }
        let serial_number = self.shared.next_serial();
        self.reset_for_reuse(serial_number);
        self.life.refs.store(1, Ordering::Release);
        Ok(self.id())
    }

    /// Whether two handles refer to the same context.
    pub fn ptr_eq(a: &Self, b: &Self) -> bool {
        a.node == b.node
    }
}

/// Takes a reference from a live, non-reusing count (invariant 2); `false` if there is none.
#[cfg(not(rdbss_mutant = "lookup_resurrects"))]
fn try_reference(refs: &AtomicUsize) -> bool {
    refs.fetch_update(Ordering::Acquire, Ordering::Relaxed, |count| {
        (count != 0 && count & REUSING == 0).then_some(count + 1)
    })
    .is_ok()
}

/// MUTANT (test-only): takes a reference with a plain increment, even from zero, so a lookup can
/// resurrect a context whose final dereference is already releasing it.
#[cfg(rdbss_mutant = "lookup_resurrects")]
fn try_reference(refs: &AtomicUsize) -> bool {
    refs.fetch_add(1, Ordering::Acquire) & REUSING == 0
}

/// Drops one count of `node`; the last one releases it (invariants 1 and 2).
fn release_one<M>(shared: &Instance<M>, node: NonNull<RxContext<M>>) -> Dereferenced {
    // SAFETY: invariant 1: the caller's count keeps the node alive until this decrement.
    let refs = &unsafe { node.as_ref() }.life.refs;
    if refs.fetch_sub(1, Ordering::Release) != 1 {
        return Dereferenced::StillReferenced;
    }
    // Pairs with the other holders' `Release` decrements: their uses happen before the free.
    fence(Ordering::Acquire);
    shared.release(node);
    Dereferenced::Freed
}

impl<M> Deref for ContextRef<M> {
    type Target = RxContext<M>;
    #[inline]
    fn deref(&self) -> &RxContext<M> {
        // SAFETY: invariant 1: this handle holds a count, so the node is alive.
        unsafe { self.node.as_ref() }
    }
}

impl<M> Clone for ContextRef<M> {
    fn clone(&self) -> Self {
        // Like `Arc::clone`: the existing count keeps the node alive, so Relaxed suffices.
        self.life.refs.fetch_add(1, Ordering::Relaxed);
        ContextRef {
            shared: self.shared.clone(),
            node: self.node,
        }
    }
}

impl<M> Drop for ContextRef<M> {
    fn drop(&mut self) {
        release_one(&self.shared, self.node);
    }
}

impl<M: fmt::Debug> fmt::Debug for ContextRef<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ContextRef")
            .field("id", &self.id())
            .field("references", &self.reference_count())
            .field("context", &**self)
            .finish()
    }
}
