//! The synchronisation facade: the only module that knows about loom.
//!
//! Every other module imports its atomics, its mutex and its per-thread state from here, so that a
//! `--cfg loom` build swaps all of them for loom's model-checked versions at once and the rest of
//! the crate is written once.
//!
//! # Invariants
//!
//! 1. Under `--cfg loom`, every atomic and every lock that takes part in the cancel protocol
//!    (`AtomicU32`, `AtomicI32`, `Mutex`) is loom's, so loom sees every interleaving of them.
//! 2. [`untracked`] atomics are `core`'s even under loom. They are only used where a thread reads
//!    back its *own* write (the spin-lock owner check) or for process-wide diagnostics (bug-check
//!    counters), so leaving them out of the model loses no interleaving that matters and keeps the
//!    state space small.
//! 3. The per-thread processor state ([`with_thread_cpu`]) is a `std` thread-local in normal builds
//!    and a loom thread-local under loom, so each loom thread starts at `PASSIVE_LEVEL` in every
//!    explored execution. Without `std` there are no threads: `irql` falls back to the embedder's
//!    hook instead.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicI32, AtomicU32, Ordering};

#[cfg(not(loom))]
pub(crate) use core::sync::atomic::{AtomicI32, AtomicU32, Ordering};

/// Atomics that stay outside loom's model (invariant 2).
pub(crate) mod untracked {
    pub(crate) use core::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
}

/// The mutex a [`crate::spinlock::KSpinLock`] is built on: `spin`'s in normal builds.
#[cfg(not(loom))]
pub(crate) type Mutex<T> = spin::Mutex<T>;
/// The guard of [`Mutex`].
#[cfg(not(loom))]
pub(crate) type MutexGuard<'a, T> = spin::MutexGuard<'a, T>;

/// Under loom the lock is loom's own mutex, so loom explores who gets it first (invariant 1).
#[cfg(loom)]
#[derive(Debug)]
pub(crate) struct Mutex<T>(loom::sync::Mutex<T>);
/// The guard of [`Mutex`].
#[cfg(loom)]
pub(crate) type MutexGuard<'a, T> = loom::sync::MutexGuard<'a, T>;

#[cfg(loom)]
impl<T> Mutex<T> {
    pub(crate) fn new(value: T) -> Self {
        Self(loom::sync::Mutex::new(value))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        // A loom mutex is only poisoned if a thread panicked while holding it, and a panic
        // already fails the loom test that caused it.
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

#[cfg(all(feature = "std", not(loom)))]
std::thread_local! {
    static THREAD_CPU: ThreadCpu = const { ThreadCpu { irql: core::cell::Cell::new(0) } };
}

#[cfg(loom)]
loom::thread_local! {
    static THREAD_CPU: ThreadCpu = ThreadCpu { irql: core::cell::Cell::new(0) };
}

/// Runs `f` on the calling thread's emulated processor (invariant 3).
#[cfg(any(feature = "std", loom))]
#[inline]
pub(crate) fn with_thread_cpu<R>(f: impl FnOnce(&ThreadCpu) -> R) -> R {
    THREAD_CPU.with(f)
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
