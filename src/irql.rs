//! IRQL emulation: each thread is an emulated processor with a current interrupt request level,
//! and every documented IRQL rule is checked with an emulated bug check.
//!
//! | rule | Windows routine | bug check |
//! |---|---|---|
//! | raise to a level below the current one | `KeRaiseIrql` | `IRQL_NOT_GREATER_OR_EQUAL` (0x9) |
//! | lower to a level above the current one | `KeLowerIrql` | `IRQL_NOT_LESS_OR_EQUAL` (0xA) |
//! | acquire a spin lock above `DISPATCH_LEVEL` | `KeAcquireSpinLock` (raises to DISPATCH) | `IRQL_NOT_GREATER_OR_EQUAL` (0x9) |
//! | call a routine documented `<= APC_LEVEL` above it | [`require_at_most`] | `DRIVER_IRQL_NOT_LESS_OR_EQUAL` (0xD1) |
//! | block or wait at `DISPATCH_LEVEL` or above | [`require_can_wait`] | `IRQL_NOT_LESS_OR_EQUAL` (0xA) |
//!
//! Where the current IRQL lives:
//! - with `std` (the default): a thread-local per OS thread, starting at `PASSIVE_LEVEL`;
//! - under `--cfg loom`: a loom thread-local, so each modelled thread starts at `PASSIVE_LEVEL`;
//! - without `std`: an embedder-provided [`ProcessorHook`] installed once with
//!   `install_processor_hook` (only without `std`); until then a single emulated processor whose
//!   IRQL is one global (the right model for a single-core target where "thread" means
//!   "interrupt nesting level").
//!
//! # Invariants
//!
//! 1. A processor's IRQL only changes through [`raise`] / [`lower`] (and the guards built on them),
//!    and each change checks the direction rule above before it happens.
//! 2. An [`IrqlGuard`] restores exactly the level it saved, through [`lower`], so a guard dropped
//!    out of order is caught as the bug check it would be in Windows.
//! 3. Under [`BugCheckPolicy::Record`](crate::BugCheckPolicy::Record) a violated rule is recorded
//!    and the change still happens, so the caller's view of the IRQL never diverges from the
//!    emulated one.
//! 4. A guard dropped while its thread unwinds from a panic restores its level without checks, so
//!    a bug check never turns into a double panic (an abort).

use core::fmt;

use crate::bugcheck::{self, BugCheck, BugCheckCode};

/// An interrupt request level, with its Windows (x64) number.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(transparent)]
pub struct Irql(u8);

impl Irql {
    /// `PASSIVE_LEVEL` (0): normal thread execution.
    #[doc(alias = "PASSIVE_LEVEL")]
    pub const PASSIVE: Irql = Irql(0);
    /// `APC_LEVEL` (1): asynchronous procedure calls are masked.
    #[doc(alias = "APC_LEVEL")]
    pub const APC: Irql = Irql(1);
    /// `DISPATCH_LEVEL` (2): the scheduler is masked; spin locks are held here.
    #[doc(alias = "DISPATCH_LEVEL")]
    pub const DISPATCH: Irql = Irql(2);
    /// `CMCI_LEVEL` (5).
    #[doc(alias = "CMCI_LEVEL")]
    pub const CMCI: Irql = Irql(5);
    /// `CLOCK_LEVEL` (13).
    #[doc(alias = "CLOCK_LEVEL")]
    pub const CLOCK: Irql = Irql(13);
    /// `IPI_LEVEL` (14), also `POWER_LEVEL` and `DRS_LEVEL`.
    #[doc(alias = "IPI_LEVEL")]
    #[doc(alias = "POWER_LEVEL")]
    pub const IPI: Irql = Irql(14);
    /// `HIGH_LEVEL` (15), also `PROFILE_LEVEL`: the highest level on x64.
    #[doc(alias = "HIGH_LEVEL")]
    #[doc(alias = "PROFILE_LEVEL")]
    pub const HIGH: Irql = Irql(15);

    /// The level with Windows number `level`, or `None` above `HIGH_LEVEL` (15).
    pub const fn new(level: u8) -> Option<Irql> {
        if level <= Self::HIGH.0 {
            Some(Irql(level))
        } else {
            None
        }
    }

    /// The Windows number of this level.
    pub const fn level(self) -> u8 {
        self.0
    }

    /// The Windows name of this level (`DIRQL` for the device levels 3..=12 and the unnamed ones).
    pub const fn name(self) -> &'static str {
        match self.0 {
            0 => "PASSIVE_LEVEL",
            1 => "APC_LEVEL",
            2 => "DISPATCH_LEVEL",
            5 => "CMCI_LEVEL",
            13 => "CLOCK_LEVEL",
            14 => "IPI_LEVEL",
            15 => "HIGH_LEVEL",
            _ => "DIRQL",
        }
    }
}

impl fmt::Display for Irql {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}

impl fmt::Debug for Irql {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Where a `no_std` embedder keeps the current IRQL and processor identity.
///
/// Install one with `install_processor_hook` (only without `std`) before the first IRQL operation.
/// Implementations must return the calling processor's own state: `current_irql` must return what
/// the last `set_current_irql` on the same processor stored, and `current_processor` a non-zero id
/// that is distinct for processors that can run concurrently.
pub trait ProcessorHook: Sync {
    /// The calling processor's current IRQL.
    fn current_irql(&self) -> Irql;
    /// Stores the calling processor's new IRQL (the checks have already been done).
    fn set_current_irql(&self, irql: Irql);
    /// A non-zero id of the calling processor.
    fn current_processor(&self) -> usize;
}

/// The default hook without `std`: one processor, its IRQL in a global.
#[cfg(not(any(feature = "std", loom)))]
struct Uniprocessor(crate::sync::untracked::AtomicU8);

#[cfg(not(any(feature = "std", loom)))]
impl ProcessorHook for Uniprocessor {
    fn current_irql(&self) -> Irql {
        Irql(self.0.load(crate::sync::untracked::Ordering::Acquire))
    }
    fn set_current_irql(&self, irql: Irql) {
        self.0
            .store(irql.0, crate::sync::untracked::Ordering::Release);
    }
    fn current_processor(&self) -> usize {
        1
    }
}

#[cfg(not(any(feature = "std", loom)))]
static UNIPROCESSOR: Uniprocessor = Uniprocessor(crate::sync::untracked::AtomicU8::new(0));

#[cfg(not(any(feature = "std", loom)))]
static HOOK: spin::Once<&'static dyn ProcessorHook> = spin::Once::new();

/// The hook was already installed (or the default was already used); the first one stays.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct HookAlreadyInstalled;

impl fmt::Display for HookAlreadyInstalled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a processor hook is already installed")
    }
}

/// Installs the embedder's processor hook (no `std` only). Fails if a hook is already installed
/// or the single-processor default has already been used.
#[cfg(not(any(feature = "std", loom)))]
pub fn install_processor_hook(
    hook: &'static dyn ProcessorHook,
) -> Result<(), HookAlreadyInstalled> {
    let mut installed = false;
    HOOK.call_once(|| {
        installed = true;
        hook
    });
    if installed {
        Ok(())
    } else {
        Err(HookAlreadyInstalled)
    }
}

#[cfg(not(any(feature = "std", loom)))]
#[inline]
fn hook() -> &'static dyn ProcessorHook {
    *HOOK.call_once(|| &UNIPROCESSOR)
}

/// The calling processor's current IRQL (`KeGetCurrentIrql`).
#[doc(alias = "KeGetCurrentIrql")]
#[inline]
pub fn current() -> Irql {
    #[cfg(any(feature = "std", loom))]
    {
        crate::sync::with_thread_cpu(|cpu| Irql(cpu.irql.get()))
    }
    #[cfg(not(any(feature = "std", loom)))]
    {
        hook().current_irql()
    }
}

#[inline]
fn set_current(irql: Irql) {
    #[cfg(any(feature = "std", loom))]
    {
        crate::sync::with_thread_cpu(|cpu| cpu.irql.set(irql.0))
    }
    #[cfg(not(any(feature = "std", loom)))]
    {
        hook().set_current_irql(irql)
    }
}

/// A non-zero id of the calling emulated processor.
///
/// With `std` (and under loom) it is the address of the thread's processor record, which is
/// unique among live threads and costs no memory access to compute.
#[inline]
pub fn current_processor() -> usize {
    #[cfg(any(feature = "std", loom))]
    {
        crate::sync::with_thread_cpu(|cpu| cpu as *const crate::sync::ThreadCpu as usize)
    }
    #[cfg(not(any(feature = "std", loom)))]
    {
        hook().current_processor()
    }
}

/// `KeRaiseIrql`: raises the current IRQL to `new` and returns the previous level.
///
/// Raising to a level below the current one is the `IRQL_NOT_GREATER_OR_EQUAL` bug check.
/// Prefer [`raise`], whose guard restores the level.
#[doc(alias = "KeRaiseIrql")]
#[inline]
#[track_caller]
pub fn raise_raw(new: Irql) -> Irql {
    raise_from(current(), new)
}

/// [`raise_raw`] for a caller that has just read the current IRQL (`old`): saves a re-read on
/// the spin-lock hot path.
#[inline]
#[track_caller]
pub(crate) fn raise_from(old: Irql, new: Irql) -> Irql {
    if new < old {
        report_cold(
            BugCheckCode::IRQL_NOT_GREATER_OR_EQUAL,
            [old.0 as usize, new.0 as usize, 0, 0],
            "KeRaiseIrql to a level below the current IRQL",
        );
    }
    // Invariant 3: the change happens even when the violation was only recorded.
    set_current(new);
    old
}

/// `KeLowerIrql`: lowers the current IRQL to `new`.
///
/// Lowering to a level above the current one is the `IRQL_NOT_LESS_OR_EQUAL` bug check.
#[doc(alias = "KeLowerIrql")]
#[inline]
#[track_caller]
pub fn lower(new: Irql) {
    lower_from(current(), new);
}

/// [`lower`] for a caller that has just read the current IRQL (`old`).
#[inline]
#[track_caller]
fn lower_from(old: Irql, new: Irql) {
    if new > old {
        report_cold(
            BugCheckCode::IRQL_NOT_LESS_OR_EQUAL,
            [old.0 as usize, new.0 as usize, 0, 0],
            "KeLowerIrql to a level above the current IRQL",
        );
    }
    set_current(new);
}

/// The slow path of every IRQL check, kept out of line so the checks inline to a compare.
#[cold]
#[inline(never)]
#[track_caller]
fn report_cold(code: BugCheckCode, parameters: [usize; 4], description: &'static str) {
    bugcheck::report(BugCheck {
        code,
        parameters,
        description,
    });
}

/// Raises to `new` and returns a guard that lowers back to the saved level when dropped.
///
/// ```
/// use rdbss::irql::{self, Irql};
/// assert_eq!(irql::current(), Irql::PASSIVE);
/// {
///     let guard = irql::raise(Irql::DISPATCH);
///     assert_eq!(irql::current(), Irql::DISPATCH);
///     assert_eq!(guard.saved(), Irql::PASSIVE);
/// }
/// assert_eq!(irql::current(), Irql::PASSIVE);
/// ```
#[inline]
#[track_caller]
pub fn raise(new: Irql) -> IrqlGuard {
    raise_guard_from(current(), new)
}

/// [`raise`] for a caller that has just read the current IRQL (`old`).
#[inline]
#[track_caller]
pub(crate) fn raise_guard_from(old: Irql, new: Irql) -> IrqlGuard {
    IrqlGuard {
        saved: raise_from(old, new),
        _not_send: core::marker::PhantomData,
    }
}

/// Restores a saved IRQL when dropped (invariant 2). Not `Send`: an IRQL belongs to a processor.
#[must_use = "dropping the guard at once lowers the IRQL again"]
pub struct IrqlGuard {
    saved: Irql,
    _not_send: core::marker::PhantomData<*const ()>,
}

impl IrqlGuard {
    /// The level this guard restores.
    pub fn saved(&self) -> Irql {
        self.saved
    }
}

impl Drop for IrqlGuard {
    #[inline]
    fn drop(&mut self) {
        let now = current();
        // Invariant 4: no second bug check while unwinding (only asked on the violation path).
        if self.saved > now && crate::sync::panicking() {
            set_current(self.saved);
        } else {
            lower_from(now, self.saved);
        }
    }
}

impl fmt::Debug for IrqlGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IrqlGuard")
            .field("saved", &self.saved)
            .finish()
    }
}

/// Asserts that the caller runs at or below `max`, as the routine `routine` documents.
///
/// Above it, this is the `DRIVER_IRQL_NOT_LESS_OR_EQUAL` bug check (parameters: 0, current IRQL,
/// `max`, 0). Returns the current IRQL.
#[inline]
#[track_caller]
pub fn require_at_most(max: Irql, routine: &'static str) -> Irql {
    let now = current();
    if now > max {
        report_cold(
            BugCheckCode::DRIVER_IRQL_NOT_LESS_OR_EQUAL,
            [0, now.0 as usize, max.0 as usize, 0],
            routine,
        );
    }
    now
}

/// Asserts that the caller may block or wait: below `DISPATCH_LEVEL`.
///
/// At or above DISPATCH this is the `IRQL_NOT_LESS_OR_EQUAL` bug check (parameters: 0, current
/// IRQL, 0, 0). `what` names the wait, e.g. `"KeWaitForSingleObject"`.
#[doc(alias = "KeWaitForSingleObject")]
#[inline]
#[track_caller]
pub fn require_can_wait(what: &'static str) -> Irql {
    let now = current();
    if now >= Irql::DISPATCH {
        report_cold(
            BugCheckCode::IRQL_NOT_LESS_OR_EQUAL,
            [0, now.0 as usize, 0, 0],
            what,
        );
    }
    now
}
