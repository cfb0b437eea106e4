//! The failover-cluster resource monitor (`rdbss::resmon`): the resource DLL's `Cancel` entry
//! point (`PCANCEL_ROUTINE`, seed 004) with the pending `Online` / `Offline` it cancels, one test
//! per documented sentence (see `docs/conformance.md`), `Terminate`, the pending timeout, and
//! invalid input.
//!
//! Needs the `std` feature (threads are emulated processors).

#![cfg(feature = "std")]

use std::sync::{Arc, Barrier};
use std::thread;

use rdbss::irql::{self, Irql};
use rdbss::resmon::{
    PendingKind, PendingWork, ResourceConfig, ResourceExitState, ResourceId, ResourceMonitor,
    ResourceState, Win32Error, DEFAULT_PENDING_TIMEOUT_MS, MIN_PENDING_TIMEOUT_MS,
};

fn monitor_with(config: ResourceConfig) -> (ResourceMonitor, ResourceId) {
    let monitor = ResourceMonitor::new();
    let id = monitor.create_resource(config).expect("create_resource");
    (monitor, id)
}

fn monitor() -> (ResourceMonitor, ResourceId) {
    monitor_with(ResourceConfig::default())
}

/// A resource whose `Online` is pending, and the worker item finishing it.
fn pending_online() -> (ResourceMonitor, ResourceId, PendingWork) {
    let (monitor, id) = monitor();
    assert_eq!(monitor.online(id), Win32Error::IO_PENDING);
    let work = monitor.next_work().expect("a queued worker item");
    (monitor, id, work)
}

/// A resource that is `Online` and whose `Offline` is pending, and its worker item.
fn pending_offline() -> (ResourceMonitor, ResourceId, PendingWork) {
    let (monitor, id, work) = pending_online();
    assert_eq!(
        work.complete(Win32Error::SUCCESS),
        ResourceExitState::Continue
    );
    assert_eq!(monitor.offline(id), Win32Error::IO_PENDING);
    let work = monitor.next_work().expect("a queued worker item");
    (monitor, id, work)
}

fn state(monitor: &ResourceMonitor, id: ResourceId) -> ResourceState {
    monitor.state(id).expect("state")
}

// ---------------------------------------------------------------------------------------------
// Values
// ---------------------------------------------------------------------------------------------

#[test]
fn win32_error_values_and_names_match_winerror_h() {
    let table = [
        (Win32Error::SUCCESS, 0, "ERROR_SUCCESS"),
        (Win32Error::INVALID_PARAMETER, 87, "ERROR_INVALID_PARAMETER"),
        (
            Win32Error::OPERATION_ABORTED,
            995,
            "ERROR_OPERATION_ABORTED",
        ),
        (Win32Error::IO_PENDING, 997, "ERROR_IO_PENDING"),
        (Win32Error::TIMEOUT, 1460, "ERROR_TIMEOUT"),
        (
            Win32Error::RESOURCE_NOT_FOUND,
            5007,
            "ERROR_RESOURCE_NOT_FOUND",
        ),
        (Win32Error::INVALID_STATE, 5023, "ERROR_INVALID_STATE"),
    ];
    for (code, value, name) in table {
        assert_eq!(code.0, value, "{name}");
        assert_eq!(code.name(), Some(name));
        assert_eq!(code.to_string(), name);
    }
    assert!(Win32Error::SUCCESS.is_success() && !Win32Error::IO_PENDING.is_success());
    assert_eq!(Win32Error(1).to_string(), "Win32 error 1");
    assert_eq!(
        format!("{:?}", Win32Error::INVALID_STATE),
        "ERROR_INVALID_STATE(5023)"
    );
}

#[test]
fn resource_state_and_exit_state_values_match_clusapi_h_and_resapi_h() {
    assert_eq!(ResourceState::Online as i32, 2);
    assert_eq!(ResourceState::Offline as i32, 3);
    assert_eq!(ResourceState::Failed as i32, 4);
    assert_eq!(ResourceState::OnlinePending as i32, 129);
    assert_eq!(ResourceState::OfflinePending as i32, 130);
    assert!(
        ResourceState::OnlinePending.is_pending() && ResourceState::OfflinePending.is_pending()
    );
    assert!(!ResourceState::Online.is_pending() && !ResourceState::Failed.is_pending());
    assert_eq!(ResourceExitState::Continue as u32, 0);
    assert_eq!(ResourceExitState::Terminate as u32, 1);
    assert_eq!(DEFAULT_PENDING_TIMEOUT_MS, 180_000);
    assert_eq!(MIN_PENDING_TIMEOUT_MS, 10);
    assert_eq!(
        ResourceConfig::default().pending_timeout_ms,
        DEFAULT_PENDING_TIMEOUT_MS
    );
}

// ---------------------------------------------------------------------------------------------
// PCANCEL_ROUTINE (seed 004)
// ---------------------------------------------------------------------------------------------

/// "Cancels an operation on a resource": a pending `Online`.
#[test]
fn cancel_cancels_a_pending_online() {
    let (monitor, id, work) = pending_online();
    assert_eq!(state(&monitor, id), ResourceState::OnlinePending);
    assert_eq!(monitor.cancel(id, 0), Win32Error::SUCCESS);
    assert_eq!(state(&monitor, id), ResourceState::Offline);
    assert!(work.check_terminate());
}

/// "Cancels an operation on a resource": a pending `Offline`.
#[test]
fn cancel_cancels_a_pending_offline() {
    let (monitor, id, work) = pending_offline();
    assert_eq!(state(&monitor, id), ResourceState::OfflinePending);
    assert_eq!(monitor.cancel(id, 0), Win32Error::SUCCESS);
    assert_eq!(state(&monitor, id), ResourceState::Online);
    assert!(work.check_terminate());
}

/// "Resource [in]: The resource ID of the resource": an id the monitor did not issue is
/// `ERROR_RESOURCE_NOT_FOUND`, for every entry point.
#[test]
fn an_unknown_resource_id_is_resource_not_found_for_every_entry_point() {
    let (monitor, id) = monitor();
    let other = ResourceMonitor::new();
    let unknown = ResourceId(id.0 + 1);
    assert_eq!(monitor.cancel(unknown, 0), Win32Error::RESOURCE_NOT_FOUND);
    assert_eq!(monitor.online(unknown), Win32Error::RESOURCE_NOT_FOUND);
    assert_eq!(monitor.offline(unknown), Win32Error::RESOURCE_NOT_FOUND);
    assert_eq!(monitor.terminate(unknown), Win32Error::RESOURCE_NOT_FOUND);
    assert_eq!(monitor.state(unknown), Err(Win32Error::RESOURCE_NOT_FOUND));
    assert_eq!(
        monitor.status(ResourceId(u32::MAX)),
        Err(Win32Error::RESOURCE_NOT_FOUND)
    );
    assert_eq!(other.cancel(id, 0), Win32Error::RESOURCE_NOT_FOUND);
    assert_eq!(monitor.queued_work(), 0);
}

/// "CancelFlags_RESERVED: Reserved": any non-zero value is `ERROR_INVALID_PARAMETER` and
/// changes nothing, pending or not.
#[test]
fn cancel_with_a_nonzero_reserved_flag_is_invalid_parameter_and_changes_nothing() {
    let (monitor, id, work) = pending_online();
    for flags in [1, 2, 0x8000_0000, u32::MAX] {
        assert_eq!(monitor.cancel(id, flags), Win32Error::INVALID_PARAMETER);
        assert_eq!(state(&monitor, id), ResourceState::OnlinePending);
        assert!(!work.check_terminate());
    }
    assert_eq!(
        work.complete(Win32Error::SUCCESS),
        ResourceExitState::Continue
    );
    assert_eq!(monitor.cancel(id, 1), Win32Error::INVALID_PARAMETER);
    assert_eq!(state(&monitor, id), ResourceState::Online);
}

/// "ERROR_SUCCESS (0)": returned when the pending operation was cancelled.
#[test]
fn cancel_of_a_pending_operation_returns_error_success_0() {
    let (monitor, id, _work) = pending_online();
    let code = monitor.cancel(id, 0);
    assert_eq!(code, Win32Error::SUCCESS);
    assert_eq!(code.0, 0);
}

/// "Error code: The operation was not successfully canceled": nothing pending is
/// `ERROR_INVALID_STATE` (5023), in every stable state, and changes nothing.
#[test]
fn cancel_with_nothing_pending_is_invalid_state_and_changes_nothing() {
    let (monitor, id) = monitor_with(ResourceConfig {
        pending_online: false,
        ..ResourceConfig::default()
    });
    assert_eq!(monitor.cancel(id, 0), Win32Error::INVALID_STATE);
    assert_eq!(state(&monitor, id), ResourceState::Offline);
    assert_eq!(monitor.online(id), Win32Error::SUCCESS);
    assert_eq!(monitor.cancel(id, 0), Win32Error::INVALID_STATE);
    assert_eq!(state(&monitor, id), ResourceState::Online);
    assert_eq!(Win32Error::INVALID_STATE.0, 5023);
}

/// The same when the worker finished first: the operation is no longer there to cancel.
#[test]
fn cancel_after_the_worker_completed_is_invalid_state_and_keeps_the_outcome() {
    let (monitor, id, work) = pending_online();
    assert_eq!(
        work.complete(Win32Error::SUCCESS),
        ResourceExitState::Continue
    );
    assert_eq!(monitor.cancel(id, 0), Win32Error::INVALID_STATE);
    assert_eq!(state(&monitor, id), ResourceState::Online);
}

/// The same for a second cancel: the first one ended the operation.
#[test]
fn a_second_cancel_is_invalid_state() {
    let (monitor, id, _work) = pending_online();
    assert_eq!(monitor.cancel(id, 0), Win32Error::SUCCESS);
    assert_eq!(monitor.cancel(id, 0), Win32Error::INVALID_STATE);
    assert_eq!(state(&monitor, id), ResourceState::Offline);
}

/// A cancelled operation's resource settles in the state it had before the operation: a
/// cancelled `Online` of a `Failed` resource goes back to `Failed`.
#[test]
fn a_cancelled_online_of_a_failed_resource_returns_to_failed() {
    let (monitor, id, work) = pending_online();
    assert_eq!(
        work.complete(Win32Error::OPERATION_ABORTED),
        ResourceExitState::Continue
    );
    assert_eq!(state(&monitor, id), ResourceState::Failed);
    assert_eq!(monitor.online(id), Win32Error::IO_PENDING);
    let _work = monitor.next_work().unwrap();
    assert_eq!(monitor.cancel(id, 0), Win32Error::SUCCESS);
    assert_eq!(state(&monitor, id), ResourceState::Failed);
}

/// The worker of a cancelled operation is told to stop at every contact, and its outcome is
/// discarded.
#[test]
fn the_worker_of_a_cancelled_operation_is_told_to_terminate_and_its_outcome_is_discarded() {
    let (monitor, id, work) = pending_online();
    assert_eq!(monitor.cancel(id, 0), Win32Error::SUCCESS);
    assert!(work.check_terminate());
    assert_eq!(work.report_status(), ResourceExitState::Terminate);
    assert_eq!(
        work.complete(Win32Error::SUCCESS),
        ResourceExitState::Terminate
    );
    assert_eq!(state(&monitor, id), ResourceState::Offline);
}

/// After a cancel the resource is usable again: a new `Online` goes pending and succeeds.
#[test]
fn after_a_cancel_the_resource_can_be_brought_online_again() {
    let (monitor, id, old) = pending_online();
    assert_eq!(monitor.cancel(id, 0), Win32Error::SUCCESS);
    assert_eq!(monitor.online(id), Win32Error::IO_PENDING);
    let work = monitor.next_work().unwrap();
    // The old worker's late outcome touches nothing of the new operation.
    assert_eq!(
        old.complete(Win32Error::SUCCESS),
        ResourceExitState::Terminate
    );
    assert_eq!(state(&monitor, id), ResourceState::OnlinePending);
    assert_eq!(
        work.complete(Win32Error::SUCCESS),
        ResourceExitState::Continue
    );
    assert_eq!(state(&monitor, id), ResourceState::Online);
}

/// Built on the core: the cancel is the core's, with its IRQL rule (the routine is never run at
/// DISPATCH_LEVEL).
#[test]
#[should_panic(expected = "DRIVER_IRQL_NOT_LESS_OR_EQUAL (0x000000D1)")]
fn cancel_at_dispatch_level_is_driver_irql_not_less_or_equal() {
    let (monitor, id, _work) = pending_online();
    let _dispatch = irql::raise(Irql::DISPATCH);
    let _ = monitor.cancel(id, 0);
}

// ---------------------------------------------------------------------------------------------
// Online / Offline and the pending protocol ("Resource DLL Entry-Point Functions")
// ---------------------------------------------------------------------------------------------

/// `Online` returns `ERROR_IO_PENDING`, the resource is `OnlinePending`, and a worker finishes
/// it: `Online`.
#[test]
fn online_returns_io_pending_and_a_worker_brings_it_online() {
    let (monitor, id) = monitor();
    assert_eq!(state(&monitor, id), ResourceState::Offline);
    assert_eq!(monitor.online(id), Win32Error::IO_PENDING);
    assert_eq!(state(&monitor, id), ResourceState::OnlinePending);
    assert_eq!(monitor.queued_work(), 1);
    let work = monitor.next_work().unwrap();
    assert_eq!((work.resource(), work.kind()), (id, PendingKind::Online));
    assert!(!work.check_terminate());
    assert_eq!(
        work.complete(Win32Error::SUCCESS),
        ResourceExitState::Continue
    );
    assert_eq!(state(&monitor, id), ResourceState::Online);
    assert!(monitor.next_work().is_none());
}

/// `Offline` likewise.
#[test]
fn offline_returns_io_pending_and_a_worker_takes_it_offline() {
    let (monitor, id, work) = pending_offline();
    assert_eq!(work.kind(), PendingKind::Offline);
    assert_eq!(
        work.complete(Win32Error::SUCCESS),
        ResourceExitState::Continue
    );
    assert_eq!(state(&monitor, id), ResourceState::Offline);
}

/// `Online` and `Offline` "may" return `ERROR_IO_PENDING`: a DLL that finishes at once returns
/// `ERROR_SUCCESS`.
#[test]
fn online_and_offline_that_are_not_pending_finish_at_once() {
    let (monitor, id) = monitor_with(ResourceConfig {
        pending_online: false,
        pending_offline: false,
        ..ResourceConfig::default()
    });
    assert_eq!(monitor.online(id), Win32Error::SUCCESS);
    assert_eq!(state(&monitor, id), ResourceState::Online);
    assert_eq!(monitor.offline(id), Win32Error::SUCCESS);
    assert_eq!(state(&monitor, id), ResourceState::Offline);
    assert_eq!(monitor.queued_work(), 0);
}

/// A worker that fails leaves the resource `Failed`; `Offline` of a failed resource is
/// immediate.
#[test]
fn a_failing_worker_leaves_the_resource_failed() {
    let (monitor, id, work) = pending_online();
    assert_eq!(work.complete(Win32Error(1460)), ResourceExitState::Continue);
    assert_eq!(state(&monitor, id), ResourceState::Failed);
    assert_eq!(monitor.offline(id), Win32Error::SUCCESS);
    assert_eq!(state(&monitor, id), ResourceState::Offline);
}

/// Entry points against the current state: nothing to do is `ERROR_SUCCESS`; an operation
/// pending is `ERROR_INVALID_STATE` and nothing changes.
#[test]
fn online_or_offline_while_an_operation_is_pending_is_invalid_state() {
    let (monitor, id, work) = pending_online();
    assert_eq!(monitor.online(id), Win32Error::INVALID_STATE);
    assert_eq!(monitor.offline(id), Win32Error::INVALID_STATE);
    assert_eq!(monitor.queued_work(), 0);
    assert_eq!(state(&monitor, id), ResourceState::OnlinePending);
    assert_eq!(
        work.complete(Win32Error::SUCCESS),
        ResourceExitState::Continue
    );
    assert_eq!(monitor.online(id), Win32Error::SUCCESS, "already online");
    assert_eq!(monitor.queued_work(), 0);
    let (monitor2, id2) = monitor_with(ResourceConfig::default());
    assert_eq!(
        monitor2.offline(id2),
        Win32Error::SUCCESS,
        "already offline"
    );
}

/// `SetResourceStatus` while pending: a checkpoint each time, `ResourceExitStateContinue`.
#[test]
fn report_status_counts_checkpoints_and_continues() {
    let (monitor, id, work) = pending_online();
    assert_eq!(monitor.status(id).unwrap().checkpoint, 0);
    monitor.advance_clock(5);
    assert_eq!(work.report_status(), ResourceExitState::Continue);
    assert_eq!(work.report_status(), ResourceExitState::Continue);
    let status = monitor.status(id).unwrap();
    assert_eq!(status.state, ResourceState::OnlinePending);
    assert_eq!(status.checkpoint, 2);
    assert_eq!(status.last_report_ms, Some(5));
    assert_eq!(
        work.complete(Win32Error::SUCCESS),
        ResourceExitState::Continue
    );
    assert_eq!(monitor.status(id).unwrap().last_report_ms, None);
}

#[test]
fn worker_items_are_handed_out_oldest_first() {
    let monitor = ResourceMonitor::new();
    let ids: Vec<_> = (0..3)
        .map(|_| monitor.create_resource(ResourceConfig::default()).unwrap())
        .collect();
    for id in &ids {
        assert_eq!(monitor.online(*id), Win32Error::IO_PENDING);
    }
    let order: Vec<_> = std::iter::from_fn(|| monitor.next_work())
        .map(|work| work.resource())
        .collect();
    assert_eq!(order, ids);
}

// ---------------------------------------------------------------------------------------------
// Terminate
// ---------------------------------------------------------------------------------------------

/// `Terminate` still works: it ends a pending operation (the worker is told to stop) and leaves
/// the resource `Offline`.
#[test]
fn terminate_of_a_pending_online_leaves_it_offline_and_stops_the_worker() {
    let (monitor, id, work) = pending_online();
    assert_eq!(monitor.terminate(id), Win32Error::SUCCESS);
    assert_eq!(state(&monitor, id), ResourceState::Offline);
    assert!(work.check_terminate());
    assert_eq!(
        work.complete(Win32Error::SUCCESS),
        ResourceExitState::Terminate
    );
    assert_eq!(state(&monitor, id), ResourceState::Offline);
    assert_eq!(monitor.cancel(id, 0), Win32Error::INVALID_STATE);
}

/// A pending `Offline` terminated is `Offline` too (not the state before, unlike `Cancel`).
#[test]
fn terminate_of_a_pending_offline_leaves_it_offline() {
    let (monitor, id, work) = pending_offline();
    assert_eq!(monitor.terminate(id), Win32Error::SUCCESS);
    assert_eq!(state(&monitor, id), ResourceState::Offline);
    assert_eq!(work.report_status(), ResourceExitState::Terminate);
}

/// `Terminate` with nothing pending, from any stable state, and after a cancel.
#[test]
fn terminate_works_from_every_state_and_after_a_cancel() {
    let (monitor, id, work) = pending_online();
    assert_eq!(
        work.complete(Win32Error::SUCCESS),
        ResourceExitState::Continue
    );
    assert_eq!(monitor.terminate(id), Win32Error::SUCCESS);
    assert_eq!(state(&monitor, id), ResourceState::Offline);
    assert_eq!(monitor.terminate(id), Win32Error::SUCCESS);
    assert_eq!(state(&monitor, id), ResourceState::Offline);
    assert_eq!(monitor.online(id), Win32Error::IO_PENDING);
    let _work = monitor.next_work().unwrap();
    assert_eq!(monitor.cancel(id, 0), Win32Error::SUCCESS);
    assert_eq!(monitor.terminate(id), Win32Error::SUCCESS);
    assert_eq!(state(&monitor, id), ResourceState::Offline);
}

// ---------------------------------------------------------------------------------------------
// The pending timeout
// ---------------------------------------------------------------------------------------------

/// A pending operation that stops reporting status for longer than its `PendingTimeout` is
/// terminated: the resource is `Failed` and the worker is told to stop.
#[test]
fn a_pending_operation_that_stops_reporting_is_terminated_after_its_pending_timeout() {
    let (monitor, id) = monitor_with(ResourceConfig {
        pending_timeout_ms: 1_000,
        ..ResourceConfig::default()
    });
    assert_eq!(monitor.online(id), Win32Error::IO_PENDING);
    let work = monitor.next_work().unwrap();
    monitor.advance_clock(400);
    assert_eq!(work.report_status(), ResourceExitState::Continue);
    // Silence from t=400 on.
    assert_eq!(monitor.advance_clock(1_001), 1_401);
    assert_eq!(monitor.check_pending_timeouts(), 1);
    assert_eq!(state(&monitor, id), ResourceState::Failed);
    assert!(work.check_terminate());
    assert_eq!(work.report_status(), ResourceExitState::Terminate);
    assert_eq!(
        work.complete(Win32Error::SUCCESS),
        ResourceExitState::Terminate
    );
    assert_eq!(state(&monitor, id), ResourceState::Failed);
    assert_eq!(monitor.cancel(id, 0), Win32Error::INVALID_STATE);
}

/// The timeout bounds the time between reports, not the operation: one that keeps reporting
/// stays pending as long as it likes.
#[test]
fn a_pending_operation_that_keeps_reporting_is_never_terminated() {
    let (monitor, id) = monitor_with(ResourceConfig {
        pending_timeout_ms: 100,
        ..ResourceConfig::default()
    });
    assert_eq!(monitor.online(id), Win32Error::IO_PENDING);
    let work = monitor.next_work().unwrap();
    for _ in 0..50 {
        monitor.advance_clock(90);
        assert_eq!(work.report_status(), ResourceExitState::Continue);
        assert_eq!(monitor.check_pending_timeouts(), 0);
    }
    assert_eq!(monitor.now_ms(), 4_500);
    assert_eq!(
        work.complete(Win32Error::SUCCESS),
        ResourceExitState::Continue
    );
    assert_eq!(state(&monitor, id), ResourceState::Online);
}

/// Exactly `PendingTimeout` of silence is not yet too long ("exceeds" the interval); one more
/// millisecond is. A never-reporting operation is timed from its start.
#[test]
fn the_timeout_fires_only_once_the_silence_exceeds_pending_timeout() {
    let (monitor, id) = monitor_with(ResourceConfig {
        pending_timeout_ms: MIN_PENDING_TIMEOUT_MS,
        ..ResourceConfig::default()
    });
    assert_eq!(monitor.online(id), Win32Error::IO_PENDING);
    let _silent = monitor.next_work().unwrap();
    monitor.advance_clock(u64::from(MIN_PENDING_TIMEOUT_MS));
    assert_eq!(monitor.check_pending_timeouts(), 0);
    assert_eq!(state(&monitor, id), ResourceState::OnlinePending);
    monitor.advance_clock(1);
    assert_eq!(monitor.check_pending_timeouts(), 1);
    assert_eq!(state(&monitor, id), ResourceState::Failed);
    assert_eq!(monitor.check_pending_timeouts(), 0, "terminated once");
}

/// Each resource has its own `PendingTimeout`.
#[test]
fn each_resource_is_timed_with_its_own_pending_timeout() {
    let monitor = ResourceMonitor::new();
    let short = monitor
        .create_resource(ResourceConfig {
            pending_timeout_ms: 50,
            ..ResourceConfig::default()
        })
        .unwrap();
    let long = monitor.create_resource(ResourceConfig::default()).unwrap();
    assert_eq!(monitor.online(short), Win32Error::IO_PENDING);
    assert_eq!(monitor.online(long), Win32Error::IO_PENDING);
    monitor.advance_clock(51);
    assert_eq!(monitor.check_pending_timeouts(), 1);
    assert_eq!(state(&monitor, short), ResourceState::Failed);
    assert_eq!(state(&monitor, long), ResourceState::OnlinePending);
}

#[test]
fn a_pending_timeout_below_the_minimum_is_invalid_parameter() {
    let monitor = ResourceMonitor::new();
    for timeout in [0, 1, MIN_PENDING_TIMEOUT_MS - 1] {
        assert_eq!(
            monitor.create_resource(ResourceConfig {
                pending_timeout_ms: timeout,
                ..ResourceConfig::default()
            }),
            Err(Win32Error::INVALID_PARAMETER)
        );
    }
    assert!(monitor
        .create_resource(ResourceConfig {
            pending_timeout_ms: u32::MAX,
            ..ResourceConfig::default()
        })
        .is_ok());
}

/// A dropped worker item (a hung or lost worker) is caught by the pending timeout.
#[test]
fn a_lost_worker_is_terminated_by_the_pending_timeout() {
    let (monitor, id) = monitor_with(ResourceConfig {
        pending_timeout_ms: 10,
        ..ResourceConfig::default()
    });
    assert_eq!(monitor.online(id), Win32Error::IO_PENDING);
    drop(monitor.next_work());
    monitor.advance_clock(11);
    assert_eq!(monitor.check_pending_timeouts(), 1);
    assert_eq!(state(&monitor, id), ResourceState::Failed);
}

// ---------------------------------------------------------------------------------------------
// IRQL and real threads
// ---------------------------------------------------------------------------------------------

#[test]
fn every_entry_point_leaves_the_irql_at_passive() {
    let (monitor, id, work) = pending_online();
    assert_eq!(work.report_status(), ResourceExitState::Continue);
    assert_eq!(irql::current(), Irql::PASSIVE);
    assert_eq!(monitor.cancel(id, 0), Win32Error::SUCCESS);
    assert_eq!(irql::current(), Irql::PASSIVE);
    assert_eq!(
        work.complete(Win32Error::SUCCESS),
        ResourceExitState::Terminate
    );
    assert_eq!(monitor.terminate(id), Win32Error::SUCCESS);
    monitor.advance_clock(1);
    monitor.check_pending_timeouts();
    assert_eq!(irql::current(), Irql::PASSIVE);
}

/// Cancel ∥ worker completion on real threads, many times: exactly one outcome each time, with
/// its state.
#[test]
fn stress_cancel_racing_worker_completion_has_exactly_one_outcome() {
    const ROUNDS: usize = if cfg!(miri) { 30 } else { 2_000 };
    let monitor = ResourceMonitor::new();
    let id = monitor.create_resource(ResourceConfig::default()).unwrap();
    let (mut cancel_won, mut worker_won) = (0, 0);
    for round in 0..ROUNDS {
        if state(&monitor, id) == ResourceState::Online {
            assert_eq!(monitor.terminate(id), Win32Error::SUCCESS);
        }
        assert_eq!(monitor.online(id), Win32Error::IO_PENDING);
        let work = monitor.next_work().unwrap();
        let barrier = Arc::new(Barrier::new(2));
        let worker = {
            let barrier = barrier.clone();
            thread::spawn(move || {
                barrier.wait();
                work.complete(Win32Error::SUCCESS)
            })
        };
        barrier.wait();
        let cancelled = monitor.cancel(id, 0);
        let exit = worker.join().unwrap();
        match (cancelled, exit, state(&monitor, id)) {
            (Win32Error::SUCCESS, ResourceExitState::Terminate, ResourceState::Offline) => {
                cancel_won += 1
            }
            (Win32Error::INVALID_STATE, ResourceExitState::Continue, ResourceState::Online) => {
                worker_won += 1
            }
            other => panic!("round {round}: not exactly one outcome: {other:?}"),
        }
    }
    assert_eq!(cancel_won + worker_won, ROUNDS);
}
