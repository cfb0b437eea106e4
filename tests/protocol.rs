//! The `RxSetMinirdrCancelRoutine` cancel-routine protocol: arming, disarming, cancelling, the
//! sticky `CANCELLED` flag, the at-most-once routine call, the single completer, and the
//! `RX_CONTEXT_FLAG_*` table, single-threaded and with racing std threads.
//!
//! Needs the `std` feature: it relies on each std thread being its own emulated processor
//! (without `std` there is one global processor, see `tests/no_std_hook.rs`).

#![cfg(feature = "std")]

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;

use rdbss::irql::{self, Irql};
use rdbss::{
    rx_set_minirdr_cancel_routine, CancelClaim, CancelOutcome, Cancelled, ContextFlags,
    ContextInit, MajorFunction, NtStatus, RxContext,
};

// ---------------------------------------------------------------------------------------------
// Per-test state lives in the mini-redirector part of the context.
// ---------------------------------------------------------------------------------------------

/// What the cancel routines saw; `u8` codes for results recorded from inside a routine.
#[derive(Default, Debug)]
struct Probe {
    /// Calls of [`first_routine`] and [`observing_routine`].
    first: AtomicUsize,
    /// Calls of [`second_routine`].
    second: AtomicUsize,
    /// The IRQL the last routine ran at.
    irql_seen: AtomicU8,
    /// `is_cancelled()` as seen from inside the routine.
    cancelled_seen: AtomicBool,
    /// `has_cancel_routine()` as seen from inside the routine.
    armed_seen: AtomicBool,
    /// Result of re-arming from inside the routine (see [`code`]).
    rearm_seen: AtomicU8,
    /// Result of disarming from inside the routine (see [`code`]).
    disarm_seen: AtomicU8,
    /// Whether a nested `cancel()` from inside the routine returned `AlreadyCancelled`.
    nested_cancel_already: AtomicBool,
}

const NOT_TRIED: u8 = 0;
const GOT_OK: u8 = 1;
const GOT_CANCELLED: u8 = 2;

fn code(result: Result<(), Cancelled>) -> u8 {
    match result {
        Ok(()) => GOT_OK,
        Err(Cancelled) => GOT_CANCELLED,
    }
}

/// The status [`first_routine`] returns, so `RoutineCalled` can be told apart.
const FIRST_STATUS: NtStatus = NtStatus::REQUEST_ABORTED;
/// The status [`second_routine`] returns.
const SECOND_STATUS: NtStatus = NtStatus::CONNECTION_DISCONNECTED;

fn first_routine(ctx: &RxContext<Probe>) -> NtStatus {
    let probe = ctx.minirdr();
    probe.first.fetch_add(1, Ordering::SeqCst);
    probe
        .irql_seen
        .store(irql::current().level(), Ordering::SeqCst);
    probe
        .cancelled_seen
        .store(ctx.is_cancelled(), Ordering::SeqCst);
    FIRST_STATUS
}

fn second_routine(ctx: &RxContext<Probe>) -> NtStatus {
    let probe = ctx.minirdr();
    probe.second.fetch_add(1, Ordering::SeqCst);
    probe
        .irql_seen
        .store(irql::current().level(), Ordering::SeqCst);
    SECOND_STATUS
}

/// Calls back into the context from inside the routine: if the routine ran under the context's
/// spin lock, `has_cancel_routine` / `set_minirdr_cancel_routine` would bug check with
/// `SPIN_LOCK_ALREADY_OWNED` (or hang).
fn observing_routine(ctx: &RxContext<Probe>) -> NtStatus {
    let probe = ctx.minirdr();
    probe.first.fetch_add(1, Ordering::SeqCst);
    probe
        .irql_seen
        .store(irql::current().level(), Ordering::SeqCst);
    probe
        .cancelled_seen
        .store(ctx.is_cancelled(), Ordering::SeqCst);
    probe
        .armed_seen
        .store(ctx.has_cancel_routine(), Ordering::SeqCst);
    probe.rearm_seen.store(
        code(ctx.set_minirdr_cancel_routine(Some(second_routine))),
        Ordering::SeqCst,
    );
    probe
        .disarm_seen
        .store(code(ctx.set_minirdr_cancel_routine(None)), Ordering::SeqCst);
    probe.nested_cancel_already.store(
        ctx.cancel() == CancelOutcome::AlreadyCancelled,
        Ordering::SeqCst,
    );
    NtStatus::SUCCESS
}

fn fresh() -> RxContext<Probe> {
    RxContext::new(MajorFunction::READ, Probe::default())
}

#[track_caller]
fn assert_passive() {
    assert_eq!(
        irql::current(),
        Irql::PASSIVE,
        "IRQL not restored to PASSIVE"
    );
}

// ---------------------------------------------------------------------------------------------
// Arming
// ---------------------------------------------------------------------------------------------

#[test]
fn new_context_is_uncancelled_with_no_routine_armed() {
    let ctx = fresh();
    assert!(!ctx.is_cancelled());
    assert!(!ctx.has_cancel_routine());
    assert_eq!(ctx.flags(), ContextFlags::empty());
    assert_eq!(ctx.stored_status(), NtStatus::SUCCESS);
    assert_eq!(ctx.major_function(), MajorFunction::READ);

    let default: RxContext<Probe> = RxContext::default();
    assert!(!default.is_cancelled());
    assert!(!default.has_cancel_routine());
    assert_eq!(default.flags(), ContextFlags::empty());
    assert_passive();
}

#[test]
fn arm_on_fresh_context_returns_ok_and_stores_routine() {
    let ctx = fresh();
    assert_eq!(ctx.set_minirdr_cancel_routine(Some(first_routine)), Ok(()));
    assert_passive();
    assert!(ctx.has_cancel_routine());
    assert!(!ctx.is_cancelled(), "arming must not cancel");
    // The stored routine is the one a cancel calls.
    assert_eq!(ctx.cancel(), CancelOutcome::RoutineCalled(FIRST_STATUS));
    assert_eq!(ctx.minirdr().first.load(Ordering::SeqCst), 1);
}

#[test]
fn rx_set_minirdr_cancel_routine_returns_status_success_on_fresh_context() {
    let ctx = fresh();
    let status = rx_set_minirdr_cancel_routine(&ctx, Some(first_routine));
    assert_passive();
    assert_eq!(status, NtStatus::SUCCESS);
    assert_eq!(status.code(), 0x0000_0000);
    assert!(ctx.has_cancel_routine());
    assert_eq!(ctx.cancel(), CancelOutcome::RoutineCalled(FIRST_STATUS));
}

#[test]
fn arm_after_cancel_returns_cancelled_and_stores_nothing() {
    let ctx = fresh();
    assert_eq!(ctx.cancel(), CancelOutcome::NoRoutineArmed);
    assert!(ctx.flags().contains(ContextFlags::CANCELLED));

    let result = ctx.set_minirdr_cancel_routine(Some(first_routine));
    assert_passive();
    assert_eq!(result, Err(Cancelled));
    let status: NtStatus = result.unwrap_err().into();
    assert_eq!(status, NtStatus::CANCELLED);
    assert_eq!(status.code(), 0xC000_0120);

    assert!(
        !ctx.has_cancel_routine(),
        "a cancelled context stored a routine"
    );
    assert_eq!(ctx.cancel(), CancelOutcome::AlreadyCancelled);
    assert_eq!(ctx.minirdr().first.load(Ordering::SeqCst), 0);
}

#[test]
fn rx_set_minirdr_cancel_routine_returns_status_cancelled_when_already_cancelled() {
    let ctx = fresh();
    assert_eq!(ctx.cancel(), CancelOutcome::NoRoutineArmed);
    let status = rx_set_minirdr_cancel_routine(&ctx, Some(first_routine));
    assert_passive();
    assert_eq!(status, NtStatus::CANCELLED);
    assert_eq!(status.code(), 0xC000_0120);
    assert_eq!(status.to_string(), "STATUS_CANCELLED");
    assert!(!ctx.has_cancel_routine());
    assert_eq!(ctx.cancel(), CancelOutcome::AlreadyCancelled);
    assert_eq!(ctx.minirdr().first.load(Ordering::SeqCst), 0);
}

#[test]
fn cancelled_error_converts_to_status_cancelled() {
    assert_eq!(NtStatus::from(Cancelled), NtStatus::CANCELLED);
    assert_eq!(NtStatus::from(Cancelled).code(), 0xC000_0120);
    assert!(NtStatus::from(Cancelled).is_error());
    assert!(Cancelled.to_string().contains("STATUS_CANCELLED"));
    let as_error: &dyn std::error::Error = &Cancelled;
    assert!(as_error.to_string().contains("cancelled"));
}

#[test]
fn arming_replaces_previous_routine_only_last_is_called() {
    let ctx = fresh();
    assert_eq!(ctx.set_minirdr_cancel_routine(Some(first_routine)), Ok(()));
    assert_eq!(ctx.set_minirdr_cancel_routine(Some(second_routine)), Ok(()));
    assert_passive();
    assert_eq!(ctx.cancel(), CancelOutcome::RoutineCalled(SECOND_STATUS));
    assert_eq!(ctx.minirdr().first.load(Ordering::SeqCst), 0);
    assert_eq!(ctx.minirdr().second.load(Ordering::SeqCst), 1);
}

#[test]
fn arming_same_routine_twice_calls_it_once() {
    let ctx = fresh();
    assert_eq!(ctx.set_minirdr_cancel_routine(Some(first_routine)), Ok(()));
    assert_eq!(ctx.set_minirdr_cancel_routine(Some(first_routine)), Ok(()));
    assert_eq!(ctx.cancel(), CancelOutcome::RoutineCalled(FIRST_STATUS));
    assert_eq!(ctx.minirdr().first.load(Ordering::SeqCst), 1);
}

// ---------------------------------------------------------------------------------------------
// Disarming (completion side)
// ---------------------------------------------------------------------------------------------

#[test]
fn disarm_before_cancel_returns_ok_and_routine_never_runs() {
    let ctx = fresh();
    assert_eq!(ctx.set_minirdr_cancel_routine(Some(first_routine)), Ok(()));
    assert_eq!(ctx.set_minirdr_cancel_routine(None), Ok(()));
    assert_passive();
    assert!(!ctx.has_cancel_routine());
    assert!(!ctx.is_cancelled());

    assert_eq!(ctx.cancel(), CancelOutcome::NoRoutineArmed);
    assert!(ctx.is_cancelled());
    assert_eq!(ctx.minirdr().first.load(Ordering::SeqCst), 0);
    assert_eq!(ctx.cancel(), CancelOutcome::AlreadyCancelled);
    assert_eq!(ctx.minirdr().first.load(Ordering::SeqCst), 0);
}

#[test]
fn disarm_via_rx_set_minirdr_cancel_routine_returns_status_success_before_cancel() {
    let ctx = fresh();
    assert_eq!(
        rx_set_minirdr_cancel_routine(&ctx, Some(first_routine)),
        NtStatus::SUCCESS
    );
    assert_eq!(rx_set_minirdr_cancel_routine(&ctx, None), NtStatus::SUCCESS);
    assert!(!ctx.has_cancel_routine());
    assert_eq!(ctx.cancel(), CancelOutcome::NoRoutineArmed);
    assert_eq!(ctx.minirdr().first.load(Ordering::SeqCst), 0);
}

#[test]
fn disarm_on_fresh_context_returns_ok() {
    let ctx = fresh();
    assert_eq!(ctx.set_minirdr_cancel_routine(None), Ok(()));
    assert!(!ctx.has_cancel_routine());
    assert!(!ctx.is_cancelled());
}

#[test]
fn rearm_after_disarm_is_called_on_cancel() {
    let ctx = fresh();
    assert_eq!(ctx.set_minirdr_cancel_routine(Some(first_routine)), Ok(()));
    assert_eq!(ctx.set_minirdr_cancel_routine(None), Ok(()));
    assert_eq!(ctx.set_minirdr_cancel_routine(Some(second_routine)), Ok(()));
    assert_eq!(ctx.cancel(), CancelOutcome::RoutineCalled(SECOND_STATUS));
    assert_eq!(ctx.minirdr().first.load(Ordering::SeqCst), 0);
    assert_eq!(ctx.minirdr().second.load(Ordering::SeqCst), 1);
}

#[test]
fn disarm_after_cancel_returns_cancelled_so_cancel_side_owns_completion() {
    let ctx = fresh();
    assert_eq!(ctx.set_minirdr_cancel_routine(Some(first_routine)), Ok(()));
    assert_eq!(ctx.cancel(), CancelOutcome::RoutineCalled(FIRST_STATUS));
    assert_eq!(ctx.minirdr().first.load(Ordering::SeqCst), 1);

    assert_eq!(ctx.set_minirdr_cancel_routine(None), Err(Cancelled));
    assert_eq!(
        rx_set_minirdr_cancel_routine(&ctx, None),
        NtStatus::CANCELLED
    );
    assert_passive();
    assert!(
        ctx.is_cancelled(),
        "a failed disarm must not clear CANCELLED"
    );
    assert_eq!(ctx.minirdr().first.load(Ordering::SeqCst), 1);
}

#[test]
fn disarm_after_cancel_with_no_routine_armed_returns_cancelled() {
    let ctx = fresh();
    assert_eq!(ctx.cancel(), CancelOutcome::NoRoutineArmed);
    assert_eq!(ctx.set_minirdr_cancel_routine(None), Err(Cancelled));
    assert_passive();
    assert!(ctx.is_cancelled());
}

// ---------------------------------------------------------------------------------------------
// Cancelling
// ---------------------------------------------------------------------------------------------

#[test]
fn cancel_reports_routine_called_with_the_status_the_routine_returned() {
    let a = fresh();
    a.set_minirdr_cancel_routine(Some(first_routine)).unwrap();
    assert_eq!(a.cancel(), CancelOutcome::RoutineCalled(FIRST_STATUS));

    let b = fresh();
    b.set_minirdr_cancel_routine(Some(second_routine)).unwrap();
    assert_eq!(b.cancel(), CancelOutcome::RoutineCalled(SECOND_STATUS));
    assert_passive();
}

#[test]
fn cancel_without_routine_reports_no_routine_armed_and_sets_cancelled() {
    let ctx = fresh();
    assert_eq!(ctx.cancel(), CancelOutcome::NoRoutineArmed);
    assert_passive();
    assert!(ctx.is_cancelled());
    assert!(ctx.flags().contains(ContextFlags::CANCELLED));
}

#[test]
fn repeated_cancel_calls_routine_at_most_once_and_reports_already_cancelled() {
    let ctx = fresh();
    ctx.set_minirdr_cancel_routine(Some(first_routine)).unwrap();
    assert_eq!(ctx.cancel(), CancelOutcome::RoutineCalled(FIRST_STATUS));
    for _ in 0..10 {
        assert_eq!(ctx.cancel(), CancelOutcome::AlreadyCancelled);
        assert_passive();
    }
    assert_eq!(ctx.minirdr().first.load(Ordering::SeqCst), 1);
    assert!(!ctx.has_cancel_routine(), "cancel must empty the slot");
}

#[test]
fn cancel_sets_cancelled_flag_and_keeps_other_flags() {
    let ctx = fresh();
    let others = ContextFlags::WAIT | ContextFlags::ASYNC_OPERATION | ContextFlags::MINIRDR_INVOKED;
    ctx.set_flags(others).unwrap();
    assert!(!ctx.flags().contains(ContextFlags::CANCELLED));
    ctx.set_minirdr_cancel_routine(Some(first_routine)).unwrap();
    assert_eq!(ctx.cancel(), CancelOutcome::RoutineCalled(FIRST_STATUS));
    assert_eq!(ctx.flags(), others | ContextFlags::CANCELLED);
    assert_eq!(ctx.flags().bits() & 0x0008_0000, 0x0008_0000);
}

#[test]
fn cancelled_flag_is_sticky_across_later_calls() {
    let ctx = fresh();
    ctx.set_minirdr_cancel_routine(Some(first_routine)).unwrap();
    ctx.cancel();
    let _ = ctx.set_minirdr_cancel_routine(Some(second_routine));
    let _ = ctx.set_minirdr_cancel_routine(None);
    let _ = ctx.clear_flags(ContextFlags::all().difference(ContextFlags::CANCELLED));
    let _ = ctx.clear_flags(ContextFlags::CANCELLED);
    let _ = ctx.cancel();
    let _ = ctx.claim_cancel().run(&ctx);
    assert!(ctx.is_cancelled());
    assert!(!ctx.has_cancel_routine());
    assert_eq!(ctx.minirdr().first.load(Ordering::SeqCst), 1);
    assert_eq!(ctx.minirdr().second.load(Ordering::SeqCst), 0);
}

#[test]
fn cancel_outcome_cancelled_now_is_false_only_for_already_cancelled() {
    assert!(CancelOutcome::RoutineCalled(NtStatus::SUCCESS).cancelled_now());
    assert!(CancelOutcome::NoRoutineArmed.cancelled_now());
    assert!(!CancelOutcome::AlreadyCancelled.cancelled_now());

    let ctx = fresh();
    assert!(ctx.cancel().cancelled_now());
    assert!(!ctx.cancel().cancelled_now());
}

// ---------------------------------------------------------------------------------------------
// The routine runs outside the lock, at the caller's IRQL
// ---------------------------------------------------------------------------------------------

#[test]
fn routine_runs_outside_the_lock_and_rearming_from_it_returns_cancelled() {
    let ctx = fresh();
    ctx.set_minirdr_cancel_routine(Some(observing_routine))
        .unwrap();
    // If the routine ran under the spin lock, the calls inside it would bug check
    // (SPIN_LOCK_ALREADY_OWNED panics) instead of returning.
    assert_eq!(
        ctx.cancel(),
        CancelOutcome::RoutineCalled(NtStatus::SUCCESS)
    );
    assert_passive();
    let probe = ctx.minirdr();
    assert_eq!(probe.first.load(Ordering::SeqCst), 1);
    assert!(
        probe.cancelled_seen.load(Ordering::SeqCst),
        "CANCELLED must be set before the routine runs"
    );
    assert!(
        !probe.armed_seen.load(Ordering::SeqCst),
        "the slot must be empty while the routine runs"
    );
    assert_eq!(probe.rearm_seen.load(Ordering::SeqCst), GOT_CANCELLED);
    assert_eq!(probe.disarm_seen.load(Ordering::SeqCst), GOT_CANCELLED);
    assert!(probe.nested_cancel_already.load(Ordering::SeqCst));
    // The re-arm inside the routine stored nothing.
    assert!(!ctx.has_cancel_routine());
    assert_eq!(probe.second.load(Ordering::SeqCst), 0);
    assert_ne!(probe.rearm_seen.load(Ordering::SeqCst), NOT_TRIED);
}

#[test]
fn routine_runs_at_callers_irql_passive() {
    let ctx = fresh();
    ctx.minirdr().irql_seen.store(0xFF, Ordering::SeqCst);
    ctx.set_minirdr_cancel_routine(Some(first_routine)).unwrap();
    assert_eq!(irql::current(), Irql::PASSIVE);
    assert_eq!(ctx.cancel(), CancelOutcome::RoutineCalled(FIRST_STATUS));
    assert_eq!(
        ctx.minirdr().irql_seen.load(Ordering::SeqCst),
        Irql::PASSIVE.level(),
        "the routine must run at the caller's IRQL, not the lock's DISPATCH_LEVEL"
    );
    assert_passive();
}

#[test]
fn routine_runs_at_callers_irql_apc_when_cancel_is_called_at_apc() {
    let ctx = fresh();
    ctx.minirdr().irql_seen.store(0xFF, Ordering::SeqCst);
    ctx.set_minirdr_cancel_routine(Some(first_routine)).unwrap();
    {
        let _apc = irql::raise(Irql::APC);
        assert_eq!(ctx.cancel(), CancelOutcome::RoutineCalled(FIRST_STATUS));
        assert_eq!(
            irql::current(),
            Irql::APC,
            "cancel must restore the caller's APC"
        );
    }
    assert_eq!(
        ctx.minirdr().irql_seen.load(Ordering::SeqCst),
        Irql::APC.level()
    );
    assert_passive();
}

#[test]
fn arm_and_disarm_at_apc_level_succeed_and_restore_apc() {
    let ctx = fresh();
    let _apc = irql::raise(Irql::APC);
    assert_eq!(ctx.set_minirdr_cancel_routine(Some(first_routine)), Ok(()));
    assert_eq!(irql::current(), Irql::APC);
    assert_eq!(ctx.set_minirdr_cancel_routine(None), Ok(()));
    assert_eq!(irql::current(), Irql::APC);
    assert!(!ctx.has_cancel_routine());
}

// ---------------------------------------------------------------------------------------------
// Deferred cancel: claim at DISPATCH, run below it
// ---------------------------------------------------------------------------------------------

#[test]
fn claim_cancel_at_dispatch_marks_cancelled_without_running_routine_then_run_calls_it_once() {
    let ctx = fresh();
    ctx.set_minirdr_cancel_routine(Some(first_routine)).unwrap();
    let claim = {
        let _dispatch = irql::raise(Irql::DISPATCH);
        let claim = ctx.claim_cancel();
        assert_eq!(
            irql::current(),
            Irql::DISPATCH,
            "claim must restore DISPATCH"
        );
        assert!(matches!(claim, CancelClaim::Routine(_)), "got {claim:?}");
        assert!(ctx.is_cancelled(), "the claim marks CANCELLED at once");
        assert_eq!(ctx.minirdr().first.load(Ordering::SeqCst), 0);
        assert!(!ctx.has_cancel_routine(), "the claim takes the routine");
        claim
    };
    assert_passive();
    // While the claim is pending, arming is refused and another cancel does nothing.
    assert_eq!(
        ctx.set_minirdr_cancel_routine(Some(second_routine)),
        Err(Cancelled)
    );
    assert_eq!(ctx.cancel(), CancelOutcome::AlreadyCancelled);
    assert_eq!(ctx.minirdr().first.load(Ordering::SeqCst), 0);

    assert_eq!(claim.run(&ctx), CancelOutcome::RoutineCalled(FIRST_STATUS));
    assert_passive();
    assert_eq!(ctx.minirdr().first.load(Ordering::SeqCst), 1);
    assert_eq!(ctx.minirdr().second.load(Ordering::SeqCst), 0);
    assert!(matches!(ctx.claim_cancel(), CancelClaim::AlreadyCancelled));
    assert_eq!(ctx.minirdr().first.load(Ordering::SeqCst), 1);
}

#[test]
fn claim_cancel_without_routine_and_after_cancel_report_matching_outcomes() {
    let ctx = fresh();
    let claim = ctx.claim_cancel();
    assert!(
        matches!(claim, CancelClaim::NoRoutineArmed),
        "got {claim:?}"
    );
    assert!(ctx.is_cancelled());
    assert_eq!(claim.run(&ctx), CancelOutcome::NoRoutineArmed);

    let again = ctx.claim_cancel();
    assert!(
        matches!(again, CancelClaim::AlreadyCancelled),
        "got {again:?}"
    );
    assert_eq!(again.run(&ctx), CancelOutcome::AlreadyCancelled);
    assert_passive();
}

// ---------------------------------------------------------------------------------------------
// The flag word
// ---------------------------------------------------------------------------------------------

#[test]
fn set_flags_refuses_cancelled_with_invalid_parameter_and_changes_nothing() {
    let ctx = fresh();
    ctx.set_flags(ContextFlags::WAIT).unwrap();
    assert_eq!(
        ctx.set_flags(ContextFlags::CANCELLED),
        Err(NtStatus::INVALID_PARAMETER)
    );
    // Mixed with other bits: still refused, and the other bits are not set either.
    assert_eq!(
        ctx.set_flags(ContextFlags::CANCELLED | ContextFlags::ASYNC_OPERATION),
        Err(NtStatus::INVALID_PARAMETER)
    );
    assert_eq!(ctx.flags(), ContextFlags::WAIT);
    assert!(!ctx.is_cancelled());
    // And the context still cancels normally (its routine runs).
    ctx.set_minirdr_cancel_routine(Some(first_routine)).unwrap();
    assert_eq!(ctx.cancel(), CancelOutcome::RoutineCalled(FIRST_STATUS));
}

#[test]
fn clear_flags_refuses_cancelled_with_invalid_parameter_and_changes_nothing() {
    let ctx = fresh();
    ctx.set_flags(ContextFlags::WAIT | ContextFlags::IN_FSP)
        .unwrap();
    ctx.cancel();
    let before = ctx.flags();
    assert_eq!(
        before,
        ContextFlags::WAIT | ContextFlags::IN_FSP | ContextFlags::CANCELLED
    );
    assert_eq!(
        ctx.clear_flags(ContextFlags::CANCELLED),
        Err(NtStatus::INVALID_PARAMETER)
    );
    assert_eq!(
        ctx.clear_flags(ContextFlags::CANCELLED | ContextFlags::WAIT),
        Err(NtStatus::INVALID_PARAMETER)
    );
    assert_eq!(ctx.flags(), before);
    assert_eq!(
        ctx.set_minirdr_cancel_routine(Some(first_routine)),
        Err(Cancelled)
    );

    // Refused on an uncancelled context too.
    let idle = fresh();
    assert_eq!(
        idle.clear_flags(ContextFlags::CANCELLED),
        Err(NtStatus::INVALID_PARAMETER)
    );
    assert_eq!(idle.flags(), ContextFlags::empty());
}

#[test]
fn set_and_clear_flags_return_previous_flags() {
    let ctx = fresh();
    assert_eq!(ctx.set_flags(ContextFlags::WAIT), Ok(ContextFlags::empty()));
    assert_eq!(
        ctx.set_flags(ContextFlags::ASYNC_OPERATION | ContextFlags::IN_FSP),
        Ok(ContextFlags::WAIT)
    );
    assert_eq!(
        ctx.flags(),
        ContextFlags::WAIT | ContextFlags::ASYNC_OPERATION | ContextFlags::IN_FSP
    );
    // Setting an already-set bit is idempotent.
    assert_eq!(
        ctx.set_flags(ContextFlags::WAIT),
        Ok(ContextFlags::WAIT | ContextFlags::ASYNC_OPERATION | ContextFlags::IN_FSP)
    );
    assert_eq!(
        ctx.clear_flags(ContextFlags::WAIT | ContextFlags::FLOPPY),
        Ok(ContextFlags::WAIT | ContextFlags::ASYNC_OPERATION | ContextFlags::IN_FSP)
    );
    assert_eq!(
        ctx.flags(),
        ContextFlags::ASYNC_OPERATION | ContextFlags::IN_FSP
    );
    // After a cancel, the previous flags reported include CANCELLED, and it survives.
    ctx.cancel();
    assert_eq!(
        ctx.clear_flags(ContextFlags::IN_FSP),
        Ok(ContextFlags::ASYNC_OPERATION | ContextFlags::IN_FSP | ContextFlags::CANCELLED)
    );
    assert_eq!(
        ctx.flags(),
        ContextFlags::ASYNC_OPERATION | ContextFlags::CANCELLED
    );
}

/// Counts a thread as finished when dropped, even if the thread panicked.
struct CountOnDrop(Arc<AtomicUsize>);

impl Drop for CountOnDrop {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn concurrent_flag_updates_never_lose_bits_or_cancelled() {
    const ROUNDS: usize = if cfg!(miri) { 100 } else { 20_000 };
    let bits = [
        ContextFlags::WRITE_THROUGH,
        ContextFlags::FLOPPY,
        ContextFlags::DEFERRED_WRITE,
        ContextFlags::VERIFY_READ,
    ];
    let ctx = Arc::new(fresh());
    let progress = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(Barrier::new(bits.len() + 1));

    let workers: Vec<_> = bits
        .iter()
        .map(|&bit| {
            let (ctx, progress, start) = (ctx.clone(), progress.clone(), start.clone());
            let finished = CountOnDrop(finished.clone());
            thread::spawn(move || {
                let _finished = finished;
                start.wait();
                for _ in 0..ROUNDS {
                    // Only this thread touches `bit`, so each previous value is known exactly;
                    // a non-atomic read-modify-write elsewhere would break one of these.
                    let before = ctx.set_flags(bit).unwrap();
                    assert!(!before.contains(bit), "a cleared bit came back");
                    let before = ctx.clear_flags(bit).unwrap();
                    assert!(before.contains(bit), "a set bit was lost");
                    progress.fetch_add(1, Ordering::Relaxed);
                }
                assert_passive();
            })
        })
        .collect();

    let canceller = {
        let (ctx, progress, start) = (ctx.clone(), progress.clone(), start.clone());
        let finished = finished.clone();
        thread::spawn(move || {
            start.wait();
            // Cancel in the middle of the flag traffic (or at once if the workers stopped early).
            while progress.load(Ordering::Relaxed) < ROUNDS
                && finished.load(Ordering::SeqCst) < bits.len()
            {
                thread::yield_now();
            }
            assert_eq!(ctx.cancel(), CancelOutcome::NoRoutineArmed);
            assert_passive();
        })
    };

    for worker in workers {
        worker.join().unwrap();
    }
    canceller.join().unwrap();
    assert_eq!(
        ctx.flags(),
        ContextFlags::CANCELLED,
        "CANCELLED lost or a worker bit left behind"
    );
}

#[test]
fn try_new_refuses_cancelled_initial_flag_and_hands_back_minirdr() {
    let init = ContextInit {
        serial_number: 7,
        major_function: MajorFunction::WRITE,
        minor_function: 1,
        flags: ContextFlags::WAIT | ContextFlags::CANCELLED,
    };
    match RxContext::try_new(init, String::from("exchange state")) {
        Err((status, minirdr)) => {
            assert_eq!(status, NtStatus::INVALID_PARAMETER);
            assert_eq!(status.code(), 0xC000_000D);
            assert_eq!(minirdr, "exchange state");
        }
        Ok(ctx) => panic!("a context was born cancelled: {ctx:?}"),
    }
}

#[test]
fn try_new_keeps_init_fields_and_flags() {
    let init = ContextInit {
        serial_number: 42,
        major_function: MajorFunction::DIRECTORY_CONTROL,
        minor_function: 3,
        flags: ContextFlags::INITIALIZATION | ContextFlags::FROM_POOL,
    };
    let ctx = RxContext::try_new(init, Probe::default()).expect("valid init refused");
    assert_eq!(ctx.serial_number(), 42);
    assert_eq!(ctx.major_function(), MajorFunction::DIRECTORY_CONTROL);
    assert_eq!(ctx.minor_function(), 3);
    assert_eq!(
        ctx.flags(),
        ContextFlags::INITIALIZATION | ContextFlags::FROM_POOL
    );
    assert!(!ctx.is_cancelled());
    assert!(!ctx.has_cancel_routine());
    assert_eq!(ctx.set_minirdr_cancel_routine(Some(first_routine)), Ok(()));
}

#[test]
fn context_flag_values_match_rxcontx_h() {
    let table: [(ContextFlags, u32); 31] = [
        (ContextFlags::FROM_POOL, 0x0000_0001),
        (ContextFlags::WAIT, 0x0000_0002),
        (ContextFlags::WRITE_THROUGH, 0x0000_0004),
        (ContextFlags::FLOPPY, 0x0000_0008),
        (ContextFlags::RECURSIVE_CALL, 0x0000_0010),
        (ContextFlags::THIS_DEVICE_TOP_LEVEL, 0x0000_0020),
        (ContextFlags::DEFERRED_WRITE, 0x0000_0040),
        (ContextFlags::VERIFY_READ, 0x0000_0080),
        (ContextFlags::STACK_IO_CONTEXT, 0x0000_0100),
        (ContextFlags::IN_FSP, 0x0000_0200),
        (ContextFlags::CREATE_MAILSLOT, 0x0000_0400),
        (ContextFlags::MAILSLOT_REPARSE, 0x0000_0800),
        (ContextFlags::ASYNC_OPERATION, 0x0000_1000),
        (ContextFlags::NO_COMPLETE_FROM_FSP, 0x0000_2000),
        (ContextFlags::POST_ON_STABLE_CONDITION, 0x0000_4000),
        (ContextFlags::FSP_DELAYED_OVERFLOW_QUEUE, 0x0000_8000),
        (ContextFlags::FSP_CRITICAL_OVERFLOW_QUEUE, 0x0001_0000),
        (ContextFlags::MINIRDR_INVOKED, 0x0002_0000),
        (ContextFlags::WAITING_FOR_RESOURCE, 0x0004_0000),
        (ContextFlags::CANCELLED, 0x0008_0000),
        (ContextFlags::SYNC_EVENT_WAITERS, 0x0010_0000),
        (ContextFlags::NO_PREPOSTING_NEEDED, 0x0020_0000),
        (ContextFlags::BYPASS_VALIDOP_CHECK, 0x0040_0000),
        (ContextFlags::BLOCKED_PIPE_RESUME, 0x0080_0000),
        (ContextFlags::IN_SERIALIZATION_QUEUE, 0x0100_0000),
        (ContextFlags::NO_EXCEPTION_BREAKPOINT, 0x0200_0000),
        (ContextFlags::NEED_RECONNECT, 0x0400_0000),
        (ContextFlags::MUST_SUCCEED, 0x0800_0000),
        (ContextFlags::MUST_SUCCEED_NONBLOCKING, 0x1000_0000),
        (ContextFlags::MUST_SUCCEED_ALLOCATED, 0x2000_0000),
        (ContextFlags::MINIRDR_INITIATED, 0x8000_0000),
    ];
    let mut union = 0;
    for (flag, value) in table {
        assert_eq!(flag.bits(), value, "{flag:?}");
        union |= value;
    }
    // Every named flag is in the table, and 0x4000_0000 is unused in rxcontx.h.
    assert_eq!(ContextFlags::all().bits(), union);
    assert_eq!(ContextFlags::all().bits(), 0xBFFF_FFFF);

    // RX_CONTEXT_PRESERVED_FLAGS and RX_CONTEXT_INITIALIZATION_FLAGS.
    assert_eq!(
        ContextFlags::PRESERVED,
        ContextFlags::FROM_POOL | ContextFlags::MUST_SUCCEED_ALLOCATED | ContextFlags::IN_FSP
    );
    assert_eq!(ContextFlags::PRESERVED.bits(), 0x2000_0201);
    assert_eq!(
        ContextFlags::INITIALIZATION,
        ContextFlags::WAIT | ContextFlags::MUST_SUCCEED | ContextFlags::MUST_SUCCEED_NONBLOCKING
    );
    assert_eq!(ContextFlags::INITIALIZATION.bits(), 0x1800_0002);
    assert!(!ContextFlags::PRESERVED.contains(ContextFlags::CANCELLED));
    assert!(!ContextFlags::INITIALIZATION.contains(ContextFlags::CANCELLED));
}

// ---------------------------------------------------------------------------------------------
// Every API call leaves the IRQL where it found it
// ---------------------------------------------------------------------------------------------

#[test]
fn irql_is_passive_after_every_api_call_on_every_path() {
    // Idle -> Armed -> Idle -> Armed -> Cancelled (routine called).
    let a = fresh();
    assert_passive();
    let _ = a.has_cancel_routine();
    assert_passive();
    a.set_minirdr_cancel_routine(Some(first_routine)).unwrap();
    assert_passive();
    let _ = a.has_cancel_routine();
    assert_passive();
    a.set_minirdr_cancel_routine(None).unwrap();
    assert_passive();
    assert_eq!(
        rx_set_minirdr_cancel_routine(&a, Some(second_routine)),
        NtStatus::SUCCESS
    );
    assert_passive();
    a.set_flags(ContextFlags::WAIT).unwrap();
    assert_passive();
    a.clear_flags(ContextFlags::WAIT).unwrap();
    assert_passive();
    assert!(a.set_flags(ContextFlags::CANCELLED).is_err());
    assert_passive();
    assert!(a.clear_flags(ContextFlags::CANCELLED).is_err());
    assert_passive();
    assert_eq!(a.cancel(), CancelOutcome::RoutineCalled(SECOND_STATUS));
    assert_passive();
    assert_eq!(a.minirdr().irql_seen.load(Ordering::SeqCst), 0);
    // Cancelled paths.
    assert_eq!(a.cancel(), CancelOutcome::AlreadyCancelled);
    assert_passive();
    assert_eq!(
        a.set_minirdr_cancel_routine(Some(first_routine)),
        Err(Cancelled)
    );
    assert_passive();
    assert_eq!(a.set_minirdr_cancel_routine(None), Err(Cancelled));
    assert_passive();
    assert_eq!(rx_set_minirdr_cancel_routine(&a, None), NtStatus::CANCELLED);
    assert_passive();
    let _ = a.has_cancel_routine();
    assert_passive();

    // Idle -> Cancelled (no routine).
    let b = fresh();
    assert_eq!(b.cancel(), CancelOutcome::NoRoutineArmed);
    assert_passive();

    // Claim paths.
    let c = fresh();
    c.set_minirdr_cancel_routine(Some(first_routine)).unwrap();
    let claim = c.claim_cancel();
    assert_passive();
    assert_eq!(claim.run(&c), CancelOutcome::RoutineCalled(FIRST_STATUS));
    assert_passive();
    let claim = c.claim_cancel();
    assert_passive();
    assert_eq!(claim.run(&c), CancelOutcome::AlreadyCancelled);
    assert_passive();
    let d = fresh();
    let claim = d.claim_cancel();
    assert_passive();
    assert_eq!(claim.run(&d), CancelOutcome::NoRoutineArmed);
    assert_passive();

    // Routine that calls back into the context.
    let e = fresh();
    e.set_minirdr_cancel_routine(Some(observing_routine))
        .unwrap();
    e.cancel();
    assert_passive();
    assert_eq!(e.minirdr().irql_seen.load(Ordering::SeqCst), 0);
}

// ---------------------------------------------------------------------------------------------
// Races between the completing side and the cancelling side
// ---------------------------------------------------------------------------------------------

/// Per-request state for the races: who completed the request, and how often.
#[derive(Default)]
struct Exchange {
    routine_calls: AtomicUsize,
    completed_by_routine: AtomicUsize,
    completed_by_completer: AtomicUsize,
    /// 0: cancel not yet returned; 1 RoutineCalled; 2 NoRoutineArmed; 3 AlreadyCancelled.
    cancel_outcome: AtomicU8,
    arm_ok: AtomicBool,
}

fn abort_and_complete(ctx: &RxContext<Exchange>) -> NtStatus {
    let state = ctx.minirdr();
    state.routine_calls.fetch_add(1, Ordering::SeqCst);
    state.completed_by_routine.fetch_add(1, Ordering::SeqCst);
    assert!(ctx.is_cancelled());
    NtStatus::CANCELLED
}

fn outcome_code(outcome: CancelOutcome) -> u8 {
    match outcome {
        CancelOutcome::RoutineCalled(_) => 1,
        CancelOutcome::NoRoutineArmed => 2,
        CancelOutcome::AlreadyCancelled => 3,
        CancelOutcome::BlockedOperationCancelled => 4,
    }
}

/// A short busy wait that varies per iteration, so the two threads meet at different points.
///
/// Plain arithmetic, not `spin_loop()`: in a VM, `pause` loops can make the hypervisor deschedule
/// the virtual CPU, which turns the race into strict alternation.
fn jitter(seed: usize) {
    let spins = (seed.wrapping_mul(2_654_435_761) >> 7) % 257;
    let mut x = 0_usize;
    for k in 0..spins {
        x = std::hint::black_box(x.wrapping_add(k));
    }
    std::hint::black_box(x);
}

/// A busy-waiting two-party rendezvous: both threads leave it within a few hundred nanoseconds of
/// each other (a `std::sync::Barrier` wakes the second thread microseconds later, which hides the
/// race). If one party panics, the other stops waiting and panics too, instead of hanging.
struct SpinRendezvous {
    arrivals: AtomicUsize,
    abandoned: AtomicBool,
}

impl SpinRendezvous {
    fn new() -> Arc<Self> {
        Arc::new(SpinRendezvous {
            arrivals: AtomicUsize::new(0),
            abandoned: AtomicBool::new(false),
        })
    }

    /// Waits for the other party to arrive for round `round` (0-based).
    fn wait(&self, round: usize) {
        self.arrivals.fetch_add(1, Ordering::SeqCst);
        let target = 2 * (round + 1);
        let mut spins = 0_u32;
        while self.arrivals.load(Ordering::SeqCst) < target {
            assert!(
                !self.abandoned.load(Ordering::SeqCst),
                "the other thread panicked"
            );
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(4096) {
                // Few cores, or other tests running: let the other party get scheduled.
                thread::yield_now();
            }
        }
    }

    /// A guard that, if its thread panics, releases the other party from [`Self::wait`].
    fn abandon_on_panic(self: &Arc<Self>) -> AbandonOnPanic {
        AbandonOnPanic(self.clone())
    }
}

struct AbandonOnPanic(Arc<SpinRendezvous>);

impl Drop for AbandonOnPanic {
    fn drop(&mut self) {
        if thread::panicking() {
            self.0.abandoned.store(true, Ordering::SeqCst);
        }
    }
}

fn contexts(n: usize) -> Arc<Vec<RxContext<Exchange>>> {
    Arc::new(
        (0..n)
            .map(|_| RxContext::new(MajorFunction::READ, Exchange::default()))
            .collect(),
    )
}

#[test]
fn stress_arm_disarm_racing_cancel_completes_each_request_exactly_once() {
    const N: usize = if cfg!(miri) { 50 } else { 3_000 };
    let ctxs = contexts(N);
    let rendezvous = SpinRendezvous::new();

    let completer = {
        let (ctxs, rendezvous) = (ctxs.clone(), rendezvous.clone());
        thread::spawn(move || {
            let _abandon = rendezvous.abandon_on_panic();
            for (i, ctx) in ctxs.iter().enumerate() {
                rendezvous.wait(i);
                jitter(i);
                match ctx.set_minirdr_cancel_routine(Some(abort_and_complete)) {
                    Ok(()) => {
                        ctx.minirdr().arm_ok.store(true, Ordering::SeqCst);
                        jitter(i * 7 + 3);
                        if i % 3 == 0 {
                            // A long exchange: give the canceller the chance to get in.
                            thread::yield_now();
                        }
                        // Disarm at completion: Ok means this side completes.
                        if ctx.set_minirdr_cancel_routine(None).is_ok() {
                            ctx.minirdr()
                                .completed_by_completer
                                .fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    // Cancelled before the exchange started: this side completes the request
                    // with STATUS_CANCELLED (no routine was stored, so nobody else will).
                    Err(Cancelled) => {
                        ctx.minirdr()
                            .completed_by_completer
                            .fetch_add(1, Ordering::SeqCst);
                    }
                }
                assert_passive();
            }
        })
    };
    let canceller = {
        let (ctxs, rendezvous) = (ctxs.clone(), rendezvous.clone());
        thread::spawn(move || {
            let _abandon = rendezvous.abandon_on_panic();
            for (i, ctx) in ctxs.iter().enumerate() {
                rendezvous.wait(i);
                jitter(i * 3 + 1);
                if i % 3 == 1 {
                    // A late cancel: usually after the exchange completed.
                    thread::yield_now();
                }
                let outcome = ctx.cancel();
                assert!(outcome.cancelled_now(), "only one cancel per context here");
                ctx.minirdr()
                    .cancel_outcome
                    .store(outcome_code(outcome), Ordering::SeqCst);
                assert_passive();
            }
        })
    };
    completer.join().unwrap();
    canceller.join().unwrap();

    // How often each interleaving happened: cancel before arm / between arm and disarm / after.
    let mut tally = [0_usize; 3];
    for (i, ctx) in ctxs.iter().enumerate() {
        let s = ctx.minirdr();
        let routine = s.completed_by_routine.load(Ordering::SeqCst);
        let completer = s.completed_by_completer.load(Ordering::SeqCst);
        assert_eq!(
            routine + completer,
            1,
            "context {i}: {routine} + {completer} completions"
        );
        assert!(s.routine_calls.load(Ordering::SeqCst) <= 1, "context {i}");
        assert!(ctx.is_cancelled(), "context {i}");
        assert!(!ctx.has_cancel_routine(), "context {i}");
        match s.cancel_outcome.load(Ordering::SeqCst) {
            1 => assert_eq!(routine, 1, "context {i}: RoutineCalled but not counted"),
            2 => assert_eq!(routine, 0, "context {i}: NoRoutineArmed but routine ran"),
            other => panic!("context {i}: unexpected cancel outcome code {other}"),
        }
        let armed = s.arm_ok.load(Ordering::SeqCst);
        tally[usize::from(armed) + routine] += 1;
    }
    eprintln!(
        "stress: cancel before arm {}, routine called {}, disarmed first {} (of {N})",
        tally[0], tally[2], tally[1]
    );
}

#[test]
fn stress_cancel_before_arm_is_never_lost() {
    const N: usize = if cfg!(miri) { 50 } else { 3_000 };
    let ctxs = contexts(N);
    let rendezvous = SpinRendezvous::new();

    let armer = {
        let (ctxs, rendezvous) = (ctxs.clone(), rendezvous.clone());
        thread::spawn(move || {
            let _abandon = rendezvous.abandon_on_panic();
            for (i, ctx) in ctxs.iter().enumerate() {
                rendezvous.wait(i);
                if i % 4 == 0 {
                    // Let the canceller go first now and then (it usually loses otherwise).
                    thread::yield_now();
                }
                jitter(i * 5);
                let ok = ctx
                    .set_minirdr_cancel_routine(Some(abort_and_complete))
                    .is_ok();
                ctx.minirdr().arm_ok.store(ok, Ordering::SeqCst);
                assert_passive();
            }
        })
    };
    let canceller = {
        let (ctxs, rendezvous) = (ctxs.clone(), rendezvous.clone());
        thread::spawn(move || {
            let _abandon = rendezvous.abandon_on_panic();
            for (i, ctx) in ctxs.iter().enumerate() {
                rendezvous.wait(i);
                jitter(i * 11 + 2);
                let outcome = ctx.cancel();
                ctx.minirdr()
                    .cancel_outcome
                    .store(outcome_code(outcome), Ordering::SeqCst);
                assert_passive();
            }
        })
    };
    armer.join().unwrap();
    canceller.join().unwrap();

    let mut armed_first = 0;

    for (i, ctx) in ctxs.iter().enumerate() {
        let s = ctx.minirdr();
        let calls = s.routine_calls.load(Ordering::SeqCst);
        if s.arm_ok.load(Ordering::SeqCst) {
            // Armed before the cancel: the cancel must have found and called it.
            assert_eq!(calls, 1, "context {i}: armed routine never called");
            assert_eq!(s.cancel_outcome.load(Ordering::SeqCst), 1, "context {i}");
        } else {
            // The cancel came first: arming reported it and stored nothing.
            assert_eq!(calls, 0, "context {i}");
            assert_eq!(s.cancel_outcome.load(Ordering::SeqCst), 2, "context {i}");
        }
        assert!(!ctx.has_cancel_routine(), "context {i}: routine left armed");
        armed_first += usize::from(s.arm_ok.load(Ordering::SeqCst));
    }
    eprintln!("stress: armed before the cancel {armed_first} of {N}");
}

#[test]
fn concurrent_cancels_call_routine_exactly_once() {
    const THREADS: usize = 4;
    const N: usize = 500;
    let ctxs = contexts(N);
    for ctx in ctxs.iter() {
        ctx.set_minirdr_cancel_routine(Some(abort_and_complete))
            .unwrap();
    }
    let winners = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (ctxs, barrier, winners) = (ctxs.clone(), barrier.clone(), winners.clone());
            thread::spawn(move || {
                barrier.wait();
                for (i, ctx) in ctxs.iter().enumerate() {
                    jitter(i + t);
                    match ctx.cancel() {
                        CancelOutcome::RoutineCalled(status) => {
                            assert_eq!(status, NtStatus::CANCELLED);
                            winners.fetch_add(1, Ordering::SeqCst);
                        }
                        CancelOutcome::AlreadyCancelled => {}
                        CancelOutcome::NoRoutineArmed => panic!("armed routine vanished"),
                        CancelOutcome::BlockedOperationCancelled => {
                            panic!("this context was never blocked")
                        }
                    }
                }
                assert_passive();
            })
        })
        .collect();
    for handle in handles {
        handle.join().unwrap();
    }
    assert_eq!(winners.load(Ordering::SeqCst), N);
    for ctx in ctxs.iter() {
        assert_eq!(ctx.minirdr().routine_calls.load(Ordering::SeqCst), 1);
    }
}
