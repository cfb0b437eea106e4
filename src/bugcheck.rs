//! Emulated bug checks (`KeBugCheckEx`): what Windows does when a driver breaks an IRQL or
//! completion rule, and what the embedder wants done about it here.
//!
//! The process-wide [`BugCheckPolicy`] decides: [`BugCheckPolicy::Panic`] (the default) panics with
//! the bug check's name and code, the way a test wants; [`BugCheckPolicy::Record`] counts it, keeps
//! the most recent ones readable, and lets the caller go on, the way a simulator that wants a
//! report instead of a crash wants.
//!
//! # Invariants
//!
//! 1. Every reported bug check increments [`count`], whatever the policy, before anything else.
//! 2. Under `Record`, the last [`RECENT_CAPACITY`] bug checks are readable through [`recent`],
//!    oldest first; older ones are dropped, never the newest.
//! 3. A bug check that cannot be continued from ([`BugCheck::is_fatal`], e.g. re-acquiring a spin
//!    lock the processor holds, where continuing would hang) panics under every policy, after
//!    being recorded.
//! 4. The policy, the counter and the ring are process-wide diagnostics, kept on `core` atomics and
//!    a `spin` mutex outside loom's model (see `sync` invariant 2): like a machine, a process has
//!    one bug-check policy.

use alloc::vec::Vec;
use core::fmt;

use crate::sync::untracked::{AtomicU8, AtomicUsize, Ordering};

/// A Windows bug-check code (`STOP` code).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(transparent)]
pub struct BugCheckCode(pub u32);

impl BugCheckCode {
    /// `IRQL_NOT_GREATER_OR_EQUAL` (0x9): `KeRaiseIrql` to a level below the current one; also
    /// what acquiring a spin lock above `DISPATCH_LEVEL` gives, since acquiring raises to DISPATCH.
    pub const IRQL_NOT_GREATER_OR_EQUAL: BugCheckCode = BugCheckCode(0x09);
    /// `IRQL_NOT_LESS_OR_EQUAL` (0xA): `KeLowerIrql` to a level above the current one, or a wait
    /// at `DISPATCH_LEVEL` or above.
    pub const IRQL_NOT_LESS_OR_EQUAL: BugCheckCode = BugCheckCode(0x0A);
    /// `SPIN_LOCK_ALREADY_OWNED` (0xF): a processor acquired a spin lock it already holds.
    pub const SPIN_LOCK_ALREADY_OWNED: BugCheckCode = BugCheckCode(0x0F);
    /// `SPIN_LOCK_NOT_OWNED` (0x10): a spin lock released by a processor that does not hold it.
    pub const SPIN_LOCK_NOT_OWNED: BugCheckCode = BugCheckCode(0x10);
    /// `MULTIPLE_IRP_COMPLETE_REQUESTS` (0x44): a request completed twice.
    pub const MULTIPLE_IRP_COMPLETE_REQUESTS: BugCheckCode = BugCheckCode(0x44);
    /// `DRIVER_IRQL_NOT_LESS_OR_EQUAL` (0xD1): a driver routine called above the IRQL its
    /// documentation allows (e.g. `RxSetMinirdrCancelRoutine` above `APC_LEVEL`).
    pub const DRIVER_IRQL_NOT_LESS_OR_EQUAL: BugCheckCode = BugCheckCode(0xD1);

    /// The bug check's Windows name, or `None` for a code this crate does not raise.
    pub const fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            0x09 => "IRQL_NOT_GREATER_OR_EQUAL",
            0x0A => "IRQL_NOT_LESS_OR_EQUAL",
            0x0F => "SPIN_LOCK_ALREADY_OWNED",
            0x10 => "SPIN_LOCK_NOT_OWNED",
            0x44 => "MULTIPLE_IRP_COMPLETE_REQUESTS",
            0xD1 => "DRIVER_IRQL_NOT_LESS_OR_EQUAL",
            _ => return None,
        })
    }
}

impl fmt::Display for BugCheckCode {
    /// `NAME (0x0000000A)`, as a debugger prints a stop code.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name} ({:#010X})", self.0),
            None => write!(f, "BUGCHECK ({:#010X})", self.0),
        }
    }
}

impl fmt::Debug for BugCheckCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// One emulated bug check: the code, its four parameters, and what the emulator caught.
///
/// Parameter meanings follow Windows where Windows defines them (for the IRQL checks: parameter 2
/// is the IRQL at the time); the rest are documented per raising site in `docs/conformance.md`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct BugCheck {
    /// The stop code.
    pub code: BugCheckCode,
    /// `BugCheckParameter1..4`.
    pub parameters: [usize; 4],
    /// A one-line description of the violation, naming the routine that caught it.
    pub description: &'static str,
}

impl BugCheck {
    /// Whether execution cannot continue past this bug check even under
    /// [`BugCheckPolicy::Record`] (invariant 3).
    pub const fn is_fatal(&self) -> bool {
        self.code.0 == BugCheckCode::SPIN_LOCK_ALREADY_OWNED.0
    }
}

impl fmt::Display for BugCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [p1, p2, p3, p4] = self.parameters;
        write!(
            f,
            "*** STOP: {} ({p1:#x}, {p2:#x}, {p3:#x}, {p4:#x}): {}",
            self.code, self.description
        )
    }
}

impl core::error::Error for BugCheck {}

/// What happens when a rule is broken.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum BugCheckPolicy {
    /// Panic with the bug check's name and code (the default, and what tests want).
    #[default]
    Panic,
    /// Count it, keep it in [`recent`], and continue as if the rule had not been broken.
    /// Fatal bug checks still panic (see [`BugCheck::is_fatal`]).
    Record,
}

/// How many recent bug checks [`recent`] keeps.
pub const RECENT_CAPACITY: usize = 16;

struct Ring {
    entries: [Option<BugCheck>; RECENT_CAPACITY],
    next: usize,
}

static POLICY: AtomicU8 = AtomicU8::new(0);
static COUNT: AtomicUsize = AtomicUsize::new(0);
static RECENT: spin::Mutex<Ring> = spin::Mutex::new(Ring {
    entries: [None; RECENT_CAPACITY],
    next: 0,
});

/// Sets the process-wide policy and returns the previous one.
pub fn set_policy(policy: BugCheckPolicy) -> BugCheckPolicy {
    let raw = match policy {
        BugCheckPolicy::Panic => 0,
        BugCheckPolicy::Record => 1,
    };
    decode(POLICY.swap(raw, Ordering::AcqRel))
}

/// The process-wide policy in force.
pub fn policy() -> BugCheckPolicy {
    decode(POLICY.load(Ordering::Acquire))
}

fn decode(raw: u8) -> BugCheckPolicy {
    if raw == 1 {
        BugCheckPolicy::Record
    } else {
        BugCheckPolicy::Panic
    }
}

/// How many bug checks have been reported since start (or the last [`clear`]).
pub fn count() -> usize {
    COUNT.load(Ordering::Acquire)
}

/// The most recent bug checks, oldest first, at most [`RECENT_CAPACITY`] (invariant 2).
pub fn recent() -> Vec<BugCheck> {
    let ring = RECENT.lock();
    let mut out = Vec::with_capacity(RECENT_CAPACITY);
    for i in 0..RECENT_CAPACITY {
        if let Some(bc) = ring.entries[(ring.next + i) % RECENT_CAPACITY] {
            out.push(bc);
        }
    }
    out
}

/// Resets the counter and forgets the recent bug checks.
pub fn clear() {
    let mut ring = RECENT.lock();
    ring.entries = [None; RECENT_CAPACITY];
    ring.next = 0;
    COUNT.store(0, Ordering::Release);
}

/// Reports a bug check (`KeBugCheckEx`): records it, then panics or returns per the policy.
///
/// Returns only under [`BugCheckPolicy::Record`] and only for a non-fatal bug check; the caller
/// then continues as if the rule had not been broken. Embedders may report their own bug checks.
#[doc(alias = "KeBugCheckEx")]
#[track_caller]
pub fn report(bug_check: BugCheck) {
    // Invariant 1: count first, under every policy.
    COUNT.fetch_add(1, Ordering::AcqRel);
    match policy() {
        BugCheckPolicy::Panic => panic!("{bug_check}"),
        BugCheckPolicy::Record => {
            {
                let mut ring = RECENT.lock();
                let slot = ring.next;
                ring.entries[slot] = Some(bug_check);
                ring.next = (slot + 1) % RECENT_CAPACITY;
            }
            // Invariant 3: recorded, but there is no way to go on.
            if bug_check.is_fatal() {
                panic!("{bug_check} (fatal: cannot continue under BugCheckPolicy::Record)");
            }
        }
    }
}
