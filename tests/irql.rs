//! IRQL emulation under the default `BugCheckPolicy::Panic`: level numbers, raise / lower and
//! their guards, every IRQL bug check (0x9, 0xA, 0xD1) and `SPIN_LOCK_ALREADY_OWNED` (0xF), the
//! `KSpinLock` IRQL and ownership rules, per-thread processors, and the `NtStatus` / bug-check
//! display formats.
//!
//! Each std thread is its own emulated processor, so these tests run in parallel safely; a
//! `#[should_panic]` test may panic with guards live (they restore quietly while unwinding).
//!
//! Needs the `std` feature: it relies on each std thread being its own emulated processor
//! (without `std` there is one global processor, see `tests/no_std_hook.rs`).

#![cfg(feature = "std")]

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Barrier};
use std::thread;
use std::time::Duration;

mod common;
use common::panic_text;
use rdbss::bugcheck::{self, BugCheck, BugCheckCode, BugCheckPolicy};
use rdbss::irql::{self, Irql};
use rdbss::{
    rx_set_minirdr_cancel_routine, CancelClaim, CancelOutcome, KSpinLock, MajorFunction, NtStatus,
    RxContext,
};

#[derive(Default)]
struct Calls(AtomicUsize);

fn count_call(ctx: &RxContext<Calls>) -> NtStatus {
    ctx.minirdr().0.fetch_add(1, Ordering::SeqCst);
    NtStatus::SUCCESS
}

fn armed() -> RxContext<Calls> {
    let ctx = RxContext::new(MajorFunction::READ, Calls::default());
    ctx.set_minirdr_cancel_routine(Some(count_call)).unwrap();
    ctx
}

// ---------------------------------------------------------------------------------------------
// Levels
// ---------------------------------------------------------------------------------------------

#[test]
fn irql_levels_have_x64_windows_numbers() {
    assert_eq!(Irql::PASSIVE.level(), 0);
    assert_eq!(Irql::APC.level(), 1);
    assert_eq!(Irql::DISPATCH.level(), 2);
    assert_eq!(Irql::CMCI.level(), 5);
    assert_eq!(Irql::CLOCK.level(), 13);
    assert_eq!(Irql::IPI.level(), 14);
    assert_eq!(Irql::HIGH.level(), 15);
    assert!(Irql::PASSIVE < Irql::APC && Irql::APC < Irql::DISPATCH);
    assert!(Irql::DISPATCH < Irql::CMCI && Irql::CMCI < Irql::CLOCK);
    assert!(Irql::CLOCK < Irql::IPI && Irql::IPI < Irql::HIGH);
}

#[test]
fn irql_new_accepts_0_to_15_and_rejects_16_and_above() {
    for level in 0..=15 {
        assert_eq!(Irql::new(level).map(Irql::level), Some(level));
    }
    assert_eq!(Irql::new(0), Some(Irql::PASSIVE));
    assert_eq!(Irql::new(2), Some(Irql::DISPATCH));
    assert_eq!(Irql::new(15), Some(Irql::HIGH));
    assert_eq!(Irql::new(16), None);
    assert_eq!(Irql::new(255), None);
}

#[test]
fn irql_names_and_display() {
    assert_eq!(Irql::PASSIVE.name(), "PASSIVE_LEVEL");
    assert_eq!(Irql::APC.name(), "APC_LEVEL");
    assert_eq!(Irql::DISPATCH.name(), "DISPATCH_LEVEL");
    assert_eq!(Irql::CMCI.name(), "CMCI_LEVEL");
    assert_eq!(Irql::CLOCK.name(), "CLOCK_LEVEL");
    assert_eq!(Irql::IPI.name(), "IPI_LEVEL");
    assert_eq!(Irql::HIGH.name(), "HIGH_LEVEL");
    assert_eq!(Irql::new(3).unwrap().name(), "DIRQL");
    assert_eq!(Irql::DISPATCH.to_string(), "DISPATCH_LEVEL (2)");
    assert_eq!(format!("{:?}", Irql::HIGH), "HIGH_LEVEL (15)");
}

// ---------------------------------------------------------------------------------------------
// Per-thread processors
// ---------------------------------------------------------------------------------------------

#[test]
fn each_thread_starts_at_passive_level() {
    assert_eq!(irql::current(), Irql::PASSIVE);
    let child = thread::spawn(irql::current).join().unwrap();
    assert_eq!(child, Irql::PASSIVE);
}

#[test]
fn thread_spawned_while_parent_is_at_dispatch_starts_at_passive() {
    let _dispatch = irql::raise(Irql::DISPATCH);
    assert_eq!(irql::current(), Irql::DISPATCH);
    let child = thread::spawn(irql::current).join().unwrap();
    assert_eq!(
        child,
        Irql::PASSIVE,
        "a new processor inherited its parent's IRQL"
    );
    assert_eq!(irql::current(), Irql::DISPATCH, "the parent's IRQL changed");
}

#[test]
fn concurrently_live_processors_have_distinct_nonzero_ids() {
    // Ids only need to be distinct among processors that can run at the same time, so every
    // thread stays alive until all ids have been read.
    const THREADS: usize = 4;
    let me = irql::current_processor();
    assert_ne!(me, 0);
    assert_eq!(
        irql::current_processor(),
        me,
        "a processor's id must be stable"
    );
    let all_read = Arc::new(Barrier::new(THREADS + 1));
    let (tx, rx) = mpsc::channel();
    let handles: Vec<_> = (0..THREADS)
        .map(|_| {
            let (all_read, tx) = (all_read.clone(), tx.clone());
            thread::spawn(move || {
                let id = irql::current_processor();
                tx.send(id).unwrap();
                all_read.wait();
                assert_eq!(irql::current_processor(), id, "id changed within a thread");
            })
        })
        .collect();
    let others: Vec<usize> = (0..THREADS).map(|_| rx.recv().unwrap()).collect();
    all_read.wait();
    for handle in handles {
        handle.join().unwrap();
    }
    for (i, id) in others.iter().enumerate() {
        assert_ne!(*id, 0);
        assert_ne!(*id, me);
        assert!(!others[..i].contains(id), "duplicate processor id {id:#x}");
    }
}

// ---------------------------------------------------------------------------------------------
// Raise and lower
// ---------------------------------------------------------------------------------------------

#[test]
fn raise_guard_raises_and_restores_saved_level() {
    assert_eq!(irql::current(), Irql::PASSIVE);
    {
        let guard = irql::raise(Irql::DISPATCH);
        assert_eq!(irql::current(), Irql::DISPATCH);
        assert_eq!(guard.saved(), Irql::PASSIVE);
    }
    assert_eq!(irql::current(), Irql::PASSIVE);
}

#[test]
fn raise_to_current_level_is_allowed() {
    let _dispatch = irql::raise(Irql::DISPATCH);
    {
        let again = irql::raise(Irql::DISPATCH);
        assert_eq!(again.saved(), Irql::DISPATCH);
        assert_eq!(irql::current(), Irql::DISPATCH);
    }
    assert_eq!(irql::current(), Irql::DISPATCH);
}

#[test]
fn nested_guards_restore_each_saved_level() {
    let apc = irql::raise(Irql::APC);
    assert_eq!(apc.saved(), Irql::PASSIVE);
    {
        let dispatch = irql::raise(Irql::DISPATCH);
        assert_eq!(dispatch.saved(), Irql::APC);
        {
            let high = irql::raise(Irql::HIGH);
            assert_eq!(high.saved(), Irql::DISPATCH);
            assert_eq!(irql::current(), Irql::HIGH);
        }
        assert_eq!(irql::current(), Irql::DISPATCH);
    }
    assert_eq!(irql::current(), Irql::APC);
    drop(apc);
    assert_eq!(irql::current(), Irql::PASSIVE);
}

#[test]
fn raise_raw_returns_previous_level_and_lower_restores_it() {
    let old = irql::raise_raw(Irql::APC);
    assert_eq!(old, Irql::PASSIVE);
    let old2 = irql::raise_raw(Irql::CLOCK);
    assert_eq!(old2, Irql::APC);
    assert_eq!(irql::current(), Irql::CLOCK);
    irql::lower(old2);
    assert_eq!(irql::current(), Irql::APC);
    irql::lower(Irql::APC); // lowering to the current level is allowed
    irql::lower(old);
    assert_eq!(irql::current(), Irql::PASSIVE);
}

#[test]
#[should_panic(
    expected = "*** STOP: IRQL_NOT_GREATER_OR_EQUAL (0x00000009) (0x2, 0x1, 0x0, 0x0): KeRaiseIrql"
)]
fn raise_to_lower_level_bug_checks_irql_not_greater_or_equal() {
    let _dispatch = irql::raise(Irql::DISPATCH);
    let _apc = irql::raise(Irql::APC);
}

#[test]
#[should_panic(
    expected = "*** STOP: IRQL_NOT_GREATER_OR_EQUAL (0x00000009) (0xf, 0x0, 0x0, 0x0): KeRaiseIrql"
)]
fn raise_raw_to_lower_level_bug_checks_irql_not_greater_or_equal() {
    irql::raise_raw(Irql::HIGH);
    irql::raise_raw(Irql::PASSIVE);
}

#[test]
#[should_panic(
    expected = "*** STOP: IRQL_NOT_LESS_OR_EQUAL (0x0000000A) (0x0, 0x2, 0x0, 0x0): KeLowerIrql"
)]
fn lower_to_level_above_current_bug_checks_irql_not_less_or_equal() {
    irql::lower(Irql::DISPATCH);
}

#[test]
#[should_panic(
    expected = "*** STOP: IRQL_NOT_LESS_OR_EQUAL (0x0000000A) (0x0, 0x1, 0x0, 0x0): KeLowerIrql"
)]
fn guards_dropped_out_of_order_bug_check_irql_not_less_or_equal() {
    let apc = irql::raise(Irql::APC);
    let dispatch = irql::raise(Irql::DISPATCH);
    drop(apc); // lowers DISPATCH -> PASSIVE: allowed
    assert_eq!(irql::current(), Irql::PASSIVE);
    drop(dispatch); // "lowers" PASSIVE -> APC: the bug check
}

#[test]
fn guard_restores_its_level_quietly_while_unwinding() {
    let result = catch_unwind(|| {
        let _apc = irql::raise(Irql::APC);
        let _dispatch = irql::raise(Irql::DISPATCH);
        assert_eq!(irql::current(), Irql::DISPATCH);
        panic!("driver bug");
    });
    assert_eq!(panic_text(result.unwrap_err()), "driver bug");
    assert_eq!(irql::current(), Irql::PASSIVE);
}

#[test]
fn bug_check_while_guards_are_live_unwinds_to_passive_without_abort() {
    // When the bug check unwinds, `_dispatch` restores APC from PASSIVE: a checked lower would
    // bug check a second time, which is a double panic (an abort of the whole test binary).
    let result = catch_unwind(|| {
        let _apc = irql::raise(Irql::APC);
        let _dispatch = irql::raise(Irql::DISPATCH);
        irql::lower(Irql::PASSIVE);
        irql::lower(Irql::CLOCK);
    });
    let text = panic_text(result.unwrap_err());
    assert!(
        text.starts_with("*** STOP: IRQL_NOT_LESS_OR_EQUAL (0x0000000A) (0x0, 0xd, 0x0, 0x0)"),
        "{text}"
    );
    assert_eq!(irql::current(), Irql::PASSIVE);
}

// ---------------------------------------------------------------------------------------------
// Routines documented `<= APC_LEVEL` (0xD1) and waits (0xA)
// ---------------------------------------------------------------------------------------------

#[test]
fn set_minirdr_cancel_routine_is_allowed_at_apc_level() {
    let ctx = RxContext::new(MajorFunction::READ, Calls::default());
    let _apc = irql::raise(Irql::APC);
    assert_eq!(ctx.set_minirdr_cancel_routine(Some(count_call)), Ok(()));
    assert_eq!(rx_set_minirdr_cancel_routine(&ctx, None), NtStatus::SUCCESS);
    assert_eq!(irql::current(), Irql::APC);
}

#[test]
#[should_panic(
    expected = "*** STOP: DRIVER_IRQL_NOT_LESS_OR_EQUAL (0x000000D1) (0x0, 0x2, 0x1, 0x0): RxSetMinirdrCancelRoutine"
)]
fn set_minirdr_cancel_routine_at_dispatch_bug_checks_driver_irql_not_less_or_equal() {
    let ctx = RxContext::new(MajorFunction::READ, Calls::default());
    let _dispatch = irql::raise(Irql::DISPATCH);
    let _ = ctx.set_minirdr_cancel_routine(Some(count_call));
}

#[test]
#[should_panic(
    expected = "*** STOP: DRIVER_IRQL_NOT_LESS_OR_EQUAL (0x000000D1) (0x0, 0x2, 0x1, 0x0): RxSetMinirdrCancelRoutine"
)]
fn disarm_at_dispatch_bug_checks_driver_irql_not_less_or_equal() {
    let ctx = armed();
    let _dispatch = irql::raise(Irql::DISPATCH);
    let _ = ctx.set_minirdr_cancel_routine(None);
}

#[test]
#[should_panic(
    expected = "*** STOP: DRIVER_IRQL_NOT_LESS_OR_EQUAL (0x000000D1) (0x0, 0x2, 0x1, 0x0): RxSetMinirdrCancelRoutine"
)]
fn rx_set_minirdr_cancel_routine_at_dispatch_bug_checks_driver_irql_not_less_or_equal() {
    let ctx = RxContext::new(MajorFunction::READ, Calls::default());
    let _dispatch = irql::raise(Irql::DISPATCH);
    let _ = rx_set_minirdr_cancel_routine(&ctx, Some(count_call));
}

#[test]
#[should_panic(
    expected = "*** STOP: DRIVER_IRQL_NOT_LESS_OR_EQUAL (0x000000D1) (0x0, 0xd, 0x1, 0x0): RxSetMinirdrCancelRoutine"
)]
fn set_minirdr_cancel_routine_at_clock_level_bug_checks_driver_irql_not_less_or_equal() {
    let ctx = RxContext::new(MajorFunction::READ, Calls::default());
    let _clock = irql::raise(Irql::CLOCK);
    let _ = ctx.set_minirdr_cancel_routine(Some(count_call));
}

#[test]
fn set_minirdr_cancel_routine_at_dispatch_bug_checks_before_storing() {
    let ctx = RxContext::new(MajorFunction::READ, Calls::default());
    let result = catch_unwind(AssertUnwindSafe(|| {
        let _dispatch = irql::raise(Irql::DISPATCH);
        let _ = ctx.set_minirdr_cancel_routine(Some(count_call));
    }));
    let text = panic_text(result.unwrap_err());
    assert!(
        text.contains("DRIVER_IRQL_NOT_LESS_OR_EQUAL (0x000000D1)"),
        "{text}"
    );
    assert_eq!(irql::current(), Irql::PASSIVE);
    assert!(
        !ctx.has_cancel_routine(),
        "the routine was stored despite the bug check"
    );
    assert_eq!(ctx.cancel(), CancelOutcome::NoRoutineArmed);
}

#[test]
#[should_panic(
    expected = "*** STOP: DRIVER_IRQL_NOT_LESS_OR_EQUAL (0x000000D1) (0x0, 0x2, 0x1, 0x0): RX_CONTEXT cancel"
)]
fn cancel_at_dispatch_bug_checks_driver_irql_not_less_or_equal() {
    let ctx = armed();
    let _dispatch = irql::raise(Irql::DISPATCH);
    let _ = ctx.cancel();
}

#[test]
fn cancel_at_dispatch_bug_checks_before_touching_the_context() {
    let ctx = armed();
    let result = catch_unwind(AssertUnwindSafe(|| {
        let _dispatch = irql::raise(Irql::DISPATCH);
        ctx.cancel()
    }));
    let text = panic_text(result.unwrap_err());
    assert!(
        text.contains("DRIVER_IRQL_NOT_LESS_OR_EQUAL (0x000000D1)"),
        "{text}"
    );
    assert_eq!(irql::current(), Irql::PASSIVE);
    assert!(
        !ctx.is_cancelled(),
        "the bug-checked cancel marked the context"
    );
    assert!(
        ctx.has_cancel_routine(),
        "the bug-checked cancel took the routine"
    );
    assert_eq!(ctx.minirdr().0.load(Ordering::SeqCst), 0);
    // A proper cancel afterwards still finds the routine.
    assert_eq!(
        ctx.cancel(),
        CancelOutcome::RoutineCalled(NtStatus::SUCCESS)
    );
    assert_eq!(ctx.minirdr().0.load(Ordering::SeqCst), 1);
}

#[test]
#[should_panic(
    expected = "*** STOP: DRIVER_IRQL_NOT_LESS_OR_EQUAL (0x000000D1) (0x0, 0x2, 0x1, 0x0): minirdr cancel routine"
)]
fn claimed_routine_run_at_dispatch_bug_checks_driver_irql_not_less_or_equal() {
    let ctx = armed();
    let _dispatch = irql::raise(Irql::DISPATCH);
    let claim = ctx.claim_cancel();
    assert!(matches!(claim, CancelClaim::Routine(_)));
    let _ = claim.run(&ctx);
}

#[test]
fn claim_without_routine_can_be_run_at_dispatch() {
    // Only running an actual routine is restricted; a claim with nothing in it reports at once.
    let ctx = RxContext::new(MajorFunction::READ, Calls::default());
    let _dispatch = irql::raise(Irql::DISPATCH);
    assert_eq!(ctx.claim_cancel().run(&ctx), CancelOutcome::NoRoutineArmed);
    assert_eq!(
        ctx.claim_cancel().run(&ctx),
        CancelOutcome::AlreadyCancelled
    );
    assert_eq!(irql::current(), Irql::DISPATCH);
}

#[test]
#[should_panic(
    expected = "*** STOP: IRQL_NOT_GREATER_OR_EQUAL (0x00000009) (0xd, 0x2, 0x0, 0x0): KeRaiseIrql"
)]
fn claim_cancel_above_dispatch_bug_checks_irql_not_greater_or_equal() {
    let ctx = armed();
    let _clock = irql::raise(Irql::CLOCK);
    let _ = ctx.claim_cancel();
}

#[test]
fn require_at_most_returns_current_level_at_or_below_max() {
    assert_eq!(irql::require_at_most(Irql::APC, "test"), Irql::PASSIVE);
    let _apc = irql::raise(Irql::APC);
    assert_eq!(irql::require_at_most(Irql::APC, "test"), Irql::APC);
    assert_eq!(irql::require_at_most(Irql::HIGH, "test"), Irql::APC);
}

#[test]
#[should_panic(
    expected = "*** STOP: DRIVER_IRQL_NOT_LESS_OR_EQUAL (0x000000D1) (0x0, 0x1, 0x0, 0x0): PassiveOnlyRoutine"
)]
fn require_at_most_above_max_bug_checks_driver_irql_not_less_or_equal() {
    let _apc = irql::raise(Irql::APC);
    irql::require_at_most(Irql::PASSIVE, "PassiveOnlyRoutine");
}

#[test]
fn require_can_wait_is_allowed_at_passive_and_apc() {
    assert_eq!(
        irql::require_can_wait("KeWaitForSingleObject"),
        Irql::PASSIVE
    );
    let _apc = irql::raise(Irql::APC);
    assert_eq!(irql::require_can_wait("KeWaitForSingleObject"), Irql::APC);
}

#[test]
#[should_panic(
    expected = "*** STOP: IRQL_NOT_LESS_OR_EQUAL (0x0000000A) (0x0, 0x2, 0x0, 0x0): KeWaitForSingleObject"
)]
fn require_can_wait_at_dispatch_bug_checks_irql_not_less_or_equal() {
    let _dispatch = irql::raise(Irql::DISPATCH);
    irql::require_can_wait("KeWaitForSingleObject");
}

#[test]
#[should_panic(
    expected = "*** STOP: IRQL_NOT_LESS_OR_EQUAL (0x0000000A) (0x0, 0xf, 0x0, 0x0): KeDelayExecutionThread"
)]
fn require_can_wait_at_high_level_bug_checks_irql_not_less_or_equal() {
    let _high = irql::raise(Irql::HIGH);
    irql::require_can_wait("KeDelayExecutionThread");
}

// ---------------------------------------------------------------------------------------------
// KSpinLock
// ---------------------------------------------------------------------------------------------

#[test]
fn spin_lock_raises_to_dispatch_and_release_restores_passive() {
    let lock = KSpinLock::new(5_u32);
    {
        let mut guard = lock.lock();
        assert_eq!(irql::current(), Irql::DISPATCH);
        assert_eq!(guard.saved_irql(), Irql::PASSIVE);
        assert!(lock.is_held_by_current_processor());
        *guard += 1;
    }
    assert_eq!(irql::current(), Irql::PASSIVE);
    assert!(!lock.is_held_by_current_processor());
    assert_eq!(lock.into_inner(), 6);
}

#[test]
fn spin_lock_acquired_at_apc_restores_apc() {
    let lock = KSpinLock::new(());
    let _apc = irql::raise(Irql::APC);
    {
        let guard = lock.lock();
        assert_eq!(irql::current(), Irql::DISPATCH);
        assert_eq!(guard.saved_irql(), Irql::APC);
    }
    assert_eq!(irql::current(), Irql::APC);
}

#[test]
fn spin_lock_acquired_at_dispatch_stays_at_dispatch() {
    let lock = KSpinLock::new(());
    let _dispatch = irql::raise(Irql::DISPATCH);
    {
        let guard = lock.lock();
        assert_eq!(guard.saved_irql(), Irql::DISPATCH);
        assert_eq!(irql::current(), Irql::DISPATCH);
    }
    assert_eq!(irql::current(), Irql::DISPATCH);
}

#[test]
fn two_spin_locks_release_in_order_restore_each_level() {
    let a = KSpinLock::new(());
    let b = KSpinLock::new(());
    let ga = a.lock();
    let gb = b.lock();
    assert_eq!(gb.saved_irql(), Irql::DISPATCH);
    drop(gb);
    assert_eq!(irql::current(), Irql::DISPATCH, "still holding `a`");
    drop(ga);
    assert_eq!(irql::current(), Irql::PASSIVE);
}

#[test]
#[should_panic(
    expected = "*** STOP: IRQL_NOT_GREATER_OR_EQUAL (0x00000009) (0xd, 0x2, 0x0, 0x0): KeRaiseIrql"
)]
fn spin_lock_acquired_above_dispatch_bug_checks_irql_not_greater_or_equal() {
    let lock = KSpinLock::new(());
    let _clock = irql::raise(Irql::CLOCK);
    let _guard = lock.lock();
}

#[test]
#[should_panic(expected = "IRQL_NOT_GREATER_OR_EQUAL (0x00000009)")]
fn spin_lock_try_lock_above_dispatch_bug_checks_irql_not_greater_or_equal() {
    let lock = KSpinLock::new(());
    let _high = irql::raise(Irql::HIGH);
    let _guard = lock.try_lock();
}

#[test]
fn spin_lock_reacquire_on_same_processor_bug_checks_spin_lock_already_owned_instead_of_hanging() {
    // Run in a child thread: if the owner check broke, the second acquire would spin forever,
    // and the timeout below turns that into a test failure instead of a hung test run.
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let lock = KSpinLock::new(0_u32);
        let me = irql::current_processor();
        let address = &lock as *const KSpinLock<u32> as usize;
        let result = catch_unwind(AssertUnwindSafe(|| {
            let _first = lock.lock();
            let _second = lock.lock();
        }));
        let text = result.map_err(panic_text);
        // After unwinding, the first guard released the lock and restored PASSIVE.
        let relockable = lock.try_lock().is_some();
        let _ = tx.send((text, me, address, irql::current(), relockable));
    });
    let (text, me, address, after, relockable) = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("re-acquiring a held spin lock hung instead of bug checking");
    let text = text.expect_err("re-acquiring a held spin lock did not bug check");
    let expected =
        format!("*** STOP: SPIN_LOCK_ALREADY_OWNED (0x0000000F) ({address:#x}, {me:#x}, 0x0, 0x0)");
    assert!(text.starts_with(&expected), "{text}\nexpected: {expected}");
    assert_eq!(after, Irql::PASSIVE);
    assert!(relockable, "the lock stayed held after unwinding");
}

#[test]
fn spin_lock_try_lock_on_lock_held_by_same_processor_returns_none_without_bug_check() {
    let lock = KSpinLock::new(());
    let guard = lock.lock();
    assert!(lock.try_lock().is_none());
    assert_eq!(
        irql::current(),
        Irql::DISPATCH,
        "a failed try_lock changed the IRQL"
    );
    assert!(lock.is_held_by_current_processor());
    drop(guard);
    assert_eq!(irql::current(), Irql::PASSIVE);
    {
        let guard = lock.try_lock().expect("free lock refused");
        assert_eq!(irql::current(), Irql::DISPATCH);
        assert_eq!(guard.saved_irql(), Irql::PASSIVE);
    }
    assert_eq!(irql::current(), Irql::PASSIVE);
}

#[test]
fn spin_lock_try_lock_on_lock_held_by_other_processor_returns_none_and_restores_irql() {
    let lock = Arc::new(KSpinLock::new(()));
    let held = Arc::new(Barrier::new(2));
    let done = Arc::new(Barrier::new(2));
    let holder = {
        let (lock, held, done) = (lock.clone(), held.clone(), done.clone());
        thread::spawn(move || {
            let _guard = lock.lock();
            held.wait();
            done.wait();
        })
    };
    held.wait();
    assert!(!lock.is_held_by_current_processor());
    assert!(lock.try_lock().is_none());
    assert_eq!(irql::current(), Irql::PASSIVE);
    done.wait();
    holder.join().unwrap();
    assert!(lock.try_lock().is_some());
}

#[test]
fn spin_lock_serialises_contending_threads() {
    const THREADS: usize = 4;
    const ROUNDS: usize = if cfg!(miri) { 50 } else { 5_000 };
    let lock = Arc::new(KSpinLock::new(0_usize));
    let start = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|_| {
            let (lock, start) = (lock.clone(), start.clone());
            thread::spawn(move || {
                start.wait();
                for _ in 0..ROUNDS {
                    let mut guard = lock.lock();
                    assert_eq!(irql::current(), Irql::DISPATCH);
                    // A non-atomic read-modify-write: only correct under mutual exclusion.
                    let value = *guard;
                    *guard = std::hint::black_box(value) + 1;
                    drop(guard);
                    assert_eq!(irql::current(), Irql::PASSIVE);
                }
            })
        })
        .collect();
    for handle in handles {
        handle.join().unwrap();
    }
    let lock = Arc::try_unwrap(lock).unwrap_or_else(|_| panic!("lock still shared"));
    assert_eq!(lock.into_inner(), THREADS * ROUNDS);
}

// ---------------------------------------------------------------------------------------------
// Status codes, bug-check formats, default policy
// ---------------------------------------------------------------------------------------------

#[test]
fn nt_status_constants_have_ntstatus_h_values_and_names() {
    let table = [
        (NtStatus::SUCCESS, 0x0000_0000, "STATUS_SUCCESS"),
        (NtStatus::PENDING, 0x0000_0103, "STATUS_PENDING"),
        (NtStatus::UNSUCCESSFUL, 0xC000_0001, "STATUS_UNSUCCESSFUL"),
        (
            NtStatus::INVALID_PARAMETER,
            0xC000_000D,
            "STATUS_INVALID_PARAMETER",
        ),
        (NtStatus::CANCELLED, 0xC000_0120, "STATUS_CANCELLED"),
        (NtStatus::NOT_FOUND, 0xC000_0225, "STATUS_NOT_FOUND"),
    ];
    for (status, code, name) in table {
        assert_eq!(status.code(), code, "{name}");
        assert_eq!(status.name(), Some(name));
        assert_eq!(status.to_string(), name);
        assert_eq!(NtStatus::from_code(code), status);
    }
    assert!(NtStatus::SUCCESS.is_success());
    assert!(NtStatus::CANCELLED.is_error() && !NtStatus::CANCELLED.is_success());
    assert_eq!(i32::from(NtStatus::CANCELLED), 0xC000_0120_u32 as i32);
}

#[test]
fn nt_status_display_of_unknown_code_is_hex() {
    let unknown = NtStatus::from_code(0xC000_1234);
    assert_eq!(unknown.name(), None);
    assert_eq!(unknown.to_string(), "0xC0001234");
    assert_eq!(format!("{unknown:?}"), "NtStatus(0xC0001234)");
    assert_eq!(
        format!("{:?}", NtStatus::CANCELLED),
        "STATUS_CANCELLED(0xC0000120)"
    );
}

#[test]
fn bug_check_codes_display_as_name_and_stop_code() {
    let table = [
        (
            BugCheckCode::IRQL_NOT_GREATER_OR_EQUAL,
            "IRQL_NOT_GREATER_OR_EQUAL (0x00000009)",
        ),
        (
            BugCheckCode::IRQL_NOT_LESS_OR_EQUAL,
            "IRQL_NOT_LESS_OR_EQUAL (0x0000000A)",
        ),
        (
            BugCheckCode::SPIN_LOCK_ALREADY_OWNED,
            "SPIN_LOCK_ALREADY_OWNED (0x0000000F)",
        ),
        (
            BugCheckCode::SPIN_LOCK_NOT_OWNED,
            "SPIN_LOCK_NOT_OWNED (0x00000010)",
        ),
        (
            BugCheckCode::MULTIPLE_IRP_COMPLETE_REQUESTS,
            "MULTIPLE_IRP_COMPLETE_REQUESTS (0x00000044)",
        ),
        (
            BugCheckCode::DRIVER_IRQL_NOT_LESS_OR_EQUAL,
            "DRIVER_IRQL_NOT_LESS_OR_EQUAL (0x000000D1)",
        ),
    ];
    for (code, text) in table {
        assert_eq!(code.to_string(), text);
    }
    assert_eq!(BugCheckCode::IRQL_NOT_LESS_OR_EQUAL.0, 0x0A);
    assert_eq!(BugCheckCode::DRIVER_IRQL_NOT_LESS_OR_EQUAL.0, 0xD1);
    assert_eq!(BugCheckCode(0xEF).name(), None);
    assert_eq!(BugCheckCode(0xEF).to_string(), "BUGCHECK (0x000000EF)");
}

#[test]
fn bug_check_display_has_stop_code_parameters_and_description() {
    let bug_check = BugCheck {
        code: BugCheckCode::DRIVER_IRQL_NOT_LESS_OR_EQUAL,
        parameters: [0, 2, 1, 0xdead],
        description: "SomeRoutine called above APC_LEVEL",
    };
    assert_eq!(
        bug_check.to_string(),
        "*** STOP: DRIVER_IRQL_NOT_LESS_OR_EQUAL (0x000000D1) (0x0, 0x2, 0x1, 0xdead): \
         SomeRoutine called above APC_LEVEL"
    );
}

#[test]
fn only_spin_lock_already_owned_is_fatal() {
    let make = |code| BugCheck {
        code,
        parameters: [0; 4],
        description: "",
    };
    assert!(make(BugCheckCode::SPIN_LOCK_ALREADY_OWNED).is_fatal());
    for code in [
        BugCheckCode::IRQL_NOT_GREATER_OR_EQUAL,
        BugCheckCode::IRQL_NOT_LESS_OR_EQUAL,
        BugCheckCode::SPIN_LOCK_NOT_OWNED,
        BugCheckCode::MULTIPLE_IRP_COMPLETE_REQUESTS,
        BugCheckCode::DRIVER_IRQL_NOT_LESS_OR_EQUAL,
    ] {
        assert!(!make(code).is_fatal(), "{code}");
    }
}

#[test]
fn default_bug_check_policy_is_panic() {
    // No test in this file changes the process-wide policy.
    assert_eq!(bugcheck::policy(), BugCheckPolicy::Panic);
    assert_eq!(BugCheckPolicy::default(), BugCheckPolicy::Panic);
}
