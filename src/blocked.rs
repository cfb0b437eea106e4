//! Blocked (serialised) operations: a per-file queue of requests waiting their turn, as RDBSS
//! keeps for pipe reads and writes (`RxSynchronizeBlockingOperations`,
//! `RxResumeBlockedOperations_Serially`, `RxCancelBlockingOperation`).
//!
//! # Invariants
//!
//! 1. An operation is in a queue's deque exactly while its context's slot holds a link to that
//!    queue (`context` invariant 8). Both change together, with the queue's lock held and then the
//!    context's slot lock: lock order **queue, then slot**, everywhere.
//! 2. Enqueueing checks `CANCELLED` under the slot lock, and cancelling sets it under the same
//!    lock before looking for the link, so a cancel either finds the operation queued (and
//!    unlinks it) or the enqueue sees the flag (and is refused with `STATUS_CANCELLED`).
//! 3. Whoever takes the link, the resumer or the canceller, owns the operation: a resumed
//!    operation is handed back to the caller to run; a cancelled one is completed with
//!    `STATUS_CANCELLED` by the canceller. Never both, never neither.
//! 4. The queue holds a counted reference ([`ContextRef`]) to every queued context, dropped only
//!    after both locks are released (a final dereference takes the registry's lock).
//! 5. Dropping a [`BlockedQueue`] resumes every operation still waiting in it
//!    (`RxResumeBlockedOperations_ALL`): a queued context links back to its queue, so without this
//!    the two would keep each other alive, and the operation would wait for a resume nobody can
//!    give any more.

use alloc::collections::VecDeque;
use alloc::sync::Arc;
use core::fmt;

use crate::context::{ContextFlags, RxContext};
use crate::registry::ContextRef;
use crate::spinlock::KSpinLock;
use crate::status::NtStatus;
use crate::sync::Ordering;

/// Where a context stands with respect to a blocked-operation queue.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
#[repr(u8)]
pub enum BlockedState {
    /// Never enqueued (or reinitialised since).
    NotBlocked = 0,
    /// In a queue, waiting for its turn.
    Waiting = 1,
    /// Taken off the queue by `resume_blocked_operations_serially`: its turn has come.
    Resumed = 2,
    /// Unlinked by a cancel and completed with `STATUS_CANCELLED`.
    Cancelled = 3,
}

impl BlockedState {
    pub(crate) fn from_u8(raw: u8) -> Self {
        match raw {
            1 => BlockedState::Waiting,
            2 => BlockedState::Resumed,
            3 => BlockedState::Cancelled,
            _ => BlockedState::NotBlocked,
        }
    }
}

/// The shared part of a queue; contexts link to it while queued.
pub(crate) struct BlockedShared<M> {
    queue: KSpinLock<VecDeque<ContextRef<M>>>,
    #[cfg(all(feature = "std", not(loom)))]
    wake: crate::sync::WaitPoint,
}

impl<M> BlockedShared<M> {
    fn notify(&self) {
        #[cfg(all(feature = "std", not(loom)))]
        self.wake.notify();
    }
}

/// A per-file queue of blocked operations (`BlockingIoQ` in RDBSS).
///
/// ```
/// use rdbss::{BlockedQueue, BlockedState, ContextInit, MajorFunction, Rdbss};
///
/// let rdbss: Rdbss<()> = Rdbss::new();
/// let pipe = BlockedQueue::new();
/// let read = |_: ()| rdbss.create_context(ContextInit { major_function: MajorFunction::READ, ..Default::default() }, ());
/// let (first, second) = (read(()).unwrap(), read(()).unwrap());
/// pipe.enqueue(&first).unwrap();
/// pipe.enqueue(&second).unwrap();
/// second.cancel(); // unlinked and completed with STATUS_CANCELLED
/// assert_eq!(second.blocked_state(), BlockedState::Cancelled);
/// let next = pipe.resume_blocked_operations_serially().unwrap();
/// assert_eq!(next.id(), first.id());
/// assert!(pipe.resume_blocked_operations_serially().is_none());
/// ```
pub struct BlockedQueue<M> {
    shared: Arc<BlockedShared<M>>,
}

impl<M> Default for BlockedQueue<M> {
    fn default() -> Self {
        BlockedQueue {
            shared: Arc::new(BlockedShared {
                queue: KSpinLock::new(VecDeque::new()),
                #[cfg(all(feature = "std", not(loom)))]
                wake: crate::sync::WaitPoint::default(),
            }),
        }
    }
}

impl<M> BlockedQueue<M> {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many operations are waiting.
    pub fn len(&self) -> usize {
        self.shared.queue.lock().len()
    }

    /// Whether no operation is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Queues `context` behind the operations already waiting (`RxSynchronizeBlockingOperations`
    /// when the file is busy). The queue keeps a reference until the operation leaves it.
    ///
    /// Errors, with nothing changed: `STATUS_CANCELLED` if the context is already cancelled
    /// (invariant 2); `STATUS_INVALID_PARAMETER` if it is already waiting in a queue or has a
    /// cancel routine armed (an operation that waits has no exchange in flight).
    ///
    /// A routine armed *while* the operation waits is dropped, not called, if a cancel unlinks
    /// the operation: the cancel completes the request itself (invariant 3).
    #[doc(alias = "RxSynchronizeBlockingOperations")]
    pub fn enqueue(&self, context: &ContextRef<M>) -> Result<(), NtStatus> {
        // Invariant 1: queue lock, then slot lock.
        let mut queue = self.shared.queue.lock();
        {
            let mut slot = context.lock_slot();
            if context.is_cancelled() {
                return Err(NtStatus::CANCELLED);
            }
            // Already waiting somewhere, or an exchange is in flight (a routine is armed): a
            // blocked operation has not started its exchange yet.
            if slot.blocked.is_some() || slot.routine.is_some() {
                return Err(NtStatus::INVALID_PARAMETER);
            }
            slot.blocked = Some(self.shared.clone());
            context
                .life
                .blocked_state
                .store(BlockedState::Waiting as u8, Ordering::Release);
        }
        // Not CANCELLED, so this cannot fail.
        let _ = context.set_flags(ContextFlags::IN_SERIALIZATION_QUEUE);
        queue.push_back(context.clone());
        Ok(())
    }

    /// Takes the next waiting operation off the queue and hands it back to run
    /// (`RxResumeBlockedOperations_Serially`); `None` if nobody waits. Its state becomes
    /// [`BlockedState::Resumed`] and `BLOCKED_PIPE_RESUME` is set; a waiter in [`wait`](Self::wait)
    /// wakes up.
    ///
    /// A resumed operation may have been cancelled a moment after it was taken off the queue (the
    /// cancel found no link, invariant 3): its owner then sees `CANCELLED` when it arms its cancel
    /// routine, and completes it.
    #[doc(alias = "RxResumeBlockedOperations_Serially")]
    pub fn resume_blocked_operations_serially(&self) -> Option<ContextRef<M>> {
        let next = {
            let mut queue = self.shared.queue.lock();
            let next = queue.pop_front()?;
            {
                // Invariant 1: the link leaves with the deque entry, under both locks.
                let mut slot = next.lock_slot();
                slot.blocked = None;
                next.life
                    .blocked_state
                    .store(BlockedState::Resumed as u8, Ordering::Release);
            }
            next
        };
        let _ = next.clear_flags(ContextFlags::IN_SERIALIZATION_QUEUE);
        let _ = next.set_flags(ContextFlags::BLOCKED_PIPE_RESUME);
        self.shared.notify();
        Some(next)
    }

    /// `RxResumeBlockedOperations_ALL`: resumes every waiting operation, in queue order, as
    /// [`resume_blocked_operations_serially`](Self::resume_blocked_operations_serially) would one
    /// by one, and drops the queue's references to them; returns how many were resumed. Their
    /// owners (in [`wait`](Self::wait), or holding their own [`ContextRef`]) run them.
    #[doc(alias = "RxResumeBlockedOperations_ALL")]
    pub fn resume_all(&self) -> usize {
        let mut resumed = 0;
        while let Some(operation) = self.resume_blocked_operations_serially() {
            drop(operation);
            resumed += 1;
        }
        resumed
    }

    /// Waits (below `DISPATCH_LEVEL`) until `context` is no longer [`BlockedState::Waiting`] in
    /// this queue, or `timeout` passes, and returns its state.
    #[cfg(all(feature = "std", not(loom)))]
    pub fn wait(&self, context: &RxContext<M>, timeout: core::time::Duration) -> BlockedState {
        crate::irql::require_can_wait("BlockedQueue::wait");
        self.shared
            .wake
            .wait_until(timeout, || context.blocked_state() != BlockedState::Waiting);
        context.blocked_state()
    }
}

impl<M> Drop for BlockedQueue<M> {
    /// Resumes every operation still waiting (invariant 5).
    fn drop(&mut self) {
        self.resume_all();
    }
}

impl<M> fmt::Debug for BlockedQueue<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockedQueue")
            .field("waiting", &self.len())
            .finish()
    }
}

/// The blocked part of a cancel (`RxCancelBlockingOperation`), called by `claim_cancel` after it
/// set `CANCELLED` and saw a link to `queue`. Returns whether this cancel unlinked the operation
/// (and completed it with `STATUS_CANCELLED`); `false` if a resume took it first (invariant 3).
pub(crate) fn cancel_blocked<M>(queue: &Arc<BlockedShared<M>>, context: &RxContext<M>) -> bool {
    let removed = {
        // Invariant 1: queue lock, then slot lock.
        let mut entries = queue.queue.lock();
        {
            let mut slot = context.lock_slot();
            match &slot.blocked {
                Some(linked) if Arc::ptr_eq(linked, queue) => slot.blocked = None,
                _ => return false,
            }
        }
        let position = entries
            .iter()
            .position(|entry| core::ptr::eq::<RxContext<M>>(&**entry, context));
        // Invariant 1: linked means queued, so the entry is there.
        position.and_then(|at| entries.remove(at))
    };
    context
        .life
        .blocked_state
        .store(BlockedState::Cancelled as u8, Ordering::Release);
    let _ = context.clear_flags(ContextFlags::IN_SERIALIZATION_QUEUE);
    // This cancel owns the operation (invariant 3): complete it. A second completion is reported
    // by `complete_request` itself.
    let _ = context.complete_request(NtStatus::CANCELLED, 0);
    // Invariant 4: the queue's reference goes only now, with no lock held.
    drop(removed);
    queue.notify();
    true
}
