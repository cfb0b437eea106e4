//! Every interleaving of arm, disarm, cancel and flag updates on one `RxContext`, explored by loom.
//!
//! Run with `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=3 cargo test -p rdbss-loom-tests --release`.
//! Without `--cfg loom` this file compiles to nothing.
//!
//! Each test states the invariant of `rdbss::context` it checks. Two of them have teeth shown by
//! test-only mutants of the protocol (`--cfg rdbss_mutant="..."`, see `.ci/run`), which loom must
//! catch:
//! - `arm_check_outside_lock` makes [`arm_parallel_cancel`] fail (a cancel slips between the check
//!   and the store: arming reports success but the routine is never called);
//! - `flags_plain_rmw` makes [`cancel_parallel_flag_update`] fail (the plain read-modify-write of
//!   the flag word loses a concurrently set bit).
#![cfg(loom)]

use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;

use rdbss::irql::{self, Irql};
use rdbss::{
    CancelClaim, CancelOutcome, Cancelled, ContextFlags, MajorFunction, NtStatus, RxContext,
};

/// The mini-redirector part of each context: what the routine and the completer observe.
#[derive(Default)]
struct Exchange {
    routine_calls: AtomicUsize,
    completions: AtomicUsize,
    /// The IRQL the routine saw, plus one (0 = never ran).
    routine_irql: AtomicUsize,
}

type Ctx = RxContext<Exchange>;

/// The cancel routine: aborts the exchange and completes the request (the cancel side owns it).
fn abort_and_complete(ctx: &Ctx) -> NtStatus {
    let ex = ctx.minirdr();
    ex.routine_calls.fetch_add(1, Ordering::SeqCst);
    ex.routine_irql
        .store(irql::current().level() as usize + 1, Ordering::SeqCst);
    ex.completions.fetch_add(1, Ordering::SeqCst);
    NtStatus::CANCELLED
}

fn new_ctx() -> Arc<Ctx> {
    Arc::new(RxContext::new(MajorFunction::READ, Exchange::default()))
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    // LOOM_MAX_PREEMPTIONS and friends are read from the environment by the builder.
    loom::model::Builder::new().check(f);
}

/// Invariant 1 and 2: a cancel that races an arm is never lost. Either the arm wins (Ok) and the
/// cancel calls the routine exactly once, or the cancel wins and the arm reports `Cancelled` and
/// stores nothing.
#[test]
fn arm_parallel_cancel() {
    model(|| {
        let ctx = new_ctx();
        let armer = {
            let ctx = ctx.clone();
            thread::spawn(move || {
                let r = ctx.set_minirdr_cancel_routine(Some(abort_and_complete));
                assert_eq!(irql::current(), Irql::PASSIVE, "IRQL restored after arm");
                r
            })
        };
        let outcome = ctx.cancel();
        assert_eq!(irql::current(), Irql::PASSIVE, "IRQL restored after cancel");
        let armed = armer.join().unwrap();

        let calls = ctx.minirdr().routine_calls.load(Ordering::SeqCst);
        match armed {
            Ok(()) => {
                assert_eq!(
                    calls, 1,
                    "arming succeeded but the racing cancel did not call the routine (lost cancel)"
                );
                assert_eq!(outcome, CancelOutcome::RoutineCalled(NtStatus::CANCELLED));
            }
            Err(Cancelled) => {
                assert_eq!(calls, 0, "arm reported CANCELLED yet a routine ran");
                assert_eq!(outcome, CancelOutcome::NoRoutineArmed);
            }
        }
        assert!(ctx.is_cancelled());
        assert!(
            !ctx.has_cancel_routine(),
            "a routine is left armed on a cancelled context"
        );
    });
}

/// Invariant 4: arm, then disarm at completion, racing a cancel. Exactly one side completes the
/// request: the completer when arm failed (it completes with STATUS_CANCELLED) or disarm
/// succeeded, the routine otherwise. After a successful disarm the routine never runs.
#[test]
fn disarm_parallel_cancel_exactly_one_completion() {
    model(|| {
        let ctx = new_ctx();
        let completer = {
            let ctx = ctx.clone();
            thread::spawn(move || {
                let ex = ctx.minirdr();
                match ctx.set_minirdr_cancel_routine(Some(abort_and_complete)) {
                    // A cancel before arming is reported: the completer completes it.
                    Err(Cancelled) => {
                        ex.completions.fetch_add(1, Ordering::SeqCst);
                        return "arm-refused";
                    }
                    Ok(()) => {}
                }
                assert_eq!(irql::current(), Irql::PASSIVE);
                let disarm = ctx.set_minirdr_cancel_routine(None);
                assert_eq!(irql::current(), Irql::PASSIVE);
                match disarm {
                    Ok(()) => {
                        ex.completions.fetch_add(1, Ordering::SeqCst);
                        "disarm-won"
                    }
                    Err(Cancelled) => "cancel-won",
                }
            })
        };
        ctx.cancel();
        assert_eq!(irql::current(), Irql::PASSIVE);
        let who = completer.join().unwrap();

        let ex = ctx.minirdr();
        assert_eq!(
            ex.completions.load(Ordering::SeqCst),
            1,
            "request completed {} times ({who})",
            ex.completions.load(Ordering::SeqCst)
        );
        let calls = ex.routine_calls.load(Ordering::SeqCst);
        match who {
            "cancel-won" => assert_eq!(calls, 1),
            _ => assert_eq!(calls, 0, "routine ran after {who}"),
        }
    });
}

/// Invariant 3: two cancels race; exactly one cancels and calls the routine, once.
#[test]
fn cancel_parallel_cancel_routine_once() {
    model(|| {
        let ctx = new_ctx();
        ctx.set_minirdr_cancel_routine(Some(abort_and_complete))
            .unwrap();
        let other = {
            let ctx = ctx.clone();
            thread::spawn(move || ctx.cancel())
        };
        let mine = ctx.cancel();
        let theirs = other.join().unwrap();

        assert_eq!(ctx.minirdr().routine_calls.load(Ordering::SeqCst), 1);
        assert_eq!(
            [mine, theirs]
                .iter()
                .filter(|o| **o == CancelOutcome::AlreadyCancelled)
                .count(),
            1,
            "exactly one of two cancels is the one that cancelled: {mine:?} / {theirs:?}"
        );
        assert!([mine, theirs].contains(&CancelOutcome::RoutineCalled(NtStatus::CANCELLED)));
    });
}

/// Invariant 2: once a cancel has finished, arming on any thread reports `Cancelled`, stores
/// nothing, and a later cancel finds nothing to do.
#[test]
fn arm_after_cancel_is_refused() {
    model(|| {
        let ctx = new_ctx();
        let canceller = {
            let ctx = ctx.clone();
            thread::spawn(move || ctx.cancel())
        };
        assert_eq!(canceller.join().unwrap(), CancelOutcome::NoRoutineArmed);
        let armer = {
            let ctx = ctx.clone();
            thread::spawn(move || ctx.set_minirdr_cancel_routine(Some(abort_and_complete)))
        };
        assert_eq!(armer.join().unwrap(), Err(Cancelled));
        assert!(!ctx.has_cancel_routine());
        assert_eq!(ctx.cancel(), CancelOutcome::AlreadyCancelled);
        assert_eq!(ctx.minirdr().routine_calls.load(Ordering::SeqCst), 0);
    });
}

/// Invariant 6: a cancel racing an update of another flag loses neither bit.
#[test]
fn cancel_parallel_flag_update() {
    model(|| {
        let ctx = new_ctx();
        let setter = {
            let ctx = ctx.clone();
            thread::spawn(move || ctx.set_flags(ContextFlags::MINIRDR_INVOKED).unwrap())
        };
        let outcome = ctx.cancel();
        let seen_by_setter = setter.join().unwrap();
        let flags = ctx.flags();
        assert!(
            flags.contains(ContextFlags::CANCELLED | ContextFlags::MINIRDR_INVOKED),
            "flag bit lost by a concurrent flag update: final {flags:?}, setter saw {seen_by_setter:?}, cancel {outcome:?}"
        );
    });
}

/// Invariant 5 and the IRQL rules: callers running at APC_LEVEL get APC_LEVEL back on every path,
/// and the routine runs at the canceller's IRQL (APC), never at DISPATCH under the lock.
#[test]
fn irql_restored_on_every_path_at_apc() {
    model(|| {
        let ctx = new_ctx();
        let armer = {
            let ctx = ctx.clone();
            thread::spawn(move || {
                let _apc = irql::raise(Irql::APC);
                let armed = ctx.set_minirdr_cancel_routine(Some(abort_and_complete));
                assert_eq!(irql::current(), Irql::APC);
                let disarmed = ctx.set_minirdr_cancel_routine(None);
                assert_eq!(irql::current(), Irql::APC);
                (armed, disarmed)
            })
        };
        {
            let _apc = irql::raise(Irql::APC);
            ctx.cancel();
            assert_eq!(irql::current(), Irql::APC);
        }
        assert_eq!(irql::current(), Irql::PASSIVE);
        let (armed, disarmed) = armer.join().unwrap();

        let seen = ctx.minirdr().routine_irql.load(Ordering::SeqCst);
        if armed.is_ok() && disarmed.is_err() {
            assert_eq!(
                seen,
                Irql::APC.level() as usize + 1,
                "routine ran at the wrong IRQL"
            );
        } else {
            assert_eq!(
                seen, 0,
                "routine ran although it was not armed at cancel time"
            );
        }
    });
}

/// DISPATCH-level cancel: `claim_cancel` at DISPATCH marks the context at once (so a racing arm is
/// refused or its routine is claimed), and the claimed routine runs exactly once, after lowering.
#[test]
fn claim_at_dispatch_parallel_arm() {
    model(|| {
        let ctx = new_ctx();
        let armer = {
            let ctx = ctx.clone();
            thread::spawn(move || ctx.set_minirdr_cancel_routine(Some(abort_and_complete)))
        };
        let claim = {
            let _dispatch = irql::raise(Irql::DISPATCH);
            let claim = ctx.claim_cancel();
            assert_eq!(irql::current(), Irql::DISPATCH);
            assert_eq!(
                ctx.minirdr().routine_calls.load(Ordering::SeqCst),
                0,
                "claim_cancel ran the routine at DISPATCH"
            );
            claim
        };
        let armed = armer.join().unwrap();
        let ran_routine = matches!(claim, CancelClaim::Routine(_));
        let outcome = claim.run(&ctx);
        assert_eq!(
            ran_routine,
            armed.is_ok(),
            "claim and arm disagree: {outcome:?}"
        );
        assert_eq!(
            ctx.minirdr().routine_calls.load(Ordering::SeqCst),
            usize::from(armed.is_ok())
        );
        if armed.is_ok() {
            assert_eq!(
                ctx.minirdr().routine_irql.load(Ordering::SeqCst),
                Irql::PASSIVE.level() as usize + 1
            );
        }
    });
}
