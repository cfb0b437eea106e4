//! `BugCheckPolicy::Record`: every IRQL violation is counted and readable through
//! `bugcheck::recent()` with its code and parameters, and execution continues with the requested
//! change applied; the ring keeps the last `RECENT_CAPACITY` oldest first; `clear()` resets; and
//! `SPIN_LOCK_ALREADY_OWNED` stays fatal.
//!
//! The policy, the counter and the ring are process-wide, and the tests of one file run on
//! parallel threads, so every test here holds `common::exclusive`'s guard for its whole run.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use rdbss::bugcheck::{self, BugCheck, BugCheckCode, BugCheckPolicy, RECENT_CAPACITY};
use rdbss::irql::{self, Irql};
use rdbss::{
    rx_set_minirdr_cancel_routine, CancelOutcome, KSpinLock, MajorFunction, NtStatus, RxContext,
};

mod common;
use common::{exclusive, panic_text};

#[derive(Default)]
struct Probe {
    calls: AtomicUsize,
    irql_seen: AtomicU8,
}

fn probe_routine(ctx: &RxContext<Probe>) -> NtStatus {
    ctx.minirdr().calls.fetch_add(1, Ordering::SeqCst);
    ctx.minirdr()
        .irql_seen
        .store(irql::current().level(), Ordering::SeqCst);
    NtStatus::SUCCESS
}

fn fresh() -> RxContext<Probe> {
    RxContext::new(MajorFunction::WRITE, Probe::default())
}

/// The only recorded bug check, checked against `code` and `parameters`.
#[track_caller]
fn assert_single(code: BugCheckCode, parameters: [usize; 4]) -> BugCheck {
    assert_eq!(bugcheck::count(), 1, "recent: {:?}", bugcheck::recent());
    let recent = bugcheck::recent();
    assert_eq!(recent.len(), 1, "{recent:?}");
    assert_eq!(recent[0].code, code, "{recent:?}");
    assert_eq!(recent[0].parameters, parameters, "{recent:?}");
    recent[0]
}

// ---------------------------------------------------------------------------------------------
// The policy switch
// ---------------------------------------------------------------------------------------------

#[test]
fn set_policy_returns_previous_policy() {
    let _x = exclusive(BugCheckPolicy::Panic);
    assert_eq!(bugcheck::policy(), BugCheckPolicy::Panic);
    assert_eq!(
        bugcheck::set_policy(BugCheckPolicy::Record),
        BugCheckPolicy::Panic
    );
    assert_eq!(bugcheck::policy(), BugCheckPolicy::Record);
    assert_eq!(
        bugcheck::set_policy(BugCheckPolicy::Record),
        BugCheckPolicy::Record
    );
    assert_eq!(
        bugcheck::set_policy(BugCheckPolicy::Panic),
        BugCheckPolicy::Record
    );
    assert_eq!(bugcheck::policy(), BugCheckPolicy::Panic);
}

#[test]
fn panic_policy_counts_the_bug_check_but_does_not_record_it() {
    let _x = exclusive(BugCheckPolicy::Panic);
    let result = catch_unwind(|| irql::lower(Irql::DISPATCH));
    let text = panic_text(result.unwrap_err());
    assert!(
        text.contains("IRQL_NOT_LESS_OR_EQUAL (0x0000000A)"),
        "{text}"
    );
    assert_eq!(bugcheck::count(), 1);
    assert!(bugcheck::recent().is_empty());
    assert_eq!(
        irql::current(),
        Irql::PASSIVE,
        "no change after a Panic bug check"
    );
}

#[test]
fn record_policy_records_nothing_for_a_correct_protocol_run() {
    let _x = exclusive(BugCheckPolicy::Record);
    let ctx = fresh();
    ctx.set_minirdr_cancel_routine(Some(probe_routine)).unwrap();
    ctx.set_minirdr_cancel_routine(None).unwrap();
    ctx.set_minirdr_cancel_routine(Some(probe_routine)).unwrap();
    {
        let _apc = irql::raise(Irql::APC);
        assert_eq!(
            ctx.cancel(),
            CancelOutcome::RoutineCalled(NtStatus::SUCCESS)
        );
    }
    {
        let _dispatch = irql::raise(Irql::DISPATCH);
        let _ = ctx.claim_cancel();
        let lock = KSpinLock::new(());
        drop(lock.lock());
    }
    assert_eq!(ctx.set_minirdr_cancel_routine(None), Err(rdbss::Cancelled));
    irql::require_can_wait("KeWaitForSingleObject");
    assert_eq!(bugcheck::count(), 0, "{:?}", bugcheck::recent());
    assert!(bugcheck::recent().is_empty());
}

// ---------------------------------------------------------------------------------------------
// Each violation: counted, recorded with code and parameters, and execution continues
// ---------------------------------------------------------------------------------------------

#[test]
fn record_raise_to_lower_level_records_irql_not_greater_or_equal_and_still_changes_irql() {
    let _x = exclusive(BugCheckPolicy::Record);
    assert_eq!(irql::raise_raw(Irql::DISPATCH), Irql::PASSIVE);
    let old = irql::raise_raw(Irql::APC);
    assert_eq!(old, Irql::DISPATCH);
    assert_eq!(
        irql::current(),
        Irql::APC,
        "the requested change must still happen"
    );
    let bc = assert_single(BugCheckCode::IRQL_NOT_GREATER_OR_EQUAL, [2, 1, 0, 0]);
    assert!(bc.description.contains("KeRaiseIrql"), "{bc}");
    irql::lower(Irql::PASSIVE);
    assert_eq!(bugcheck::count(), 1);
}

#[test]
fn record_lower_to_higher_level_records_irql_not_less_or_equal_and_still_changes_irql() {
    let _x = exclusive(BugCheckPolicy::Record);
    irql::lower(Irql::DISPATCH);
    assert_eq!(
        irql::current(),
        Irql::DISPATCH,
        "the requested change must still happen"
    );
    let bc = assert_single(BugCheckCode::IRQL_NOT_LESS_OR_EQUAL, [0, 2, 0, 0]);
    assert!(bc.description.contains("KeLowerIrql"), "{bc}");
    irql::lower(Irql::PASSIVE);
    assert_eq!(bugcheck::count(), 1);
}

#[test]
fn record_setter_at_dispatch_records_driver_irql_not_less_or_equal_and_still_stores_routine() {
    let _x = exclusive(BugCheckPolicy::Record);
    let ctx = fresh();
    {
        let _dispatch = irql::raise(Irql::DISPATCH);
        assert_eq!(ctx.set_minirdr_cancel_routine(Some(probe_routine)), Ok(()));
        assert_eq!(irql::current(), Irql::DISPATCH);
    }
    let bc = assert_single(BugCheckCode::DRIVER_IRQL_NOT_LESS_OR_EQUAL, [0, 2, 1, 0]);
    assert!(bc.description.contains("RxSetMinirdrCancelRoutine"), "{bc}");
    assert_eq!(irql::current(), Irql::PASSIVE);
    assert!(
        ctx.has_cancel_routine(),
        "Record must continue and store the routine"
    );
    assert_eq!(
        ctx.cancel(),
        CancelOutcome::RoutineCalled(NtStatus::SUCCESS)
    );
    assert_eq!(ctx.minirdr().calls.load(Ordering::SeqCst), 1);
    assert_eq!(bugcheck::count(), 1);
}

#[test]
fn record_rx_set_minirdr_cancel_routine_at_clock_records_current_irql_and_still_stores() {
    let _x = exclusive(BugCheckPolicy::Record);
    let ctx = fresh();
    {
        let _clock = irql::raise(Irql::CLOCK);
        assert_eq!(
            rx_set_minirdr_cancel_routine(&ctx, Some(probe_routine)),
            NtStatus::SUCCESS
        );
    }
    // The setter's own check first, then its spin lock's (acquiring above DISPATCH). What follows
    // those two (the release lowering DISPATCH -> CLOCK is recorded too) is not pinned here.
    let recent = bugcheck::recent();
    assert!(recent.len() >= 2, "{recent:?}");
    assert_eq!(recent[0].code, BugCheckCode::DRIVER_IRQL_NOT_LESS_OR_EQUAL);
    assert_eq!(recent[0].parameters, [0, 13, 1, 0]);
    assert_eq!(recent[1].code, BugCheckCode::IRQL_NOT_GREATER_OR_EQUAL);
    assert_eq!(recent[1].parameters, [13, 2, 0, 0]);
    assert_eq!(irql::current(), Irql::PASSIVE);
    assert!(
        ctx.has_cancel_routine(),
        "Record must continue and store the routine"
    );
}

#[test]
fn record_setter_at_dispatch_on_cancelled_context_still_returns_cancelled() {
    let _x = exclusive(BugCheckPolicy::Record);
    let ctx = fresh();
    assert_eq!(ctx.cancel(), CancelOutcome::NoRoutineArmed);
    {
        let _dispatch = irql::raise(Irql::DISPATCH);
        assert_eq!(
            ctx.set_minirdr_cancel_routine(Some(probe_routine)),
            Err(rdbss::Cancelled)
        );
    }
    assert_single(BugCheckCode::DRIVER_IRQL_NOT_LESS_OR_EQUAL, [0, 2, 1, 0]);
    assert!(!ctx.has_cancel_routine());
}

#[test]
fn record_cancel_at_dispatch_records_driver_irql_not_less_or_equal_and_continues() {
    let _x = exclusive(BugCheckPolicy::Record);
    let ctx = fresh();
    ctx.set_minirdr_cancel_routine(Some(probe_routine)).unwrap();
    {
        let _dispatch = irql::raise(Irql::DISPATCH);
        assert_eq!(
            ctx.cancel(),
            CancelOutcome::RoutineCalled(NtStatus::SUCCESS)
        );
        assert_eq!(irql::current(), Irql::DISPATCH);
    }
    // Continuing "as if the rule had not been broken" runs the routine once, at the caller's
    // (wrong) level.
    assert_eq!(ctx.minirdr().calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        ctx.minirdr().irql_seen.load(Ordering::SeqCst),
        Irql::DISPATCH.level()
    );
    assert!(ctx.is_cancelled());
    // One broken rule, one record: `cancel` checks the IRQL once for claim and run together.
    let recent = bugcheck::recent();
    assert_eq!(recent.len(), 1, "{recent:?}");
    assert_eq!(bugcheck::count(), 1);
    assert_eq!(recent[0].code, BugCheckCode::DRIVER_IRQL_NOT_LESS_OR_EQUAL);
    assert_eq!(recent[0].parameters, [0, 2, 1, 0]);
    assert!(recent[0].description.contains("cancel"), "{}", recent[0]);
}

#[test]
fn record_wait_at_dispatch_records_irql_not_less_or_equal_with_current_irql() {
    let _x = exclusive(BugCheckPolicy::Record);
    {
        let _dispatch = irql::raise(Irql::DISPATCH);
        assert_eq!(
            irql::require_can_wait("KeWaitForSingleObject"),
            Irql::DISPATCH
        );
    }
    let bc = assert_single(BugCheckCode::IRQL_NOT_LESS_OR_EQUAL, [0, 2, 0, 0]);
    assert_eq!(bc.description, "KeWaitForSingleObject");
    assert_eq!(irql::current(), Irql::PASSIVE);
}

#[test]
fn record_spin_lock_above_dispatch_records_irql_not_greater_or_equal_and_still_locks() {
    let _x = exclusive(BugCheckPolicy::Record);
    let lock = KSpinLock::new(0_u32);
    irql::raise_raw(Irql::CLOCK);
    {
        let mut guard = lock.lock();
        *guard += 1;
        // The acquire went on: the lock is held and the IRQL is what acquiring asks for.
        assert!(lock.is_held_by_current_processor());
        assert_eq!(irql::current(), Irql::DISPATCH);
        assert_eq!(guard.saved_irql(), Irql::CLOCK);
        let bc = assert_single(BugCheckCode::IRQL_NOT_GREATER_OR_EQUAL, [13, 2, 0, 0]);
        assert!(bc.description.contains("KeRaiseIrql"), "{bc}");
    }
    // Release restores the saved level and frees the lock.
    assert_eq!(irql::current(), Irql::CLOCK);
    assert!(!lock.is_held_by_current_processor());
    assert!(bugcheck::count() >= 1);
    assert_eq!(
        bugcheck::recent()[0].code,
        BugCheckCode::IRQL_NOT_GREATER_OR_EQUAL
    );
    irql::lower(Irql::PASSIVE);
    assert!(lock.try_lock().is_some());
    assert_eq!(irql::current(), Irql::PASSIVE);
}

#[test]
fn record_lists_different_violations_oldest_first() {
    let _x = exclusive(BugCheckPolicy::Record);
    let ctx = fresh();
    irql::raise_raw(Irql::DISPATCH); //                     ok
    irql::raise_raw(Irql::APC); //                          0x9  [2, 1]
    irql::lower(Irql::DISPATCH); //                         0xA  [1, 2]
    let _ = ctx.set_minirdr_cancel_routine(None); //        0xD1 [0, 2, 1]
    irql::require_can_wait("KeWaitForMultipleObjects"); //  0xA  [0, 2]
    irql::lower(Irql::PASSIVE); //                          ok
    let recent = bugcheck::recent();
    let got: Vec<(BugCheckCode, [usize; 4])> =
        recent.iter().map(|bc| (bc.code, bc.parameters)).collect();
    assert_eq!(
        got,
        [
            (BugCheckCode::IRQL_NOT_GREATER_OR_EQUAL, [2, 1, 0, 0]),
            (BugCheckCode::IRQL_NOT_LESS_OR_EQUAL, [1, 2, 0, 0]),
            (BugCheckCode::DRIVER_IRQL_NOT_LESS_OR_EQUAL, [0, 2, 1, 0]),
            (BugCheckCode::IRQL_NOT_LESS_OR_EQUAL, [0, 2, 0, 0]),
        ]
    );
    assert_eq!(recent[3].description, "KeWaitForMultipleObjects");
    assert_eq!(bugcheck::count(), 4);
}

// ---------------------------------------------------------------------------------------------
// The ring and the counter
// ---------------------------------------------------------------------------------------------

/// Reports `n` distinguishable bug checks (parameter 1 = 0..n) as an embedder would.
fn report_numbered(n: usize) {
    for i in 0..n {
        bugcheck::report(BugCheck {
            code: BugCheckCode::MULTIPLE_IRP_COMPLETE_REQUESTS,
            parameters: [i, 0, 0, 0],
            description: "numbered test bug check",
        });
    }
}

fn first_parameters() -> Vec<usize> {
    bugcheck::recent()
        .iter()
        .map(|bc| bc.parameters[0])
        .collect()
}

#[test]
fn recent_capacity_is_16() {
    assert_eq!(RECENT_CAPACITY, 16);
}

#[test]
fn record_embedder_report_returns_and_is_recorded() {
    let _x = exclusive(BugCheckPolicy::Record);
    report_numbered(3);
    assert_eq!(bugcheck::count(), 3);
    assert_eq!(first_parameters(), [0, 1, 2]);
    assert!(bugcheck::recent()
        .iter()
        .all(|bc| bc.code == BugCheckCode::MULTIPLE_IRP_COMPLETE_REQUESTS));
}

#[test]
fn recent_keeps_exactly_capacity_when_full() {
    let _x = exclusive(BugCheckPolicy::Record);
    report_numbered(RECENT_CAPACITY);
    assert_eq!(first_parameters(), (0..RECENT_CAPACITY).collect::<Vec<_>>());
}

#[test]
fn recent_keeps_only_the_last_16_oldest_first() {
    let _x = exclusive(BugCheckPolicy::Record);
    report_numbered(RECENT_CAPACITY + 5);
    assert_eq!(
        first_parameters(),
        (5..RECENT_CAPACITY + 5).collect::<Vec<_>>(),
        "the ring must drop the oldest, never the newest"
    );
}

#[test]
fn count_keeps_counting_past_recent_capacity() {
    let _x = exclusive(BugCheckPolicy::Record);
    report_numbered(3 * RECENT_CAPACITY + 7);
    assert_eq!(bugcheck::count(), 3 * RECENT_CAPACITY + 7);
    assert_eq!(bugcheck::recent().len(), RECENT_CAPACITY);
    assert_eq!(
        first_parameters(),
        (2 * RECENT_CAPACITY + 7..3 * RECENT_CAPACITY + 7).collect::<Vec<_>>()
    );
}

#[test]
fn clear_resets_count_and_recent() {
    let _x = exclusive(BugCheckPolicy::Record);
    report_numbered(RECENT_CAPACITY + 3);
    assert_ne!(bugcheck::count(), 0);
    bugcheck::clear();
    assert_eq!(bugcheck::count(), 0);
    assert!(bugcheck::recent().is_empty());
    // Recording starts afresh after a clear, oldest first from the new start.
    report_numbered(2);
    assert_eq!(bugcheck::count(), 2);
    assert_eq!(first_parameters(), [0, 1]);
}

// ---------------------------------------------------------------------------------------------
// Fatal bug checks
// ---------------------------------------------------------------------------------------------

#[test]
fn spin_lock_already_owned_is_fatal_under_record_and_is_recorded() {
    let _x = exclusive(BugCheckPolicy::Record);
    // In a child thread (its own processor) with a timeout: if the bug check were not fatal, or
    // not raised at all, the second acquire would spin forever.
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let lock = KSpinLock::new(());
        let me = irql::current_processor();
        let address = &lock as *const KSpinLock<()> as usize;
        let result = catch_unwind(AssertUnwindSafe(|| {
            let _first = lock.lock();
            let _second = lock.lock();
        }));
        let text = result.map_err(panic_text);
        // The unwind released the first acquisition and restored the IRQL.
        let after = (irql::current(), lock.try_lock().is_some());
        let _ = tx.send((text, me, address, after));
    });
    let (text, me, address, (irql_after, relockable)) = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("re-acquiring a held spin lock under Record hung instead of panicking");
    let text = text.expect_err("re-acquire returned under Record");
    assert!(
        text.contains("SPIN_LOCK_ALREADY_OWNED (0x0000000F)"),
        "{text}"
    );
    assert!(text.contains("fatal"), "{text}");

    let bc = assert_single(BugCheckCode::SPIN_LOCK_ALREADY_OWNED, [address, me, 0, 0]);
    assert!(bc.is_fatal());
    assert_eq!(irql_after, Irql::PASSIVE);
    assert!(relockable, "the lock stayed held after unwinding");
}
