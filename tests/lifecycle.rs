//! The context lifecycle of an [`Rdbss`] instance (`DESIGN.md` section 4): creation (reference
//! count 1, serial numbers, the active count, draining), reference counting and the final
//! dereference, references kept by id, reinitialisation for reuse, cancel by id (with the
//! reference held for the callback), the deferral of DISPATCH-level cancels to a work queue,
//! completion (`MULTIPLE_IRP_COMPLETE_REQUESTS` on a second one), blocked (serialised) operations,
//! and two concurrency stress runs.
//!
//! Everything here runs under the default `BugCheckPolicy::Panic`: a broken IRQL or completion
//! rule panics, so a test that passes also saw no bug check. The `Record` policy is exercised in
//! `tests/lifecycle_record.rs`.
//!
//! Miri: iteration counts are cut down with [`scaled`] under `cfg(miri)`, and no test is ignored
//! there (`MIRIFLAGS="-Zmiri-disable-isolation" cargo +nightly miri test --test lifecycle`).
//!
//! Needs the `std` feature: each std thread is its own emulated processor.

#![cfg(feature = "std")]

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

use rdbss::irql::{self, Irql};
use rdbss::{
    BlockedQueue, BlockedState, CancelByIdOutcome, CancelClaim, CancelOutcome, Cancelled,
    ContextFlags, ContextInit, ContextRef, DeferredCancel, Dereferenced, DrainStatus,
    MajorFunction, ManualWorkQueue, NtStatus, Rdbss, RequestId, RxContext, WorkQueue,
};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// `large` natively, `small` under Miri (which is some 100x slower).
fn scaled(large: usize, small: usize) -> usize {
    if cfg!(miri) {
        small
    } else {
        large
    }
}

/// What the cancel routine saw, kept in the mini-redirector part of the context.
#[derive(Default, Debug)]
struct Probe {
    /// Calls of [`probe_routine`].
    calls: AtomicUsize,
    /// The IRQL the routine ran at.
    irql_seen: AtomicU8,
    /// `reference_count()` as seen from inside the routine.
    refs_seen: AtomicUsize,
    /// The thread the routine ran on.
    thread_seen: Mutex<Option<ThreadId>>,
}

/// The status [`probe_routine`] returns, so `RoutineCalled` can be told apart.
const ROUTINE_STATUS: NtStatus = NtStatus::REQUEST_ABORTED;

fn probe_routine(ctx: &RxContext<Probe>) -> NtStatus {
    let probe = ctx.minirdr();
    probe
        .irql_seen
        .store(irql::current().level(), Ordering::SeqCst);
    probe
        .refs_seen
        .store(ctx.reference_count(), Ordering::SeqCst);
    *probe.thread_seen.lock().unwrap() = Some(thread::current().id());
    // Last, so a test that waits for the call sees everything the routine recorded.
    probe.calls.fetch_add(1, Ordering::SeqCst);
    ROUTINE_STATUS
}

fn calls(ctx: &RxContext<Probe>) -> usize {
    ctx.minirdr().calls.load(Ordering::SeqCst)
}

fn init(major_function: MajorFunction) -> ContextInit {
    ContextInit {
        major_function,
        ..ContextInit::default()
    }
}

/// An instance whose DISPATCH-level cancels wait in a [`ManualWorkQueue`] (no worker thread),
/// and that queue.
fn manual<M: Send + Sync + 'static>() -> (Rdbss<M>, Arc<ManualWorkQueue<M>>) {
    let queue = ManualWorkQueue::new();
    (Rdbss::with_work_queue(queue.clone()), queue)
}

/// A probe context in a fresh manual-queue instance.
fn probe_instance() -> Rdbss<Probe> {
    manual().0
}

fn create(rdbss: &Rdbss<Probe>) -> ContextRef<Probe> {
    rdbss
        .create_context(init(MajorFunction::READ), Probe::default())
        .unwrap_or_else(|(status, _)| panic!("create_context failed: {status:?}"))
}

/// Counts drops of the mini-redirector state.
struct Tracked {
    drops: Arc<AtomicUsize>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.drops.fetch_add(1, Ordering::SeqCst);
    }
}

fn create_tracked(rdbss: &Rdbss<Tracked>, drops: &Arc<AtomicUsize>) -> ContextRef<Tracked> {
    rdbss
        .create_context(
            init(MajorFunction::WRITE),
            Tracked {
                drops: drops.clone(),
            },
        )
        .unwrap_or_else(|(status, _)| panic!("create_context failed: {status:?}"))
}

/// Polls `done` every millisecond for up to five seconds.
#[track_caller]
fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(1));
    }
}

#[track_caller]
fn assert_not_found<M>(rdbss: &Rdbss<M>, id: RequestId)
where
    M: Send + Sync + 'static,
{
    assert!(
        matches!(rdbss.lookup(id), Err(NtStatus::NOT_FOUND)),
        "lookup({id:?})"
    );
    assert_eq!(rdbss.cancel_by_id(id), Err(NtStatus::NOT_FOUND), "{id:?}");
    assert_eq!(
        rdbss.complete_by_id(id, NtStatus::SUCCESS, 0),
        Err(NtStatus::NOT_FOUND),
        "{id:?}"
    );
    assert_eq!(
        rdbss.dereference_by_id(id),
        Err(NtStatus::NOT_FOUND),
        "{id:?}"
    );
}

/// A tiny xorshift generator: reproducible "random moments" without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A short busy wait that varies with `seed`, so racing threads meet at different points.
fn jitter(seed: u64) {
    let spins = (seed.wrapping_mul(2_654_435_761) >> 7) % 257;
    let mut x = 0_u64;
    for k in 0..spins {
        x = std::hint::black_box(x.wrapping_add(k));
    }
    std::hint::black_box(x);
}

// ---------------------------------------------------------------------------------------------
// 1. The instance: creation, serial numbers, the active count, draining
// ---------------------------------------------------------------------------------------------

#[test]
fn create_gives_reference_count_one_and_distinct_increasing_serial_numbers() {
    let rdbss = probe_instance();
    let mut serials = Vec::new();
    let mut handles = Vec::new();
    for _ in 0..5 {
        let ctx = rdbss
            .create_context(
                ContextInit {
                    // Ignored: the instance assigns serial numbers from its own counter.
                    serial_number: 4242,
                    ..init(MajorFunction::READ)
                },
                Probe::default(),
            )
            .unwrap();
        assert_eq!(ctx.reference_count(), 1);
        assert_eq!(ctx.id().serial_number(), ctx.serial_number());
        assert_ne!(ctx.serial_number(), 4242, "init.serial_number is ignored");
        serials.push(ctx.serial_number());
        handles.push(ctx);
    }
    assert!(
        serials.windows(2).all(|w| w[0] < w[1]),
        "serial numbers must be distinct and increasing: {serials:?}"
    );
    let ids: std::collections::HashSet<_> = handles.iter().map(|c| c.id()).collect();
    assert_eq!(
        ids.len(),
        handles.len(),
        "every live context has its own id"
    );
    // Freeing a context does not give its serial number out again.
    let freed = handles.pop().unwrap();
    let last = freed.serial_number();
    drop(freed);
    let next = create(&rdbss);
    assert!(next.serial_number() > last);
}

#[test]
fn create_keeps_the_init_fields_and_flags() {
    let rdbss = probe_instance();
    let flags = ContextFlags::WAIT | ContextFlags::ASYNC_OPERATION;
    let ctx = rdbss
        .create_context(
            ContextInit {
                major_function: MajorFunction::DEVICE_CONTROL,
                minor_function: 7,
                flags,
                serial_number: 0,
            },
            Probe::default(),
        )
        .unwrap();
    assert_eq!(ctx.major_function(), MajorFunction::DEVICE_CONTROL);
    assert_eq!(ctx.minor_function(), 7);
    assert_eq!(ctx.flags(), flags);
    assert!(!ctx.is_cancelled());
    assert!(!ctx.is_completed());
    assert!(!ctx.has_cancel_routine());
    assert_eq!(ctx.stored_status(), NtStatus::SUCCESS);
    assert_eq!(ctx.information(), 0);
    assert_eq!(ctx.blocked_state(), BlockedState::NotBlocked);
}

#[test]
fn active_contexts_counts_contexts_from_creation_to_the_final_dereference() {
    let rdbss = probe_instance();
    assert_eq!(rdbss.active_contexts(), 0);
    let a = create(&rdbss);
    assert_eq!(rdbss.active_contexts(), 1);
    let b = create(&rdbss);
    let b2 = b.clone();
    assert_eq!(
        rdbss.active_contexts(),
        2,
        "a second handle is not a second context"
    );
    drop(b);
    assert_eq!(rdbss.active_contexts(), 2, "b is still referenced");
    drop(b2);
    assert_eq!(rdbss.active_contexts(), 1);
    drop(a);
    assert_eq!(rdbss.active_contexts(), 0);
}

#[test]
fn create_with_cancelled_flag_is_invalid_parameter_and_hands_back_the_minirdr_state() {
    let rdbss: Rdbss<String> = manual().0;
    let refused = rdbss.create_context(
        ContextInit {
            flags: ContextFlags::CANCELLED | ContextFlags::WAIT,
            ..init(MajorFunction::READ)
        },
        String::from("exchange state"),
    );
    match refused {
        Err((status, minirdr)) => {
            assert_eq!(status, NtStatus::INVALID_PARAMETER);
            assert_eq!(minirdr, "exchange state");
        }
        Ok(ctx) => panic!("a context was created cancelled: {ctx:?}"),
    }
    assert_eq!(rdbss.active_contexts(), 0, "nothing was registered");
}

#[test]
fn create_after_start_drain_is_invalid_device_state_and_hands_back_the_minirdr_state() {
    let rdbss: Rdbss<String> = manual().0;
    let in_flight = rdbss
        .create_context(init(MajorFunction::READ), String::from("first"))
        .unwrap();
    assert!(!rdbss.is_draining());
    rdbss.start_drain();
    assert!(rdbss.is_draining());
    match rdbss.create_context(init(MajorFunction::READ), String::from("second")) {
        Err((status, minirdr)) => {
            assert_eq!(status, NtStatus::INVALID_DEVICE_STATE);
            assert_eq!(minirdr, "second");
        }
        Ok(ctx) => panic!("created while draining: {ctx:?}"),
    }
    assert_eq!(
        rdbss.active_contexts(),
        1,
        "the refused creation backed out"
    );
    // Contexts in flight are untouched.
    assert!(!in_flight.is_cancelled());
    assert_eq!(in_flight.minirdr(), "first");
    assert!(rdbss.lookup(in_flight.id()).is_ok());
}

#[test]
fn drain_status_is_active_until_draining_with_no_context_left() {
    let rdbss = probe_instance();
    assert_eq!(
        rdbss.drain_status(),
        DrainStatus::Active(0),
        "not draining: never Drained, even with no context"
    );
    let a = create(&rdbss);
    let b = create(&rdbss);
    assert_eq!(rdbss.drain_status(), DrainStatus::Active(2));
    rdbss.start_drain();
    assert_eq!(rdbss.drain_status(), DrainStatus::Active(2));
    drop(a);
    assert_eq!(rdbss.drain_status(), DrainStatus::Active(1));
    drop(b);
    assert_eq!(rdbss.drain_status(), DrainStatus::Drained);
}

#[test]
fn drain_with_requests_in_flight_times_out_with_their_number() {
    let rdbss = probe_instance();
    let a = create(&rdbss);
    let b = create(&rdbss);
    let timeout = Duration::from_millis(20);
    let started = Instant::now();
    assert_eq!(rdbss.drain(timeout), Err(2));
    assert!(
        started.elapsed() >= timeout,
        "returned after {:?}, before the timeout",
        started.elapsed()
    );
    assert!(
        rdbss.is_draining(),
        "drain starts draining even when it times out"
    );
    assert!(rdbss
        .create_context(init(MajorFunction::READ), Probe::default())
        .is_err());
    drop(a);
    assert_eq!(rdbss.drain(timeout), Err(1));
    drop(b);
    assert_eq!(rdbss.drain(timeout), Ok(()));
}

#[test]
fn drain_returns_ok_when_the_last_request_is_dropped_from_another_thread() {
    let rdbss = probe_instance();
    let first = create(&rdbss);
    let second = create(&rdbss);
    let waiting = Arc::new(AtomicBool::new(false));
    let dropper = {
        let waiting = waiting.clone();
        thread::spawn(move || {
            while !waiting.load(Ordering::SeqCst) {
                thread::yield_now();
            }
            // Give the drainer time to go to sleep on its condition variable.
            thread::sleep(Duration::from_millis(10));
            drop(first);
            thread::sleep(Duration::from_millis(5));
            second.complete_request(NtStatus::SUCCESS, 0).unwrap();
        })
    };
    waiting.store(true, Ordering::SeqCst);
    let started = Instant::now();
    assert_eq!(rdbss.drain(Duration::from_secs(30)), Ok(()));
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "drain must return when the count reaches zero, not at the deadline"
    );
    assert_eq!(rdbss.drain_status(), DrainStatus::Drained);
    dropper.join().unwrap();
}

#[test]
fn drain_with_nothing_in_flight_returns_ok_at_once() {
    let rdbss = probe_instance();
    assert_eq!(rdbss.drain(Duration::ZERO), Ok(()));
    assert_eq!(rdbss.drain_status(), DrainStatus::Drained);
}

#[test]
#[should_panic(expected = "IRQL_NOT_LESS_OR_EQUAL (0x0000000A)")]
fn drain_at_dispatch_is_irql_not_less_or_equal() {
    let rdbss = probe_instance();
    let _dispatch = irql::raise(Irql::DISPATCH);
    let _ = rdbss.drain(Duration::from_millis(1));
}

#[test]
fn two_instances_have_independent_serials_counts_lookups_and_drain() {
    let (a, _qa) = manual::<Probe>();
    let (b, _qb) = manual::<Probe>();
    let a1 = create(&a);
    let a2 = create(&a);
    let b1 = create(&b);
    // Serial numbers come from per-instance counters: b's first is a's first, and creating in b
    // did not move a's counter.
    assert_eq!(b1.serial_number(), a1.serial_number());
    let a3 = create(&a);
    assert_eq!(a3.serial_number(), a2.serial_number() + 1);
    assert_eq!((a.active_contexts(), b.active_contexts()), (3, 1));

    // An id of a's is not a context of b's (b has nothing in that slot).
    assert!(matches!(b.lookup(a3.id()), Err(NtStatus::NOT_FOUND)));
    assert_eq!(b.cancel_by_id(a3.id()), Err(NtStatus::NOT_FOUND));
    assert!(!a3.is_cancelled());

    // Cancelling in b leaves a alone.
    assert_eq!(
        b.cancel_by_id(b1.id()),
        Ok(CancelByIdOutcome::Cancelled(CancelOutcome::NoRoutineArmed))
    );
    assert!(b1.is_cancelled());
    assert!(!a1.is_cancelled());

    // Draining a does not drain b.
    a.start_drain();
    assert!(a
        .create_context(init(MajorFunction::READ), Probe::default())
        .is_err());
    assert!(!b.is_draining());
    let b2 = create(&b);
    assert_eq!(b.active_contexts(), 2);
    drop((a1, a2, a3));
    assert_eq!(a.drain_status(), DrainStatus::Drained);
    assert_eq!(b.drain_status(), DrainStatus::Active(2));
    assert_eq!(a.drain(Duration::ZERO), Ok(()));
    drop((b1, b2));
    assert_eq!(b.active_contexts(), 0);
}

#[test]
fn a_cloned_rdbss_handle_is_the_same_instance() {
    let rdbss = probe_instance();
    let other = rdbss.clone();
    let ctx = create(&other);
    assert_eq!(rdbss.active_contexts(), 1);
    assert!(ContextRef::ptr_eq(&rdbss.lookup(ctx.id()).unwrap(), &ctx));
    rdbss.start_drain();
    assert!(other.is_draining());
}

// ---------------------------------------------------------------------------------------------
// 2. Reference counting and the final dereference
// ---------------------------------------------------------------------------------------------

#[test]
fn clone_and_reference_increment_and_drop_decrements_the_count() {
    let rdbss = probe_instance();
    let ctx = create(&rdbss);
    let a = ctx.clone();
    assert_eq!(ctx.reference_count(), 2);
    let b = ctx.reference();
    assert_eq!(ctx.reference_count(), 3);
    assert!(ContextRef::ptr_eq(&a, &b) && ContextRef::ptr_eq(&a, &ctx));
    assert_eq!(a.id(), ctx.id());
    let looked_up = rdbss.lookup(ctx.id()).unwrap();
    assert_eq!(ctx.reference_count(), 4, "lookup takes a reference");
    assert!(ContextRef::ptr_eq(&looked_up, &ctx));
    drop(looked_up);
    drop(a);
    assert_eq!(ctx.reference_count(), 2);
    drop(b);
    assert_eq!(ctx.reference_count(), 1);
}

#[test]
fn dereference_reports_still_referenced_then_freed() {
    let rdbss = probe_instance();
    let ctx = create(&rdbss);
    let other = ctx.reference();
    let id = ctx.id();
    assert_eq!(other.dereference(), Dereferenced::StillReferenced);
    assert_eq!(ctx.reference_count(), 1);
    assert_eq!(rdbss.active_contexts(), 1);
    assert!(rdbss.lookup(id).is_ok(), "still registered");
    assert_eq!(ctx.dereference(), Dereferenced::Freed);
    assert_eq!(rdbss.active_contexts(), 0);
}

#[test]
fn final_dereference_unlinks_the_context_so_its_id_is_not_found() {
    let rdbss = probe_instance();
    let keep = create(&rdbss);
    let ctx = create(&rdbss);
    let id = ctx.id();
    drop(ctx);
    assert_not_found(&rdbss, id);
    assert_eq!(rdbss.active_contexts(), 1);
    // The other context is untouched.
    assert_eq!(keep.reference_count(), 1);
    assert!(rdbss.lookup(keep.id()).is_ok());
}

#[test]
fn a_freed_slot_is_reused_with_a_new_serial_number_and_the_old_id_stays_not_found() {
    let rdbss = probe_instance();
    let old = create(&rdbss);
    let old_id = old.id();
    drop(old);
    let new = create(&rdbss);
    assert_eq!(
        new.id().slot(),
        old_id.slot(),
        "the free slot is taken again"
    );
    assert_ne!(new.id(), old_id);
    assert_not_found(&rdbss, old_id);
    assert!(!new.is_cancelled() && !new.is_completed());
    assert_eq!(
        new.reference_count(),
        1,
        "failed lookups of the old id left no reference"
    );
}

#[test]
fn minirdr_state_is_not_dropped_while_a_reference_remains() {
    let (rdbss, _queue) = manual::<Tracked>();
    let kept_drops = Arc::new(AtomicUsize::new(0));
    let kept = create_tracked(&rdbss, &kept_drops);
    let extra = kept.clone();
    // Churn plenty of other contexts so the epoch collector runs many times.
    let churn_drops = Arc::new(AtomicUsize::new(0));
    let churn_until = |done: &dyn Fn() -> bool, what: &str| {
        let mut churned = 0;
        while !done() {
            churned += 1;
            assert!(churned < 100_000, "{what}");
            drop(create_tracked(&rdbss, &churn_drops));
        }
    };
    churn_until(
        &|| churn_drops.load(Ordering::SeqCst) > 0,
        "the collector never ran",
    );
    drop(extra);
    let target = churn_drops.load(Ordering::SeqCst) + scaled(1_000, 40);
    churn_until(
        &|| churn_drops.load(Ordering::SeqCst) >= target,
        "the collector stopped running",
    );
    assert_eq!(kept_drops.load(Ordering::SeqCst), 0, "still referenced");
    assert_eq!(kept.reference_count(), 1);
    // Once released, it is dropped like the others.
    drop(kept);
    churn_until(
        &|| kept_drops.load(Ordering::SeqCst) > 0,
        "never dropped after its last reference",
    );
    assert_eq!(kept_drops.load(Ordering::SeqCst), 1);
}

#[test]
fn minirdr_state_is_dropped_eventually_while_the_instance_lives() {
    let drops = Arc::new(AtomicUsize::new(0));
    let (rdbss, _queue) = manual::<Tracked>();
    let first = create_tracked(&rdbss, &drops);
    drop(first);
    assert_eq!(rdbss.active_contexts(), 0, "unlinked at once");
    // Destruction is deferred through the instance's epoch collector: more traffic lets it run.
    let mut churned = 0;
    while drops.load(Ordering::SeqCst) == 0 {
        churned += 1;
        assert!(
            churned < 100_000,
            "the first context's state was never dropped"
        );
        drop(create_tracked(&rdbss, &drops));
    }
    assert!(drops.load(Ordering::SeqCst) <= churned + 1);
}

#[test]
fn dropping_every_handle_and_the_instance_on_a_thread_that_exits_drops_every_minirdr_state() {
    let drops = Arc::new(AtomicUsize::new(0));
    let n = scaled(200, 10);
    {
        let drops = drops.clone();
        // Each thread caches one epoch handle; the thread's exit releases it.
        thread::spawn(move || {
            let (rdbss, queue) = manual::<Tracked>();
            let handles: Vec<_> = (0..n).map(|_| create_tracked(&rdbss, &drops)).collect();
            let mut extra = Vec::new();
            for (i, h) in handles.iter().enumerate() {
                if i % 3 == 0 {
                    extra.push(h.clone());
                }
            }
            assert_eq!(drops.load(Ordering::SeqCst), 0);
            drop(handles);
            drop(extra);
            assert_eq!(rdbss.active_contexts(), 0);
            drop(rdbss);
            drop(queue);
        })
        .join()
        .unwrap();
    }
    assert_eq!(
        drops.load(Ordering::SeqCst),
        n,
        "every M dropped exactly once"
    );
}

#[test]
fn dropping_every_handle_and_the_instance_drops_every_minirdr_state_on_the_same_thread() {
    let drops = Arc::new(AtomicUsize::new(0));
    let n = scaled(10, 3);
    let (rdbss, queue) = manual::<Tracked>();
    let handles: Vec<_> = (0..n).map(|_| create_tracked(&rdbss, &drops)).collect();
    drop(handles);
    assert_eq!(rdbss.active_contexts(), 0);
    drop(rdbss);
    drop(queue);
    assert_eq!(
        drops.load(Ordering::SeqCst),
        n,
        "every handle and the instance are gone, yet some M destructors have not run"
    );
}

// ---------------------------------------------------------------------------------------------
// 3. References kept by id
// ---------------------------------------------------------------------------------------------

#[test]
fn into_id_keeps_a_reference_that_dereference_by_id_releases() {
    let rdbss = probe_instance();
    let ctx = create(&rdbss);
    let observer = ctx.clone();
    let id = ctx.into_id();
    assert_eq!(id, observer.id());
    assert_eq!(observer.reference_count(), 2, "the id keeps its reference");
    assert_eq!(
        rdbss.dereference_by_id(id),
        Ok(Dereferenced::StillReferenced)
    );
    assert_eq!(observer.reference_count(), 1);
    assert_eq!(observer.dereference(), Dereferenced::Freed);
    assert_not_found(&rdbss, id);
}

#[test]
fn dereference_by_id_of_the_last_reference_frees_the_context() {
    let rdbss = probe_instance();
    let id = create(&rdbss).into_id();
    assert_eq!(rdbss.active_contexts(), 1, "alive, held by its id only");
    let looked_up = rdbss.lookup(id).unwrap();
    assert_eq!(looked_up.reference_count(), 2);
    drop(looked_up);
    assert_eq!(rdbss.dereference_by_id(id), Ok(Dereferenced::Freed));
    assert_eq!(rdbss.active_contexts(), 0);
    assert_not_found(&rdbss, id);
}

#[test]
fn two_references_kept_by_id_need_two_dereferences() {
    let rdbss = probe_instance();
    let ctx = create(&rdbss);
    let id = ctx.clone().into_id();
    assert_eq!(ctx.into_id(), id);
    assert_eq!(
        rdbss.dereference_by_id(id),
        Ok(Dereferenced::StillReferenced)
    );
    assert_eq!(rdbss.active_contexts(), 1);
    assert_eq!(rdbss.dereference_by_id(id), Ok(Dereferenced::Freed));
    assert_eq!(rdbss.active_contexts(), 0);
}

#[test]
fn dereference_by_id_below_zero_is_invalid_parameter_while_alive_and_changes_nothing() {
    let rdbss = probe_instance();
    let ctx = create(&rdbss);
    let id = ctx.id();
    // No reference kept by id at all.
    assert_eq!(
        rdbss.dereference_by_id(id),
        Err(NtStatus::INVALID_PARAMETER)
    );
    assert_eq!(ctx.reference_count(), 1, "nothing changed");
    // One kept, released, then one more release: below zero.
    let kept = ctx.clone().into_id();
    assert_eq!(
        rdbss.dereference_by_id(kept),
        Ok(Dereferenced::StillReferenced)
    );
    assert_eq!(
        rdbss.dereference_by_id(kept),
        Err(NtStatus::INVALID_PARAMETER)
    );
    assert_eq!(ctx.reference_count(), 1, "nothing changed");
    assert_eq!(rdbss.active_contexts(), 1);
    assert!(!ctx.is_completed() && !ctx.is_cancelled());
    assert_eq!(ctx.dereference(), Dereferenced::Freed);
}

#[test]
fn dereference_by_id_after_the_context_is_freed_is_not_found_and_changes_nothing() {
    let rdbss = probe_instance();
    let id = create(&rdbss).into_id();
    assert_eq!(rdbss.dereference_by_id(id), Ok(Dereferenced::Freed));
    assert_eq!(rdbss.dereference_by_id(id), Err(NtStatus::NOT_FOUND));
    // The slot's next owner is not touched by the stale id.
    let next = create(&rdbss);
    let next_kept = next.clone().into_id();
    assert_eq!(next.id().slot(), id.slot());
    assert_eq!(rdbss.dereference_by_id(id), Err(NtStatus::NOT_FOUND));
    assert_eq!(next.reference_count(), 2);
    assert_eq!(rdbss.active_contexts(), 1);
    assert_eq!(
        rdbss.dereference_by_id(next_kept),
        Ok(Dereferenced::StillReferenced)
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Reinitialisation for reuse
// ---------------------------------------------------------------------------------------------

#[test]
fn reinitialize_keeps_exactly_preserved_and_initialization_flags_and_loses_cancelled() {
    let rdbss = probe_instance();
    let everything = ContextFlags::all() - ContextFlags::CANCELLED;
    let mut ctx = rdbss
        .create_context(
            ContextInit {
                flags: everything,
                ..init(MajorFunction::WRITE)
            },
            Probe::default(),
        )
        .unwrap();
    assert_eq!(ctx.flags(), everything);
    assert_eq!(ctx.cancel(), CancelOutcome::NoRoutineArmed);
    assert_eq!(ctx.flags(), ContextFlags::all());
    ctx.reinitialize().unwrap();
    let kept = ContextFlags::PRESERVED | ContextFlags::INITIALIZATION;
    assert_eq!(ctx.flags(), everything & kept);
    assert_eq!(
        ctx.flags(),
        ContextFlags::FROM_POOL
            | ContextFlags::MUST_SUCCEED_ALLOCATED
            | ContextFlags::IN_FSP
            | ContextFlags::WAIT
            | ContextFlags::MUST_SUCCEED
            | ContextFlags::MUST_SUCCEED_NONBLOCKING
    );
    assert!(!ctx.is_cancelled());
    // Usable again: arming succeeds and a new cancel calls the routine.
    ctx.set_minirdr_cancel_routine(Some(probe_routine)).unwrap();
    assert_eq!(
        rdbss.cancel_by_id(ctx.id()),
        Ok(CancelByIdOutcome::Cancelled(CancelOutcome::RoutineCalled(
            ROUTINE_STATUS
        )))
    );
}

#[test]
fn reinitialize_empties_the_cancel_slot() {
    let rdbss = probe_instance();
    let mut ctx = create(&rdbss);
    ctx.set_minirdr_cancel_routine(Some(probe_routine)).unwrap();
    assert!(ctx.has_cancel_routine());
    ctx.reinitialize().unwrap();
    assert!(!ctx.has_cancel_routine());
    assert_eq!(ctx.cancel(), CancelOutcome::NoRoutineArmed);
    assert_eq!(calls(&ctx), 0, "the routine armed before reuse never runs");
}

#[test]
fn reinitialize_makes_a_completed_request_pending_again() {
    let rdbss = probe_instance();
    let mut ctx = create(&rdbss);
    RxContext::complete_request(&ctx, NtStatus::END_OF_FILE, 512).unwrap();
    ctx.set_stored_status(NtStatus::END_OF_FILE);
    assert!(ctx.is_completed());
    ctx.reinitialize().unwrap();
    assert!(!ctx.is_completed());
    assert_eq!(ctx.stored_status(), NtStatus::SUCCESS);
    assert_eq!(ctx.information(), 0);
    assert_eq!(ctx.reference_count(), 1);
    // Pending again: it can be completed once more, without a bug check.
    ctx.complete_request(NtStatus::SUCCESS, 3).unwrap();
    assert_eq!(rdbss.active_contexts(), 0);
}

#[test]
fn reinitialize_resets_the_blocked_state_and_blocked_pipe_resume() {
    let rdbss = probe_instance();
    let pipe = BlockedQueue::new();
    let mut ctx = create(&rdbss);
    pipe.enqueue(&ctx).unwrap();
    drop(pipe.resume_blocked_operations_serially().unwrap());
    assert_eq!(ctx.blocked_state(), BlockedState::Resumed);
    assert!(ctx.flags().contains(ContextFlags::BLOCKED_PIPE_RESUME));
    ctx.reinitialize().unwrap();
    assert_eq!(ctx.blocked_state(), BlockedState::NotBlocked);
    assert!(!ctx.flags().contains(ContextFlags::BLOCKED_PIPE_RESUME));
    // It can be queued again.
    pipe.enqueue(&ctx).unwrap();
    assert_eq!(pipe.len(), 1);
    drop(pipe.resume_blocked_operations_serially());
}

#[test]
fn reinitialize_gives_a_new_id_and_the_old_id_is_not_found() {
    let rdbss = probe_instance();
    let mut ctx = create(&rdbss);
    let old = ctx.id();
    assert_eq!(ctx.cancel(), CancelOutcome::NoRoutineArmed);
    let new = ctx.reinitialize().unwrap();
    assert_eq!(new, ctx.id());
    assert_ne!(new, old);
    assert_eq!(new.slot(), old.slot(), "same context, same slot");
    assert!(new.serial_number() > old.serial_number());
    assert_eq!(ctx.serial_number(), new.serial_number());
    // The old id names a request that no longer exists: a cancel of a reused id must not cancel
    // the new request, a completion must not complete it.
    assert_not_found(&rdbss, old);
    assert!(!ctx.is_cancelled());
    assert!(!ctx.is_completed());
    assert_eq!(ctx.reference_count(), 1);
    // The new id works.
    assert!(ContextRef::ptr_eq(&rdbss.lookup(new).unwrap(), &ctx));
    assert_eq!(rdbss.active_contexts(), 1, "reuse is not a new context");
}

#[test]
fn reinitialize_with_another_reference_alive_is_invalid_device_state_and_changes_nothing() {
    let rdbss = probe_instance();
    let mut ctx = create(&rdbss);
    assert_eq!(ctx.cancel(), CancelOutcome::NoRoutineArmed);
    let id = ctx.id();
    let flags = ctx.flags();

    let other = ctx.clone();
    assert_eq!(ctx.reinitialize(), Err(NtStatus::INVALID_DEVICE_STATE));
    assert_eq!(ctx.id(), id);
    assert_eq!(ctx.flags(), flags);
    assert!(ctx.is_cancelled());
    assert_eq!(ctx.reference_count(), 2);
    drop(other);

    // A reference kept by id counts too.
    let kept = ctx.clone().into_id();
    assert_eq!(ctx.reinitialize(), Err(NtStatus::INVALID_DEVICE_STATE));
    assert!(ctx.is_cancelled());
    assert_eq!(ctx.reference_count(), 2);
    assert!(rdbss.lookup(id).is_ok(), "the id still names it");
    assert_eq!(
        rdbss.dereference_by_id(kept),
        Ok(Dereferenced::StillReferenced)
    );

    // So does the reference a blocked queue holds.
    let mut fresh = create(&rdbss);
    let pipe = BlockedQueue::new();
    pipe.enqueue(&fresh).unwrap();
    assert_eq!(fresh.reinitialize(), Err(NtStatus::INVALID_DEVICE_STATE));
    assert_eq!(fresh.blocked_state(), BlockedState::Waiting);
    drop(pipe.resume_blocked_operations_serially());

    // Alone again: now it works.
    assert!(ctx.reinitialize().is_ok());
}

#[test]
fn standalone_rxcontext_reinitialize_keeps_only_preserved_flags_and_takes_the_serial_number() {
    let everything = ContextFlags::all() - ContextFlags::CANCELLED;
    let mut ctx = RxContext::try_new(
        ContextInit {
            serial_number: 5,
            flags: everything,
            ..init(MajorFunction::READ)
        },
        Probe::default(),
    )
    .unwrap();
    ctx.set_minirdr_cancel_routine(Some(probe_routine)).unwrap();
    assert_eq!(ctx.cancel(), CancelOutcome::RoutineCalled(ROUTINE_STATUS));
    ctx.complete_request(NtStatus::CANCELLED, 9).unwrap();
    ctx.reinitialize(77);
    assert_eq!(
        ctx.flags(),
        everything & (ContextFlags::PRESERVED | ContextFlags::INITIALIZATION)
    );
    assert!(!ctx.is_cancelled());
    assert!(!ctx.has_cancel_routine());
    assert!(!ctx.is_completed());
    assert_eq!(ctx.stored_status(), NtStatus::SUCCESS);
    assert_eq!(ctx.information(), 0);
    assert_eq!(ctx.serial_number(), 77);
    assert_eq!(
        ctx.reference_count(),
        0,
        "a standalone context is not counted"
    );
    assert_eq!(ctx.set_minirdr_cancel_routine(Some(probe_routine)), Ok(()));
    assert_eq!(ctx.cancel(), CancelOutcome::RoutineCalled(ROUTINE_STATUS));
    assert_eq!(calls(&ctx), 2, "once per life of the request");
}

// ---------------------------------------------------------------------------------------------
// 5. Cancel by id
// ---------------------------------------------------------------------------------------------

#[test]
fn request_id_round_trips_through_u64() {
    let rdbss = probe_instance();
    let ctx = create(&rdbss);
    let id = ctx.id();
    assert_eq!(RequestId::from_u64(id.as_u64()), id);
    assert_eq!(
        id.as_u64(),
        (u64::from(id.serial_number()) << 32) | u64::from(id.slot())
    );
    assert!(ContextRef::ptr_eq(
        &rdbss.lookup(RequestId::from_u64(id.as_u64())).unwrap(),
        &ctx
    ));
    assert_eq!(
        format!("{id}"),
        format!("{}#{}", id.slot(), id.serial_number())
    );
}

#[test]
fn cancel_by_id_of_unknown_ids_is_not_found() {
    let rdbss = probe_instance();
    // Before any context exists (no slot table at all).
    for raw in [0, 1, u64::MAX, 0xDEAD_BEEF_0BAD_F00D] {
        assert_not_found(&rdbss, RequestId::from_u64(raw));
    }
    let ctx = create(&rdbss);
    let id = ctx.id();
    let unknown = [
        // Garbage.
        RequestId::from_u64(0xDEAD_BEEF_0BAD_F00D),
        // A slot far beyond the table (and beyond any bucket).
        RequestId::from_u64((u64::from(id.serial_number()) << 32) | u64::from(u32::MAX)),
        // A slot in an existing bucket that was never used.
        RequestId::from_u64((u64::from(id.serial_number()) << 32) | u64::from(id.slot() + 1)),
        // The live slot with a serial number never handed out.
        RequestId::from_u64((u64::from(id.serial_number() + 1000) << 32) | u64::from(id.slot())),
        // The live slot with serial number 0 (never used by an instance).
        RequestId::from_u64(u64::from(id.slot())),
    ];
    for bad in unknown {
        assert_not_found(&rdbss, bad);
    }
    assert!(!ctx.is_cancelled(), "no stale id reached the live context");
    assert_eq!(ctx.reference_count(), 1);
}

#[test]
fn cancel_by_id_calls_the_armed_routine_once_and_reports_its_status() {
    let rdbss = probe_instance();
    let ctx = create(&rdbss);
    ctx.set_minirdr_cancel_routine(Some(probe_routine)).unwrap();
    assert_eq!(
        rdbss.cancel_by_id(ctx.id()),
        Ok(CancelByIdOutcome::Cancelled(CancelOutcome::RoutineCalled(
            ROUTINE_STATUS
        )))
    );
    assert_eq!(calls(&ctx), 1);
    assert_eq!(
        ctx.minirdr().irql_seen.load(Ordering::SeqCst),
        Irql::PASSIVE.level()
    );
    assert_eq!(
        *ctx.minirdr().thread_seen.lock().unwrap(),
        Some(thread::current().id()),
        "below DISPATCH the routine runs now, on the cancelling thread"
    );
    assert!(ctx.is_cancelled());
    assert!(!ctx.has_cancel_routine());
    assert_eq!(ctx.set_minirdr_cancel_routine(None), Err(Cancelled));
    assert_eq!(
        ctx.reference_count(),
        1,
        "the cancel's reference is dropped"
    );
}

#[test]
fn cancel_by_id_at_apc_level_runs_the_routine_now_at_apc() {
    let (rdbss, queue) = manual::<Probe>();
    let ctx = create(&rdbss);
    ctx.set_minirdr_cancel_routine(Some(probe_routine)).unwrap();
    {
        let _apc = irql::raise(Irql::APC);
        assert_eq!(
            rdbss.cancel_by_id(ctx.id()),
            Ok(CancelByIdOutcome::Cancelled(CancelOutcome::RoutineCalled(
                ROUTINE_STATUS
            )))
        );
    }
    assert_eq!(calls(&ctx), 1);
    assert_eq!(
        ctx.minirdr().irql_seen.load(Ordering::SeqCst),
        Irql::APC.level()
    );
    assert!(queue.is_empty(), "only DISPATCH defers");
}

#[test]
fn cancel_by_id_without_a_routine_reports_no_routine_armed_and_sets_cancelled() {
    let rdbss = probe_instance();
    let ctx = create(&rdbss);
    assert_eq!(
        rdbss.cancel_by_id(ctx.id()),
        Ok(CancelByIdOutcome::Cancelled(CancelOutcome::NoRoutineArmed))
    );
    assert!(ctx.is_cancelled());
    // The cancel before arming is not lost: arming reports it.
    assert_eq!(
        ctx.set_minirdr_cancel_routine(Some(probe_routine)),
        Err(Cancelled)
    );
    assert_eq!(calls(&ctx), 0);
}

#[test]
fn second_cancel_by_id_reports_already_cancelled_and_does_not_call_the_routine_again() {
    let rdbss = probe_instance();
    let ctx = create(&rdbss);
    ctx.set_minirdr_cancel_routine(Some(probe_routine)).unwrap();
    assert!(matches!(
        rdbss.cancel_by_id(ctx.id()),
        Ok(CancelByIdOutcome::Cancelled(CancelOutcome::RoutineCalled(
            _
        )))
    ));
    assert_eq!(
        rdbss.cancel_by_id(ctx.id()),
        Ok(CancelByIdOutcome::Cancelled(
            CancelOutcome::AlreadyCancelled
        ))
    );
    assert_eq!(ctx.cancel(), CancelOutcome::AlreadyCancelled);
    assert_eq!(calls(&ctx), 1);
}

#[test]
fn cancel_by_id_of_a_completed_but_referenced_context_is_already_completed() {
    let rdbss = probe_instance();
    let ctx = create(&rdbss);
    ctx.set_minirdr_cancel_routine(Some(probe_routine)).unwrap();
    let id = ctx.id();
    ctx.clone().complete_request(NtStatus::SUCCESS, 10).unwrap();
    assert_eq!(
        rdbss.cancel_by_id(id),
        Ok(CancelByIdOutcome::AlreadyCompleted)
    );
    assert_eq!(
        calls(&ctx),
        0,
        "nothing to cancel: the routine is not called"
    );
    assert!(
        !ctx.is_cancelled(),
        "a completed request is not marked cancelled"
    );
    assert_eq!(ctx.stored_status(), NtStatus::SUCCESS);
    assert_eq!(
        ctx.reference_count(),
        1,
        "the lookup's reference is dropped"
    );
}

#[test]
fn cancel_by_id_holds_a_reference_for_the_duration_of_the_routine() {
    let rdbss = probe_instance();
    let ctx = create(&rdbss);
    ctx.set_minirdr_cancel_routine(Some(probe_routine)).unwrap();
    let outside = ctx.reference_count();
    assert_eq!(outside, 1);
    assert!(rdbss.cancel_by_id(ctx.id()).is_ok());
    assert_eq!(
        ctx.minirdr().refs_seen.load(Ordering::SeqCst),
        outside + 1,
        "inside the routine the cancel holds one more reference"
    );
    assert_eq!(ctx.reference_count(), outside);
}

/// A routine that records how many references the context has while it runs.
fn count_references(ctx: &RxContext<Probe>) -> NtStatus {
    ctx.minirdr().calls.fetch_add(1, Ordering::SeqCst);
    ctx.minirdr()
        .refs_seen
        .store(ctx.reference_count(), Ordering::SeqCst);
    NtStatus::SUCCESS
}

#[test]
fn cancel_by_id_of_a_context_held_only_by_its_id_keeps_it_alive_until_the_routine_returns() {
    let rdbss = probe_instance();
    let ctx = create(&rdbss);
    ctx.set_minirdr_cancel_routine(Some(count_references))
        .unwrap();
    let id = ctx.into_id();
    assert_eq!(
        rdbss.cancel_by_id(id),
        Ok(CancelByIdOutcome::Cancelled(CancelOutcome::RoutineCalled(
            NtStatus::SUCCESS
        )))
    );
    let ctx = rdbss.lookup(id).unwrap();
    assert_eq!(ctx.minirdr().refs_seen.load(Ordering::SeqCst), 2);
    drop(ctx);
    // The completing side, which kept the request by id, now finds the disarm refused and lets
    // go: the final dereference is the id's.
    assert_eq!(rdbss.dereference_by_id(id), Ok(Dereferenced::Freed));
    assert_eq!(rdbss.active_contexts(), 0);
}

// ---------------------------------------------------------------------------------------------
// 6. Deferral of DISPATCH-level cancels
// ---------------------------------------------------------------------------------------------

#[test]
fn cancel_by_id_at_dispatch_marks_cancelled_and_defers_the_routine_to_the_work_queue() {
    let (rdbss, queue) = manual::<Probe>();
    let ctx = create(&rdbss);
    ctx.set_minirdr_cancel_routine(Some(probe_routine)).unwrap();
    {
        let _dispatch = irql::raise(Irql::DISPATCH);
        assert_eq!(
            rdbss.cancel_by_id(ctx.id()),
            Ok(CancelByIdOutcome::Deferred)
        );
        assert!(ctx.is_cancelled(), "marked at once, at DISPATCH");
        assert_eq!(calls(&ctx), 0, "never run at DISPATCH");
        assert_eq!(queue.len(), 1);
        // A second cancel, still at DISPATCH, finds it cancelled and queues nothing.
        assert_eq!(
            rdbss.cancel_by_id(ctx.id()),
            Ok(CancelByIdOutcome::Cancelled(
                CancelOutcome::AlreadyCancelled
            ))
        );
        assert_eq!(queue.len(), 1);
    }
    // A racing arm (or disarm at completion) sees the cancel although the routine has not run.
    assert_eq!(
        ctx.set_minirdr_cancel_routine(Some(probe_routine)),
        Err(Cancelled)
    );
    assert_eq!(ctx.set_minirdr_cancel_routine(None), Err(Cancelled));
    assert!(!ctx.has_cancel_routine(), "claimed out of the slot");
    assert_eq!(calls(&ctx), 0);
    assert_eq!(queue.len(), 1);
    // A pending item holds its context, and so the instance, alive: run it before letting go.
    assert_eq!(queue.run_pending(), 1);
    assert_eq!(calls(&ctx), 1);
}

#[test]
fn run_pending_runs_the_deferred_routine_exactly_once_below_dispatch() {
    let (rdbss, queue) = manual::<Probe>();
    let ctx = create(&rdbss);
    ctx.set_minirdr_cancel_routine(Some(probe_routine)).unwrap();
    {
        let _dispatch = irql::raise(Irql::DISPATCH);
        assert_eq!(
            rdbss.cancel_by_id(ctx.id()),
            Ok(CancelByIdOutcome::Deferred)
        );
    }
    assert_eq!(irql::current(), Irql::PASSIVE);
    assert_eq!(queue.run_pending(), 1);
    assert_eq!(calls(&ctx), 1);
    assert_eq!(
        ctx.minirdr().irql_seen.load(Ordering::SeqCst),
        Irql::PASSIVE.level()
    );
    assert!(queue.is_empty());
    assert_eq!(queue.run_pending(), 0);
    assert_eq!(calls(&ctx), 1, "exactly once");
    assert_eq!(ctx.cancel(), CancelOutcome::AlreadyCancelled);
    assert_eq!(calls(&ctx), 1);
}

#[test]
fn a_deferred_cancel_holds_a_reference_until_it_runs() {
    let (rdbss, queue) = manual::<Probe>();
    let ctx = create(&rdbss);
    ctx.set_minirdr_cancel_routine(Some(probe_routine)).unwrap();
    {
        let _dispatch = irql::raise(Irql::DISPATCH);
        assert_eq!(
            rdbss.cancel_by_id(ctx.id()),
            Ok(CancelByIdOutcome::Deferred)
        );
    }
    assert_eq!(ctx.reference_count(), 2, "the queued item holds one");
    // Even if the request's own reference goes, the context outlives the deferral.
    let id = ctx.id();
    drop(ctx);
    assert_eq!(rdbss.active_contexts(), 1);
    let looked_up = rdbss.lookup(id).unwrap();
    assert_eq!(looked_up.reference_count(), 2);
    drop(looked_up);
    assert_eq!(queue.run_pending(), 1);
    // The routine ran with the item's reference plus nothing else... and then it was dropped.
    assert_eq!(rdbss.active_contexts(), 0);
    assert_not_found(&rdbss, id);
}

#[test]
fn the_routine_sees_the_deferred_items_reference() {
    let (rdbss, queue) = manual::<Probe>();
    let ctx = create(&rdbss);
    ctx.set_minirdr_cancel_routine(Some(probe_routine)).unwrap();
    {
        let _dispatch = irql::raise(Irql::DISPATCH);
        assert_eq!(
            rdbss.cancel_by_id(ctx.id()),
            Ok(CancelByIdOutcome::Deferred)
        );
    }
    queue.run_pending();
    assert_eq!(ctx.minirdr().refs_seen.load(Ordering::SeqCst), 2);
    assert_eq!(
        ctx.reference_count(),
        1,
        "the item's reference went after the run"
    );
}

#[test]
fn cancel_by_id_at_dispatch_without_a_routine_is_no_routine_armed_and_queues_nothing() {
    let (rdbss, queue) = manual::<Probe>();
    let ctx = create(&rdbss);
    {
        let _dispatch = irql::raise(Irql::DISPATCH);
        assert_eq!(
            rdbss.cancel_by_id(ctx.id()),
            Ok(CancelByIdOutcome::Cancelled(CancelOutcome::NoRoutineArmed))
        );
        assert!(ctx.is_cancelled());
    }
    assert!(queue.is_empty());
    assert_eq!(ctx.reference_count(), 1);
}

#[test]
fn cancel_by_id_at_dispatch_of_a_completed_context_is_already_completed_and_queues_nothing() {
    let (rdbss, queue) = manual::<Probe>();
    let ctx = create(&rdbss);
    ctx.set_minirdr_cancel_routine(Some(probe_routine)).unwrap();
    ctx.clone().complete_request(NtStatus::SUCCESS, 0).unwrap();
    {
        let _dispatch = irql::raise(Irql::DISPATCH);
        assert_eq!(
            rdbss.cancel_by_id(ctx.id()),
            Ok(CancelByIdOutcome::AlreadyCompleted)
        );
    }
    assert!(queue.is_empty());
    assert!(!ctx.is_cancelled());
}

#[test]
fn default_instance_runs_the_deferred_routine_on_a_worker_thread_below_dispatch() {
    let rdbss: Rdbss<Probe> = Rdbss::new();
    let ctx = create(&rdbss);
    ctx.set_minirdr_cancel_routine(Some(probe_routine)).unwrap();
    {
        let _dispatch = irql::raise(Irql::DISPATCH);
        assert_eq!(
            rdbss.cancel_by_id(ctx.id()),
            Ok(CancelByIdOutcome::Deferred)
        );
        assert!(ctx.is_cancelled());
    }
    wait_until("the worker to run the deferred routine", || {
        calls(&ctx) == 1
    });
    let probe = ctx.minirdr();
    let ran_on = probe.thread_seen.lock().unwrap().expect("recorded");
    assert_ne!(ran_on, thread::current().id(), "ran on a worker thread");
    assert!(
        probe.irql_seen.load(Ordering::SeqCst) < Irql::DISPATCH.level(),
        "ran below DISPATCH"
    );
    wait_until("the worker to drop its reference", || {
        ctx.reference_count() == 1
    });
    assert_eq!(calls(&ctx), 1);
}

/// A work queue that only stores what is posted, so a test can run the items by hand.
struct Stash<M> {
    items: Mutex<Vec<DeferredCancel<M>>>,
}

impl<M: Send + Sync> WorkQueue<M> for Stash<M> {
    fn post(&self, work: DeferredCancel<M>) {
        self.items.lock().unwrap().push(work);
    }
}

fn stashed_deferred_cancel() -> (Rdbss<Probe>, ContextRef<Probe>, DeferredCancel<Probe>) {
    let stash = Arc::new(Stash {
        items: Mutex::new(Vec::new()),
    });
    let rdbss = Rdbss::with_work_queue(stash.clone());
    let ctx = create(&rdbss);
    ctx.set_minirdr_cancel_routine(Some(probe_routine)).unwrap();
    {
        let _dispatch = irql::raise(Irql::DISPATCH);
        assert_eq!(
            rdbss.cancel_by_id(ctx.id()),
            Ok(CancelByIdOutcome::Deferred)
        );
    }
    let mut items = std::mem::take(&mut *stash.items.lock().unwrap());
    assert_eq!(items.len(), 1);
    let item = items.pop().unwrap();
    (rdbss, ctx, item)
}

#[test]
fn a_custom_work_queue_receives_the_deferred_cancel_which_runs_the_routine_once() {
    let (rdbss, ctx, item) = stashed_deferred_cancel();
    assert_eq!(item.id(), ctx.id());
    assert_eq!(ctx.reference_count(), 2);
    assert_eq!(item.run(), CancelOutcome::RoutineCalled(ROUTINE_STATUS));
    assert_eq!(calls(&ctx), 1);
    assert_eq!(ctx.reference_count(), 1);
    drop(ctx);
    assert_eq!(rdbss.active_contexts(), 0);
}

#[test]
#[should_panic(expected = "DRIVER_IRQL_NOT_LESS_OR_EQUAL (0x000000D1)")]
fn deferred_cancel_run_at_dispatch_is_driver_irql_not_less_or_equal() {
    let (_rdbss, _ctx, item) = stashed_deferred_cancel();
    let _dispatch = irql::raise(Irql::DISPATCH);
    let _ = item.run();
}

#[test]
#[should_panic(expected = "DRIVER_IRQL_NOT_LESS_OR_EQUAL (0x000000D1)")]
fn manual_work_queue_run_pending_at_dispatch_is_driver_irql_not_less_or_equal() {
    let (rdbss, queue) = manual::<Probe>();
    let ctx = create(&rdbss);
    ctx.set_minirdr_cancel_routine(Some(probe_routine)).unwrap();
    let _dispatch = irql::raise(Irql::DISPATCH);
    assert_eq!(
        rdbss.cancel_by_id(ctx.id()),
        Ok(CancelByIdOutcome::Deferred)
    );
    queue.run_pending();
}

// ---------------------------------------------------------------------------------------------
// 7. Completion
// ---------------------------------------------------------------------------------------------

#[test]
fn complete_request_stores_status_and_information_and_drops_that_reference() {
    let rdbss = probe_instance();
    let ctx = create(&rdbss);
    let observer = ctx.clone();
    assert_eq!(observer.reference_count(), 2);
    assert!(!observer.is_completed());
    ctx.complete_request(NtStatus::END_OF_FILE, 4096).unwrap();
    assert!(observer.is_completed());
    assert_eq!(observer.stored_status(), NtStatus::END_OF_FILE);
    assert_eq!(observer.information(), 4096);
    assert_eq!(
        observer.reference_count(),
        1,
        "the request's reference went"
    );
    assert_eq!(rdbss.active_contexts(), 1);
    assert!(
        rdbss.lookup(observer.id()).is_ok(),
        "still referenced, still there"
    );
}

#[test]
fn complete_request_of_the_last_reference_frees_the_context() {
    let rdbss = probe_instance();
    let ctx = create(&rdbss);
    let id = ctx.id();
    ctx.complete_request(NtStatus::SUCCESS, 1).unwrap();
    assert_eq!(rdbss.active_contexts(), 0);
    assert_not_found(&rdbss, id);
}

#[test]
fn complete_by_id_completes_and_drops_only_the_lookups_reference() {
    let rdbss = probe_instance();
    let ctx = create(&rdbss);
    assert_eq!(
        rdbss.complete_by_id(ctx.id(), NtStatus::CANCELLED, 0),
        Ok(())
    );
    assert!(ctx.is_completed());
    assert_eq!(ctx.stored_status(), NtStatus::CANCELLED);
    assert_eq!(ctx.reference_count(), 1);
    assert_eq!(
        rdbss.cancel_by_id(ctx.id()),
        Ok(CancelByIdOutcome::AlreadyCompleted)
    );
}

#[test]
fn complete_by_id_after_free_is_not_found() {
    let rdbss = probe_instance();
    let ctx = create(&rdbss);
    let id = ctx.id();
    ctx.complete_request(NtStatus::SUCCESS, 0).unwrap();
    assert_eq!(
        rdbss.complete_by_id(id, NtStatus::SUCCESS, 0),
        Err(NtStatus::NOT_FOUND),
        "complete after free"
    );
    // Also after the slot was given to another request.
    let next = create(&rdbss);
    assert_eq!(next.id().slot(), id.slot());
    assert_eq!(
        rdbss.complete_by_id(id, NtStatus::SUCCESS, 0),
        Err(NtStatus::NOT_FOUND)
    );
    assert!(!next.is_completed());
}

#[test]
#[should_panic(expected = "MULTIPLE_IRP_COMPLETE_REQUESTS (0x00000044)")]
fn second_complete_request_through_another_handle_is_multiple_irp_complete_requests() {
    let rdbss = probe_instance();
    let ctx = create(&rdbss);
    let second = ctx.clone();
    ctx.complete_request(NtStatus::SUCCESS, 0).unwrap();
    let _ = second.complete_request(NtStatus::CANCELLED, 0);
}

#[test]
#[should_panic(expected = "MULTIPLE_IRP_COMPLETE_REQUESTS (0x00000044)")]
fn rxcontext_complete_request_twice_is_multiple_irp_complete_requests() {
    let ctx = RxContext::new(MajorFunction::READ, ());
    ctx.complete_request(NtStatus::SUCCESS, 0).unwrap();
    let _ = ctx.complete_request(NtStatus::SUCCESS, 0);
}

#[test]
#[should_panic(expected = "MULTIPLE_IRP_COMPLETE_REQUESTS (0x00000044)")]
fn second_complete_by_id_is_multiple_irp_complete_requests() {
    let rdbss = probe_instance();
    let ctx = create(&rdbss);
    rdbss
        .complete_by_id(ctx.id(), NtStatus::SUCCESS, 0)
        .unwrap();
    let _ = rdbss.complete_by_id(ctx.id(), NtStatus::SUCCESS, 0);
}

#[test]
fn complete_request_at_dispatch_is_allowed() {
    let rdbss = probe_instance();
    let ctx = create(&rdbss);
    let observer = ctx.clone();
    {
        let _dispatch = irql::raise(Irql::DISPATCH);
        ctx.complete_request(NtStatus::SUCCESS, 2).unwrap();
    }
    assert!(observer.is_completed());
    assert_eq!(observer.information(), 2);
}

// ---------------------------------------------------------------------------------------------
// 8. Blocked (serialised) operations
// ---------------------------------------------------------------------------------------------

#[test]
fn enqueue_of_a_cancelled_context_is_refused_with_cancelled_and_queues_nothing() {
    let rdbss = probe_instance();
    let pipe = BlockedQueue::new();
    let ctx = create(&rdbss);
    assert_eq!(ctx.cancel(), CancelOutcome::NoRoutineArmed);
    assert_eq!(pipe.enqueue(&ctx), Err(NtStatus::CANCELLED));
    assert!(pipe.is_empty());
    assert_eq!(ctx.blocked_state(), BlockedState::NotBlocked);
    assert!(!ctx.flags().contains(ContextFlags::IN_SERIALIZATION_QUEUE));
    assert_eq!(ctx.reference_count(), 1, "the queue took no reference");
}

#[test]
fn enqueue_twice_is_invalid_parameter_in_the_same_or_another_queue() {
    let rdbss = probe_instance();
    let pipe = BlockedQueue::new();
    let other = BlockedQueue::new();
    let ctx = create(&rdbss);
    pipe.enqueue(&ctx).unwrap();
    assert_eq!(pipe.enqueue(&ctx), Err(NtStatus::INVALID_PARAMETER));
    assert_eq!(other.enqueue(&ctx), Err(NtStatus::INVALID_PARAMETER));
    assert_eq!((pipe.len(), other.len()), (1, 0));
    assert_eq!(
        ctx.reference_count(),
        2,
        "one reference, for the one queue entry"
    );
    drop(pipe.resume_blocked_operations_serially());
}

#[test]
fn enqueue_of_a_context_with_a_routine_armed_is_invalid_parameter_and_queues_nothing() {
    let rdbss = probe_instance();
    let pipe = BlockedQueue::new();
    let ctx = create(&rdbss);
    ctx.set_minirdr_cancel_routine(Some(probe_routine)).unwrap();
    assert_eq!(pipe.enqueue(&ctx), Err(NtStatus::INVALID_PARAMETER));
    assert!(pipe.is_empty());
    assert_eq!(ctx.blocked_state(), BlockedState::NotBlocked);
    assert_eq!(ctx.reference_count(), 1, "no reference taken");
    assert!(ctx.has_cancel_routine(), "the armed routine is untouched");
}

#[test]
fn cancel_of_a_waiting_operation_with_a_routine_armed_meanwhile_completes_once_and_drops_the_routine(
) {
    let rdbss = probe_instance();
    let pipe = BlockedQueue::new();
    let ctx = create(&rdbss);
    pipe.enqueue(&ctx).unwrap();
    // Armed while waiting (a misuse the setter cannot refuse): the cancel still completes the
    // request exactly once, itself, and never calls the routine.
    ctx.set_minirdr_cancel_routine(Some(probe_routine)).unwrap();
    assert_eq!(
        rdbss.cancel_by_id(ctx.id()),
        Ok(CancelByIdOutcome::Cancelled(
            CancelOutcome::BlockedOperationCancelled
        ))
    );
    assert_eq!(
        calls(&ctx),
        0,
        "the routine of a blocked operation was called"
    );
    assert!(ctx.is_completed());
    assert_eq!(ctx.stored_status(), NtStatus::CANCELLED);
    assert!(!ctx.has_cancel_routine());
    assert!(pipe.is_empty());
}

#[test]
fn dropping_a_queue_resumes_its_waiting_operations_and_releases_them() {
    let rdbss = probe_instance();
    let pipe = BlockedQueue::new();
    let (first, second) = (create(&rdbss), create(&rdbss));
    pipe.enqueue(&first).unwrap();
    pipe.enqueue(&second).unwrap();
    drop(pipe);
    for op in [&first, &second] {
        assert_eq!(op.blocked_state(), BlockedState::Resumed);
        assert!(op.flags().contains(ContextFlags::BLOCKED_PIPE_RESUME));
        assert!(
            !op.is_completed(),
            "resumed, not completed: its owner runs it"
        );
        assert_eq!(op.reference_count(), 1, "the queue's reference is gone");
    }
    drop((first, second));
    assert_eq!(
        rdbss.active_contexts(),
        0,
        "nothing kept alive by the dropped queue"
    );
}

#[test]
fn resume_all_resumes_every_waiting_operation_in_order() {
    let rdbss = probe_instance();
    let pipe = BlockedQueue::new();
    let ops: Vec<_> = (0..3).map(|_| create(&rdbss)).collect();
    for op in &ops {
        pipe.enqueue(op).unwrap();
    }
    assert_eq!(pipe.resume_all(), 3);
    assert!(pipe.is_empty());
    assert!(ops
        .iter()
        .all(|op| op.blocked_state() == BlockedState::Resumed && op.reference_count() == 1));
    assert_eq!(pipe.resume_all(), 0);
}

#[test]
fn enqueue_takes_a_reference_and_marks_the_operation_waiting() {
    let rdbss = probe_instance();
    let pipe = BlockedQueue::new();
    let ctx = create(&rdbss);
    pipe.enqueue(&ctx).unwrap();
    assert_eq!(pipe.len(), 1);
    assert!(!pipe.is_empty());
    assert_eq!(ctx.reference_count(), 2);
    assert_eq!(ctx.blocked_state(), BlockedState::Waiting);
    assert!(ctx.flags().contains(ContextFlags::IN_SERIALIZATION_QUEUE));
    // The queue's reference keeps the operation alive without its owner.
    let id = ctx.id();
    drop(ctx);
    assert_eq!(rdbss.active_contexts(), 1);
    let resumed = pipe.resume_blocked_operations_serially().unwrap();
    assert_eq!(resumed.id(), id);
    assert_eq!(
        resumed.reference_count(),
        1,
        "the queue's reference was handed over"
    );
    drop(resumed);
    assert_eq!(rdbss.active_contexts(), 0);
}

#[test]
fn resume_blocked_operations_serially_is_fifo_and_marks_each_resumed() {
    let rdbss = probe_instance();
    let pipe = BlockedQueue::new();
    let ops: Vec<_> = (0..4).map(|_| create(&rdbss)).collect();
    for op in &ops {
        pipe.enqueue(op).unwrap();
    }
    for (i, op) in ops.iter().enumerate() {
        assert_eq!(pipe.len(), ops.len() - i);
        let next = pipe.resume_blocked_operations_serially().unwrap();
        assert!(ContextRef::ptr_eq(&next, op), "operation {i} out of order");
        assert_eq!(next.blocked_state(), BlockedState::Resumed);
        let flags = next.flags();
        assert!(flags.contains(ContextFlags::BLOCKED_PIPE_RESUME));
        assert!(!flags.contains(ContextFlags::IN_SERIALIZATION_QUEUE));
        assert!(!next.is_completed(), "the resumer runs it, not the queue");
        // The ones behind it still wait.
        for later in &ops[i + 1..] {
            assert_eq!(later.blocked_state(), BlockedState::Waiting);
        }
    }
    assert!(pipe.resume_blocked_operations_serially().is_none());
    assert!(pipe.is_empty());
}

#[test]
fn cancel_of_a_waiting_operation_unlinks_it_and_completes_it_with_status_cancelled() {
    let rdbss = probe_instance();
    let pipe = BlockedQueue::new();
    let first = create(&rdbss);
    let second = create(&rdbss);
    let third = create(&rdbss);
    for op in [&first, &second, &third] {
        pipe.enqueue(op).unwrap();
    }
    assert_eq!(second.reference_count(), 2);
    assert_eq!(second.cancel(), CancelOutcome::BlockedOperationCancelled);
    assert_eq!(pipe.len(), 2);
    assert!(second.is_cancelled());
    assert!(second.is_completed());
    assert_eq!(second.stored_status(), NtStatus::CANCELLED);
    assert_eq!(second.information(), 0);
    assert_eq!(second.blocked_state(), BlockedState::Cancelled);
    assert!(!second
        .flags()
        .contains(ContextFlags::IN_SERIALIZATION_QUEUE));
    assert_eq!(
        second.reference_count(),
        1,
        "the queue's reference was dropped"
    );
    assert_eq!(second.cancel(), CancelOutcome::AlreadyCancelled);
    // The others keep their order.
    let a = pipe.resume_blocked_operations_serially().unwrap();
    let b = pipe.resume_blocked_operations_serially().unwrap();
    assert!(ContextRef::ptr_eq(&a, &first) && ContextRef::ptr_eq(&b, &third));
    assert!(pipe.resume_blocked_operations_serially().is_none());
}

#[test]
fn cancel_by_id_of_a_waiting_operation_unlinks_and_completes_it() {
    let rdbss = probe_instance();
    let pipe = BlockedQueue::new();
    let ctx = create(&rdbss);
    pipe.enqueue(&ctx).unwrap();
    assert_eq!(
        rdbss.cancel_by_id(ctx.id()),
        Ok(CancelByIdOutcome::Cancelled(
            CancelOutcome::BlockedOperationCancelled
        ))
    );
    assert!(pipe.is_empty());
    assert!(ctx.is_completed());
    assert_eq!(ctx.stored_status(), NtStatus::CANCELLED);
    assert_eq!(ctx.blocked_state(), BlockedState::Cancelled);
    assert_eq!(ctx.reference_count(), 1);
    // Its owner, holding the last reference, lets go without completing again.
    let id = ctx.id();
    drop(ctx);
    assert_eq!(rdbss.active_contexts(), 0);
    assert_not_found(&rdbss, id);
}

#[test]
fn cancel_of_a_waiting_operation_held_only_by_the_queue_frees_it() {
    let rdbss = probe_instance();
    let pipe = BlockedQueue::new();
    let ctx = create(&rdbss);
    pipe.enqueue(&ctx).unwrap();
    let id = ctx.id();
    drop(ctx);
    assert_eq!(
        rdbss.cancel_by_id(id),
        Ok(CancelByIdOutcome::Cancelled(
            CancelOutcome::BlockedOperationCancelled
        ))
    );
    assert!(pipe.is_empty());
    assert_eq!(rdbss.active_contexts(), 0);
}

#[test]
fn cancel_after_resume_does_not_complete_and_the_owner_sees_cancelled_when_arming() {
    let rdbss = probe_instance();
    let pipe = BlockedQueue::new();
    let ctx = create(&rdbss);
    pipe.enqueue(&ctx).unwrap();
    let resumed = pipe.resume_blocked_operations_serially().unwrap();
    drop(resumed);
    assert_eq!(
        rdbss.cancel_by_id(ctx.id()),
        Ok(CancelByIdOutcome::Cancelled(CancelOutcome::NoRoutineArmed))
    );
    assert!(ctx.is_cancelled());
    assert!(
        !ctx.is_completed(),
        "the resumed operation's owner completes it"
    );
    assert_eq!(ctx.blocked_state(), BlockedState::Resumed);
    assert_eq!(
        ctx.set_minirdr_cancel_routine(Some(probe_routine)),
        Err(Cancelled)
    );
    ctx.complete_request(NtStatus::CANCELLED, 0).unwrap();
    assert_eq!(rdbss.active_contexts(), 0);
}

#[test]
fn wait_returns_resumed_when_the_operation_is_resumed_on_another_thread() {
    let rdbss = probe_instance();
    let pipe = BlockedQueue::new();
    let ctx = create(&rdbss);
    pipe.enqueue(&ctx).unwrap();
    let waiting = AtomicBool::new(false);
    let state = thread::scope(|s| {
        let waiter = s.spawn(|| {
            waiting.store(true, Ordering::SeqCst);
            pipe.wait(&ctx, Duration::from_secs(30))
        });
        while !waiting.load(Ordering::SeqCst) {
            thread::yield_now();
        }
        let started = Instant::now();
        let resumed = pipe.resume_blocked_operations_serially().unwrap();
        let state = waiter.join().unwrap();
        assert!(started.elapsed() < Duration::from_secs(30));
        drop(resumed);
        state
    });
    assert_eq!(state, BlockedState::Resumed);
}

#[test]
fn wait_returns_cancelled_when_the_operation_is_cancelled_on_another_thread() {
    let rdbss = probe_instance();
    let pipe = BlockedQueue::new();
    let ctx = create(&rdbss);
    pipe.enqueue(&ctx).unwrap();
    let waiting = AtomicBool::new(false);
    let state = thread::scope(|s| {
        let waiter = s.spawn(|| {
            waiting.store(true, Ordering::SeqCst);
            pipe.wait(&ctx, Duration::from_secs(30))
        });
        while !waiting.load(Ordering::SeqCst) {
            thread::yield_now();
        }
        assert_eq!(
            rdbss.cancel_by_id(ctx.id()),
            Ok(CancelByIdOutcome::Cancelled(
                CancelOutcome::BlockedOperationCancelled
            ))
        );
        waiter.join().unwrap()
    });
    assert_eq!(state, BlockedState::Cancelled);
    assert!(ctx.is_completed());
}

#[test]
fn wait_returns_waiting_after_the_timeout() {
    let rdbss = probe_instance();
    let pipe = BlockedQueue::new();
    let ctx = create(&rdbss);
    pipe.enqueue(&ctx).unwrap();
    let timeout = Duration::from_millis(20);
    let started = Instant::now();
    let state = thread::scope(|s| s.spawn(|| pipe.wait(&ctx, timeout)).join().unwrap());
    assert_eq!(state, BlockedState::Waiting);
    assert!(started.elapsed() >= timeout);
    assert_eq!(pipe.len(), 1);
    drop(pipe.resume_blocked_operations_serially());
}

#[test]
fn wait_for_an_operation_never_queued_returns_at_once() {
    let rdbss = probe_instance();
    let pipe = BlockedQueue::new();
    let ctx = create(&rdbss);
    assert_eq!(
        pipe.wait(&ctx, Duration::from_secs(30)),
        BlockedState::NotBlocked
    );
}

#[test]
fn cancel_by_id_at_dispatch_of_a_blocked_operation_completes_it_without_the_work_queue() {
    let (rdbss, queue) = manual::<Probe>();
    let pipe = BlockedQueue::new();
    let ctx = create(&rdbss);
    pipe.enqueue(&ctx).unwrap();
    {
        let _dispatch = irql::raise(Irql::DISPATCH);
        assert_eq!(
            rdbss.cancel_by_id(ctx.id()),
            Ok(CancelByIdOutcome::Cancelled(
                CancelOutcome::BlockedOperationCancelled
            ))
        );
        assert!(ctx.is_completed());
        assert_eq!(irql::current(), Irql::DISPATCH);
    }
    assert!(queue.is_empty(), "nothing deferred: spin locks only");
    assert!(pipe.is_empty());
    assert_eq!(ctx.stored_status(), NtStatus::CANCELLED);
    assert_eq!(ctx.blocked_state(), BlockedState::Cancelled);
    assert_eq!(ctx.reference_count(), 1);
}

#[test]
fn claim_cancel_at_dispatch_of_a_blocked_operation_unlinks_and_completes_it() {
    let rdbss = probe_instance();
    let pipe = BlockedQueue::new();
    let ctx = create(&rdbss);
    pipe.enqueue(&ctx).unwrap();
    let claim = {
        let _dispatch = irql::raise(Irql::DISPATCH);
        ctx.claim_cancel()
    };
    assert!(matches!(claim, CancelClaim::BlockedOperationCancelled));
    assert_eq!(claim.run(&ctx), CancelOutcome::BlockedOperationCancelled);
    assert!(pipe.is_empty());
    assert!(ctx.is_completed());
    assert_eq!(ctx.reference_count(), 1);
}

// ---------------------------------------------------------------------------------------------
// 9. Concurrency stress
// ---------------------------------------------------------------------------------------------

/// Per-request state for the race: which request this is, and the shared tally.
struct Req {
    index: usize,
    tally: Arc<Tally>,
}

/// Per-request counters that outlive the contexts (they are freed during the run).
struct Tally {
    completions: Vec<AtomicUsize>,
    routine_calls: Vec<AtomicUsize>,
}

impl Tally {
    fn new(n: usize) -> Arc<Self> {
        Arc::new(Tally {
            completions: (0..n).map(|_| AtomicUsize::new(0)).collect(),
            routine_calls: (0..n).map(|_| AtomicUsize::new(0)).collect(),
        })
    }
}

/// The cancel routine of the race: it was taken out of the slot by the cancel, so the completer's
/// disarm will fail and this side owns completion (`DESIGN.md` section 2).
fn abort_and_complete(ctx: &RxContext<Req>) -> NtStatus {
    let req = ctx.minirdr();
    req.tally.routine_calls[req.index].fetch_add(1, Ordering::SeqCst);
    assert!(ctx.is_cancelled());
    // Panics (MULTIPLE_IRP_COMPLETE_REQUESTS) if the completer completed too.
    ctx.complete_request(NtStatus::CANCELLED, 0).unwrap();
    req.tally.completions[req.index].fetch_add(1, Ordering::SeqCst);
    NtStatus::CANCELLED
}

#[test]
fn stress_completer_racing_cancel_by_id_completes_each_request_exactly_once() {
    let n = scaled(2_000, 24);
    let rdbss: Rdbss<Req> = manual().0;
    let tally = Tally::new(n);
    // The ids published so far, for the canceller.
    let ids: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let published = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));

    let completer = {
        let (rdbss, tally, ids, published) =
            (rdbss.clone(), tally.clone(), ids.clone(), published.clone());
        thread::spawn(move || {
            for i in 0..n {
                let ctx = rdbss
                    .create_context(
                        init(MajorFunction::READ),
                        Req {
                            index: i,
                            tally: tally.clone(),
                        },
                    )
                    .unwrap_or_else(|(status, _)| panic!("create {i}: {status:?}"));
                ids[i].store(ctx.id().as_u64(), Ordering::SeqCst);
                published.store(i + 1, Ordering::SeqCst);
                jitter(i as u64);
                match ctx.set_minirdr_cancel_routine(Some(abort_and_complete)) {
                    Ok(()) => {
                        // The network exchange.
                        jitter(i as u64 * 7 + 3);
                        if i % 5 == 0 {
                            thread::yield_now();
                        }
                        match ctx.set_minirdr_cancel_routine(None) {
                            // Disarmed first: the routine never runs, this side completes.
                            Ok(()) => {
                                ctx.complete_request(NtStatus::SUCCESS, i).unwrap();
                                tally.completions[i].fetch_add(1, Ordering::SeqCst);
                            }
                            // The cancel took the routine: it completes. Just let go.
                            Err(Cancelled) => drop(ctx),
                        }
                    }
                    // Cancelled before the exchange started: nothing was armed, this side
                    // completes with STATUS_CANCELLED.
                    Err(Cancelled) => {
                        ctx.complete_request(NtStatus::CANCELLED, 0).unwrap();
                        tally.completions[i].fetch_add(1, Ordering::SeqCst);
                    }
                }
                assert_eq!(irql::current(), Irql::PASSIVE);
            }
        })
    };
    let canceller = {
        let (rdbss, ids, published, done) =
            (rdbss.clone(), ids.clone(), published.clone(), done.clone());
        thread::spawn(move || {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
            // [NOT_FOUND, AlreadyCompleted, RoutineCalled, NoRoutineArmed, AlreadyCancelled]
            let mut outcomes = [0_usize; 5];
            while !done.load(Ordering::SeqCst) {
                let upto = published.load(Ordering::SeqCst);
                if upto == 0 {
                    thread::yield_now();
                    continue;
                }
                // Mostly the request being worked on right now, sometimes an older one.
                let i = if rng.below(4) == 0 {
                    rng.below(upto)
                } else {
                    upto - 1
                };
                jitter(rng.next());
                let id = RequestId::from_u64(ids[i].load(Ordering::SeqCst));
                let slot = match rdbss.cancel_by_id(id) {
                    Err(NtStatus::NOT_FOUND) => 0,
                    Ok(CancelByIdOutcome::AlreadyCompleted) => 1,
                    Ok(CancelByIdOutcome::Cancelled(CancelOutcome::RoutineCalled(status))) => {
                        assert_eq!(status, NtStatus::CANCELLED);
                        2
                    }
                    Ok(CancelByIdOutcome::Cancelled(CancelOutcome::NoRoutineArmed)) => 3,
                    Ok(CancelByIdOutcome::Cancelled(CancelOutcome::AlreadyCancelled)) => 4,
                    other => panic!("request {i}: unexpected {other:?}"),
                };
                outcomes[slot] += 1;
                assert_eq!(irql::current(), Irql::PASSIVE);
            }
            outcomes
        })
    };
    let completer_result = completer.join();
    done.store(true, Ordering::SeqCst);
    let outcomes = canceller.join().expect("canceller panicked");
    completer_result.expect("completer panicked");

    for i in 0..n {
        let completions = tally.completions[i].load(Ordering::SeqCst);
        assert_eq!(completions, 1, "request {i} completed {completions} times");
        assert!(
            tally.routine_calls[i].load(Ordering::SeqCst) <= 1,
            "request {i}"
        );
    }
    assert_eq!(rdbss.active_contexts(), 0, "every context was freed");
    let routine_calls: usize = tally
        .routine_calls
        .iter()
        .map(|c| c.load(Ordering::SeqCst))
        .sum();
    eprintln!(
        "stress: {n} requests, routine completed {routine_calls}; cancel_by_id outcomes \
         [not found, already completed, routine called, no routine, already cancelled] = \
         {outcomes:?}"
    );
}

#[test]
fn stress_create_complete_drop_with_concurrent_lookups_leaves_no_context() {
    let per_thread = scaled(10_000, 30);
    let rdbss: Rdbss<Probe> = manual().0;
    const RING: usize = 64;
    let recent: Arc<Vec<AtomicU64>> = Arc::new((0..RING).map(|_| AtomicU64::new(0)).collect());
    let creators_done = Arc::new(AtomicUsize::new(0));

    let creators: Vec<_> = (0..2)
        .map(|t| {
            let (rdbss, recent, creators_done) =
                (rdbss.clone(), recent.clone(), creators_done.clone());
            thread::spawn(move || {
                // A few requests in flight at a time, so lookups find some of them alive.
                let mut in_flight = std::collections::VecDeque::new();
                for i in 0..per_thread {
                    let ctx = create(&rdbss);
                    recent[(i * 2 + t) % RING].store(ctx.id().as_u64(), Ordering::SeqCst);
                    in_flight.push_back(ctx);
                    if in_flight.len() > 4 {
                        let ctx = in_flight.pop_front().unwrap();
                        if i % 2 == 0 {
                            ctx.complete_request(NtStatus::SUCCESS, i).unwrap();
                        } else {
                            // Completed through another handle, then the request's own dropped.
                            ctx.clone().complete_request(NtStatus::SUCCESS, i).unwrap();
                            drop(ctx);
                        }
                    }
                }
                for ctx in in_flight {
                    ctx.complete_request(NtStatus::SUCCESS, 0).unwrap();
                }
                creators_done.fetch_add(1, Ordering::SeqCst);
            })
        })
        .collect();
    let looker = {
        let (rdbss, recent, creators_done) = (rdbss.clone(), recent.clone(), creators_done.clone());
        thread::spawn(move || {
            let mut rng = Rng(0x2545_F491_4F6C_DD1D);
            let (mut found, mut missed) = (0_usize, 0_usize);
            while creators_done.load(Ordering::SeqCst) < 2 {
                let id = RequestId::from_u64(recent[rng.below(RING)].load(Ordering::SeqCst));
                match rdbss.lookup(id) {
                    Ok(ctx) => {
                        // Never a reused context under a stale id.
                        assert_eq!(ctx.id(), id);
                        assert!(ctx.reference_count() >= 1);
                        found += 1;
                    }
                    Err(status) => {
                        assert_eq!(status, NtStatus::NOT_FOUND);
                        missed += 1;
                    }
                }
            }
            (found, missed)
        })
    };
    for creator in creators {
        creator.join().expect("creator panicked");
    }
    let (found, missed) = looker.join().expect("looker panicked");
    assert_eq!(rdbss.active_contexts(), 0);
    for slot in recent.iter() {
        assert_not_found(&rdbss, RequestId::from_u64(slot.load(Ordering::SeqCst)));
    }
    eprintln!("lookups: {found} found, {missed} not found");
}
