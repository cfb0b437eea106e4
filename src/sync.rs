//! The synchronisation facade: the only module that knows about loom and shuttle.
//!
//! Every other module imports its atomics, its mutex and its per-thread state from here, so that a
//! `--cfg loom` build swaps all of them for loom's model-checked versions at once (and a
//! `--cfg shuttle` build for shuttle's randomly scheduled ones), and the rest of the crate is
//! written once.
//!
//! # Invariants
//!
//! 1. Under `--cfg loom`, every atomic and every lock that takes part in the cancel protocol
//!    (`AtomicU32`, `AtomicI32`, `Mutex`) is loom's, so loom sees every interleaving of them.
//! 2. [`untracked`] atomics are `core`'s even under loom. They are only used where a thread reads
//!    back its *own* write (the spin-lock owner check) or for process-wide diagnostics (bug-check
//!    counters), so leaving them out of the model loses no interleaving that matters and keeps the
//!    state space small.
//! 3. Under `--cfg loom` the crate must also be built with `--cfg crossbeam_loom`, so that the
//!    epoch-based reclamation of the registry is loom's too (a build without it is refused).
//! 4. The per-thread processor state ([`with_thread_cpu`]) is a `std` thread-local in normal builds
//!    and a loom thread-local under loom, so each loom thread starts at `PASSIVE_LEVEL` in every
//!    explored execution. Without `std` there are no threads: `irql` falls back to the embedder's
//!    hook instead.
//! 5. A thread's cached epoch handle ([`pin`]) is dropped by [`forget_cached_handle`] when its
//!    instance goes away on that thread; on other threads it lives until the thread pins another
//!    instance or exits (keeping only the collector's bookkeeping, not freed contexts, alive).
//! 6. Under `--cfg shuttle` (randomized schedules of larger scenarios than loom can explore, see
//!    the `shuttle-tests` crate), the atomics, the mutex and the per-thread processor state are
//!    shuttle's, so shuttle chooses who runs at each of them; crossbeam-epoch keeps its own real
//!    atomics (shuttle runs one thread at a time, so they stay correct, just not explored), and
//!    the per-thread epoch-handle cache is off (shuttle's threads share one OS thread). `loom` and
//!    `shuttle` exclude each other.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{
    fence, AtomicBool, AtomicI32, AtomicU32, AtomicU8, AtomicUsize, Ordering,
};

#[cfg(shuttle)]
pub(crate) use shuttle::sync::atomic::{
    fence, AtomicBool, AtomicI32, AtomicU32, AtomicU8, AtomicUsize, Ordering,
};

#[cfg(not(any(loom, shuttle)))]
pub(crate) use core::sync::atomic::{
    fence, AtomicBool, AtomicI32, AtomicU32, AtomicU8, AtomicUsize, Ordering,
};

#[cfg(all(loom, shuttle))]
compile_error!("--cfg loom and --cfg shuttle exclude each other");

// Epoch-based reclamation for the registry (`registry` invariants). Under loom, crossbeam-epoch
// must itself be built against loom, which it does under `--cfg crossbeam_loom`.
#[cfg(all(loom, not(crossbeam_loom)))]
compile_error!(
    "build loom tests with RUSTFLAGS=\"--cfg loom --cfg crossbeam_loom\" so that loom also models \
     crossbeam-epoch's atomics"
);
pub(crate) use crossbeam_epoch as epoch;

/// Atomics that stay outside loom's model (invariant 2).
pub(crate) mod untracked {
    pub(crate) use core::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
}

/// The mutex a [`crate::spinlock::KSpinLock`] is built on: `spin`'s in normal builds.
#[cfg(not(any(loom, shuttle)))]
pub(crate) type Mutex<T> = spin::Mutex<T>;
/// The guard of [`Mutex`].
#[cfg(not(any(loom, shuttle)))]
pub(crate) type MutexGuard<'a, T> = spin::MutexGuard<'a, T>;

/// The checker whose mutex [`Mutex`] wraps under `--cfg loom` or `--cfg shuttle`.
#[cfg(loom)]
use loom::sync as checker;
#[cfg(shuttle)]
use shuttle::sync as checker;

/// Under loom (or shuttle) the lock is the checker's own mutex, so the checker explores (or
/// picks) who gets it first (invariants 1 and 6); a spin loop would never yield to its scheduler.
#[cfg(any(loom, shuttle))]
#[derive(Debug)]
pub(crate) struct Mutex<T>(checker::Mutex<T>);
/// The guard of [`Mutex`].
#[cfg(any(loom, shuttle))]
pub(crate) type MutexGuard<'a, T> = checker::MutexGuard<'a, T>;

#[cfg(any(loom, shuttle))]
impl<T> Mutex<T> {
    /// Shuttle's mutex has a `const` constructor, which `KSpinLock::new` needs outside loom.
    #[cfg(shuttle)]
    pub(crate) const fn new(value: T) -> Self {
        Self(checker::Mutex::new(value))
    }

    #[cfg(loom)]
    pub(crate) fn new(value: T) -> Self {
        Self(checker::Mutex::new(value))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        // Poisoned only if a thread panicked while holding it, and that panic already fails the
        // test that caused it.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn try_lock(&self) -> Option<MutexGuard<'_, T>> {
        self.0.try_lock().ok()
    }

    pub(crate) fn into_inner(self) -> T {
        self.0
            .into_inner()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn get_mut(&mut self) -> &mut T {
        self.0
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One emulated processor's state: a thread is a processor, and the address of its record is the
/// processor's id (non-zero, unique among live threads).
#[cfg(any(feature = "std", loom))]
pub(crate) struct ThreadCpu {
    /// The current IRQL, as its Windows number.
    pub(crate) irql: core::cell::Cell<u8>,
}

#[cfg(all(feature = "std", not(loom), not(shuttle)))]
std::thread_local! {
    static THREAD_CPU: ThreadCpu = const { ThreadCpu { irql: core::cell::Cell::new(0) } };
}

#[cfg(shuttle)]
shuttle::thread_local! {
    static THREAD_CPU: ThreadCpu = ThreadCpu { irql: core::cell::Cell::new(0) };
}

#[cfg(loom)]
loom::thread_local! {
    static THREAD_CPU: ThreadCpu = ThreadCpu { irql: core::cell::Cell::new(0) };
}

/// Runs `f` on the calling thread's emulated processor (invariant 4).
#[cfg(any(feature = "std", loom))]
#[inline]
pub(crate) fn with_thread_cpu<R>(f: impl FnOnce(&ThreadCpu) -> R) -> R {
    THREAD_CPU.with(f)
}

// One registered epoch handle per thread, for the collector the thread used last (invariant 5).
#[cfg(all(feature = "std", not(loom), not(miri), not(shuttle)))]
std::thread_local! {
    static EPOCH_HANDLE: core::cell::RefCell<Option<epoch::LocalHandle>> =
        const { core::cell::RefCell::new(None) };
}

/// Pins the calling thread in `collector`'s epoch.
///
/// With `std` (not under loom, shuttle or Miri) each thread caches one registered handle, for the collector
/// it used last, so pinning costs no allocation in the common case of one instance per thread.
/// Elsewhere, or when the cache is busy (a destructor run by the collector pinning again), each
/// pin registers a fresh handle (an allocation).
pub(crate) fn pin(collector: &epoch::Collector) -> epoch::Guard {
    #[cfg(all(feature = "std", not(loom), not(miri), not(shuttle)))]
    {
        let cached = EPOCH_HANDLE.try_with(|cell| {
            let mut cell = cell.try_borrow_mut().ok()?;
            if let Some(handle) = cell.as_ref() {
                if handle.collector() == collector {
                    return Some(handle.pin());
                }
            }
            let handle = collector.register();
            let guard = handle.pin();
            *cell = Some(handle);
            Some(guard)
        });
        if let Ok(Some(guard)) = cached {
            return guard;
        }
    }
    collector.register().pin()
}

/// Drops the calling thread's cached handle if it belongs to `collector`. Called before the
/// collector's owner lets it go, so that a cached handle is never the last owner of a collector
/// on this thread and the collector's pending destructors run when the owner drops it.
pub(crate) fn forget_cached_handle(collector: &epoch::Collector) {
    #[cfg(all(feature = "std", not(loom), not(miri), not(shuttle)))]
    {
        let _ = EPOCH_HANDLE.try_with(|cell| {
            let stale = cell.try_borrow_mut().ok().and_then(|mut cell| {
                if cell.as_ref().is_some_and(|h| h.collector() == collector) {
                    cell.take()
                } else {
                    None
                }
            });
            // Dropped outside the borrow: finalising a handle may run destructors that pin.
            drop(stale);
        });
    }
    #[cfg(not(all(feature = "std", not(loom), not(miri), not(shuttle))))]
    let _ = collector;
}

/// Where `std` callers wait for a state change (`Rdbss::drain`, `BlockedQueue::wait`): a condition
/// variable and its mutex. A notifier changes the state first and then calls [`notify`]; a waiter
/// re-checks the state with the mutex held before each wait, so no wake-up is lost.
///
/// [`notify`]: WaitPoint::notify
#[cfg(all(feature = "std", not(loom)))]
#[derive(Default)]
pub(crate) struct WaitPoint {
    lock: std::sync::Mutex<()>,
    changed: std::sync::Condvar,
}

#[cfg(all(feature = "std", not(loom)))]
impl WaitPoint {
    /// Wakes every waiter, after the caller changed the state they wait for.
    ///
    /// The model's `KeSetEvent`, so callable at `DISPATCH_LEVEL`: it holds the host mutex only for
    /// an instant, and a waiter never holds it while asleep, so the notifier never blocks on a
    /// wait.
    pub(crate) fn notify(&self) {
        let _held = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.changed.notify_all();
    }

    /// Waits until `ready()` holds or `timeout` passes; returns whether it holds.
    pub(crate) fn wait_until(
        &self,
        timeout: core::time::Duration,
        mut ready: impl FnMut() -> bool,
    ) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut held = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if ready() {
                return true;
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return false;
            }
            held = self
                .changed
                .wait_timeout(held, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// Whether the calling thread is unwinding from a panic (guards then restore state quietly
/// instead of raising a second bug check, which would abort the process).
#[inline]
pub(crate) fn panicking() -> bool {
    #[cfg(any(feature = "std", loom))]
    {
        std::thread::panicking()
    }
    #[cfg(not(any(feature = "std", loom)))]
    {
        false
    }
}
