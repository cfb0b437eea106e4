//! `KSPIN_LOCK`: a spin lock that raises to `DISPATCH_LEVEL` while held, and knows its owner.
//!
//! Built on `spin::Mutex` in normal builds and on loom's mutex under `--cfg loom` (through the
//! `sync` facade), so loom explores every order in which processors take it.
//!
//! # Invariants
//!
//! 1. Acquire order is: check ownership, raise to DISPATCH (which is the IRQL rule check: above
//!    DISPATCH it is `IRQL_NOT_GREATER_OR_EQUAL`), take the lock, record the owner. Release is the
//!    exact reverse, so the saved IRQL is restored only after the lock is free.
//! 2. `owner` is the id of the processor holding the lock, or 0. Only the holder writes its own id
//!    and only the holder clears it, so a processor that reads its own id there holds the lock: that
//!    is the `SPIN_LOCK_ALREADY_OWNED` bug check, raised instead of spinning forever.
//! 3. A guard is not `Send`: the processor that raised the IRQL is the one that restores it.
//! 4. A guard's inner mutex guard and IRQL guard are live from construction until its `drop`,
//!    which drops each exactly once, in the order of invariant 1; nothing touches them afterwards.

use core::fmt;
use core::marker::PhantomData;
use core::mem::ManuallyDrop;
use core::ops::{Deref, DerefMut};

use crate::bugcheck::{self, BugCheck, BugCheckCode};
use crate::irql::{self, Irql, IrqlGuard};
use crate::sync::untracked::{AtomicUsize, Ordering};
use crate::sync::{Mutex, MutexGuard};

/// A spin lock protecting a `T`, with Windows' IRQL and ownership rules.
///
/// ```
/// use rdbss::irql::{self, Irql};
/// use rdbss::KSpinLock;
///
/// let lock = KSpinLock::new(0_u32);
/// {
///     let mut guard = lock.lock();
///     assert_eq!(irql::current(), Irql::DISPATCH);
///     *guard += 1;
/// }
/// assert_eq!(irql::current(), Irql::PASSIVE);
/// assert_eq!(lock.into_inner(), 1);
/// ```
#[doc(alias = "KSPIN_LOCK")]
pub struct KSpinLock<T> {
    owner: AtomicUsize,
    inner: Mutex<T>,
}

impl<T> KSpinLock<T> {
    /// A free lock protecting `value` (`KeInitializeSpinLock`).
    #[doc(alias = "KeInitializeSpinLock")]
    #[cfg(not(loom))]
    pub const fn new(value: T) -> Self {
        KSpinLock {
            owner: AtomicUsize::new(0),
            inner: Mutex::new(value),
        }
    }

    /// A free lock protecting `value` (`KeInitializeSpinLock`).
    #[doc(alias = "KeInitializeSpinLock")]
    #[cfg(loom)]
    pub fn new(value: T) -> Self {
        KSpinLock {
            owner: AtomicUsize::new(0),
            inner: Mutex::new(value),
        }
    }

    /// Acquires the lock (`KeAcquireSpinLock`), raising to `DISPATCH_LEVEL` until the guard drops.
    ///
    /// Bug checks: `SPIN_LOCK_ALREADY_OWNED` if this processor holds it already (fatal under every
    /// policy: going on would spin forever); `IRQL_NOT_GREATER_OR_EQUAL` if called above DISPATCH.
    #[doc(alias = "KeAcquireSpinLock")]
    #[inline]
    #[track_caller]
    pub fn lock(&self) -> KSpinLockGuard<'_, T> {
        self.lock_from(irql::current())
    }

    /// [`lock`](Self::lock) for a caller that has just read the current IRQL (`now`).
    #[inline]
    #[track_caller]
    pub(crate) fn lock_from(&self, now: Irql) -> KSpinLockGuard<'_, T> {
        let me = irql::current_processor();
        // Invariant 2: only we could have stored our own id.
        if self.owner.load(Ordering::Relaxed) == me {
            self.already_owned(me);
        }
        // Invariant 1: raise first (the IRQL check), then spin.
        let irql = irql::raise_guard_from(now, Irql::DISPATCH);
        let inner = self.inner.lock();
        self.owner.store(me, Ordering::Relaxed);
        KSpinLockGuard::new(self, inner, irql)
    }

    #[cold]
    #[inline(never)]
    #[track_caller]
    fn already_owned(&self, me: usize) {
        bugcheck::report(BugCheck {
            code: BugCheckCode::SPIN_LOCK_ALREADY_OWNED,
            parameters: [self as *const Self as usize, me, 0, 0],
            description: "KeAcquireSpinLock on a lock this processor already holds",
        });
    }

    /// Acquires the lock if it is free (`KeTryToAcquireSpinLockAtDpcLevel`-like), else `None`.
    ///
    /// Unlike [`lock`](Self::lock), this never bug checks on a lock the caller holds: it just
    /// reports it as busy.
    #[track_caller]
    pub fn try_lock(&self) -> Option<KSpinLockGuard<'_, T>> {
        let me = irql::current_processor();
        let irql = irql::raise(Irql::DISPATCH);
        let inner = self.inner.try_lock()?;
        self.owner.store(me, Ordering::Relaxed);
        Some(KSpinLockGuard::new(self, inner, irql))
    }

    /// Whether the calling processor holds this lock.
    pub fn is_held_by_current_processor(&self) -> bool {
        self.owner.load(Ordering::Relaxed) == irql::current_processor()
    }

    /// The protected value, without locking (the `&mut` proves nobody else holds it).
    pub fn get_mut(&mut self) -> &mut T {
        self.inner.get_mut()
    }

    /// Consumes the lock and returns the value.
    pub fn into_inner(self) -> T {
        self.inner.into_inner()
    }
}

impl<T: Default> Default for KSpinLock<T> {
    fn default() -> Self {
        KSpinLock::new(T::default())
    }
}

impl<T> fmt::Debug for KSpinLock<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let owner = self.owner.load(Ordering::Relaxed);
        f.debug_struct("KSpinLock")
            .field("owner", &(owner != 0).then_some(owner))
            .finish_non_exhaustive()
    }
}

/// Holds a [`KSpinLock`]; releasing it (`KeReleaseSpinLock`) restores the saved IRQL.
#[must_use = "dropping the guard releases the lock at once"]
pub struct KSpinLockGuard<'a, T> {
    lock: &'a KSpinLock<T>,
    // Invariant 4: live until `drop`, which drops each once, in the order of invariant 1.
    inner: ManuallyDrop<MutexGuard<'a, T>>,
    irql: ManuallyDrop<IrqlGuard>,
    _not_send: PhantomData<*const ()>,
}

impl<'a, T> KSpinLockGuard<'a, T> {
    #[inline]
    fn new(lock: &'a KSpinLock<T>, inner: MutexGuard<'a, T>, irql: IrqlGuard) -> Self {
        KSpinLockGuard {
            lock,
            inner: ManuallyDrop::new(inner),
            irql: ManuallyDrop::new(irql),
            _not_send: PhantomData,
        }
    }

    /// The IRQL that releasing the lock restores.
    pub fn saved_irql(&self) -> Irql {
        self.irql.saved()
    }
}

impl<T> Deref for KSpinLockGuard<'_, T> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        &self.inner
    }
}

impl<T> DerefMut for KSpinLockGuard<'_, T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        &mut self.inner
    }
}

impl<T> Drop for KSpinLockGuard<'_, T> {
    #[doc(alias = "KeReleaseSpinLock")]
    #[inline]
    fn drop(&mut self) {
        // Invariant 1, reversed: forget the owner, free the lock, then lower the IRQL.
        self.lock.owner.store(0, Ordering::Relaxed);
        // SAFETY: invariant 4. `inner` was initialised in `new`, is dropped only here, and this
        // guard is never used again after `drop` returns.
        unsafe { ManuallyDrop::drop(&mut self.inner) };
        // SAFETY: invariant 4, as for `inner`; dropped after it, so the IRQL is restored only once
        // the lock is free.
        unsafe { ManuallyDrop::drop(&mut self.irql) };
    }
}

impl<T: fmt::Debug> fmt::Debug for KSpinLockGuard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KSpinLockGuard")
            .field("value", &**self)
            .field("saved_irql", &self.saved_irql())
            .finish()
    }
}
