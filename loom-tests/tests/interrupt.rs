//! The FUSE interrupt layer under loom: registration ∥ interrupt ∥ reply, every interleaving.
//!
//! Run with `RUSTFLAGS="--cfg loom --cfg crossbeam_loom" LOOM_MAX_PREEMPTIONS=3 cargo test -p
//! rdbss-loom-tests --release --test interrupt`. Without `--cfg loom` this file compiles to
//! nothing.
//!
//! The request side is a mini-redirector as DESIGN.md section 2 has it: register the FUSE id,
//! arm the cancel routine (complete `STATUS_CANCELLED` at once if arming is refused), and on the
//! server's reply disarm and complete only if the disarm won; then unregister. The interrupt
//! side is the adapter's `FUSE_INTERRUPT` handler: interrupt, and settle a remembered interrupt.
//!
//! Checked in every interleaving: exactly one completion; the routine at most once; an interrupt
//! settled as delivered was never lost (its request ended cancelled); an interrupt answered
//! `EAGAIN` leaves the request untouched; the table ends empty; nothing leaks (the instance is
//! dropped at the end of every model and each request's counters are a loom `Arc`).
//!
//! Teeth (test-only mutant, see `.ci/loom-mutants`): `interrupt_register_forgets` (a registration
//! drops a remembered interrupt without cancelling) makes [`interrupt_parallel_register`] fail
//! with "interrupt lost".
#![cfg(loom)]

use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;

use rdbss::{
    CancelOutcome, ContextInit, ContextRef, InterruptOutcome, InterruptTable, ManualWorkQueue,
    NtStatus, Rdbss, Registration, RxContext, Settled,
};

#[derive(Clone, Default)]
struct Probe {
    counters: Arc<Counters>,
}

#[derive(Default)]
struct Counters {
    routine_calls: AtomicUsize,
    completions: AtomicUsize,
}

type Ctx = RxContext<Probe>;

fn complete(ctx: &Ctx, status: NtStatus) {
    ctx.complete_request(status, 0)
        .expect("completed twice (MULTIPLE_IRP_COMPLETE_REQUESTS)");
    ctx.minirdr()
        .counters
        .completions
        .fetch_add(1, Ordering::SeqCst);
}

fn abort(ctx: &Ctx) -> NtStatus {
    ctx.minirdr()
        .counters
        .routine_calls
        .fetch_add(1, Ordering::SeqCst);
    complete(ctx, NtStatus::CANCELLED);
    NtStatus::SUCCESS
}

/// Arms the routine; a refused arm (already cancelled) completes at once. True if sent.
fn dispatch(ctx: &Ctx) -> bool {
    if ctx.set_minirdr_cancel_routine(Some(abort)).is_ok() {
        true
    } else {
        complete(ctx, NtStatus::CANCELLED);
        false
    }
}

/// The server's reply: disarm, and complete only if the disarm won.
fn reply(ctx: &Ctx) {
    if ctx.set_minirdr_cancel_routine(None).is_ok() {
        complete(ctx, NtStatus::SUCCESS);
    }
}

fn create(rdbss: &Rdbss<Probe>, probe: &Probe) -> ContextRef<Probe> {
    rdbss
        .create_context(ContextInit::default(), probe.clone())
        .map_err(|(status, _)| status)
        .expect("create_context")
}

/// What the interrupt side saw, for the final checks.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Seen {
    Cancelled(CancelOutcome),
    Delivered,
    Retry,
}

fn interrupt_and_settle(table: &InterruptTable<Probe>, unique: u64) -> Seen {
    match table.interrupt(unique) {
        InterruptOutcome::Cancelled(outcome) => Seen::Cancelled(outcome),
        InterruptOutcome::Pending(pending) => match table.settle(pending) {
            Settled::Delivered => Seen::Delivered,
            Settled::Retry => Seen::Retry,
        },
        InterruptOutcome::InvalidId => panic!("valid id refused"),
    }
}

/// Invariant 1 of `interrupt`: the request's whole life (register, dispatch, reply, unregister)
/// races one interrupt (interrupt, then settle if remembered).
#[test]
fn interrupt_parallel_register() {
    loom::model(|| {
        let rdbss = Arc::new(Rdbss::with_work_queue(ManualWorkQueue::new()));
        let table = Arc::new(InterruptTable::new());
        let probe = Probe::default();

        let request = {
            let (rdbss, table, probe) = (rdbss.clone(), table.clone(), probe.clone());
            thread::spawn(move || {
                let ctx = create(&rdbss, &probe);
                let registration = table.register(2, &ctx).expect("register");
                if dispatch(&ctx) {
                    reply(&ctx);
                }
                drop(table.unregister(2, &ctx));
                (registration, ctx)
            })
        };
        let seen = interrupt_and_settle(&table, 2);
        let (registration, ctx) = request.join().unwrap();
        // Read after both sides are done: an interrupt that found the request in flight may
        // cancel it after the request side has finished (the cancel runs outside the lock).
        let (cancelled, status) = (ctx.is_cancelled(), ctx.stored_status());
        drop(ctx);

        let counters = &probe.counters;
        assert_eq!(
            counters.completions.load(Ordering::SeqCst),
            1,
            "not exactly one completion"
        );
        assert!(counters.routine_calls.load(Ordering::SeqCst) <= 1);
        match seen {
            // The interrupt was handed to the registration: it must have cancelled the request.
            Seen::Delivered => {
                assert!(
                    cancelled && status == NtStatus::CANCELLED,
                    "interrupt lost: settled as delivered but the request ended {status:?} \
                     (registration {registration:?})"
                );
            }
            // Found in flight and the routine ran: the request is answered EINTR.
            Seen::Cancelled(CancelOutcome::RoutineCalled(_)) => {
                assert_eq!(status, NtStatus::CANCELLED);
            }
            // Found in flight before arming or after the disarm: marked; whoever completes wins.
            Seen::Cancelled(_) => assert!(cancelled),
            // EAGAIN: the request never saw this interrupt (it is still to come or already done).
            Seen::Retry => {
                assert!(matches!(registration, Registration::Registered));
            }
        }
        if matches!(registration, Registration::Interrupted(_)) {
            assert_eq!(seen, Seen::Delivered);
        }
        assert!(table.is_empty(), "table not empty: {table:?}");
        assert_eq!(rdbss.active_contexts(), 0);
    });
}

/// A dispatched request: its reply ∥ an interrupt ∥ a second interrupt (a signal, then another
/// one). Exactly one completion, the routine at most once, and the table ends empty.
#[test]
fn interrupt_parallel_reply_and_second_interrupt() {
    loom::model(|| {
        let rdbss = Arc::new(Rdbss::with_work_queue(ManualWorkQueue::new()));
        let table = Arc::new(InterruptTable::new());
        let probe = Probe::default();
        let ctx = create(&rdbss, &probe);
        assert_eq!(table.register(4, &ctx), Ok(Registration::Registered));
        assert!(dispatch(&ctx));

        let replier = {
            let (table, ctx) = (table.clone(), ctx.reference());
            thread::spawn(move || {
                reply(&ctx);
                drop(table.unregister(4, &ctx));
            })
        };
        let second = {
            let table = table.clone();
            thread::spawn(move || interrupt_and_settle(&table, 4))
        };
        let first = interrupt_and_settle(&table, 4);
        replier.join().unwrap();
        let second = second.join().unwrap();

        let counters = &probe.counters;
        assert_eq!(counters.completions.load(Ordering::SeqCst), 1);
        let routine_calls = counters.routine_calls.load(Ordering::SeqCst);
        assert!(routine_calls <= 1);
        let called = [first, second]
            .iter()
            .filter(|s| matches!(s, Seen::Cancelled(CancelOutcome::RoutineCalled(_))))
            .count();
        assert_eq!(called, routine_calls, "{first:?} {second:?}");
        if routine_calls == 1 {
            assert_eq!(ctx.stored_status(), NtStatus::CANCELLED);
        } else {
            assert_eq!(ctx.stored_status(), NtStatus::SUCCESS);
        }
        drop(ctx);
        assert!(table.is_empty(), "table not empty: {table:?}");
        assert_eq!(rdbss.active_contexts(), 0);
    });
}
