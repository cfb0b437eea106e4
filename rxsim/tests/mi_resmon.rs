//! The simulator's MI and cluster-resource layers (`rxsim/src/mi.rs`, `rxsim/src/resource.rs`):
//! every outcome they count occurs in some run, their invariants hold in deterministic and
//! threads mode, and deterministic runs stay byte-identical.

use rxsim::{run, Config, Invariant, Mode, Outcome, Report};
use std::process::Command;

fn simulate(config: &Config) -> Outcome {
    run(config, &|_, _| {}).unwrap_or_else(|e| panic!("config did not validate: {e}"))
}

/// Every invariant held, and the MI and resource layers ended clean.
fn assert_clean(report: &Report) {
    assert_eq!(report.violations_total, 0, "{report}");
    for invariant in [
        Invariant::MiClosedOnce,
        Invariant::MiCallbackNotAfterCompletion,
        Invariant::MiQuotaReturned,
        Invariant::ResourceSettled,
    ] {
        let result = report
            .invariants
            .iter()
            .find(|i| i.invariant == invariant)
            .unwrap_or_else(|| panic!("{invariant:?} missing from the report"));
        assert!(result.holds, "{invariant:?}\n{report}");
    }
    let m = &report.mi;
    assert_eq!(m.closes, m.started_enumerate + m.started_invoke, "{report}");
    assert_eq!(
        m.final_results_delivered + m.final_results_cancelled,
        m.closes,
        "{report}"
    );
    assert_eq!(
        m.posted_delivered + m.posted_discarded,
        m.closes,
        "{report}"
    );
    assert_eq!(m.quota_in_use_at_end, 0, "{report}");
    assert_eq!(m.live_operations_at_end, 0, "{report}");
    assert_eq!(m.instances_read, m.instances_posted, "{report}");
    let r = &report.resources;
    assert_eq!(r.pending_at_end, 0, "{report}");
    assert_eq!(
        r.online_completed + r.online_ended_by_abort,
        r.online_started,
        "{report}"
    );
    assert_eq!(
        report.requests.completed, report.requests.issued,
        "{report}"
    );
}

fn config(requests: u64) -> Config {
    Config {
        requests,
        ..Config::default()
    }
}

#[test]
fn mi_enumerations_are_cancelled_for_every_reason_with_results_after_the_cancel() {
    let outcome = simulate(&config(20_000));
    let report = &outcome.report;
    assert_clean(report);
    let m = &report.mi;
    assert!(m.started_enumerate > 0 && m.started_invoke > 0, "{report}");
    // User cancels (MI_REASON_NONE) and timeouts (MI_REASON_TIMEOUT).
    assert!(m.cancels_reason_none > 0, "{report}");
    assert!(m.cancels_reason_timeout > 0, "{report}");
    assert!(m.enumerations_cancelled > 0, "{report}");
    // Every cancelled enumeration's provider was told: by its registered callback, or at its
    // registration when the cancel came first.
    assert!(m.registered > 0, "{report}");
    assert!(m.registered_after_cancel_called_at_once > 0, "{report}");
    assert_eq!(m.callbacks, m.enumerations_cancelled, "{report}");
    // Asynchronous cancellation: instances posted before the cancel are still read after it.
    assert!(m.results_after_cancel > 0, "{report}");
    assert!(m.final_results_cancelled > 0, "{report}");
    assert!(m.closed_at_cancel > 0, "{report}");

    // Teardown with operations in flight: MI_REASON_SHUTDOWN.
    let torn = simulate(&Config {
        teardown_at: Some(20_000),
        ..config(5_000)
    });
    assert_clean(&torn.report);
    assert!(
        torn.report.mi.cancels_reason_shutdown > 0,
        "{}",
        torn.report
    );
}

#[test]
fn invoke_cancels_are_accepted_and_the_call_runs_to_completion() {
    let outcome = simulate(&config(20_000));
    let report = &outcome.report;
    assert_clean(report);
    let m = &report.mi;
    // register_cancel is refused for every invoke: NOT_SUPPORTED.
    assert_eq!(m.register_not_supported, m.started_invoke, "{report}");
    assert!(m.invokes_cancelled > 0, "{report}");
    // Each cancelled invoke ran to completion with its real result (not a teardown here),
    // which the provider posted after the client had its cancelled final result.
    assert_eq!(
        m.invokes_ran_to_completion_after_cancel, m.invokes_cancelled,
        "{report}"
    );
    let calls = &report.requests.by_kind["method_call"];
    assert_eq!(calls.cancelled, 0, "{report}");
    assert!(calls.succeeded > 0, "{report}");
}

#[test]
fn mi_quota_refusals_are_observable_and_the_quota_returns_to_zero() {
    let outcome = simulate(&Config {
        mi_quota: 2,
        ..config(5_000)
    });
    let report = &outcome.report;
    assert_clean(report);
    let m = &report.mi;
    assert!(m.refused_server_limits_exceeded > 0, "{report}");
    assert_eq!(m.max_quota_in_use, 2, "{report}");
    assert_eq!(
        report.requests.by_status.get("STATUS_QUOTA_EXCEEDED"),
        Some(&m.refused_server_limits_exceeded),
        "{report}"
    );
}

#[test]
fn teardown_cancels_pending_onlines_and_the_resources_settle_offline() {
    // Torn down before any connection is online (connects take 500us..2ms).
    let outcome = simulate(&Config {
        teardown_at: Some(300),
        ..config(5_000)
    });
    let report = &outcome.report;
    assert_clean(report);
    let r = &report.resources;
    assert_eq!(r.online_cancelled, 16, "{report}");
    assert_eq!(r.online_ended_by_abort, 16, "{report}");
    assert_eq!(r.offline_at_end, 16, "{report}");
    // Every request waited for its connection and was cancelled where it waited.
    assert_eq!(report.cancels.total.won, report.requests.issued, "{report}");

    // A normal run: the teardown finds nothing pending.
    let calm = simulate(&config(3_000));
    assert_clean(&calm.report);
    assert_eq!(calm.report.resources.cancel_nothing_pending, 16);
    assert_eq!(calm.report.resources.online_cancelled, 0);
    assert_eq!(calm.report.resources.online_at_end, 16);
}

#[test]
fn crashes_terminate_and_pending_timeouts_fail_then_retry() {
    let outcome = simulate(&Config {
        pending_timeout: 10_000,
        connect_latency: "uniform:1ms..30ms".parse().unwrap(),
        crashes: vec!["20ms+5ms".parse().unwrap()],
        ..config(5_000)
    });
    let report = &outcome.report;
    assert_clean(report);
    let r = &report.resources;
    assert_eq!(r.terminations, 16, "{report}");
    assert!(r.terminations_of_a_pending_online > 0, "{report}");
    assert!(r.pending_timeouts > 0, "{report}");
    assert_eq!(r.online_retries, r.pending_timeouts, "{report}");
    assert_eq!(
        r.online_ended_by_abort,
        r.online_cancelled + r.pending_timeouts + r.terminations_of_a_pending_online,
        "{report}"
    );
    assert_eq!(r.online_at_end, 16, "{report}");
}

#[test]
fn the_layers_hold_their_invariants_in_threads_mode() {
    let outcome = simulate(&Config {
        mode: Mode::Threads,
        threads: 2,
        requests: 20_000,
        latency: "exp:100us".parse().unwrap(),
        pending_timeout: 10_000,
        connect_latency: "uniform:1ms..15ms".parse().unwrap(),
        crashes: vec!["30ms+5ms".parse().unwrap()],
        mi_quota: 4,
        ..Config::default()
    });
    let report = &outcome.report;
    assert_clean(report);
    assert!(report.mi.cancels_reason_none > 0, "{report}");
    assert!(report.mi.invokes_ran_to_completion_after_cancel > 0);
    assert!(report.resources.terminations > 0, "{report}");

    let torn = simulate(&Config {
        mode: Mode::Threads,
        threads: 2,
        requests: 5_000,
        teardown_at: Some(600),
        ..Config::default()
    });
    assert_clean(&torn.report);
}

#[test]
fn the_layers_keep_deterministic_runs_byte_identical() {
    let faulty = |seed| Config {
        seed,
        pending_timeout: 10_000,
        connect_latency: "uniform:1ms..30ms".parse().unwrap(),
        crashes: vec!["20ms+5ms".parse().unwrap()],
        mi_quota: 4,
        ..config(4_000)
    };
    let first = simulate(&faulty(3));
    let second = simulate(&faulty(3));
    assert_clean(&first.report);
    assert!(first.report.mi.results_after_cancel > 0 || first.report.mi.callbacks > 0);
    assert!(
        first.report.resources.pending_timeouts > 0,
        "{}",
        first.report
    );
    assert_eq!(first.report.to_string(), second.report.to_string());
    assert_eq!(
        serde_json::to_string(&first.report).unwrap(),
        serde_json::to_string(&second.report).unwrap()
    );
    let other = simulate(&faulty(4));
    assert_ne!(
        serde_json::to_string(&first.report.mi).unwrap(),
        serde_json::to_string(&other.report.mi).unwrap()
    );
}

#[test]
fn cli_options_and_report_rows() {
    let output = Command::new(env!("CARGO_BIN_EXE_rxsim"))
        .args([
            "run",
            "--requests",
            "2000",
            "--mi-quota",
            "3",
            "--connect-latency",
            "1ms",
            "--pending-timeout",
            "50ms",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text}");
    assert!(text.contains("MI (quota 3"), "{text}");
    assert!(text.contains("PendingTimeout 50 ms"), "{text}");
    assert!(text.contains("method_call"), "{text}");
    for bad in [&["--mi-quota", "0"][..], &["--pending-timeout", "5ms"][..]] {
        let output = Command::new(env!("CARGO_BIN_EXE_rxsim"))
            .arg("run")
            .args(bad)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{bad:?}");
    }
}
