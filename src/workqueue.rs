//! Deferral of DISPATCH-level cancels: RDBSS never runs a minirdr cancel routine at
//! `DISPATCH_LEVEL`; a cancel that arrives there marks the context at once and posts the routine
//! to a work queue that runs it below DISPATCH (`RxDispatchToWorkerThread`).
//!
//! The queue is a trait the embedder implements ([`WorkQueue`]); two implementations come with
//! the crate: [`ManualWorkQueue`] (items wait until the embedder calls `run_pending`, for
//! deterministic simulators and `no_std`) and, with `std`, [`ThreadWorkQueue`] (worker threads).
//!
//! # Invariants
//!
//! 1. A [`DeferredCancel`] holds a counted reference to its context, so the context outlives the
//!    deferral, and the claimed routine, which nobody else can call any more (`context`
//!    invariant 3): running the item is its one call; dropping it unrun loses that call.
//! 2. [`DeferredCancel::run`] checks that it runs below `DISPATCH_LEVEL`.

use alloc::collections::VecDeque;
use alloc::sync::Arc;
use core::fmt;

use crate::context::{CancelOutcome, CancelRoutine};
use crate::irql::{self, Irql};
use crate::registry::{ContextRef, RequestId};
use crate::spinlock::KSpinLock;

/// A cancel routine claimed at `DISPATCH_LEVEL`, waiting to run below it.
#[must_use = "the claimed cancel routine runs only if the item is run"]
pub struct DeferredCancel<M> {
    context: ContextRef<M>,
    routine: CancelRoutine<M>,
}

impl<M> DeferredCancel<M> {
    pub(crate) fn new(context: ContextRef<M>, routine: CancelRoutine<M>) -> Self {
        DeferredCancel { context, routine }
    }

    /// The request whose routine this is.
    pub fn id(&self) -> RequestId {
        self.context.id()
    }

    /// Calls the routine (invariant 2: below DISPATCH, else `DRIVER_IRQL_NOT_LESS_OR_EQUAL`) and
    /// then drops the context reference.
    #[track_caller]
    pub fn run(self) -> CancelOutcome {
        irql::require_at_most(
            Irql::APC,
            "deferred minirdr cancel routine run at DISPATCH_LEVEL or above",
        );
        CancelOutcome::RoutineCalled((self.routine)(&self.context))
    }
}

impl<M> fmt::Debug for DeferredCancel<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeferredCancel")
            .field("id", &self.id())
            .finish_non_exhaustive()
    }
}

/// Where an [`Rdbss`](crate::Rdbss) instance posts cancels that arrive at `DISPATCH_LEVEL`.
///
/// `post` may be called at DISPATCH: it must not block, and it must not run the item itself.
/// Every posted item should eventually be [`run`](DeferredCancel::run) below DISPATCH.
pub trait WorkQueue<M>: Send + Sync {
    /// Queues `work` to run later below `DISPATCH_LEVEL`.
    fn post(&self, work: DeferredCancel<M>);
}

/// A queue that holds posted items until [`run_pending`](Self::run_pending) is called: for
/// single-threaded, deterministic simulators and for `no_std` embedders.
///
/// A pending item holds a reference to its context, and so keeps the instance (which owns this
/// queue) alive, as a queued work item keeps a Windows device from unloading: run the pending
/// items before dropping the last handles, or the instance, its queue and the items are never
/// freed.
pub struct ManualWorkQueue<M> {
    items: KSpinLock<VecDeque<DeferredCancel<M>>>,
}

impl<M> ManualWorkQueue<M> {
    /// An empty queue, shareable with an instance.
    pub fn new() -> Arc<Self> {
        Arc::new(ManualWorkQueue {
            items: KSpinLock::new(VecDeque::new()),
        })
    }

    /// How many items wait.
    pub fn len(&self) -> usize {
        self.items.lock().len()
    }

    /// Whether no item waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Runs every waiting item, in posting order, each outside the queue's lock; returns how many
    /// ran. Must be called below `DISPATCH_LEVEL`.
    pub fn run_pending(&self) -> usize {
        let mut ran = 0;
        loop {
            let next = self.items.lock().pop_front();
            match next {
                Some(work) => {
                    let _ = work.run();
                    ran += 1;
                }
                None => return ran,
            }
        }
    }
}

impl<M: Send + Sync> WorkQueue<M> for ManualWorkQueue<M> {
    fn post(&self, work: DeferredCancel<M>) {
        self.items.lock().push_back(work);
    }
}

impl<M> fmt::Debug for ManualWorkQueue<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManualWorkQueue")
            .field("pending", &self.len())
            .finish()
    }
}

/// Worker threads (each at `PASSIVE_LEVEL`) that run posted items as they arrive.
///
/// Workers stop once the queue is dropped and they have run every item already posted. They are
/// not joined on drop (the last reference to an instance may be dropped on a worker).
#[cfg(all(feature = "std", not(loom)))]
pub struct ThreadWorkQueue<M> {
    sender: std::sync::mpsc::Sender<DeferredCancel<M>>,
    threads: usize,
}

#[cfg(all(feature = "std", not(loom)))]
impl<M: Send + Sync + 'static> ThreadWorkQueue<M> {
    /// Starts `threads` workers (at least one).
    pub fn new(threads: usize) -> Arc<Self> {
        let threads = threads.max(1);
        let (sender, receiver) = std::sync::mpsc::channel::<DeferredCancel<M>>();
        let receiver = Arc::new(std::sync::Mutex::new(receiver));
        for n in 0..threads {
            let receiver = receiver.clone();
            std::thread::Builder::new()
                .name(alloc::format!("rdbss-worker-{n}"))
                .spawn(move || loop {
                    let next = receiver.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    match next {
                        Ok(work) => {
                            let _ = work.run();
                        }
                        Err(_) => return,
                    }
                })
                .expect("spawning an rdbss worker thread");
        }
        Arc::new(ThreadWorkQueue { sender, threads })
    }
}

#[cfg(all(feature = "std", not(loom)))]
impl<M: Send + Sync> WorkQueue<M> for ThreadWorkQueue<M> {
    fn post(&self, work: DeferredCancel<M>) {
        // The workers hold the receiver until every sender (this queue) is gone, so this only
        // fails if every worker panicked; the item is then dropped, and its reference with it.
        let _ = self.sender.send(work);
    }
}

#[cfg(all(feature = "std", not(loom)))]
impl<M> fmt::Debug for ThreadWorkQueue<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ThreadWorkQueue")
            .field("threads", &self.threads)
            .finish()
    }
}
