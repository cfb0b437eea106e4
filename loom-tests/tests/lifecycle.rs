//! The context lifecycle under loom: registry lookups, reference counting, completion, blocked
//! queues and reuse, with crossbeam-epoch's reclamation modelled too.
//!
//! Run with `RUSTFLAGS="--cfg loom --cfg crossbeam_loom" LOOM_MAX_PREEMPTIONS=3 cargo test -p
//! rdbss-loom-tests --release --test lifecycle`. Without `--cfg loom` this file compiles to nothing.
//!
//! Every model ends by dropping the instance, so loom also checks that nothing leaked: each
//! context's mini-redirector part holds a loom `Arc`, which loom reports if it is never dropped.
//!
//! Teeth (test-only mutants, see `.ci/loom-mutants`):
//! - `lookup_resurrects` (a lookup takes a reference with a plain increment, even from zero)
//!   makes [`cancel_by_id_parallel_final_dereference`] fail: the context is released twice;
//! - `lookup_skips_recheck` (no serial-number check after taking the reference) makes
//!   [`lookup_parallel_free_and_slot_reuse`] fail: a stale id finds the slot's next context.
#![cfg(loom)]

use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;

use rdbss::{
    BlockedQueue, CancelByIdOutcome, CancelOutcome, Cancelled, ContextInit, ContextRef,
    MajorFunction, ManualWorkQueue, NtStatus, Rdbss, RxContext,
};

/// Per-request state: counters shared with the test (a loom `Arc`, so a leak is reported).
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

/// The cancel side owns completion: the routine completes the request.
fn complete_as_cancelled(ctx: &Ctx) -> NtStatus {
    ctx.minirdr()
        .counters
        .routine_calls
        .fetch_add(1, Ordering::SeqCst);
    complete(ctx, NtStatus::CANCELLED);
    NtStatus::SUCCESS
}

fn complete(ctx: &Ctx, status: NtStatus) {
    ctx.complete_request(status, 0)
        .expect("completed twice (MULTIPLE_IRP_COMPLETE_REQUESTS)");
    ctx.minirdr()
        .counters
        .completions
        .fetch_add(1, Ordering::SeqCst);
}

fn instance() -> Rdbss<Probe> {
    Rdbss::with_work_queue(ManualWorkQueue::new())
}

fn create(rdbss: &Rdbss<Probe>, probe: &Probe) -> ContextRef<Probe> {
    rdbss
        .create_context(
            ContextInit {
                major_function: MajorFunction::READ,
                ..ContextInit::default()
            },
            probe.clone(),
        )
        .map_err(|(status, _)| status)
        .expect("create_context")
}

fn model(f: impl Fn() + Sync + Send + 'static) {
    loom::model::Builder::new().check(f);
}

/// Registry invariants 1 and 2: a cancel by id racing the final dereference either finds nothing
/// or holds a reference for the whole callback; the context is released exactly once.
#[test]
fn cancel_by_id_parallel_final_dereference() {
    model(|| {
        let rdbss = instance();
        let probe = Probe::default();
        let ctx = create(&rdbss, &probe);
        ctx.set_minirdr_cancel_routine(Some(complete_as_cancelled))
            .unwrap();
        let id = ctx.id();

        let canceller = {
            let rdbss = rdbss.clone();
            thread::spawn(move || rdbss.cancel_by_id(id))
        };
        drop(ctx); // the final dereference, unless the canceller holds a reference
        let outcome = canceller.join().unwrap();

        let calls = probe.counters.routine_calls.load(Ordering::SeqCst);
        match outcome {
            Err(status) => {
                assert_eq!(status, NtStatus::NOT_FOUND);
                assert_eq!(calls, 0);
            }
            Ok(outcome) => {
                assert_eq!(
                    outcome,
                    CancelByIdOutcome::Cancelled(CancelOutcome::RoutineCalled(NtStatus::SUCCESS))
                );
                assert_eq!(calls, 1);
            }
        }
        let active = rdbss.active_contexts();
        if active != 0 {
            // A context released twice is also freed twice: leak the instance instead of letting
            // its collector double-free while this panic unwinds (which would abort the report).
            core::mem::forget(rdbss);
            panic!("context released twice or never (active count {active})");
        }
        assert_eq!(rdbss.lookup(id).err(), Some(NtStatus::NOT_FOUND));
    });
}

/// Protocol invariant 4 through the lifecycle: cancel by id ∥ completion (disarm, complete) ∥ the
/// creator's dereference. Exactly one completion; everything freed.
#[test]
fn cancel_parallel_complete_parallel_dereference() {
    model(|| {
        let rdbss = instance();
        let probe = Probe::default();
        let ctx = create(&rdbss, &probe);
        ctx.set_minirdr_cancel_routine(Some(complete_as_cancelled))
            .unwrap();
        let id = ctx.id();

        let completer = {
            let ctx = ctx.clone();
            thread::spawn(move || match ctx.set_minirdr_cancel_routine(None) {
                Ok(()) => {
                    complete(&ctx, NtStatus::SUCCESS);
                    drop(ctx);
                }
                Err(Cancelled) => drop(ctx), // the cancel side completes
            })
        };
        let canceller = {
            let rdbss = rdbss.clone();
            thread::spawn(move || {
                let _ = rdbss.cancel_by_id(id);
            })
        };
        drop(ctx);
        completer.join().unwrap();
        canceller.join().unwrap();

        assert_eq!(probe.counters.completions.load(Ordering::SeqCst), 1);
        assert!(probe.counters.routine_calls.load(Ordering::SeqCst) <= 1);
        assert_eq!(rdbss.active_contexts(), 0);
    });
}

/// Blocked invariant 3: a cancel racing `resume_blocked_operations_serially` for the same queued
/// operation. Exactly one side owns it: the cancel completes it, or the resumer hands it to its
/// owner, who sees CANCELLED (or not) when arming and completes it.
#[test]
fn cancel_parallel_blocked_resume() {
    model(|| {
        let rdbss = instance();
        let probe = Probe::default();
        let queue = Arc::new(BlockedQueue::new());
        let op = create(&rdbss, &probe);
        queue.enqueue(&op).unwrap();
        let id = op.id();
        drop(op); // the queue holds its own reference

        let resumer = {
            let queue = queue.clone();
            thread::spawn(move || {
                if let Some(op) = queue.resume_blocked_operations_serially() {
                    // The operation's turn: it starts its exchange by arming.
                    match op.set_minirdr_cancel_routine(Some(complete_as_cancelled)) {
                        Err(Cancelled) => complete(&op, NtStatus::CANCELLED),
                        Ok(()) => match op.set_minirdr_cancel_routine(None) {
                            Ok(()) => complete(&op, NtStatus::SUCCESS),
                            Err(Cancelled) => {} // the routine completed it
                        },
                    }
                }
            })
        };
        let outcome = rdbss.cancel_by_id(id);
        resumer.join().unwrap();

        // A blocked operation the cancel unlinked was completed by the library itself.
        let by_cancel = usize::from(
            outcome
                == Ok(CancelByIdOutcome::Cancelled(
                    CancelOutcome::BlockedOperationCancelled,
                )),
        );
        assert_eq!(
            probe.counters.completions.load(Ordering::SeqCst) + by_cancel,
            1,
            "cancel said {outcome:?}"
        );
        assert!(queue.is_empty());
        assert_eq!(rdbss.active_contexts(), 0);
    });
}

/// Registry invariants 3 and 5: a lookup of an id racing the free of its context and the reuse
/// of its slot by a new context never returns the new context under the old id.
#[test]
fn lookup_parallel_free_and_slot_reuse() {
    model(|| {
        let rdbss = instance();
        let probe = Probe::default();
        let first = create(&rdbss, &probe);
        let first_id = first.id();

        let churn = {
            let (rdbss, probe) = (rdbss.clone(), probe.clone());
            thread::spawn(move || {
                drop(first);
                // Reuses the freed slot with a new serial number (unless the lookup holds the
                // first context, which then keeps its slot).
                create(&rdbss, &probe)
            })
        };
        if let Ok(found) = rdbss.lookup(first_id) {
            assert_eq!(
                found.id(),
                first_id,
                "a stale id found the slot's next context"
            );
        }
        let second = churn.join().unwrap();
        drop(second);
        assert_eq!(rdbss.active_contexts(), 0);
    });
}

/// Registry invariant 6: reinitialisation ∥ a lookup of the old id. Either the lookup holds a
/// reference (and reinitialisation is refused) or it finds nothing; it never sees the context
/// mid-reset or under its new id.
#[test]
fn reinitialize_parallel_lookup_of_old_id() {
    model(|| {
        let rdbss = instance();
        let probe = Probe::default();
        let mut ctx = create(&rdbss, &probe);
        let old = ctx.id();

        let looker = {
            let rdbss = rdbss.clone();
            thread::spawn(move || match rdbss.lookup(old) {
                Ok(found) => {
                    assert_eq!(found.id(), old, "found the reused context under its old id");
                    assert!(!found.is_completed());
                    true
                }
                Err(status) => {
                    assert_eq!(status, NtStatus::NOT_FOUND);
                    false
                }
            })
        };
        let reused = ctx.reinitialize();
        let found = looker.join().unwrap();
        match reused {
            Ok(new) => assert_ne!(new, old),
            Err(status) => {
                assert_eq!(status, NtStatus::INVALID_DEVICE_STATE);
                assert!(found, "reinitialise refused with no other reference");
            }
        }
        drop(ctx);
        assert_eq!(rdbss.active_contexts(), 0);
    });
}
