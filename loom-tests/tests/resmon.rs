//! The resource monitor (`rdbss::resmon`) under loom: `Cancel`, `Terminate` and the pending
//! timeout racing the worker that finishes a pending `Online`.
//!
//! Run with `RUSTFLAGS="--cfg loom --cfg crossbeam_loom" LOOM_MAX_PREEMPTIONS=3 cargo test -p
//! rdbss-loom-tests --release --test resmon`. Without `--cfg loom` this file compiles to nothing.
//!
//! Each test names the invariants of `rdbss::resmon` it checks. Teeth (a test-only mutant, see
//! `.ci/loom-mutants`): `resmon_complete_skips_disarm` (the worker asks "cancelled?" instead of
//! disarming through the core) makes [`cancel_parallel_online_completion`] fail: the worker and
//! the cancel both end the operation, and the context is completed twice
//! (`MULTIPLE_IRP_COMPLETE_REQUESTS`).
#![cfg(loom)]

use loom::thread;

use rdbss::resmon::{
    ResourceConfig, ResourceExitState, ResourceId, ResourceMonitor, ResourceState, Win32Error,
};

fn model(f: impl Fn() + Sync + Send + 'static) {
    loom::model::Builder::new().check(f);
}

/// A monitor with one resource whose `Online` is pending.
fn pending_online(config: ResourceConfig) -> (ResourceMonitor, ResourceId) {
    let monitor = ResourceMonitor::new();
    let id = monitor.create_resource(config).unwrap();
    assert_eq!(monitor.online(id), Win32Error::IO_PENDING);
    (monitor, id)
}

/// Invariants 2, 3, 4 and 6: `Cancel` racing the worker's completion of a pending `Online`.
/// Exactly one wins: the cancel (`ERROR_SUCCESS`, the resource back `Offline`, the worker told to
/// stop) or the worker (`Online`, the cancel finding nothing pending: `ERROR_INVALID_STATE`).
#[test]
fn cancel_parallel_online_completion() {
    model(|| {
        let (monitor, id) = pending_online(ResourceConfig::default());
        let work = monitor.next_work().unwrap();
        let worker = thread::spawn(move || work.complete(Win32Error::SUCCESS));
        let cancelled = monitor.cancel(id, 0);
        let exit = worker.join().unwrap();
        let state = monitor.state(id).unwrap();

        match (cancelled, exit, state) {
            (Win32Error::SUCCESS, ResourceExitState::Terminate, ResourceState::Offline)
            | (Win32Error::INVALID_STATE, ResourceExitState::Continue, ResourceState::Online) => {}
            other => panic!("not exactly one outcome: (cancel, worker, state) = {other:?}"),
        }
        assert_eq!(monitor.cancel(id, 0), Win32Error::INVALID_STATE);
    });
}

/// Invariants 2, 3 and 4: `Terminate` racing the worker. Terminate always leaves the resource
/// `Offline`, whether the worker finished just before it (the worker then saw `Continue`) or
/// was stopped by it.
#[test]
fn terminate_parallel_online_completion() {
    model(|| {
        let (monitor, id) = pending_online(ResourceConfig::default());
        let work = monitor.next_work().unwrap();
        let worker = thread::spawn(move || work.complete(Win32Error::SUCCESS));
        assert_eq!(monitor.terminate(id), Win32Error::SUCCESS);
        let _exit = worker.join().unwrap();

        assert_eq!(monitor.state(id).unwrap(), ResourceState::Offline);
        assert_eq!(monitor.cancel(id, 0), Win32Error::INVALID_STATE);
    });
}

/// Invariants 3 and 4: the pending timeout racing a status report that comes just in time (the
/// clock is already past the timeout measured from the start). Either the report lands first
/// (nothing terminated, still pending) or the timeout does (`Failed`, the report is told to
/// stop); never both, never neither.
#[test]
fn pending_timeout_parallel_status_report() {
    model(|| {
        let config = ResourceConfig {
            pending_timeout_ms: 10,
            ..ResourceConfig::default()
        };
        let (monitor, id) = pending_online(config);
        let work = monitor.next_work().unwrap();
        monitor.advance_clock(11);
        let worker = thread::spawn(move || {
            let report = work.report_status();
            (report, work)
        });
        let terminated = monitor.check_pending_timeouts();
        let (report, work) = worker.join().unwrap();
        let state = monitor.state(id).unwrap();

        match (report, terminated, state) {
            (ResourceExitState::Continue, 0, ResourceState::OnlinePending) => {
                assert_eq!(
                    work.complete(Win32Error::SUCCESS),
                    ResourceExitState::Continue
                );
                assert_eq!(monitor.state(id).unwrap(), ResourceState::Online);
            }
            (ResourceExitState::Terminate, 1, ResourceState::Failed) => {
                assert!(work.check_terminate());
                assert_eq!(
                    work.complete(Win32Error::SUCCESS),
                    ResourceExitState::Terminate
                );
                assert_eq!(monitor.state(id).unwrap(), ResourceState::Failed);
            }
            other => panic!("(report, terminated, state) = {other:?}"),
        }
    });
}
