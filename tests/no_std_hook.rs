//! Without the `std` feature, the IRQL and processor id come from the embedder's
//! `irql::ProcessorHook`: installing one works once, and raise / lower, `KSpinLock`, the IRQL
//! checks and the cancel-routine protocol all go through it.
//!
//! Run with `cargo test --no-default-features --test no_std_hook`; in default (`std`) builds this
//! file compiles to nothing. The hook is process-global, so everything is one test.

#![cfg(not(feature = "std"))]

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use rdbss::irql::{self, HookAlreadyInstalled, Irql, ProcessorHook};
use rdbss::{CancelOutcome, Cancelled, KSpinLock, MajorFunction, NtStatus, RxContext};

/// An embedder's processor: its IRQL in an atomic, a fixed id, and a count of IRQL changes.
struct TestProcessor {
    irql: AtomicU8,
    id: usize,
    sets: AtomicUsize,
}

impl ProcessorHook for TestProcessor {
    fn current_irql(&self) -> Irql {
        Irql::new(self.irql.load(Ordering::SeqCst)).expect("hook holds a valid IRQL")
    }

    fn set_current_irql(&self, irql: Irql) {
        self.sets.fetch_add(1, Ordering::SeqCst);
        self.irql.store(irql.level(), Ordering::SeqCst);
    }

    fn current_processor(&self) -> usize {
        self.id
    }
}

static PROCESSOR: TestProcessor = TestProcessor {
    irql: AtomicU8::new(0),
    id: 7,
    sets: AtomicUsize::new(0),
};

/// A second hook that must never be used.
static OTHER: TestProcessor = TestProcessor {
    irql: AtomicU8::new(0),
    id: 99,
    sets: AtomicUsize::new(0),
};

#[derive(Default)]
struct Probe {
    calls: AtomicUsize,
    irql_seen: AtomicU8,
    sets_seen: AtomicUsize,
}

fn probe_routine(ctx: &RxContext<Probe>) -> NtStatus {
    let probe = ctx.minirdr();
    probe.calls.fetch_add(1, Ordering::SeqCst);
    probe
        .irql_seen
        .store(irql::current().level(), Ordering::SeqCst);
    probe
        .sets_seen
        .store(PROCESSOR.sets.load(Ordering::SeqCst), Ordering::SeqCst);
    NtStatus::REQUEST_ABORTED
}

fn sets() -> usize {
    PROCESSOR.sets.load(Ordering::SeqCst)
}

#[test]
fn embedder_processor_hook_drives_irql_spin_locks_and_cancel_protocol() {
    // Installing: once, before any IRQL operation; a second install is refused.
    assert_eq!(irql::install_processor_hook(&PROCESSOR), Ok(()));
    assert_eq!(
        irql::install_processor_hook(&OTHER),
        Err(HookAlreadyInstalled)
    );
    assert!(HookAlreadyInstalled
        .to_string()
        .contains("already installed"));

    // current() and current_processor() read the hook.
    assert_eq!(irql::current(), Irql::PASSIVE);
    assert_eq!(irql::current_processor(), 7);
    PROCESSOR.irql.store(Irql::APC.level(), Ordering::SeqCst);
    assert_eq!(
        irql::current(),
        Irql::APC,
        "current() does not read the hook"
    );
    PROCESSOR
        .irql
        .store(Irql::PASSIVE.level(), Ordering::SeqCst);

    // raise / guard drop write through the hook.
    let before = sets();
    {
        let guard = irql::raise(Irql::DISPATCH);
        assert_eq!(sets(), before + 1);
        assert_eq!(
            PROCESSOR.irql.load(Ordering::SeqCst),
            Irql::DISPATCH.level()
        );
        assert_eq!(irql::current(), Irql::DISPATCH);
        assert_eq!(guard.saved(), Irql::PASSIVE);
    }
    assert_eq!(sets(), before + 2);
    assert_eq!(irql::current(), Irql::PASSIVE);

    // KSpinLock raises to DISPATCH through the hook, and knows its owner by the hook's id.
    let lock = KSpinLock::new(0_u32);
    let before = sets();
    {
        let mut guard = lock.lock();
        *guard += 1;
        assert!(sets() > before);
        assert_eq!(
            PROCESSOR.irql.load(Ordering::SeqCst),
            Irql::DISPATCH.level()
        );
        assert!(lock.is_held_by_current_processor());
        assert!(lock.try_lock().is_none());
    }
    assert_eq!(PROCESSOR.irql.load(Ordering::SeqCst), Irql::PASSIVE.level());
    assert!(!lock.is_held_by_current_processor());

    // Re-acquiring on the hook's processor is still SPIN_LOCK_ALREADY_OWNED, with the hook's id.
    let reacquire = catch_unwind(AssertUnwindSafe(|| {
        let _first = lock.lock();
        let _second = lock.lock();
    }));
    let text = *reacquire
        .expect_err("re-acquire did not bug check")
        .downcast::<String>()
        .expect("bug check message");
    assert!(
        text.contains("SPIN_LOCK_ALREADY_OWNED (0x0000000F)"),
        "{text}"
    );
    assert!(text.contains(", 0x7, 0x0, 0x0)"), "{text}");
    // Unwinding released the first acquisition and lowered back through the hook.
    assert_eq!(irql::current(), Irql::PASSIVE);
    assert!(!lock.is_held_by_current_processor());

    // The cancel-routine protocol over the hook.
    let ctx = RxContext::new(MajorFunction::READ, Probe::default());
    let before = sets();
    assert_eq!(ctx.set_minirdr_cancel_routine(Some(probe_routine)), Ok(()));
    assert!(
        sets() >= before + 2,
        "arming did not raise/lower through the hook"
    );
    assert_eq!(irql::current(), Irql::PASSIVE);
    assert!(ctx.has_cancel_routine());
    assert_eq!(
        ctx.cancel(),
        CancelOutcome::RoutineCalled(NtStatus::REQUEST_ABORTED)
    );
    assert_eq!(ctx.minirdr().calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        ctx.minirdr().irql_seen.load(Ordering::SeqCst),
        Irql::PASSIVE.level(),
        "the routine must run below DISPATCH (the lock released first)"
    );
    assert!(ctx.minirdr().sets_seen.load(Ordering::SeqCst) >= before + 4);
    assert_eq!(ctx.cancel(), CancelOutcome::AlreadyCancelled);
    assert_eq!(ctx.set_minirdr_cancel_routine(None), Err(Cancelled));
    assert_eq!(ctx.minirdr().calls.load(Ordering::SeqCst), 1);

    // The IRQL rule reads the hook: DRIVER_IRQL_NOT_LESS_OR_EQUAL at the hook's DISPATCH.
    let fresh = RxContext::new(MajorFunction::WRITE, Probe::default());
    PROCESSOR
        .irql
        .store(Irql::DISPATCH.level(), Ordering::SeqCst);
    let result = catch_unwind(AssertUnwindSafe(|| {
        let _ = fresh.set_minirdr_cancel_routine(Some(probe_routine));
    }));
    PROCESSOR
        .irql
        .store(Irql::PASSIVE.level(), Ordering::SeqCst);
    let text = *result
        .expect_err("setter at the hook's DISPATCH did not bug check")
        .downcast::<String>()
        .expect("bug check message");
    assert!(
        text.starts_with(
            "*** STOP: DRIVER_IRQL_NOT_LESS_OR_EQUAL (0x000000D1) (0x0, 0x2, 0x1, 0x0)"
        ),
        "{text}"
    );
    assert!(!fresh.has_cancel_routine());

    // The other hook was never consulted.
    assert_eq!(OTHER.sets.load(Ordering::SeqCst), 0);
}
