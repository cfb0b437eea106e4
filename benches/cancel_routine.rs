//! Cost of arming and disarming a mini-redirector cancel routine (`RxSetMinirdrCancelRoutine`).
//!
//! Four measurements, all in one criterion group (`cancel_routine`), one run:
//!
//! | benchmark | one iteration |
//! |---|---|
//! | `arm_disarm` | `ctx.set_minirdr_cancel_routine(Some(routine))` then `ctx.set_minirdr_cancel_routine(None)` on one uncontended `RxContext<()>` (the round trip a mini-redirector does per exchange) |
//! | `spin_floor` | two lock/unlock pairs of a bare `spin::Mutex<usize>`, each storing a value (the floor: a round trip takes the context's spin lock twice) |
//! | `tokio_cancellation_token` | the peer: create `token.cancelled()` on a `tokio_util::sync::CancellationToken` made once, pin it, poll it once with `Waker::noop()` (registers the waiter; asserted `Pending`), drop it (deregisters) |
//! | `arm_disarm_contended` | the `arm_disarm` round trip while a second OS thread keeps creating other contexts, arming a routine on each and cancelling it, until the measurement is over |
//!
//! After the measurements the benchmark prints the medians and three ratios, the first two with
//! PASS or MISS against their targets (a miss is reported, never a panic):
//!
//! | ratio | target | meaning |
//! |---|---|---|
//! | `arm_disarm / spin_floor` | `<= 1.5` | the IRQL and ownership emulation costs at most half the bare locking again |
//! | `tokio_cancellation_token / arm_disarm` | `>= 2.5` | arm + disarm is at least 2.5x faster than registering and dropping a tokio cancellation waiter |
//! | `arm_disarm_contended / arm_disarm` | reported | how much cancelling *other* contexts on another thread slows this one (contexts share no lock, so on an idle machine with two free cores this stays near 1; on a loaded one it measures time-slicing) |
//!
//! The first two targets are the crate's performance goals (issue 2); the third ratio has no
//! target and is reported only.
//!
//! The medians are criterion's own median point estimates, read back from the
//! `<criterion home>/cancel_routine/<benchmark>/new/estimates.json` files this run wrote. The
//! criterion home is found the way criterion 0.8 finds it: `$CRITERION_HOME`, else
//! `$CARGO_TARGET_DIR/criterion`, else `<target directory from cargo metadata>/criterion`, else
//! `./target/criterion`. A file only counts if this run wrote it (its modification time changed
//! since the benchmark started), so stale results from an earlier run never make a ratio. When no
//! fresh estimates exist (criterion's `--test` mode, `--list`, `--profile-time`, a filter that
//! skips a benchmark, `--discard-baseline`, `--load-baseline` or `cargo criterion`) the ratios are
//! reported as unavailable. (The estimate-reading code lives in `benches/common/mod.rs`, shared
//! with the `cancel_by_id` benchmark.)
//!
//! # Running
//!
//! ```text
//! cargo bench --bench cancel_routine                                   # full run (about a minute)
//! cargo bench --bench cancel_routine -- --quick                        # quick smoke run
//! cargo bench --bench cancel_routine -- --warm-up-time 1 --measurement-time 2
//! cargo bench --bench cancel_routine -- --test                         # run each benchmark once
//! cargo bench --bench cancel_routine -- 'spin_floor|arm_disarm$'       # a subset (other ratios n/a)
//! ```
//!
//! Every criterion command-line option works as usual. The machine should be otherwise idle and
//! have at least two cores, or `arm_disarm_contended` measures time-slicing rather than interference.

mod common;

use std::future::Future;
use std::hint::black_box;
use std::path::PathBuf;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Waker};
use std::thread;

use common::{Median, Snapshot};
use criterion::Criterion;
use rdbss::{CancelOutcome, CancelRoutine, MajorFunction, NtStatus, RxContext};
use tokio_util::sync::CancellationToken;

/// The criterion group all four benchmarks belong to (also their directory under the home).
const GROUP: &str = "cancel_routine";
const ARM_DISARM: &str = "arm_disarm";
const SPIN_FLOOR: &str = "spin_floor";
const TOKIO: &str = "tokio_cancellation_token";
const CONTENDED: &str = "arm_disarm_contended";
const BENCHMARKS: [&str; 4] = [ARM_DISARM, SPIN_FLOOR, TOKIO, CONTENDED];

/// A ratio of two medians and the target it is held to.
struct RatioTarget {
    numerator: &'static str,
    denominator: &'static str,
    target: Target,
}

#[derive(Clone, Copy)]
enum Target {
    AtMost(f64),
    AtLeast(f64),
    /// No target: the ratio is printed for the record.
    ReportOnly,
}

impl Target {
    /// `None` when there is no target to meet.
    fn met_by(self, ratio: f64) -> Option<bool> {
        match self {
            Target::AtMost(limit) => Some(ratio <= limit),
            Target::AtLeast(limit) => Some(ratio >= limit),
            Target::ReportOnly => None,
        }
    }

    fn describe(self) -> String {
        match self {
            Target::AtMost(limit) => format!("<= {limit}"),
            Target::AtLeast(limit) => format!(">= {limit}"),
            Target::ReportOnly => "none".to_string(),
        }
    }
}

const RATIOS: [RatioTarget; 3] = [
    RatioTarget {
        numerator: ARM_DISARM,
        denominator: SPIN_FLOOR,
        target: Target::AtMost(1.5),
    },
    RatioTarget {
        numerator: TOKIO,
        denominator: ARM_DISARM,
        target: Target::AtLeast(2.5),
    },
    RatioTarget {
        numerator: CONTENDED,
        denominator: ARM_DISARM,
        target: Target::ReportOnly,
    },
];

/// The armed routine. Never called on the measured context (it is never cancelled).
fn abort_exchange(_: &RxContext) -> NtStatus {
    NtStatus::SUCCESS
}

fn bench_spin_floor(c: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    let lock = spin::Mutex::new(0_usize);
    c.bench_function(SPIN_FLOOR, |b| {
        b.iter(|| {
            let lock = black_box(&lock);
            // The same two critical sections as arm + disarm: store something, store nothing.
            *lock.lock() = black_box(1);
            *lock.lock() = black_box(0);
        });
    });
    assert_eq!(lock.into_inner(), 0);
}

/// One arm + disarm round trip; `true` if both returned `Ok`.
#[inline(always)]
fn arm_disarm(ctx: &RxContext, routine: CancelRoutine) -> bool {
    let ctx = black_box(ctx);
    let armed = ctx.set_minirdr_cancel_routine(black_box(Some(routine)));
    let disarmed = ctx.set_minirdr_cancel_routine(black_box(None));
    armed.is_ok() & disarmed.is_ok()
}

/// Benchmarks the round trip under `name`, asserting (outside the timed loop) that every call was
/// `Ok` and that the context ends up idle and uncancelled.
fn bench_arm_disarm(
    c: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
) {
    let ctx = RxContext::new(MajorFunction::READ, ());
    assert!(
        arm_disarm(&ctx, abort_exchange),
        "warm-up round trip failed"
    );
    let mut all_ok = true;
    c.bench_function(name, |b| {
        b.iter(|| all_ok &= arm_disarm(&ctx, abort_exchange));
    });
    assert!(all_ok, "{name}: set_minirdr_cancel_routine returned Err");
    assert!(!ctx.is_cancelled() && !ctx.has_cancel_routine());
}

fn bench_tokio(c: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    let token = CancellationToken::new();
    let mut cx = Context::from_waker(Waker::noop());
    let mut all_pending = true;
    c.bench_function(TOKIO, |b| {
        b.iter(|| {
            let cancelled = pin!(black_box(&token).cancelled());
            // The first poll registers the waiter; dropping the future deregisters it.
            all_pending &= cancelled.poll(&mut cx).is_pending();
        });
    });
    assert!(
        all_pending,
        "token.cancelled() was ready on an uncancelled token"
    );
    assert!(!token.is_cancelled());
}

/// Keeps a value alone on its cache lines (128 bytes: adjacent-line prefetch pairs 64-byte lines),
/// so the canceller's flag and counter cannot falsely share a line with the measured thread's data.
#[repr(align(128))]
struct CacheLine<T>(T);

/// Sets the flag when dropped, so a panicking benchmark still stops the background thread (and
/// `thread::scope` does not wait for it forever).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// The background load: cancel fresh contexts, each with a routine armed, until `stop`.
fn cancel_other_contexts(stop: &AtomicBool, cancels: &AtomicU64) {
    let mut done = 0_u64;
    while !stop.load(Ordering::Acquire) {
        let ctx = RxContext::new(MajorFunction::READ, ());
        let ctx = black_box(&ctx);
        let armed = ctx.set_minirdr_cancel_routine(Some(abort_exchange));
        let outcome = ctx.cancel();
        assert!(
            armed.is_ok() && outcome == CancelOutcome::RoutineCalled(NtStatus::SUCCESS),
            "background cancel went wrong: {armed:?}, {outcome:?}"
        );
        done += 1;
        // A store to a line nobody reads during the measurement: no contention of its own.
        cancels.store(done, Ordering::Release);
    }
}

fn bench_contended(c: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    let CacheLine(stop) = &CacheLine(AtomicBool::new(false));
    let CacheLine(cancels) = &CacheLine(AtomicU64::new(0));
    let background = thread::scope(|s| {
        let _stop_on_drop = StopOnDrop(stop);
        let canceller = thread::Builder::new()
            .name("rdbss-canceller".into())
            .spawn_scoped(s, || cancel_other_contexts(stop, cancels))
            .expect("spawn the canceller thread");
        // Measure only once the canceller is really running.
        while cancels.load(Ordering::Acquire) == 0 && !canceller.is_finished() {
            thread::yield_now();
        }
        bench_arm_disarm(c, CONTENDED);
        stop.store(true, Ordering::Release);
        canceller.join().expect("the canceller thread panicked");
        cancels.load(Ordering::Acquire)
    });
    println!("{CONTENDED}: the background thread cancelled {background} other contexts");
}

fn run_benchmarks(c: &mut Criterion) {
    let mut group = c.benchmark_group(GROUP);
    bench_spin_floor(&mut group);
    bench_arm_disarm(&mut group, ARM_DISARM);
    bench_tokio(&mut group);
    bench_contended(&mut group);
    group.finish();
}

fn report(snapshot: &Snapshot) {
    println!();
    println!("{GROUP} summary: criterion median point estimates of this run");
    if let Some(reason) = common::no_measurement_reason() {
        println!("  ratios unavailable: {reason}");
        return;
    }
    let found: Vec<(&str, Option<(Median, PathBuf)>)> = [SPIN_FLOOR, ARM_DISARM, TOKIO, CONTENDED]
        .into_iter()
        .map(|name| (name, snapshot.fresh_median(name)))
        .collect();
    for (name, found) in &found {
        match found {
            Some((m, _)) => println!(
                "  {name:<26} {:>9.3} ns   ({:.0}% CI {:.3} .. {:.3} ns)",
                m.ns,
                m.confidence * 100.0,
                m.lower,
                m.upper
            ),
            None => println!("  {name:<26} unavailable (no estimates.json written by this run)"),
        }
    }
    let median_of = |name: &str| {
        found
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, f)| f.as_ref().map(|(m, _)| *m))
    };
    let mut misses = 0;
    for RatioTarget {
        numerator,
        denominator,
        target,
    } in RATIOS
    {
        let label = format!("{numerator} / {denominator}");
        let target_text = target.describe();
        match (median_of(numerator), median_of(denominator)) {
            (Some(n), Some(d)) if d.ns > 0.0 => {
                let ratio = n.ns / d.ns;
                let verdict = match target.met_by(ratio) {
                    Some(true) => "PASS",
                    Some(false) => {
                        misses += 1;
                        "MISS"
                    }
                    None => "(reported)",
                };
                println!("  {label:<45} = {ratio:>6.3}   target {target_text:<7} {verdict}");
            }
            _ => println!("  {label:<45} unavailable (a median is missing)   target {target_text}"),
        }
    }
    let source = found
        .iter()
        .find_map(|(_, f)| f.as_ref().map(|(_, path)| path));
    // <home>/cancel_routine/<benchmark>/new/estimates.json
    common::print_estimates_source(source.map(PathBuf::as_path), snapshot);
    if misses > 0 {
        println!("  {misses} target(s) missed (reported only; a noisy machine can cause this)");
    }
    // Other load makes the contended measurement time-slice with the canceller.
    common::print_machine();
}

fn main() {
    // Before anything runs: which estimates already exist, so only this run's count.
    let snapshot = Snapshot::take(GROUP, &BENCHMARKS);
    let mut criterion = Criterion::default().configure_from_args();
    run_benchmarks(&mut criterion);
    criterion.final_summary();
    report(&snapshot);
}
