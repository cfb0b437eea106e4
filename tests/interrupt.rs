//! The FUSE interrupt layer (`rdbss::interrupt`, DESIGN.md section 5): registration, interrupts
//! of in-flight requests, interrupts that overtake their request, settling with `EAGAIN`,
//! replies, invalid and duplicate ids, and a multi-threaded stress run.
//!
//! Each request's mini-redirector part counts its completions; the cancel routine completes with
//! `STATUS_CANCELLED`, the "reply" path disarms first and completes only if the disarm wins, as
//! a real mini-redirector does (DESIGN.md section 2).

#![cfg(feature = "std")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;

use rdbss::interrupt::{InterruptStats, InterruptTableError, FUSE_INT_REQ_BIT};
use rdbss::{
    CancelOutcome, ContextInit, ContextRef, InterruptOutcome, InterruptTable, NtStatus, Rdbss,
    Registration, RxContext, Settled,
};

#[derive(Default)]
struct Request {
    completions: AtomicUsize,
    routine_calls: AtomicUsize,
}

type Ctx = RxContext<Arc<Request>>;

fn complete(ctx: &Ctx, status: NtStatus) {
    ctx.complete_request(status, 0)
        .expect("completed twice (MULTIPLE_IRP_COMPLETE_REQUESTS)");
    ctx.minirdr().completions.fetch_add(1, Ordering::SeqCst);
}

/// The minirdr cancel routine: aborts and completes with STATUS_CANCELLED (the adapter's EINTR).
fn abort(ctx: &Ctx) -> NtStatus {
    ctx.minirdr().routine_calls.fetch_add(1, Ordering::SeqCst);
    complete(ctx, NtStatus::CANCELLED);
    NtStatus::SUCCESS
}

/// Dispatch: arm the routine; a context already cancelled is completed at once.
fn dispatch(ctx: &Ctx) -> bool {
    match ctx.set_minirdr_cancel_routine(Some(abort)) {
        Ok(()) => true,
        Err(_) => {
            complete(ctx, NtStatus::CANCELLED);
            false
        }
    }
}

/// The server's reply: disarm; complete only if the disarm won.
fn reply(ctx: &Ctx) {
    if ctx.set_minirdr_cancel_routine(None).is_ok() {
        complete(ctx, NtStatus::SUCCESS);
    }
}

fn new_request(rdbss: &Rdbss<Arc<Request>>) -> (ContextRef<Arc<Request>>, Arc<Request>) {
    let request = Arc::new(Request::default());
    let ctx = rdbss
        .create_context(ContextInit::default(), request.clone())
        .map_err(|(status, _)| status)
        .expect("create_context");
    (ctx, request)
}

#[test]
fn interrupt_of_in_flight_request_runs_the_routine_which_completes_it_cancelled() {
    let rdbss = Rdbss::new();
    let table = InterruptTable::new();
    let (ctx, request) = new_request(&rdbss);
    assert_eq!(table.register(2, &ctx), Ok(Registration::Registered));
    assert!(dispatch(&ctx));
    assert_eq!(
        table.interrupt(2),
        InterruptOutcome::Cancelled(CancelOutcome::RoutineCalled(NtStatus::SUCCESS))
    );
    assert_eq!(ctx.stored_status(), NtStatus::CANCELLED);
    assert_eq!(request.routine_calls.load(Ordering::SeqCst), 1);
    // The late reply loses the disarm and completes nothing.
    reply(&ctx);
    assert_eq!(request.completions.load(Ordering::SeqCst), 1);
    assert!(table.unregister(2, &ctx).is_some());
    assert!(table.is_empty());
    assert_eq!(table.stats().cancelled_in_flight, 1);
}

#[test]
fn interrupt_before_registration_is_remembered_and_the_registration_cancels_the_request() {
    let rdbss = Rdbss::new();
    let table = InterruptTable::new();
    let InterruptOutcome::Pending(pending) = table.interrupt(8) else {
        panic!("an interrupt for an unknown id must be remembered");
    };
    assert_eq!(pending.unique(), 8);
    assert_eq!(table.remembered(), 1);
    let (ctx, request) = new_request(&rdbss);
    assert_eq!(
        table.register(8, &ctx),
        Ok(Registration::Interrupted(CancelOutcome::NoRoutineArmed))
    );
    assert!(ctx.is_cancelled());
    // Arming reports the cancel, so the request never goes out and is answered EINTR.
    assert!(!dispatch(&ctx));
    assert_eq!(ctx.stored_status(), NtStatus::CANCELLED);
    assert_eq!(request.routine_calls.load(Ordering::SeqCst), 0);
    assert_eq!(table.settle(pending), Settled::Delivered);
    assert!(table.unregister(8, &ctx).is_some());
    assert!(table.is_empty());
    let stats = table.stats();
    assert_eq!(
        (
            stats.remembered,
            stats.cancelled_on_registration,
            stats.retried
        ),
        (1, 1, 0)
    );
}

#[test]
fn remembered_interrupt_whose_request_never_comes_settles_as_retry_and_is_forgotten() {
    let table = InterruptTable::<()>::new();
    let InterruptOutcome::Pending(pending) = table.interrupt(10) else {
        panic!("expected a pending interrupt");
    };
    assert_eq!(table.settle(pending), Settled::Retry);
    assert!(table.is_empty());
    assert_eq!(table.stats().retried, 1);
}

#[test]
fn interrupt_for_an_already_answered_request_changes_nothing_and_settles_as_retry() {
    let rdbss = Rdbss::new();
    let table = InterruptTable::new();
    let (ctx, request) = new_request(&rdbss);
    assert_eq!(table.register(12, &ctx), Ok(Registration::Registered));
    assert!(dispatch(&ctx));
    reply(&ctx);
    drop(table.unregister(12, &ctx));
    // The interrupt crossed the reply: remembered, then answered EAGAIN (which the kernel drops).
    let InterruptOutcome::Pending(pending) = table.interrupt(12) else {
        panic!("expected a pending interrupt");
    };
    assert_eq!(table.settle(pending), Settled::Retry);
    assert_eq!(ctx.stored_status(), NtStatus::SUCCESS);
    assert!(!ctx.is_cancelled());
    assert_eq!(request.completions.load(Ordering::SeqCst), 1);
    assert_eq!(request.routine_calls.load(Ordering::SeqCst), 0);
    assert!(table.is_empty());
}

#[test]
fn interrupt_racing_the_reply_after_disarm_marks_cancelled_but_the_reply_completes() {
    let rdbss = Rdbss::new();
    let table = InterruptTable::new();
    let (ctx, request) = new_request(&rdbss);
    assert_eq!(table.register(14, &ctx), Ok(Registration::Registered));
    assert!(dispatch(&ctx));
    // The reply path disarmed first: it owns completion.
    assert!(ctx.set_minirdr_cancel_routine(None).is_ok());
    assert_eq!(
        table.interrupt(14),
        InterruptOutcome::Cancelled(CancelOutcome::NoRoutineArmed)
    );
    complete(&ctx, NtStatus::SUCCESS);
    assert_eq!(request.completions.load(Ordering::SeqCst), 1);
    assert_eq!(ctx.stored_status(), NtStatus::SUCCESS);
    drop(table.unregister(14, &ctx));
}

#[test]
fn second_interrupt_for_the_same_request_is_harmless() {
    let rdbss = Rdbss::new();
    let table = InterruptTable::new();
    let (ctx, request) = new_request(&rdbss);
    assert_eq!(table.register(16, &ctx), Ok(Registration::Registered));
    assert!(dispatch(&ctx));
    assert!(matches!(
        table.interrupt(16),
        InterruptOutcome::Cancelled(CancelOutcome::RoutineCalled(_))
    ));
    assert_eq!(
        table.interrupt(16),
        InterruptOutcome::Cancelled(CancelOutcome::AlreadyCancelled)
    );
    assert_eq!(request.routine_calls.load(Ordering::SeqCst), 1);
    assert_eq!(request.completions.load(Ordering::SeqCst), 1);
    drop(table.unregister(16, &ctx));
}

#[test]
fn repeated_interrupts_before_registration_keep_one_entry_and_only_the_latest_settle_retries() {
    let table = InterruptTable::<()>::new();
    let InterruptOutcome::Pending(first) = table.interrupt(18) else {
        panic!("expected pending");
    };
    let InterruptOutcome::Pending(second) = table.interrupt(18) else {
        panic!("expected pending");
    };
    assert_eq!(table.remembered(), 1);
    assert_eq!(table.settle(first), Settled::Delivered);
    assert_eq!(table.remembered(), 1);
    assert_eq!(table.settle(second), Settled::Retry);
    assert!(table.is_empty());
}

#[test]
fn ids_that_are_zero_or_carry_the_interrupt_bit_are_refused_and_change_nothing() {
    let rdbss = Rdbss::new();
    let table = InterruptTable::new();
    let (ctx, _request) = new_request(&rdbss);
    assert_eq!(
        table.register(0, &ctx),
        Err(InterruptTableError::InvalidId(0))
    );
    assert_eq!(
        table.register(20 | FUSE_INT_REQ_BIT, &ctx),
        Err(InterruptTableError::InvalidId(21))
    );
    assert_eq!(table.interrupt(0), InterruptOutcome::InvalidId);
    assert_eq!(table.interrupt(21), InterruptOutcome::InvalidId);
    assert!(table.is_empty());
    assert!(!ctx.is_cancelled());
    assert_eq!(
        ctx.reference_count(),
        1,
        "a refused registration keeps no reference"
    );
    assert_eq!(table.stats().invalid_ids, 4);
    assert_eq!(table.stats().interrupts, 0);
}

#[test]
fn duplicate_registration_is_refused_and_cannot_unregister_the_original() {
    let rdbss = Rdbss::new();
    let table = InterruptTable::new();
    let (original, _a) = new_request(&rdbss);
    let (duplicate, _b) = new_request(&rdbss);
    assert_eq!(table.register(22, &original), Ok(Registration::Registered));
    assert_eq!(
        table.register(22, &duplicate),
        Err(InterruptTableError::AlreadyRegistered(22))
    );
    assert_eq!(duplicate.reference_count(), 1);
    assert!(table.unregister(22, &duplicate).is_none());
    assert_eq!(table.in_flight(), 1);
    // The interrupt still reaches the original.
    assert!(matches!(
        table.interrupt(22),
        InterruptOutcome::Cancelled(_)
    ));
    assert!(original.is_cancelled());
    assert!(!duplicate.is_cancelled());
    assert!(table.unregister(22, &original).is_some());
    assert_eq!(table.stats().duplicate_registrations, 1);
    let message = InterruptTableError::AlreadyRegistered(22).to_string();
    assert!(message.contains("already registered"), "{message}");
}

#[test]
fn table_holds_a_reference_while_registered_and_returns_it_on_unregister() {
    let rdbss = Rdbss::new();
    let table = InterruptTable::new();
    let (ctx, _request) = new_request(&rdbss);
    assert_eq!(table.register(24, &ctx), Ok(Registration::Registered));
    assert_eq!(ctx.reference_count(), 2);
    let returned = table.unregister(24, &ctx).expect("registered");
    assert!(ContextRef::ptr_eq(&returned, &ctx));
    drop(returned);
    assert_eq!(ctx.reference_count(), 1);
    assert!(table.unregister(24, &ctx).is_none(), "unregister twice");
    drop(ctx);
    assert_eq!(rdbss.active_contexts(), 0);
}

#[test]
fn stats_start_at_zero_and_debug_names_the_counts() {
    let table = InterruptTable::<()>::default();
    assert_eq!(table.stats(), InterruptStats::default());
    assert!(format!("{table:?}").contains("entries: 0"));
}

/// Many requests, each registered, dispatched and replied on one thread while another thread
/// interrupts it at a random moment (sometimes before it registers). Every request completes
/// exactly once; an interrupt settled as delivered always cancelled its request; the table ends
/// empty and the instance drains.
#[test]
fn stress_register_interrupt_reply_from_two_threads_completes_each_request_exactly_once() {
    const REQUESTS: u64 = if cfg!(miri) { 100 } else { 20_000 };
    let rdbss = Arc::new(Rdbss::new());
    let table = Arc::new(InterruptTable::new());
    let requests: Arc<Vec<Arc<Request>>> =
        Arc::new((0..REQUESTS).map(|_| Arc::default()).collect());
    let barrier = Arc::new(Barrier::new(2));
    let served = {
        let (rdbss, table, requests, barrier) = (
            rdbss.clone(),
            table.clone(),
            requests.clone(),
            barrier.clone(),
        );
        thread::spawn(move || {
            barrier.wait();
            let mut cancelled = 0;
            for (i, request) in requests.iter().enumerate() {
                let unique = 2 * (i as u64 + 1);
                let ctx = rdbss
                    .create_context(ContextInit::default(), request.clone())
                    .map_err(|(s, _)| s)
                    .unwrap();
                let registration = table.register(unique, &ctx).unwrap();
                if dispatch(&ctx) {
                    std::hint::spin_loop();
                    reply(&ctx);
                }
                if matches!(registration, Registration::Interrupted(_)) {
                    cancelled += 1;
                }
                drop(table.unregister(unique, &ctx));
            }
            cancelled
        })
    };
    let interrupter = {
        let (table, barrier) = (table.clone(), barrier.clone());
        thread::spawn(move || {
            barrier.wait();
            let mut delivered = Vec::new();
            for i in 0..REQUESTS {
                let unique = 2 * (i + 1);
                match table.interrupt(unique) {
                    InterruptOutcome::Pending(pending) => {
                        std::hint::spin_loop();
                        if table.settle(pending) == Settled::Delivered {
                            delivered.push(i as usize);
                        }
                    }
                    InterruptOutcome::Cancelled(_) => {}
                    InterruptOutcome::InvalidId => panic!("valid id refused"),
                }
            }
            delivered
        })
    };
    let _cancelled_on_registration = served.join().unwrap();
    let delivered = interrupter.join().unwrap();
    for (i, request) in requests.iter().enumerate() {
        assert_eq!(
            request.completions.load(Ordering::SeqCst),
            1,
            "request {i} completed other than once"
        );
        assert!(request.routine_calls.load(Ordering::SeqCst) <= 1);
    }
    // Settled::Delivered means the request registered while the interrupt was remembered (and
    // was cancelled by that), or registered and replied before the settle. Either way the
    // request is finished; the table must be empty and nothing leaked.
    assert!(delivered.len() as u64 <= REQUESTS);
    assert!(table.is_empty(), "{table:?}");
    assert_eq!(rdbss.active_contexts(), 0);
    let stats = table.stats();
    assert_eq!(stats.registered, REQUESTS);
    assert_eq!(stats.interrupts, REQUESTS);
    assert_eq!(
        stats.cancelled_in_flight + stats.remembered,
        REQUESTS,
        "{stats:?}"
    );
}
