//! MI cancellation (`rdbss::mi`) under loom: `MI_Context_RegisterCancel` racing
//! `MI_Operation_Cancel` racing `MI_Context_PostResult`, on the registry context each operation
//! owns (crossbeam-epoch modelled too).
//!
//! Run with `RUSTFLAGS="--cfg loom --cfg crossbeam_loom" LOOM_MAX_PREEMPTIONS=3 cargo test -p
//! rdbss-loom-tests --release --test mi`. Without `--cfg loom` this file compiles to nothing.
//!
//! Each test names the invariants of `rdbss::mi` it checks. Teeth (test-only mutants, see
//! `.ci/loom-mutants`):
//! - `mi_arm_before_store` (the core's routine is armed before the callback is in the slot)
//!   makes [`register_parallel_cancel_never_loses_the_callback`] fail: a registration reported
//!   `Registered` and its callback was never called (and
//!   [`register_parallel_cancel_parallel_post_result`] fails too: a routine armed after the final
//!   result completes the request a second time).
#![cfg(loom)]

use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::Arc;
use loom::thread;

use rdbss::mi::{
    MiCallerId, MiCancellationReason, MiDelivery, MiFinalResult, MiOperationKind, MiPosted,
    MiRegistration, MiResult, MiSession,
};

const CLIENT: MiCallerId = MiCallerId(7);

fn model(f: impl Fn() + Sync + Send + 'static) {
    loom::model::Builder::new().check(f);
}

/// A callback that counts its calls and checks it got the first cancel's reason.
fn counting(calls: &Arc<AtomicUsize>) -> impl FnOnce(MiCancellationReason) + Send + 'static {
    let calls = calls.clone();
    move |reason| {
        assert_eq!(reason, MiCancellationReason::Timeout);
        calls.fetch_add(1, Ordering::SeqCst);
    }
}

/// Invariants 2, 3 and 5: a registration racing a cancel. Whichever comes first, the callback is
/// called exactly once: by the cancel's routine if the registration armed it first, or at once by
/// the registration the core refused. The quota goes back as soon as the provider was told.
#[test]
fn register_parallel_cancel_never_loses_the_callback() {
    model(|| {
        let session: MiSession<u32> = MiSession::new(1);
        let (operation, provider) = session
            .start_operation(CLIENT, MiOperationKind::Enumerate)
            .unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let registrar = {
            let provider = provider.clone();
            let callback = counting(&calls);
            thread::spawn(move || provider.register_cancel_with(callback))
        };
        operation
            .cancel(CLIENT, MiCancellationReason::Timeout)
            .unwrap();
        let registration = registrar.join().unwrap();

        assert!(
            matches!(
                registration,
                Ok(MiRegistration::Registered | MiRegistration::CalledAtOnce)
            ),
            "{registration:?}"
        );
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "registration said {registration:?} but the callback was not called (lost callback)"
        );
        assert_eq!(
            session.operations_in_use(),
            0,
            "the provider was told, yet the quota is held"
        );
        assert_eq!(
            operation.get_result(),
            MiDelivery::Final(MiFinalResult::cancelled(MiCancellationReason::Timeout))
        );
        // The provider's late final result is discarded and changes nothing.
        assert_eq!(provider.post_result(MiResult::OK), Ok(MiPosted::Discarded));
        assert_eq!(session.operations_in_use(), 0);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        drop(operation);
        assert_eq!(session.live_operations(), 0);
    });
}

/// Invariants 3, 4, 6 and 7: register ∥ cancel ∥ post result. The callback runs at most once and
/// never once the provider's result won; the client's final result is the provider's exactly
/// when its post was delivered; the request is completed once and the quota goes back once.
#[test]
fn register_parallel_cancel_parallel_post_result() {
    model(|| {
        let session: MiSession<u32> = MiSession::new(1);
        let (operation, provider) = session
            .start_operation(CLIENT, MiOperationKind::Enumerate)
            .unwrap();
        let operation = Arc::new(operation);
        let calls = Arc::new(AtomicUsize::new(0));
        let registrar = {
            let provider = provider.clone();
            let callback = counting(&calls);
            thread::spawn(move || provider.register_cancel_with(callback))
        };
        let canceller = {
            let operation = operation.clone();
            thread::spawn(move || operation.cancel(CLIENT, MiCancellationReason::Timeout))
        };
        let posted = provider.post_result(MiResult::OK).unwrap();
        let registration = registrar.join().unwrap();
        canceller.join().unwrap().unwrap();

        let calls = calls.load(Ordering::SeqCst);
        assert!(calls <= 1, "callback called {calls} times");
        let final_result = operation.final_result();
        match posted {
            MiPosted::Delivered => {
                assert_eq!(calls, 0, "callback ran although the provider's result won");
                assert_eq!(
                    final_result,
                    Some(MiFinalResult {
                        result: MiResult::OK,
                        cancelled: None
                    })
                );
            }
            MiPosted::Discarded => assert_eq!(
                final_result,
                Some(MiFinalResult::cancelled(MiCancellationReason::Timeout))
            ),
        }
        match registration {
            Ok(MiRegistration::CalledAtOnce) => assert_eq!(calls, 1),
            Err(MiResult::INVALID_PARAMETER) => assert_eq!(calls, 0, "registered after the post"),
            Ok(MiRegistration::Registered) => {}
            other => panic!("unexpected registration {other:?}"),
        }
        assert_eq!(
            session.operations_in_use(),
            0,
            "quota not returned exactly once"
        );
    });
}

/// Invariant 6 on an invoke (the cancel cannot reach the provider): the client gets its final
/// result at once, the operation holds its quota until the provider posts, and the unit goes
/// back exactly once, whichever of cancel and post comes first.
#[test]
fn cancel_parallel_post_result_returns_quota_once() {
    model(|| {
        let session: MiSession<u32> = MiSession::new(1);
        let (operation, provider) = session
            .start_operation(CLIENT, MiOperationKind::Invoke)
            .unwrap();
        let operation = Arc::new(operation);
        let canceller = {
            let operation = operation.clone();
            thread::spawn(move || {
                operation
                    .cancel(CLIENT, MiCancellationReason::Timeout)
                    .unwrap();
                // The client has its final result as soon as its cancel returns.
                assert!(operation.final_result().is_some());
            })
        };
        let posted = provider.post_result(MiResult::OK).unwrap();
        canceller.join().unwrap();

        let in_use = session.operations_in_use();
        assert!(in_use <= 1, "quota returned twice (in use: {in_use})");
        assert_eq!(in_use, 0, "quota never returned");
        let final_result = operation.final_result().unwrap();
        assert_eq!(
            final_result.cancelled.is_none(),
            posted == MiPosted::Delivered,
            "{posted:?} / {final_result:?}"
        );
    });
}

/// Invariants 3 and 5 with two registrations: the provider registers A, then B, while the client
/// cancels. Exactly one callback runs: B unless the cancel reached A before B was registered (B is
/// then reported `AlreadyDelivered`, the provider having been told once already).
#[test]
fn reregister_parallel_cancel_calls_exactly_one_callback_the_last_registered() {
    model(|| {
        let session: MiSession<u32> = MiSession::new(1);
        let (operation, provider) = session
            .start_operation(CLIENT, MiOperationKind::Enumerate)
            .unwrap();
        let first = Arc::new(AtomicUsize::new(0));
        let second = Arc::new(AtomicUsize::new(0));
        let registrar = {
            let provider = provider.clone();
            let (a, b) = (counting(&first), counting(&second));
            thread::spawn(move || {
                let ra = provider.register_cancel_with(a);
                let rb = provider.register_cancel_with(b);
                (ra, rb)
            })
        };
        operation
            .cancel(CLIENT, MiCancellationReason::Timeout)
            .unwrap();
        let (ra, rb) = registrar.join().unwrap();

        let (a, b) = (first.load(Ordering::SeqCst), second.load(Ordering::SeqCst));
        assert_eq!(a + b, 1, "callbacks called: A {a}, B {b} ({ra:?}, {rb:?})");
        match rb {
            Ok(MiRegistration::AlreadyDelivered) => assert_eq!(a, 1, "{ra:?}"),
            Ok(MiRegistration::Registered | MiRegistration::CalledAtOnce) => {
                assert_eq!(b, 1, "B was registered last ({ra:?}) but A ran")
            }
            other => panic!("unexpected registration {other:?}"),
        }
        assert_eq!(session.operations_in_use(), 0);
    });
}
