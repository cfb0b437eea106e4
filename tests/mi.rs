//! MI cancellation (`rdbss::mi`): `MI_Operation_Cancel` / `MI_Operation_Close` (seeds 001 and
//! 003) and `MI_Context_RegisterCancel` (seed 000), one test per documented sentence (see
//! `docs/conformance.md`), the choices the seeds leave open, and invalid input.
//!
//! Needs the `std` feature (threads are emulated processors).

#![cfg(feature = "std")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;

use rdbss::irql::{self, Irql};
use rdbss::mi::{
    MiCallerId, MiCancellationReason, MiContext, MiDelivery, MiFinalResult, MiOperation,
    MiOperationKind, MiPosted, MiRegistration, MiResult, MiSession,
};

const ALICE: MiCallerId = MiCallerId(1000);
const MALLORY: MiCallerId = MiCallerId(666);

type Session = MiSession<u32>;

fn session(quota: usize) -> Session {
    MiSession::new(quota)
}

fn start(session: &Session, kind: MiOperationKind) -> (MiOperation<u32>, MiContext<u32>) {
    session
        .start_operation(ALICE, kind)
        .expect("start_operation")
}

fn enumerate(session: &Session) -> (MiOperation<u32>, MiContext<u32>) {
    start(session, MiOperationKind::Enumerate)
}

fn invoke(session: &Session) -> (MiOperation<u32>, MiContext<u32>) {
    start(session, MiOperationKind::Invoke)
}

/// Counts calls and remembers the last reason (as its `mi.h` value + 1; 0 = never called).
#[derive(Default)]
struct Calls {
    count: AtomicUsize,
    reason: AtomicUsize,
}

impl Calls {
    fn new() -> Arc<Self> {
        Arc::new(Calls::default())
    }

    fn callback(self: &Arc<Self>) -> impl FnOnce(MiCancellationReason) + Send + 'static {
        let calls = self.clone();
        move |reason| {
            calls.count.fetch_add(1, Ordering::SeqCst);
            calls
                .reason
                .store(reason.as_raw() as usize + 1, Ordering::SeqCst);
        }
    }

    fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    fn reason(&self) -> Option<MiCancellationReason> {
        match self.reason.load(Ordering::SeqCst) {
            0 => None,
            n => Some(MiCancellationReason::from_raw(n as u32 - 1).unwrap()),
        }
    }
}

fn ok_result() -> MiFinalResult {
    MiFinalResult {
        result: MiResult::OK,
        cancelled: None,
    }
}

fn cancelled(reason: MiCancellationReason) -> MiFinalResult {
    MiFinalResult::cancelled(reason)
}

fn close(operation: MiOperation<u32>) {
    operation
        .close(ALICE)
        .map_err(|(error, _)| error)
        .expect("close");
}

// ---------------------------------------------------------------------------------------------
// mi.h values
// ---------------------------------------------------------------------------------------------

#[test]
fn mi_result_values_and_names_match_mi_h() {
    let table = [
        (MiResult::OK, 0, "MI_RESULT_OK"),
        (MiResult::FAILED, 1, "MI_RESULT_FAILED"),
        (MiResult::ACCESS_DENIED, 2, "MI_RESULT_ACCESS_DENIED"),
        (
            MiResult::INVALID_NAMESPACE,
            3,
            "MI_RESULT_INVALID_NAMESPACE",
        ),
        (
            MiResult::INVALID_PARAMETER,
            4,
            "MI_RESULT_INVALID_PARAMETER",
        ),
        (MiResult::INVALID_CLASS, 5, "MI_RESULT_INVALID_CLASS"),
        (MiResult::NOT_FOUND, 6, "MI_RESULT_NOT_FOUND"),
        (MiResult::NOT_SUPPORTED, 7, "MI_RESULT_NOT_SUPPORTED"),
        (
            MiResult::CLASS_HAS_CHILDREN,
            8,
            "MI_RESULT_CLASS_HAS_CHILDREN",
        ),
        (
            MiResult::CLASS_HAS_INSTANCES,
            9,
            "MI_RESULT_CLASS_HAS_INSTANCES",
        ),
        (
            MiResult::INVALID_SUPERCLASS,
            10,
            "MI_RESULT_INVALID_SUPERCLASS",
        ),
        (MiResult::ALREADY_EXISTS, 11, "MI_RESULT_ALREADY_EXISTS"),
        (MiResult::NO_SUCH_PROPERTY, 12, "MI_RESULT_NO_SUCH_PROPERTY"),
        (MiResult::TYPE_MISMATCH, 13, "MI_RESULT_TYPE_MISMATCH"),
        (
            MiResult::QUERY_LANGUAGE_NOT_SUPPORTED,
            14,
            "MI_RESULT_QUERY_LANGUAGE_NOT_SUPPORTED",
        ),
        (MiResult::INVALID_QUERY, 15, "MI_RESULT_INVALID_QUERY"),
        (
            MiResult::METHOD_NOT_AVAILABLE,
            16,
            "MI_RESULT_METHOD_NOT_AVAILABLE",
        ),
        (MiResult::METHOD_NOT_FOUND, 17, "MI_RESULT_METHOD_NOT_FOUND"),
        (
            MiResult::NAMESPACE_NOT_EMPTY,
            20,
            "MI_RESULT_NAMESPACE_NOT_EMPTY",
        ),
        (
            MiResult::INVALID_ENUMERATION_CONTEXT,
            21,
            "MI_RESULT_INVALID_ENUMERATION_CONTEXT",
        ),
        (
            MiResult::INVALID_OPERATION_TIMEOUT,
            22,
            "MI_RESULT_INVALID_OPERATION_TIMEOUT",
        ),
        (
            MiResult::PULL_HAS_BEEN_ABANDONED,
            23,
            "MI_RESULT_PULL_HAS_BEEN_ABANDONED",
        ),
        (
            MiResult::PULL_CANNOT_BE_ABANDONED,
            24,
            "MI_RESULT_PULL_CANNOT_BE_ABANDONED",
        ),
        (
            MiResult::FILTERED_ENUMERATION_NOT_SUPPORTED,
            25,
            "MI_RESULT_FILTERED_ENUMERATION_NOT_SUPPORTED",
        ),
        (
            MiResult::CONTINUATION_ON_ERROR_NOT_SUPPORTED,
            26,
            "MI_RESULT_CONTINUATION_ON_ERROR_NOT_SUPPORTED",
        ),
        (
            MiResult::SERVER_LIMITS_EXCEEDED,
            27,
            "MI_RESULT_SERVER_LIMITS_EXCEEDED",
        ),
        (
            MiResult::SERVER_IS_SHUTTING_DOWN,
            28,
            "MI_RESULT_SERVER_IS_SHUTTING_DOWN",
        ),
    ];
    for (result, value, name) in table {
        assert_eq!(result.0, value, "{name}");
        assert_eq!(result.name(), Some(name));
        assert_eq!(result.to_string(), name);
    }
    assert!(MiResult::OK.is_ok() && !MiResult::FAILED.is_ok());
    assert_eq!(MiResult(18).name(), None);
    assert_eq!(MiResult(18).to_string(), "MI_Result(18)");
    assert_eq!(
        format!("{:?}", MiResult(4)),
        "MI_RESULT_INVALID_PARAMETER(4)"
    );
    assert_eq!(format!("{:?}", MiResult(99)), "MiResult(99)");
}

#[test]
fn cancellation_reason_values_match_mi_h_and_unknown_values_are_invalid_parameter() {
    let table = [
        (MiCancellationReason::None, 0),
        (MiCancellationReason::Timeout, 1),
        (MiCancellationReason::Shutdown, 2),
        (MiCancellationReason::ServiceStop, 3),
    ];
    for (reason, value) in table {
        assert_eq!(reason.as_raw(), value);
        assert_eq!(MiCancellationReason::from_raw(value), Ok(reason));
        assert_eq!(MiCancellationReason::try_from(value), Ok(reason));
    }
    for bad in [4, 255, u32::MAX] {
        assert_eq!(
            MiCancellationReason::from_raw(bad),
            Err(MiResult::INVALID_PARAMETER)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// MI_Operation_Cancel (seeds 001 and 003)
// ---------------------------------------------------------------------------------------------

/// "Cancels a running operation."
#[test]
fn cancel_cancels_a_running_operation() {
    let s = session(4);
    let (operation, provider) = enumerate(&s);
    assert!(!operation.is_cancelled());
    assert_eq!(operation.get_result(), MiDelivery::NotYet);
    assert_eq!(operation.cancel(ALICE, MiCancellationReason::None), Ok(()));
    assert!(operation.is_cancelled());
    assert!(provider.is_cancelled());
    assert_eq!(
        provider.cancellation_reason(),
        Some(MiCancellationReason::None)
    );
    assert_eq!(
        operation.get_result(),
        MiDelivery::Final(cancelled(MiCancellationReason::None))
    );
}

/// "A pointer to an operation handle ... For asynchronous callbacks, this value can be the
/// operation handle that is passed into the callback": any copy of the handle, here its id.
#[test]
fn operation_cancel_by_id_cancels_like_the_handle_and_returns_mi_result_ok() {
    let s = session(4);
    let (operation, provider) = enumerate(&s);
    let calls = Calls::new();
    provider.register_cancel_with(calls.callback()).unwrap();
    assert_eq!(
        s.operation_cancel(
            operation.id(),
            ALICE,
            MiCancellationReason::Shutdown.as_raw()
        ),
        MiResult::OK
    );
    assert_eq!(calls.count(), 1);
    assert_eq!(calls.reason(), Some(MiCancellationReason::Shutdown));
    assert_eq!(
        operation.final_result(),
        Some(cancelled(MiCancellationReason::Shutdown))
    );
}

/// "reason: MI_CancellationReason enumeration value": each reaches the provider's callback.
#[test]
fn cancel_passes_each_reason_to_the_provider_callback() {
    for reason in [
        MiCancellationReason::None,
        MiCancellationReason::Timeout,
        MiCancellationReason::Shutdown,
        MiCancellationReason::ServiceStop,
    ] {
        let s = session(1);
        let (operation, provider) = enumerate(&s);
        let calls = Calls::new();
        provider.register_cancel_with(calls.callback()).unwrap();
        operation.cancel(ALICE, reason).unwrap();
        assert_eq!(calls.reason(), Some(reason));
        assert_eq!(provider.cancellation_reason(), Some(reason));
        assert_eq!(operation.final_result(), Some(cancelled(reason)));
    }
}

#[test]
fn operation_cancel_with_an_unknown_reason_is_invalid_parameter_and_changes_nothing() {
    let s = session(1);
    let (operation, _provider) = enumerate(&s);
    assert_eq!(
        s.operation_cancel(operation.id(), ALICE, 4),
        MiResult::INVALID_PARAMETER
    );
    assert!(!operation.is_cancelled());
    assert_eq!(operation.final_result(), None);
}

/// "Cancellation is asynchronous": cancel returns while the provider is still at work; the
/// provider finishes later on its own.
#[test]
fn cancel_is_asynchronous_it_returns_before_the_provider_has_finished() {
    let s = session(1);
    let (operation, provider) = enumerate(&s);
    let calls = Calls::new();
    provider.register_cancel_with(calls.callback()).unwrap();
    operation
        .cancel(ALICE, MiCancellationReason::Timeout)
        .unwrap();
    // The provider was told, but has not posted anything: it is still "running".
    assert_eq!(calls.count(), 1);
    assert!(provider.is_cancelled());
    // It finishes later; its result comes too late and is discarded.
    assert_eq!(provider.post_result(MiResult::OK), Ok(MiPosted::Discarded));
    assert_eq!(
        operation.final_result(),
        Some(cancelled(MiCancellationReason::Timeout))
    );
}

/// "Cancelled operations still need to be closed": the operation's resources stay until close.
#[test]
fn cancelled_operation_keeps_its_resources_until_it_is_closed() {
    let s = session(1);
    let (operation, provider) = enumerate(&s);
    provider.post_instance(1).unwrap();
    operation.cancel(ALICE, MiCancellationReason::None).unwrap();
    drop(provider); // the provider is done with it
    assert_eq!(s.operations_in_use(), 0);
    assert_eq!(s.live_operations(), 1, "freed before close");
    assert_eq!(operation.get_result(), MiDelivery::Instance(1));
    close(operation);
    assert_eq!(s.live_operations(), 0, "close is where its resources go");
}

/// "Cancellation will cause the operation to finish as soon as possible": the final result is
/// there when cancel returns.
#[test]
fn cancel_gives_the_final_result_as_soon_as_it_returns() {
    let s = session(1);
    let (operation, _provider) = enumerate(&s);
    assert_eq!(operation.final_result(), None);
    operation.cancel(ALICE, MiCancellationReason::None).unwrap();
    assert_eq!(
        operation.final_result(),
        Some(cancelled(MiCancellationReason::None))
    );
}

/// "For an asynchronous operation, this will cause final callback to happen with the final
/// result": the results end with the (cancelled) final result.
#[test]
fn cancel_ends_the_results_with_the_final_result() {
    let s = session(1);
    let (operation, provider) = enumerate(&s);
    provider.post_instance(10).unwrap();
    provider.post_instance(11).unwrap();
    operation
        .cancel(ALICE, MiCancellationReason::ServiceStop)
        .unwrap();
    assert_eq!(operation.get_result(), MiDelivery::Instance(10));
    assert_eq!(operation.get_result(), MiDelivery::Instance(11));
    let last = MiDelivery::Final(cancelled(MiCancellationReason::ServiceStop));
    assert_eq!(operation.get_result(), last);
    assert_eq!(operation.get_result(), last, "the final result stays");
}

/// "For a synchronous operation, the final result should be available soon": even when the
/// provider never answers (an invoke).
#[test]
fn final_result_is_available_after_cancel_even_if_the_provider_never_answers() {
    let s = session(1);
    let (operation, provider) = invoke(&s);
    operation.cancel(ALICE, MiCancellationReason::None).unwrap();
    assert_eq!(
        operation.get_result(),
        MiDelivery::Final(cancelled(MiCancellationReason::None))
    );
    // The provider was not told and has not answered: it still holds the quota.
    assert_eq!(s.operations_in_use(), 1);
    close(operation);
    drop(provider);
}

/// "A closing operation ... should be called in same security context as the starting
/// operation": a cancel from another caller is `MI_RESULT_ACCESS_DENIED` and does nothing.
#[test]
fn cancel_from_another_caller_is_access_denied_and_changes_nothing() {
    let s = session(1);
    let (operation, provider) = enumerate(&s);
    let calls = Calls::new();
    provider.register_cancel_with(calls.callback()).unwrap();
    assert_eq!(
        operation.cancel(MALLORY, MiCancellationReason::None),
        Err(MiResult::ACCESS_DENIED)
    );
    assert_eq!(
        s.operation_cancel(operation.id(), MALLORY, 0),
        MiResult::ACCESS_DENIED
    );
    assert!(!operation.is_cancelled());
    assert_eq!(calls.count(), 0);
    assert_eq!(operation.final_result(), None);
    assert_eq!(operation.owner(), ALICE);
}

/// The same for close: `MI_RESULT_ACCESS_DENIED`, and the handle is handed back still open.
#[test]
fn close_from_another_caller_is_access_denied_and_hands_the_handle_back_open() {
    let s = session(1);
    let (operation, provider) = enumerate(&s);
    let (error, operation) = operation.close(MALLORY).unwrap_err();
    assert_eq!(error, MiResult::ACCESS_DENIED);
    assert!(!operation.is_cancelled());
    provider.post_instance(5).unwrap();
    assert_eq!(operation.get_result(), MiDelivery::Instance(5));
    close(operation);
}

/// "After cancellation, there may be more than just one result ... a few extra results may
/// still get delivered": instances posted before the cancel are delivered after it.
#[test]
fn instances_posted_before_the_cancel_are_still_delivered_after_it() {
    let s = session(1);
    let (operation, provider) = enumerate(&s);
    for n in 0..3 {
        provider.post_instance(n).unwrap();
    }
    operation.cancel(ALICE, MiCancellationReason::None).unwrap();
    let mut got = Vec::new();
    while let MiDelivery::Instance(n) = operation.get_result() {
        got.push(n);
    }
    assert_eq!(got, [0, 1, 2]);
    assert!(matches!(operation.get_result(), MiDelivery::Final(_)));
}

/// Once the client has its final result, a provider's instance is refused (`MI_RESULT_FAILED`,
/// its cue to stop) and dropped.
#[test]
fn post_instance_after_the_client_has_its_final_result_fails_and_is_dropped() {
    let s = session(1);
    let (operation, provider) = invoke(&s);
    operation.cancel(ALICE, MiCancellationReason::None).unwrap();
    assert_eq!(provider.post_instance(9), Err(MiResult::FAILED));
    assert_eq!(
        operation.get_result(),
        MiDelivery::Final(cancelled(MiCancellationReason::None))
    );
}

/// "Not all operation cancellations get through to the provider ... enum can": an enumeration's
/// cancel reaches the provider.
#[test]
fn cancel_of_an_enumeration_reaches_the_provider() {
    let s = session(1);
    let (operation, provider) = enumerate(&s);
    assert!(MiOperationKind::Enumerate.cancel_reaches_provider());
    let calls = Calls::new();
    assert_eq!(
        provider.register_cancel_with(calls.callback()),
        Ok(MiRegistration::Registered)
    );
    operation.cancel(ALICE, MiCancellationReason::None).unwrap();
    assert_eq!(calls.count(), 1);
}

/// "... but invoke cannot": an invoke's provider cannot register, and is never called.
#[test]
fn cancel_of_an_invoke_does_not_reach_the_provider() {
    let s = session(1);
    let (operation, provider) = invoke(&s);
    assert!(!MiOperationKind::Invoke.cancel_reaches_provider());
    let calls = Calls::new();
    assert_eq!(
        provider.register_cancel_with(calls.callback()),
        Err(MiResult::NOT_SUPPORTED)
    );
    operation.cancel(ALICE, MiCancellationReason::None).unwrap();
    assert_eq!(calls.count(), 0);
    assert_eq!(provider.post_result(MiResult::OK), Ok(MiPosted::Discarded));
    assert_eq!(calls.count(), 0);
}

/// "The client does disconnect from the server as soon as possible ... it will not wait for the
/// entire operation to complete before giving a final result."
#[test]
fn client_gets_its_final_result_while_the_invoke_provider_still_runs() {
    let s = session(1);
    let (operation, provider) = invoke(&s);
    operation.cancel(ALICE, MiCancellationReason::None).unwrap();
    assert!(operation.final_result().is_some());
    // The provider has not finished: the operation still holds its quota.
    assert_eq!(s.operations_in_use(), 1);
    assert_eq!(provider.post_result(MiResult::OK), Ok(MiPosted::Discarded));
    assert_eq!(s.operations_in_use(), 0);
}

/// "... new operations may possibly fail with quota violations until the provider finally
/// realizes the operation is canceled, and it shuts itself down": `MI_RESULT_SERVER_LIMITS_EXCEEDED`
/// (27) between the cancel and the invoke provider's final result.
#[test]
fn quota_stays_held_after_cancel_until_the_invoke_provider_finishes() {
    let s = session(1);
    let (operation, provider) = invoke(&s);
    operation.cancel(ALICE, MiCancellationReason::None).unwrap();
    close(operation);
    let refused = s.start_operation(ALICE, MiOperationKind::Enumerate);
    assert_eq!(refused.err(), Some(MiResult::SERVER_LIMITS_EXCEEDED));
    assert_eq!(MiResult::SERVER_LIMITS_EXCEEDED.0, 27);
    // The provider realizes and shuts down.
    assert_eq!(provider.post_result(MiResult::OK), Ok(MiPosted::Discarded));
    assert_eq!(s.operations_in_use(), 0);
    let (again, _provider) = enumerate(&s);
    close(again);
}

/// The same for an enumeration whose provider had not registered yet: quota held until it
/// registers (and is called at once).
#[test]
fn quota_stays_held_after_cancel_until_an_enumerate_provider_notices_by_registering() {
    let s = session(1);
    let (operation, provider) = enumerate(&s);
    operation.cancel(ALICE, MiCancellationReason::None).unwrap();
    assert_eq!(
        s.start_operation(ALICE, MiOperationKind::Invoke).err(),
        Some(MiResult::SERVER_LIMITS_EXCEEDED)
    );
    let calls = Calls::new();
    assert_eq!(
        provider.register_cancel_with(calls.callback()),
        Ok(MiRegistration::CalledAtOnce)
    );
    assert_eq!(s.operations_in_use(), 0);
    assert!(s.start_operation(ALICE, MiOperationKind::Invoke).is_ok());
}

/// The quota unit goes back when the provider's callback has returned, not before: a new
/// operation started from inside the callback is still refused.
#[test]
fn quota_stays_held_while_the_cancel_callback_runs_and_is_released_when_it_returns() {
    let s = session(1);
    let (operation, provider) = enumerate(&s);
    let seen = Arc::new(Mutex::new(None));
    let (inner, session_in_callback) = (seen.clone(), s.clone());
    provider
        .register_cancel_with(move |_| {
            let attempt = session_in_callback.start_operation(ALICE, MiOperationKind::Invoke);
            *inner.lock().unwrap() = Some(attempt.err());
        })
        .unwrap();
    operation.cancel(ALICE, MiCancellationReason::None).unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        Some(Some(MiResult::SERVER_LIMITS_EXCEEDED))
    );
    assert_eq!(s.operations_in_use(), 0);
}

#[test]
fn a_session_refuses_operations_beyond_its_quota_with_server_limits_exceeded() {
    let s = session(2);
    assert_eq!(s.max_operations(), 2);
    let a = enumerate(&s);
    let b = invoke(&s);
    assert_eq!(s.operations_in_use(), 2);
    assert_eq!(
        s.start_operation(ALICE, MiOperationKind::Enumerate).err(),
        Some(MiResult::SERVER_LIMITS_EXCEEDED)
    );
    assert_eq!(a.1.post_result(MiResult::OK), Ok(MiPosted::Delivered));
    assert_eq!(s.operations_in_use(), 1);
    let c = enumerate(&s);
    drop((a.0, b, c));
    assert_eq!(s.operations_in_use(), 0);
    assert_eq!(s.live_operations(), 0);
}

#[test]
fn a_session_with_zero_quota_refuses_every_operation() {
    let s = session(0);
    assert_eq!(
        s.start_operation(ALICE, MiOperationKind::Enumerate).err(),
        Some(MiResult::SERVER_LIMITS_EXCEEDED)
    );
    assert_eq!(s.operations_in_use(), 0);
}

#[test]
fn a_shut_down_session_refuses_new_operations_with_server_is_shutting_down() {
    let s = session(4);
    let (running, provider) = enumerate(&s);
    s.shutdown();
    assert_eq!(
        s.start_operation(ALICE, MiOperationKind::Enumerate).err(),
        Some(MiResult::SERVER_IS_SHUTTING_DOWN)
    );
    assert_eq!(
        s.operations_in_use(),
        1,
        "the refused start gave its unit back"
    );
    assert_eq!(provider.post_result(MiResult::OK), Ok(MiPosted::Delivered));
    assert_eq!(running.get_result(), MiDelivery::Final(ok_result()));
}

/// "cancel() again is harmless": `Ok`, nothing more happens, and the first reason stays.
#[test]
fn second_cancel_is_harmless_and_keeps_the_first_reason() {
    let s = session(1);
    let (operation, provider) = enumerate(&s);
    let calls = Calls::new();
    provider.register_cancel_with(calls.callback()).unwrap();
    operation
        .cancel(ALICE, MiCancellationReason::Timeout)
        .unwrap();
    assert_eq!(
        operation.cancel(ALICE, MiCancellationReason::Shutdown),
        Ok(())
    );
    assert_eq!(s.operation_cancel(operation.id(), ALICE, 3), MiResult::OK);
    assert_eq!(calls.count(), 1);
    assert_eq!(calls.reason(), Some(MiCancellationReason::Timeout));
    assert_eq!(
        operation.final_result(),
        Some(cancelled(MiCancellationReason::Timeout))
    );
}

/// A cancel after the provider's final result is harmless too and keeps that result.
#[test]
fn cancel_after_the_final_result_is_harmless_and_keeps_the_providers_result() {
    let s = session(1);
    let (operation, provider) = enumerate(&s);
    let calls = Calls::new();
    provider.register_cancel_with(calls.callback()).unwrap();
    assert_eq!(provider.post_result(MiResult::OK), Ok(MiPosted::Delivered));
    assert_eq!(operation.cancel(ALICE, MiCancellationReason::None), Ok(()));
    assert_eq!(calls.count(), 0);
    assert_eq!(operation.get_result(), MiDelivery::Final(ok_result()));
    assert_eq!(s.operations_in_use(), 0);
}

/// The provider's result, when it is the final one, keeps its code: errors too.
#[test]
fn provider_error_result_is_the_final_result_and_not_a_cancellation() {
    let s = session(1);
    let (operation, provider) = enumerate(&s);
    assert_eq!(
        provider.post_result(MiResult::NOT_FOUND),
        Ok(MiPosted::Delivered)
    );
    assert_eq!(
        operation.final_result(),
        Some(MiFinalResult {
            result: MiResult::NOT_FOUND,
            cancelled: None
        })
    );
}

/// Cancel or close on a closed handle is `MI_RESULT_INVALID_PARAMETER` where it can be written
/// (by id; with the handle, `close(self)` makes it impossible to write).
#[test]
fn operation_cancel_of_a_closed_operation_is_invalid_parameter() {
    let s = session(1);
    let (operation, provider) = enumerate(&s);
    let id = operation.id();
    close(operation);
    // The provider still holds the context: the id still names it, but it is closed.
    assert_eq!(
        s.operation_cancel(id, ALICE, 0),
        MiResult::INVALID_PARAMETER
    );
    drop(provider);
    // Gone altogether.
    assert_eq!(
        s.operation_cancel(id, ALICE, 0),
        MiResult::INVALID_PARAMETER
    );
}

#[test]
fn operation_cancel_of_an_unknown_id_is_invalid_parameter() {
    let s = session(1);
    let (mine, _provider) = enumerate(&s);
    for raw in [u64::MAX, 12345, mine.id().as_u64() + (1 << 40)] {
        assert_eq!(
            s.operation_cancel(rdbss::RequestId::from_u64(raw), ALICE, 0),
            MiResult::INVALID_PARAMETER,
            "{raw:#x}"
        );
    }
    assert!(!mine.is_cancelled());
}

/// Closing an operation that has no final result yet cancels it first, with `MI_REASON_NONE`,
/// so a close never blocks and never leaves the provider running unnoticed.
#[test]
fn close_of_a_running_operation_cancels_it_first_with_reason_none() {
    let s = session(1);
    let (operation, provider) = enumerate(&s);
    let calls = Calls::new();
    provider.register_cancel_with(calls.callback()).unwrap();
    close(operation);
    assert_eq!(calls.count(), 1);
    assert_eq!(calls.reason(), Some(MiCancellationReason::None));
    assert_eq!(s.operations_in_use(), 0);
    assert_eq!(provider.post_instance(1), Err(MiResult::FAILED));
}

/// Dropping the handle closes it the same way.
#[test]
fn dropping_the_operation_closes_it_like_close() {
    let s = session(1);
    let (operation, provider) = enumerate(&s);
    let id = operation.id();
    let calls = Calls::new();
    provider.register_cancel_with(calls.callback()).unwrap();
    drop(operation);
    assert_eq!(calls.count(), 1);
    assert_eq!(
        s.operation_cancel(id, ALICE, 0),
        MiResult::INVALID_PARAMETER
    );
}

/// Close is where the client's resources go: unread instances are dropped there.
#[test]
fn close_drops_unread_instances() {
    let s: MiSession<Arc<()>> = MiSession::new(1);
    let (operation, provider) = s
        .start_operation(ALICE, MiOperationKind::Enumerate)
        .unwrap();
    let token = Arc::new(());
    provider.post_instance(token.clone()).unwrap();
    provider.post_instance(token.clone()).unwrap();
    assert_eq!(provider.post_result(MiResult::OK), Ok(MiPosted::Delivered));
    assert_eq!(Arc::strong_count(&token), 3);
    operation.close(ALICE).map_err(|(error, _)| error).unwrap();
    assert_eq!(Arc::strong_count(&token), 1);
    assert_eq!(s.live_operations(), 0);
}

// ---------------------------------------------------------------------------------------------
// MI_Context_RegisterCancel (seed 000)
// ---------------------------------------------------------------------------------------------

/// "Registers a callback that is invoked when the operation is canceled."
#[test]
fn registered_callback_is_invoked_when_the_operation_is_cancelled() {
    let s = session(1);
    let (operation, provider) = enumerate(&s);
    let calls = Calls::new();
    assert_eq!(
        provider.register_cancel_with(calls.callback()),
        Ok(MiRegistration::Registered)
    );
    assert_eq!(calls.count(), 0);
    operation
        .cancel(ALICE, MiCancellationReason::Timeout)
        .unwrap();
    assert_eq!(calls.count(), 1);
}

/// "callback: Function that will be called if the operation is canceled" (only then).
#[test]
fn callback_is_not_called_unless_the_operation_is_cancelled() {
    let s = session(1);
    let (operation, provider) = enumerate(&s);
    let calls = Calls::new();
    provider.register_cancel_with(calls.callback()).unwrap();
    provider.post_instance(1).unwrap();
    assert_eq!(provider.post_result(MiResult::OK), Ok(MiPosted::Delivered));
    close(operation);
    assert_eq!(calls.count(), 0);
}

fn record_data(reason: MiCancellationReason, data: (Arc<Mutex<Vec<String>>>, &'static str)) {
    data.0
        .lock()
        .unwrap()
        .push(format!("{}:{}", data.1, reason.as_raw()));
}

/// "callbackData: Data to be passed to the callback."
#[test]
fn register_cancel_passes_the_callback_data_and_the_reason() {
    let s = session(1);
    let (operation, provider) = enumerate(&s);
    let log = Arc::new(Mutex::new(Vec::new()));
    assert_eq!(
        provider.register_cancel(record_data, (log.clone(), "enum-42")),
        Ok(MiRegistration::Registered)
    );
    operation
        .cancel(ALICE, MiCancellationReason::Shutdown)
        .unwrap();
    assert_eq!(*log.lock().unwrap(), ["enum-42:2"]);
}

static NO_DATA_CALLS: AtomicUsize = AtomicUsize::new(0);

fn count_without_data(_: MiCancellationReason, (): ()) {
    NO_DATA_CALLS.fetch_add(1, Ordering::SeqCst);
}

/// "callbackData [in, optional]": no data at all.
#[test]
fn register_cancel_without_callback_data() {
    let s = session(1);
    let (operation, provider) = enumerate(&s);
    let before = NO_DATA_CALLS.load(Ordering::SeqCst);
    provider.register_cancel(count_without_data, ()).unwrap();
    operation.cancel(ALICE, MiCancellationReason::None).unwrap();
    assert_eq!(NO_DATA_CALLS.load(Ordering::SeqCst), before + 1);
}

/// "Returns a value of the MI_Result enumeration": `MI_RESULT_OK` as `Ok`, errors as their codes.
#[test]
fn register_cancel_returns_mi_result_codes() {
    let s = session(2);
    let (_op, provider) = enumerate(&s);
    assert!(provider.register_cancel_with(|_| {}).is_ok());
    let (_op2, invoke_provider) = invoke(&s);
    let code = invoke_provider.register_cancel_with(|_| {}).unwrap_err();
    assert_eq!(code.0, 7);
    assert_eq!(code.to_string(), "MI_RESULT_NOT_SUPPORTED");
}

/// "If a provider calls this function multiple times on the same context, only the last
/// callback function will be called."
#[test]
fn registering_again_replaces_the_callback_only_the_last_is_called() {
    let s = session(1);
    let (operation, provider) = enumerate(&s);
    let (first, second, third) = (Calls::new(), Calls::new(), Calls::new());
    for calls in [&first, &second, &third] {
        assert_eq!(
            provider.register_cancel_with(calls.callback()),
            Ok(MiRegistration::Registered)
        );
    }
    operation.cancel(ALICE, MiCancellationReason::None).unwrap();
    assert_eq!((first.count(), second.count(), third.count()), (0, 0, 1));
}

/// A replaced callback is dropped (with its data) when it is replaced, not kept until the end.
#[test]
fn a_replaced_callback_is_dropped_unused() {
    let s = session(1);
    let (_operation, provider) = enumerate(&s);
    let token = Arc::new(());
    let held = token.clone();
    provider.register_cancel_with(move |_| drop(held)).unwrap();
    assert_eq!(Arc::strong_count(&token), 2);
    provider.register_cancel_with(|_| {}).unwrap();
    assert_eq!(Arc::strong_count(&token), 1);
}

/// "Not all operations canceled on the client will reach the provider."
#[test]
fn not_every_client_cancel_reaches_the_provider() {
    let s = session(2);
    let (enum_op, enum_provider) = enumerate(&s);
    let (invoke_op, invoke_provider) = invoke(&s);
    let (enum_calls, invoke_calls) = (Calls::new(), Calls::new());
    enum_provider
        .register_cancel_with(enum_calls.callback())
        .unwrap();
    let _ = invoke_provider.register_cancel_with(invoke_calls.callback());
    enum_op.cancel(ALICE, MiCancellationReason::None).unwrap();
    invoke_op.cancel(ALICE, MiCancellationReason::None).unwrap();
    assert_eq!((enum_calls.count(), invoke_calls.count()), (1, 0));
}

/// "If this is an operation that cannot register the cancellation callback, the function will
/// return an error."
#[test]
fn register_cancel_on_an_invoke_returns_not_supported_and_registers_nothing() {
    let s = session(1);
    let (operation, provider) = invoke(&s);
    let calls = Calls::new();
    assert_eq!(
        provider.register_cancel_with(calls.callback()),
        Err(MiResult::NOT_SUPPORTED)
    );
    operation.cancel(ALICE, MiCancellationReason::None).unwrap();
    assert_eq!(calls.count(), 0);
}

/// "This would mean the operation will run to completion": the invoke's provider runs on and
/// its result is the final result.
#[test]
fn an_invoke_whose_registration_failed_runs_to_completion() {
    let s = session(1);
    let (operation, provider) = invoke(&s);
    assert!(provider.register_cancel_with(|_| {}).is_err());
    provider.post_instance(7).unwrap();
    assert_eq!(provider.post_result(MiResult::OK), Ok(MiPosted::Delivered));
    assert_eq!(operation.get_result(), MiDelivery::Instance(7));
    assert_eq!(operation.get_result(), MiDelivery::Final(ok_result()));
}

/// "If the operation runs through to completion, the callback function will not be called":
/// not by a later cancel either.
#[test]
fn callback_is_never_called_once_the_operation_has_completed() {
    let s = session(1);
    let (operation, provider) = enumerate(&s);
    let calls = Calls::new();
    provider.register_cancel_with(calls.callback()).unwrap();
    let clone = provider.clone();
    assert_eq!(provider.post_result(MiResult::OK), Ok(MiPosted::Delivered));
    operation.cancel(ALICE, MiCancellationReason::None).unwrap();
    assert_eq!(s.operation_cancel(operation.id(), ALICE, 1), MiResult::OK);
    close(operation);
    drop(clone);
    assert_eq!(calls.count(), 0);
}

/// A registration after the operation completed is refused (the context is no longer valid)
/// and its callback is never called.
#[test]
fn register_after_the_final_result_is_invalid_parameter_and_never_called() {
    let s = session(1);
    let (operation, provider) = enumerate(&s);
    let clone = provider.clone();
    provider.post_result(MiResult::OK).unwrap();
    let calls = Calls::new();
    assert_eq!(
        clone.register_cancel_with(calls.callback()),
        Err(MiResult::INVALID_PARAMETER)
    );
    operation.cancel(ALICE, MiCancellationReason::None).unwrap();
    assert_eq!(calls.count(), 0);
}

/// The choice for a callback registered after the cancel: called at once, before
/// `register_cancel` returns (never lost), and the quota goes back then.
#[test]
fn register_after_cancel_calls_the_callback_at_once() {
    let s = session(1);
    let (operation, provider) = enumerate(&s);
    operation
        .cancel(ALICE, MiCancellationReason::ServiceStop)
        .unwrap();
    assert_eq!(s.operations_in_use(), 1);
    let calls = Calls::new();
    assert_eq!(
        provider.register_cancel_with(calls.callback()),
        Ok(MiRegistration::CalledAtOnce)
    );
    assert_eq!(calls.count(), 1);
    assert_eq!(calls.reason(), Some(MiCancellationReason::ServiceStop));
    assert_eq!(s.operations_in_use(), 0);
    assert_eq!(provider.post_result(MiResult::OK), Ok(MiPosted::Discarded));
}

/// Once the cancel has reached a callback, later registrations are not called again: the
/// provider is told exactly once.
#[test]
fn register_after_the_cancel_was_delivered_is_already_delivered_and_not_called() {
    let s = session(1);
    let (operation, provider) = enumerate(&s);
    let (first, second) = (Calls::new(), Calls::new());
    provider.register_cancel_with(first.callback()).unwrap();
    operation.cancel(ALICE, MiCancellationReason::None).unwrap();
    assert_eq!(
        provider.register_cancel_with(second.callback()),
        Ok(MiRegistration::AlreadyDelivered)
    );
    assert_eq!((first.count(), second.count()), (1, 0));
}

/// The callback runs with no lock held: it may post the final result and register again.
#[test]
fn the_callback_may_call_back_into_the_context() {
    let s = session(1);
    let (operation, provider) = enumerate(&s);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (inner, context) = (seen.clone(), provider.clone());
    provider
        .register_cancel_with(move |_| {
            let again = context.register_cancel_with(|_| {});
            let instance = context.post_instance(1);
            let posted = context.post_result(MiResult::OK);
            inner
                .lock()
                .unwrap()
                .push(format!("{again:?} {instance:?} {posted:?}"));
        })
        .unwrap();
    operation.cancel(ALICE, MiCancellationReason::None).unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        ["Ok(AlreadyDelivered) Err(MI_RESULT_FAILED(1)) Ok(Discarded)"]
    );
    assert_eq!(s.operations_in_use(), 0);
}

// ---------------------------------------------------------------------------------------------
// The provider's context: invalid use and abandonment
// ---------------------------------------------------------------------------------------------

#[test]
fn a_second_final_result_through_another_clone_is_invalid_parameter() {
    let s = session(1);
    let (operation, provider) = enumerate(&s);
    let clone = provider.clone();
    assert_eq!(
        provider.post_result(MiResult::NOT_FOUND),
        Ok(MiPosted::Delivered)
    );
    assert_eq!(
        clone.clone().post_result(MiResult::OK),
        Err(MiResult::INVALID_PARAMETER)
    );
    assert_eq!(clone.post_instance(3), Err(MiResult::INVALID_PARAMETER));
    assert_eq!(
        operation.final_result().map(|f| f.result),
        Some(MiResult::NOT_FOUND)
    );
    assert_eq!(s.operations_in_use(), 0);
}

/// A provider that drops its context without a final result posts `MI_RESULT_FAILED`: the
/// operation ends and its quota goes back.
#[test]
fn dropping_the_provider_context_without_a_result_posts_failed_and_returns_the_quota() {
    let s = session(1);
    let (operation, provider) = enumerate(&s);
    let clone = provider.clone();
    drop(provider);
    assert_eq!(operation.final_result(), None, "a clone is still alive");
    drop(clone);
    assert_eq!(
        operation.final_result(),
        Some(MiFinalResult {
            result: MiResult::FAILED,
            cancelled: None
        })
    );
    assert_eq!(s.operations_in_use(), 0);
}

#[test]
fn every_mi_call_leaves_the_irql_at_passive() {
    let s = session(1);
    let (operation, provider) = enumerate(&s);
    provider.register_cancel_with(|_| {}).unwrap();
    assert_eq!(irql::current(), Irql::PASSIVE);
    provider.post_instance(1).unwrap();
    operation.cancel(ALICE, MiCancellationReason::None).unwrap();
    assert_eq!(irql::current(), Irql::PASSIVE);
    let _ = operation.get_result();
    close(operation);
    drop(provider);
    assert_eq!(irql::current(), Irql::PASSIVE);
}

/// Built on the core: an MI cancel is the core's cancel, with its IRQL rule.
#[test]
#[should_panic(expected = "DRIVER_IRQL_NOT_LESS_OR_EQUAL (0x000000D1)")]
fn mi_cancel_at_dispatch_level_is_driver_irql_not_less_or_equal() {
    let s = session(1);
    let (operation, _provider) = enumerate(&s);
    let _dispatch = irql::raise(Irql::DISPATCH);
    let _ = operation.cancel(ALICE, MiCancellationReason::None);
}

// ---------------------------------------------------------------------------------------------
// Real threads
// ---------------------------------------------------------------------------------------------

/// Register ∥ cancel ∥ post result on real threads, many times: the callback runs at most once,
/// never after a delivered result, the client's final result matches the post's outcome, and
/// every quota unit and every context comes back.
#[test]
fn stress_register_cancel_and_post_result_racing_keep_every_invariant() {
    const ROUNDS: usize = if cfg!(miri) { 30 } else { 2_000 };
    let s = session(ROUNDS);
    for round in 0..ROUNDS {
        let (operation, provider) = enumerate(&s);
        let operation = Arc::new(operation);
        let calls = Calls::new();
        let barrier = Arc::new(Barrier::new(3));
        let registrar = {
            let (provider, barrier, callback) =
                (provider.clone(), barrier.clone(), calls.callback());
            thread::spawn(move || {
                barrier.wait();
                provider.register_cancel_with(callback)
            })
        };
        let canceller = {
            let (operation, barrier) = (operation.clone(), barrier.clone());
            thread::spawn(move || {
                barrier.wait();
                operation.cancel(ALICE, MiCancellationReason::Timeout)
            })
        };
        barrier.wait();
        let posted = provider.post_result(MiResult::OK).unwrap();
        let registration = registrar.join().unwrap();
        canceller.join().unwrap().unwrap();

        let count = calls.count();
        assert!(count <= 1, "round {round}: {count} calls");
        match posted {
            MiPosted::Delivered => {
                assert_eq!(count, 0, "round {round}: called after completion");
                assert_eq!(operation.final_result(), Some(ok_result()));
            }
            MiPosted::Discarded => assert_eq!(
                operation.final_result(),
                Some(cancelled(MiCancellationReason::Timeout))
            ),
        }
        if registration == Ok(MiRegistration::CalledAtOnce) {
            assert_eq!(count, 1, "round {round}");
        }
    }
    assert_eq!(s.operations_in_use(), 0);
    assert_eq!(s.live_operations(), 0);
}
