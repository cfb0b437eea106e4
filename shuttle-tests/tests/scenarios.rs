//! Larger scenarios than loom can explore exhaustively, under shuttle's randomized schedulers
//! (uniformly random, and PCT, which finds bugs of small depth with a known probability).
//!
//! Run with `RUSTFLAGS="--cfg shuttle" cargo test -p rdbss-shuttle-tests --release --target-dir
//! target/shuttle`. `RDBSS_SHUTTLE_ITERATIONS` scales every test's schedule count (default 1: the
//! counts below, about 15 s in all on a 2-core machine in release).
//!
//! Each schedule builds a fresh instance (with a `ManualWorkQueue`: a `ThreadWorkQueue` would run
//! work on real threads shuttle does not control) and checks, whatever the interleaving: every
//! request completed exactly once (a second completion is a `MULTIPLE_IRP_COMPLETE_REQUESTS` bug
//! check, which panics under the default policy and fails the schedule), the routine ran at most
//! once and only on a cancelled context, a request whose cancel won completed `STATUS_CANCELLED`,
//! nothing leaked (the instance drains to zero), and the IRQL is back at `PASSIVE_LEVEL`.
//! A failing schedule is printed by shuttle and can be replayed.
#![cfg(shuttle)]

use shuttle::sync::atomic::{AtomicUsize, Ordering};
use shuttle::sync::{Arc, Mutex};
use shuttle::thread;

use rdbss::irql::{self, Irql};
use rdbss::{
    BlockedQueue, CancelByIdOutcome, ContextInit, ContextRef, InterruptOutcome, InterruptTable,
    ManualWorkQueue, NtStatus, Rdbss, RequestId, RxContext, Settled,
};

/// Schedules per test, times `RDBSS_SHUTTLE_ITERATIONS`.
fn iterations(base: usize) -> usize {
    let scale = std::env::var("RDBSS_SHUTTLE_ITERATIONS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(1);
    base * scale.max(1)
}

#[derive(Default)]
struct Counters {
    completions: AtomicUsize,
    routine_calls: AtomicUsize,
}

#[derive(Clone, Default)]
struct Probe(std::sync::Arc<Counters>);

type Ctx = RxContext<Probe>;

/// Requests kept to the end of a schedule, with their probes.
type Kept = Arc<Mutex<Vec<(Probe, ContextRef<Probe>)>>>;

fn complete(ctx: &Ctx, status: NtStatus) {
    ctx.complete_request(status, 0)
        .expect("completed twice (MULTIPLE_IRP_COMPLETE_REQUESTS)");
    ctx.minirdr().0.completions.fetch_add(1, Ordering::SeqCst);
}

/// The minirdr routine: only ever on a cancelled context; completes with STATUS_CANCELLED.
fn abort(ctx: &Ctx) -> NtStatus {
    assert!(
        ctx.is_cancelled(),
        "routine ran on a context that is not cancelled"
    );
    ctx.minirdr().0.routine_calls.fetch_add(1, Ordering::SeqCst);
    complete(ctx, NtStatus::CANCELLED);
    NtStatus::SUCCESS
}

/// Arms; a refused arm completes at once. True if armed.
fn dispatch(ctx: &Ctx) -> bool {
    if ctx.set_minirdr_cancel_routine(Some(abort)).is_ok() {
        true
    } else {
        complete(ctx, NtStatus::CANCELLED);
        false
    }
}

/// The reply: disarm; complete only if the disarm won.
fn reply(ctx: &Ctx) {
    if ctx.set_minirdr_cancel_routine(None).is_ok() {
        complete(ctx, NtStatus::SUCCESS);
    }
}

fn instance() -> (Arc<Rdbss<Probe>>, Arc<ManualWorkQueue<Probe>>) {
    let queue = ManualWorkQueue::new();
    (Arc::new(Rdbss::with_work_queue(queue.clone())), queue)
}

fn create(rdbss: &Rdbss<Probe>, probe: &Probe) -> ContextRef<Probe> {
    rdbss
        .create_context(ContextInit::default(), probe.clone())
        .map_err(|(status, _)| status)
        .expect("create_context")
}

/// A tiny deterministic generator per thread (shuttle's scheduler is the source of randomness
/// that matters; this only varies what each thread does).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, bound: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) as usize) % bound.max(1)
    }
}

fn check_counts(probes: &[Probe], cancelled_status: &[(Probe, NtStatus)]) {
    for (i, probe) in probes.iter().enumerate() {
        assert_eq!(
            probe.0.completions.load(Ordering::SeqCst),
            1,
            "request {i} completed other than once"
        );
        assert!(probe.0.routine_calls.load(Ordering::SeqCst) <= 1);
    }
    for (probe, status) in cancelled_status {
        if probe.0.routine_calls.load(Ordering::SeqCst) == 1 {
            assert_eq!(
                *status,
                NtStatus::CANCELLED,
                "the routine ran but the request ended otherwise"
            );
        }
    }
}

/// 8 threads and 1000 contexts: each thread creates its share, publishes the ids, arms, and
/// replies to some of its requests, while cancelling other threads' requests by id (some at
/// DISPATCH_LEVEL, deferred to the work queue), and drops its handles.
fn registry_scenario() {
    const THREADS: usize = 8;
    const PER_THREAD: usize = 125;
    let (rdbss, queue) = instance();
    let ids: Arc<Mutex<Vec<RequestId>>> = Arc::new(Mutex::new(Vec::new()));
    let probes: Arc<Mutex<Vec<Probe>>> = Arc::new(Mutex::new(Vec::new()));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (rdbss, ids, probes) = (rdbss.clone(), ids.clone(), probes.clone());
            thread::spawn(move || {
                let mut rng = Lcg(t as u64 + 1);
                let mut mine = Vec::with_capacity(PER_THREAD);
                for _ in 0..PER_THREAD {
                    let probe = Probe::default();
                    let ctx = create(&rdbss, &probe);
                    ids.lock().unwrap().push(ctx.id());
                    probes.lock().unwrap().push(probe);
                    let armed = dispatch(&ctx);
                    mine.push((ctx, armed));
                    // Cancel somebody's request by id, now and then at DISPATCH.
                    let victim = {
                        let ids = ids.lock().unwrap();
                        ids[rng.next(ids.len())]
                    };
                    if rng.next(4) == 0 {
                        let _raised = irql::raise(Irql::DISPATCH);
                        match rdbss.cancel_by_id(victim) {
                            Ok(_) | Err(NtStatus::NOT_FOUND) => {}
                            Err(other) => panic!("cancel_by_id at DISPATCH: {other:?}"),
                        }
                    } else {
                        match rdbss.cancel_by_id(victim) {
                            Ok(
                                CancelByIdOutcome::Cancelled(_)
                                | CancelByIdOutcome::AlreadyCompleted
                                | CancelByIdOutcome::Deferred,
                            )
                            | Err(NtStatus::NOT_FOUND) => {}
                            Err(other) => panic!("cancel_by_id: {other:?}"),
                        }
                    }
                    // Reply to an older request of ours, and drop it.
                    if mine.len() > 2 && rng.next(2) == 0 {
                        let (ctx, armed) = mine.swap_remove(rng.next(mine.len()));
                        if armed {
                            reply(&ctx);
                        }
                    }
                }
                for (ctx, armed) in mine {
                    if armed {
                        reply(&ctx);
                    }
                }
                assert_eq!(irql::current(), Irql::PASSIVE);
            })
        })
        .collect();
    for handle in handles {
        handle.join().unwrap();
    }
    // Deferred cancels of requests already completed and freed find nothing.
    queue.run_pending();
    let probes = probes.lock().unwrap();
    assert_eq!(probes.len(), THREADS * PER_THREAD);
    check_counts(&probes, &[]);
    assert_eq!(rdbss.active_contexts(), 0, "contexts leaked");
}

#[test]
fn registry_8_threads_1000_contexts_random_schedules() {
    shuttle::check_random(registry_scenario, iterations(60));
}

#[test]
fn registry_8_threads_1000_contexts_pct_schedules() {
    shuttle::check_pct(registry_scenario, iterations(60), 3);
}

/// The FUSE interrupt layer at scale: 4 threads serve 64 requests each (register, arm, reply,
/// unregister) while 4 threads send interrupts for random ids, settling the remembered ones.
/// Every request completes exactly once; an interrupt settled as delivered was never lost; the
/// table ends empty and the instance drains.
fn interrupt_scenario() {
    const SERVERS: usize = 4;
    const INTERRUPTERS: usize = 4;
    const PER_SERVER: usize = 64;
    let (rdbss, _queue) = instance();
    let table: Arc<InterruptTable<Probe>> = Arc::new(InterruptTable::new());
    let served: Kept = Arc::new(Mutex::new(Vec::new()));
    let servers: Vec<_> = (0..SERVERS)
        .map(|s| {
            let (rdbss, table, served) = (rdbss.clone(), table.clone(), served.clone());
            thread::spawn(move || {
                for r in 0..PER_SERVER {
                    let unique = 2 * (1 + (s * PER_SERVER + r) as u64);
                    let probe = Probe::default();
                    let ctx = create(&rdbss, &probe);
                    let registration = table.register(unique, &ctx).expect("register");
                    if dispatch(&ctx) {
                        thread::yield_now();
                        reply(&ctx);
                    }
                    drop(table.unregister(unique, &ctx));
                    let _ = registration;
                    // Kept until the end: a cancel that found it in flight may still be running.
                    served.lock().unwrap().push((probe, ctx));
                }
            })
        })
        .collect();
    let interrupters: Vec<_> = (0..INTERRUPTERS)
        .map(|i| {
            let table = table.clone();
            thread::spawn(move || {
                let mut rng = Lcg(100 + i as u64);
                for _ in 0..PER_SERVER {
                    let unique = 2 * (1 + rng.next(SERVERS * PER_SERVER) as u64);
                    match table.interrupt(unique) {
                        InterruptOutcome::Pending(pending) => {
                            thread::yield_now();
                            let _: Settled = table.settle(pending);
                        }
                        InterruptOutcome::Cancelled(_) => {}
                        InterruptOutcome::InvalidId => panic!("valid id refused"),
                    }
                }
            })
        })
        .collect();
    for handle in servers.into_iter().chain(interrupters) {
        handle.join().unwrap();
    }
    let served = std::mem::take(&mut *served.lock().unwrap());
    let outcomes: Vec<(Probe, NtStatus)> = served
        .iter()
        .map(|(probe, ctx)| (probe.clone(), ctx.stored_status()))
        .collect();
    drop(served);
    let probes: Vec<Probe> = outcomes.iter().map(|(p, _)| p.clone()).collect();
    check_counts(&probes, &outcomes);
    assert!(table.is_empty(), "table not empty: {table:?}");
    assert_eq!(rdbss.active_contexts(), 0);
}

#[test]
fn interrupt_table_8_threads_random_schedules() {
    shuttle::check_random(interrupt_scenario, iterations(300));
}

#[test]
fn interrupt_table_8_threads_pct_schedules() {
    shuttle::check_pct(interrupt_scenario, iterations(300), 3);
}

/// Serialised (blocked) operations: 6 threads enqueue 20 contexts each on one queue, a resumer
/// wakes them one at a time (each woken operation is then replied to), and 2 threads cancel
/// random ones by id. Every operation completes exactly once: the cancelled ones by the core
/// (unlinked, STATUS_CANCELLED) or by their reply.
fn blocked_scenario() {
    const ENQUEUERS: usize = 6;
    const PER_THREAD: usize = 20;
    let (rdbss, queue) = instance();
    let blocked: Arc<BlockedQueue<Probe>> = Arc::new(BlockedQueue::new());
    let ids: Arc<Mutex<Vec<RequestId>>> = Arc::new(Mutex::new(Vec::new()));
    let kept: Kept = Arc::new(Mutex::new(Vec::new()));
    let enqueued = Arc::new(AtomicUsize::new(0));
    let mut handles = Vec::new();
    for _ in 0..ENQUEUERS {
        let (rdbss, blocked, ids, kept, enqueued) = (
            rdbss.clone(),
            blocked.clone(),
            ids.clone(),
            kept.clone(),
            enqueued.clone(),
        );
        handles.push(thread::spawn(move || {
            for _ in 0..PER_THREAD {
                let probe = Probe::default();
                let ctx = create(&rdbss, &probe);
                kept.lock().unwrap().push((probe, ctx.reference()));
                ids.lock().unwrap().push(ctx.id());
                match blocked.enqueue(&ctx) {
                    Ok(()) => {}
                    // Cancelled before it was queued: the enqueuer completes it.
                    Err(NtStatus::CANCELLED) => complete(&ctx, NtStatus::CANCELLED),
                    Err(other) => panic!("enqueue: {other:?}"),
                }
                enqueued.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    for c in 0..2 {
        let (rdbss, ids) = (rdbss.clone(), ids.clone());
        handles.push(thread::spawn(move || {
            let mut rng = Lcg(7 + c);
            for _ in 0..PER_THREAD {
                let victim = {
                    let ids = ids.lock().unwrap();
                    if ids.is_empty() {
                        None
                    } else {
                        Some(ids[rng.next(ids.len())])
                    }
                };
                if let Some(victim) = victim {
                    let _ = rdbss.cancel_by_id(victim);
                }
                thread::yield_now();
            }
        }));
    }
    {
        let (blocked, enqueued) = (blocked.clone(), enqueued.clone());
        handles.push(thread::spawn(move || loop {
            match blocked.resume_blocked_operations_serially() {
                Some(ctx) => {
                    // Woken: the operation now runs and is answered (the cancel may race it).
                    if dispatch(&ctx) {
                        reply(&ctx);
                    }
                }
                None if enqueued.load(Ordering::SeqCst) == ENQUEUERS * PER_THREAD
                    && blocked.is_empty() =>
                {
                    break
                }
                None => thread::yield_now(),
            }
        }));
    }
    for handle in handles {
        handle.join().unwrap();
    }
    queue.run_pending();
    let kept = std::mem::take(&mut *kept.lock().unwrap());
    assert_eq!(kept.len(), ENQUEUERS * PER_THREAD);
    for (i, (probe, ctx)) in kept.iter().enumerate() {
        assert!(ctx.is_completed(), "operation {i} never completed");
        let by_us = probe.0.completions.load(Ordering::SeqCst);
        assert!(by_us <= 1, "operation {i} completed {by_us} times");
        if by_us == 0 {
            // Unlinked and completed by the core's cancel of a blocked operation.
            assert_eq!(ctx.stored_status(), NtStatus::CANCELLED);
        }
    }
    drop(kept);
    assert_eq!(rdbss.active_contexts(), 0);
}

#[test]
fn blocked_queue_9_threads_random_schedules() {
    shuttle::check_random(blocked_scenario, iterations(200));
}
