//! Live mode: requests served in real time on a tokio runtime (`rxsim::live`).

use rdbss::bugcheck::{self, BugCheckPolicy};
use rdbss::{irql, CancelOutcome, ContextRef, DrainStatus, Irql, NtStatus};
use rxsim::server::{Op, STATUS_FILE_IS_A_DIRECTORY};
use rxsim::{Config, Latency, Live, LiveReply, LiveRequest, Window};
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The bug-check policy and counter are process-wide: one test at a time, each on its own
/// runtime (a sync guard, so it is never held across an `.await`).
static SERIAL: Mutex<()> = Mutex::new(());

fn on_runtime<F: Future>(test: impl FnOnce() -> F) -> F::Output {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    runtime.block_on(test())
}

/// No latency, no service time, no loss: nothing sleeps.
fn instant() -> Config {
    Config {
        latency: Latency::Fixed(0),
        jitter: 0,
        service: Latency::Fixed(0),
        loss: 0.0,
        timeout: None,
        ..Config::default()
    }
}

/// A real network: a few hundred microseconds each way, some jitter and loss.
fn lan() -> Config {
    Config {
        latency: Latency::Uniform(100, 400),
        jitter: 100,
        service: Latency::Uniform(0, 300),
        loss: 0.01,
        rto: 2_000,
        timeout: None,
        ..Config::default()
    }
}

const SLOW: &str = "d0/slow";

fn slow_files() -> Vec<(String, Duration)> {
    vec![(SLOW.to_string(), Duration::from_secs(10))]
}

/// Prepares, dispatches, waits, and releases the handle.
async fn call(live: &Live, op: Op) -> LiveReply {
    let ctx = live.prepare(op).unwrap();
    let reply = live.dispatch(&ctx).await;
    drop(ctx);
    reply
}

fn read(path: &str, offset: u64, len: u32) -> Op {
    Op::Read {
        path: path.into(),
        offset,
        len,
    }
}

fn query(path: &str) -> Op {
    Op::QueryInfo { path: path.into() }
}

/// Polls `done` every millisecond for up to a second.
async fn eventually(what: &str, done: impl Fn() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < Duration::from_secs(1), "never: {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Shuts down and checks that everything was given back.
async fn shut_down(live: &Live) {
    assert_eq!(live.shutdown(Duration::from_secs(2)).await, Ok(()));
    assert_eq!(live.drain_status(), DrainStatus::Drained);
    assert_eq!(live.rdbss().active_contexts(), 0);
    assert_eq!(live.in_flight(), 0);
    assert_eq!(live.exchanges_open(), 0);
    assert_eq!(live.server().credits_in_use(), 0);
    assert_eq!(live.server().open_exchanges(), 0);
    let stats = live.stats();
    assert_eq!(stats.completed(), stats.dispatched, "{stats:?}");
}

async fn round_trip(config: Config) {
    let live = Live::new(&config, &slow_files()).unwrap();
    let created = call(
        &live,
        Op::Create {
            path: "d9/new".into(),
        },
    )
    .await;
    assert_eq!(created.status, NtStatus::SUCCESS);
    let write = Op::Write {
        path: "d9/new".into(),
        offset: 0,
        data: b"hello, world".to_vec(),
    };
    assert_eq!(call(&live, write).await.info, 12);
    let got = call(&live, read("d9/new", 7, 100)).await;
    assert_eq!(
        (got.status, &got.data[..], got.info),
        (NtStatus::SUCCESS, &b"world"[..], 5)
    );
    assert_eq!(call(&live, query("d9/new")).await.info, 12);
    let truncate = Op::Truncate {
        path: "d9/new".into(),
        size: 5,
    };
    assert_eq!(call(&live, truncate).await.status, NtStatus::SUCCESS);
    assert_eq!(call(&live, query("d9/new")).await.info, 5);
    let grow = Op::Truncate {
        path: "d9/new".into(),
        size: 7,
    };
    assert_eq!(call(&live, grow).await.status, NtStatus::SUCCESS);
    assert_eq!(call(&live, read("d9/new", 0, 100)).await.data, b"hello\0\0");
    let listing = call(&live, Op::DirEnum { dir: "d9".into() }).await;
    assert_eq!(listing.data, b"new\n");
    let root = call(&live, Op::DirEnum { dir: String::new() }).await;
    assert_eq!(root.data, b"d0/\nd1/\nd2/\nd3/\nd9/\n");
    assert_eq!(
        call(&live, query("d9")).await.status,
        STATUS_FILE_IS_A_DIRECTORY
    );
    assert_eq!(
        call(&live, query("")).await.status,
        STATUS_FILE_IS_A_DIRECTORY
    );
    // The slow file exists, empty; only reads and writes of it are slow.
    assert_eq!(call(&live, query(SLOW)).await.info, 0);
    let delete = Op::Delete {
        path: "d9/new".into(),
    };
    assert_eq!(call(&live, delete.clone()).await.status, NtStatus::SUCCESS);
    assert_eq!(
        call(&live, query("d9/new")).await.status,
        NtStatus::OBJECT_NAME_NOT_FOUND
    );
    assert_eq!(
        call(&live, delete).await.status,
        NtStatus::OBJECT_NAME_NOT_FOUND
    );
    let closed = call(&live, Op::Close { fid: created.info }).await;
    assert_eq!(closed.status, NtStatus::SUCCESS);
    assert_eq!(live.server().file("d9/new"), None);
    let stats = live.stats();
    assert_eq!((stats.dispatched, stats.completed_error), (17, 4));
    assert_eq!(
        stats.cancelled + stats.refused_at_arm + stats.disconnected,
        0
    );
    shut_down(&live).await;
}

#[test]
fn every_operation_round_trips_with_zero_latency() {
    on_runtime(|| round_trip(instant()));
}

#[test]
fn every_operation_round_trips_over_a_lossy_network() {
    on_runtime(|| round_trip(lan()));
}

#[test]
fn dir_enum_of_the_root_lists_directories_once() {
    on_runtime(|| async {
        let slow = vec![
            ("big".to_string(), Duration::from_millis(1)),
            ("/deep/er/file".to_string(), Duration::from_millis(1)),
        ];
        let live = Live::new(&instant(), &slow).unwrap();
        let root = call(&live, Op::DirEnum { dir: String::new() }).await;
        assert_eq!(root.status, NtStatus::SUCCESS);
        assert_eq!(
            String::from_utf8(root.data).unwrap(),
            "big\nd0/\nd1/\nd2/\nd3/\ndeep/\n"
        );
        let deep = call(&live, Op::DirEnum { dir: "deep".into() }).await;
        assert_eq!(deep.data, b"er/\n");
        shut_down(&live).await;
    });
}

/// Dispatches a read of the slow file and waits until the server runs it.
async fn slow_read_in_flight(
    live: &Live,
) -> (ContextRef<LiveRequest>, tokio::task::JoinHandle<LiveReply>) {
    let ctx = live.prepare(read(SLOW, 0, 4096)).unwrap();
    let reply = tokio::spawn(live.dispatch(&ctx));
    eventually("the slow read reaches the server", || {
        live.server().open_exchanges() == 1
    })
    .await;
    assert_eq!(live.in_flight(), 1);
    (ctx, reply)
}

#[test]
fn cancelling_a_slow_read_in_flight_completes_at_once_and_aborts_it_at_the_server() {
    on_runtime(|| async {
        let config = Config {
            latency: Latency::Fixed(500),
            ..instant()
        };
        let live = Live::new(&config, &slow_files()).unwrap();
        let (ctx, reply) = slow_read_in_flight(&live).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!reply.is_finished(), "a 10 s read is still at the server");
        let cancelled_at = Instant::now();
        assert_eq!(
            ctx.cancel(),
            CancelOutcome::RoutineCalled(NtStatus::SUCCESS)
        );
        let reply = tokio::time::timeout(Duration::from_millis(50), reply)
            .await
            .expect("the cancelled read completes within 50 ms")
            .unwrap();
        assert_eq!(reply.status, NtStatus::CANCELLED);
        assert!(cancelled_at.elapsed() < Duration::from_millis(50));
        assert!(ctx.is_completed());
        drop(ctx);
        // The CANCEL follows its request up the link and aborts the exchange (reads are
        // cancellable at the server), which gives its credit back.
        eventually("the server aborts the read", || {
            live.server().stats().cancelled == 1 && live.server().credits_in_use() == 0
        })
        .await;
        let stats = live.stats();
        assert_eq!(
            (
                stats.cancelled,
                stats.server_cancels_sent,
                stats.completed_ok
            ),
            (1, 1, 0)
        );
        assert_eq!(live.server().stats().finished, 0);
        shut_down(&live).await;
    });
}

#[test]
fn a_cancel_before_dispatch_completes_without_any_exchange() {
    on_runtime(|| async {
        let live = Live::new(&lan(), &slow_files()).unwrap();
        let ctx = live.prepare(read(SLOW, 0, 10)).unwrap();
        assert_eq!(ctx.cancel(), CancelOutcome::NoRoutineArmed);
        let reply = live.dispatch(&ctx).await;
        assert_eq!(reply, LiveReply::status(NtStatus::CANCELLED));
        assert!(ctx.is_completed() && !ctx.has_cancel_routine());
        drop(ctx);
        let stats = live.stats();
        assert_eq!((stats.dispatched, stats.refused_at_arm), (1, 1));
        assert_eq!(stats.server_cancels_sent, 0);
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(live.server().stats().exchanges, 0);
        shut_down(&live).await;
    });
}

/// The `Record` bug-check policy for as long as it lives (taken under `SERIAL`), then the
/// previous one, even if the test fails.
struct RecordBugChecks {
    previous: BugCheckPolicy,
    before: usize,
}

impl RecordBugChecks {
    fn start() -> Self {
        RecordBugChecks {
            previous: bugcheck::set_policy(BugCheckPolicy::Record),
            before: bugcheck::count(),
        }
    }

    fn count(&self) -> usize {
        bugcheck::count() - self.before
    }
}

impl Drop for RecordBugChecks {
    fn drop(&mut self) {
        bugcheck::set_policy(self.previous);
    }
}

#[test]
fn many_reads_racing_cancels_complete_exactly_once_and_drain() {
    let (results, stats, bug_checks) = on_runtime(|| {
        let recording = RecordBugChecks::start();
        async move {
            let slow = vec![("d1/slow".to_string(), Duration::from_millis(3))];
            let config = Config {
                credits: 48,
                ..lan()
            };
            let live = Live::new(&config, &slow).unwrap();
            let mut tasks = Vec::new();
            for i in 0..1500u64 {
                let live = live.clone();
                tasks.push(tokio::spawn(async move {
                    let path = if i % 3 == 0 {
                        "d1/slow".to_string()
                    } else {
                        format!("d{}/f{}", i % 4, i % 16)
                    };
                    let op = match i % 5 {
                        0 => Op::Write {
                            path,
                            offset: i % 100,
                            data: vec![i as u8; 64],
                        },
                        1 => query(&path),
                        _ => read(&path, i % 4096, 4096),
                    };
                    let ctx = live.prepare(op).unwrap();
                    // Cancel at a pseudo-random moment (before dispatch, mid-exchange, racing the
                    // reply, or too late), by the handle or by id, at PASSIVE or from a DPC.
                    let cancel = (i % 4 != 3).then(|| {
                        let (ctx, id, rdbss) = (ctx.clone(), ctx.id(), live.rdbss().clone());
                        let delay = Duration::from_micros((i * 7919) % 4_000);
                        tokio::spawn(async move {
                            if !delay.is_zero() {
                                tokio::time::sleep(delay).await;
                            }
                            match i % 3 {
                                0 => {
                                    let _ = ctx.cancel();
                                }
                                1 => {
                                    let _ = rdbss.cancel_by_id(id);
                                }
                                _ => {
                                    // From a DPC: the routine is deferred to the work queue.
                                    let _dpc = irql::raise(Irql::DISPATCH);
                                    let _ = rdbss.cancel_by_id(id);
                                }
                            }
                            drop(ctx);
                        })
                    });
                    if i % 16 == 1 {
                        // Cancelled before dispatch: arming is refused.
                        let _ = ctx.cancel();
                    } else if i % 8 == 0 {
                        tokio::task::yield_now().await;
                    }
                    let reply = live.dispatch(&ctx).await;
                    assert!(ctx.is_completed());
                    drop(ctx);
                    if let Some(cancel) = cancel {
                        cancel.await.unwrap();
                    }
                    reply.status
                }));
            }
            let mut results = Vec::new();
            for task in tasks {
                results.push(task.await.unwrap());
            }
            shut_down(&live).await;
            (results, live.stats(), recording.count())
        }
    });
    assert_eq!(bug_checks, 0, "{:?}", bugcheck::recent());

    // Every future resolved once, with one status; the counters add up to it.
    assert_eq!(results.len(), 1500);
    let count = |s: NtStatus| results.iter().filter(|&&r| r == s).count() as u64;
    let cancelled = count(NtStatus::CANCELLED);
    let ok = results.iter().filter(|r| r.is_success()).count() as u64;
    assert_eq!(stats.dispatched, 1500);
    assert_eq!(stats.completed(), 1500, "{stats:?}");
    assert_eq!(
        stats.cancelled + stats.refused_at_arm,
        cancelled,
        "{stats:?}"
    );
    assert_eq!(stats.completed_ok, ok, "{stats:?}");
    assert_eq!(stats.completed_error, 1500 - ok - cancelled, "{stats:?}");
    assert_eq!(stats.disconnected, 0);
    assert!(stats.cancelled > 0 && stats.refused_at_arm > 0, "{stats:?}");
    assert!(stats.cancel_lost_race <= ok + stats.completed_error);
    assert_eq!(stats.server_cancels_sent, stats.cancelled);
}

#[test]
fn a_crash_disconnects_requests_in_flight() {
    on_runtime(|| async {
        let config = Config {
            crashes: vec![Window {
                start: 200_000,
                length: 100_000,
            }],
            ..instant()
        };
        let live = Live::new(&config, &slow_files()).unwrap();
        let (ctx, reply) = slow_read_in_flight(&live).await;
        assert!(live.now() < 200_000, "the test machine is too slow");
        let reply = tokio::time::timeout(Duration::from_secs(1), reply)
            .await
            .expect("the crash disconnects the read")
            .unwrap();
        assert_eq!(reply.status, NtStatus::CONNECTION_DISCONNECTED);
        assert!(live.now() >= 200_000);
        drop(ctx);
        assert_eq!(live.server().epoch(), 2);
        assert_eq!(live.server().credits_in_use(), 0);
        // While the server is down, a request fails the same way.
        if live.now() < 280_000 {
            let down = call(&live, query("d0/f0")).await;
            assert_eq!(down.status, NtStatus::CONNECTION_DISCONNECTED);
        }
        eventually_restarted(&live).await;
        assert_eq!(call(&live, query("d0/f0")).await.status, NtStatus::SUCCESS);
        let stats = live.stats();
        assert!(stats.disconnected >= 1, "{stats:?}");
        assert_eq!(live.server().stats().crashes, 1);
        shut_down(&live).await;
    });
}

async fn eventually_restarted(live: &Live) {
    while live.now() < 300_000 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
}

#[test]
fn shutdown_cancels_requests_in_flight_and_refuses_new_ones() {
    on_runtime(|| async {
        let live = Live::new(&instant(), &slow_files()).unwrap();
        let (ctx, reply) = slow_read_in_flight(&live).await;
        let prepared = live.prepare(query("d0/f0")).unwrap();
        let waiter = tokio::spawn(async move {
            let reply = reply.await.unwrap();
            drop(ctx);
            reply
        });
        let shutdown = {
            let live = live.clone();
            tokio::spawn(async move { live.shutdown(Duration::from_secs(2)).await })
        };
        assert_eq!(waiter.await.unwrap().status, NtStatus::CANCELLED);
        assert_eq!(
            live.prepare(query("d0/f0")).err(),
            Some(NtStatus::INVALID_DEVICE_STATE)
        );
        // A request prepared before the drain is cancelled too: refused at arm.
        eventually("the prepared request is cancelled", || {
            prepared.is_cancelled()
        })
        .await;
        assert_eq!(live.dispatch(&prepared).await.status, NtStatus::CANCELLED);
        drop(prepared);
        assert_eq!(shutdown.await.unwrap(), Ok(()));
        assert_eq!(live.server().stats().cancelled, 1);
        let stats = live.stats();
        assert_eq!((stats.cancelled, stats.refused_at_arm), (1, 1));
    });
}

#[test]
fn shutdown_reports_what_is_left_at_its_deadline() {
    on_runtime(|| async {
        let live = Live::new(&instant(), &[]).unwrap();
        let held = live.prepare(query("d0/f0")).unwrap();
        assert_eq!(live.shutdown(Duration::from_millis(20)).await, Err(1));
        drop(held);
        assert_eq!(live.shutdown(Duration::from_millis(20)).await, Ok(()));
    });
}

#[test]
fn no_credit_completes_with_the_servers_refusal() {
    on_runtime(|| async {
        let config = Config {
            credits: 1,
            ..instant()
        };
        let live = Live::new(&config, &slow_files()).unwrap();
        let (ctx, reply) = slow_read_in_flight(&live).await;
        let refused = call(&live, query("d0/f0")).await;
        assert_eq!(refused.status, NtStatus::QUOTA_EXCEEDED);
        assert!(ctx.cancel().cancelled_now());
        assert_eq!(reply.await.unwrap().status, NtStatus::CANCELLED);
        drop(ctx);
        assert_eq!(live.server().stats().rejected_no_credit, 1);
        shut_down(&live).await;
    });
}

#[test]
fn bad_dispatches_and_configurations_are_answered_not_panicked() {
    assert!(Live::new(&instant(), &[]).unwrap_err().contains("tokio"));
    on_runtime(|| async {
        let live = Live::new(&instant(), &[]).unwrap();
        let other = Live::new(&instant(), &[]).unwrap();
        let ctx = live.prepare(query("d0/f0")).unwrap();
        assert_eq!(live.dispatch(&ctx).await.status, NtStatus::SUCCESS);
        let again = live.dispatch(&ctx).await;
        assert_eq!(again.status, NtStatus::INVALID_DEVICE_STATE);
        let foreign = other.prepare(query("d0/f0")).unwrap();
        let wrong = live.dispatch(&foreign).await;
        assert_eq!(wrong.status, NtStatus::INVALID_PARAMETER);
        assert_eq!(other.dispatch(&foreign).await.status, NtStatus::SUCCESS);
        drop((ctx, foreign));
        assert_eq!(live.stats().dispatched, 1);
        shut_down(&live).await;
        shut_down(&other).await;

        let bad = Config {
            credits: 0,
            ..instant()
        };
        assert!(Live::new(&bad, &[]).unwrap_err().contains("--credits"));
        for path in ["", "/", "d0", "a//b", "dir/"] {
            let slow = [(path.to_string(), Duration::from_secs(1))];
            assert!(Live::new(&instant(), &slow).is_err(), "{path:?}");
        }
        let absurd = Config {
            latency: Latency::Fixed(u64::MAX),
            ..instant()
        };
        assert!(Live::new(&absurd, &[]).unwrap_err().contains("--latency"));
        let far = Config {
            latency: Latency::Fixed(rxsim::live::MAX_LIVE_MICROS),
            ..instant()
        };
        let unreachable = Live::new(&far, &[]).unwrap();
        let ctx = unreachable.prepare(query("d0/f0")).unwrap();
        let reply = tokio::spawn(unreachable.dispatch(&ctx));
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(ctx.cancel().cancelled_now());
        assert_eq!(reply.await.unwrap().status, NtStatus::CANCELLED);
    });
}

#[test]
fn zero_latency_requests_never_wait_for_the_timer() {
    on_runtime(|| async {
        let live = Live::new(&instant(), &[]).unwrap();
        let write = Op::Write {
            path: "d0/f0".into(),
            offset: 0,
            data: vec![7; 1 << 20],
        };
        assert_eq!(call(&live, write).await.status, NtStatus::SUCCESS);
        let start = Instant::now();
        let mut bytes = 0;
        for i in 0..2_000u64 {
            let got = call(&live, read("d0/f0", (i % 8) * 131_072, 131_072)).await;
            bytes += got.data.len();
        }
        // Each request through the timer would take at least 1 ms: 2 s in all.
        let elapsed = start.elapsed();
        assert!(elapsed < Duration::from_millis(1_500), "{elapsed:?}");
        assert_eq!(bytes, 2_000 * 131_072);
        shut_down(&live).await;
    });
}
