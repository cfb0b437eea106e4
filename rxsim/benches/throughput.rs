//! Simulator throughput with minirdr cancel routines armed versus never armed: what the cancel
//! machinery costs a whole run.
//!
//! # What is measured
//!
//! Requests per second of [`rxsim::run`] in [`Mode::Threads`] (2 simulation threads, 16 clients,
//! 8 requests outstanding per client) with no network latency, no jitter, no service time, no
//! client-side delays, no loss, no timeouts, no user cancels and a mix without `change_notify`, so
//! nothing is ever cancelled and the run is bound by the simulator's own CPU work. Two sides differ
//! only in `arm_cancel_routines`:
//!
//! | side | `arm_cancel_routines` | per exchange |
//! |---|---|---|
//! | `unarmed` (baseline) | `false` | no cancel routine, completion goes straight on |
//! | `armed` (measured) | `true` | `set_minirdr_cancel_routine(Some(mrx_cancel))` before the exchange is sent, `set_minirdr_cancel_routine(None)` when its reply comes back |
//!
//! The figure of one round is `report.throughput.requests_per_sec`: completed requests divided by
//! the wall-clock time from the start of the run's clock to the last completion. It leaves out
//! the run's setup, the end-of-run detection (which polls every 500 us) and the after-run
//! invariant checks and report, which are the same work on both sides. The whole `rxsim::run`
//! wall time (`Outcome.wall`) is printed next to it for reference only.
//!
//! # How
//!
//! Both sides are measured in the same process, in the same run: one warm-up round of each
//! (printed, not counted), then rounds alternating unarmed, armed, unarmed, armed, ... so that
//! machine noise (other load, frequency changes) spreads over both sides. Every round must pass
//! all of the simulator's invariants and complete every request; otherwise its report is printed
//! and the process exits with status 1.
//!
//! Printed: every round's figure (and the armed / unarmed ratio of each pair), then per side the
//! median and the spread (min .. max), the ratio of the medians armed / unarmed, the cost in
//! percent (`(1 - ratio) * 100`), and a `PASS` or `MISS` line. The median and spread of the
//! per-round ratios are printed too, for the record (they show how noisy the machine was); only
//! the ratio of the medians is judged.
//!
//! # Target
//!
//! The cancel machinery costs at most 5 % of throughput: **median(armed) >= 0.95 ×
//! median(unarmed)**. A `MISS` is reported, never a failure (the exit status stays 0: shared
//! machines are noisy); only a failed invariant, a bad configuration or a bad environment
//! variable exits non-zero.
//!
//! # Running
//!
//! ```text
//! cargo bench -p rxsim --bench throughput                   # 9 rounds of each, 200 000 requests a round
//! RXSIM_BENCH_ROUNDS=15 RXSIM_BENCH_REQUESTS=500000 cargo bench -p rxsim --bench throughput
//! cargo bench -p rxsim --bench throughput -- --test         # CI: 1 round of each, 5 000 requests, not judged
//! ```
//!
//! `RXSIM_BENCH_ROUNDS` (rounds per side, at least 1) and `RXSIM_BENCH_REQUESTS` (requests per
//! round, at least 1) override the defaults of a full run; `--test` ignores them. Arguments other
//! than `--test` (such as the `--bench` that `cargo bench` passes) are ignored. The machine should
//! be otherwise idle and have at least two cores for the two simulation threads. A full run takes
//! about 20 s on a 2-CPU machine (20 rounds of about 1 s); `--test` well under a second.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use rxsim::{run, Config, Latency, Mode, OpMix, Outcome};

/// The root crate's benchmark helpers; only `print_machine` is used here.
#[path = "../../benches/common/mod.rs"]
#[allow(dead_code)]
mod common;

/// Rounds per side in a full run.
const DEFAULT_ROUNDS: usize = 9;
/// Requests per round in a full run.
const DEFAULT_REQUESTS: u64 = 200_000;
/// Requests per round in `--test` mode (one round per side, no warm-up, not judged).
const TEST_REQUESTS: u64 = 5_000;
/// The target: median(armed) >= this × median(unarmed), i.e. a cost of at most 5 %.
const TARGET_RATIO: f64 = 0.95;
/// The operation mix: the default one without `change_notify`, which only a cancel can end and
/// which the unarmed baseline therefore refuses.
const MIX: &str = "create=8,read=30,write=20,query_info=12,dir_enum=8,pipe_transact=10,close=8";

/// One side of the comparison.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Unarmed,
    Armed,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Unarmed => "unarmed",
            Side::Armed => "armed",
        }
    }
}

/// The run of one side: threads mode, zero latency, nothing that cancels.
fn config(side: Side, requests: u64) -> Result<Config, String> {
    let config = Config {
        mode: Mode::Threads,
        threads: 2,
        clients: 16,
        depth: 8,
        requests,
        cancel_rate: 0.0,
        latency: Latency::Fixed(0),
        jitter: 0,
        service: Latency::Fixed(0),
        dispatch_delay: Latency::Fixed(0),
        completion_delay: Latency::Fixed(0),
        timeout: None,
        loss: 0.0,
        mix: MIX.parse::<OpMix>()?,
        teardown_at: None,
        arm_cancel_routines: side == Side::Armed,
        ..Config::default()
    };
    config
        .validate()
        .map_err(|e| format!("the {} configuration is refused: {e}", side.name()))?;
    Ok(config)
}

/// One measured round.
struct Round {
    /// `report.throughput.requests_per_sec`.
    per_sec: f64,
    /// The report's start-to-last-completion time.
    duration: Duration,
    /// The whole `rxsim::run` call.
    wall: Duration,
}

/// Runs one round, or says why it does not count (the caller prints and exits non-zero).
fn round(config: &Config) -> Result<Round, String> {
    let outcome: Outcome = run(config, &|_, _| {})?;
    let report = &outcome.report;
    if !outcome.passed() {
        return Err(format!(
            "{} violation(s) of the simulator's invariants:\n{report}",
            report.violations_total
        ));
    }
    if report.requests.completed != config.requests {
        return Err(format!(
            "{} of {} requests completed, so the throughput is not comparable:\n{report}",
            report.requests.completed, config.requests
        ));
    }
    let per_sec = report.throughput.requests_per_sec;
    if !per_sec.is_finite() || per_sec <= 0.0 {
        return Err(format!("no usable throughput ({per_sec}):\n{report}"));
    }
    Ok(Round {
        per_sec,
        duration: Duration::from_micros(report.throughput.duration_us),
        wall: outcome.wall,
    })
}

/// Runs and prints one round of `side`.
fn measure(label: &str, side: Side, config: &Config) -> Result<f64, String> {
    let r = round(config).map_err(|e| format!("{label} {}: {e}", side.name()))?;
    println!(
        "  {label:<9} {:<8} {:>12.0} req/s   (to last completion {:>8.3} s, rxsim::run {:>8.3} s)",
        side.name(),
        r.per_sec,
        r.duration.as_secs_f64(),
        r.wall.as_secs_f64()
    );
    Ok(r.per_sec)
}

/// The median (mean of the middle two for an even count); `values` is not empty.
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    }
}

fn spread(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        })
}

/// A positive whole number from the environment, or `default` when the variable is unset.
fn env_count(name: &str, default: u64) -> Result<u64, String> {
    match std::env::var(name) {
        Err(std::env::VarError::NotPresent) => Ok(default),
        Err(e) => Err(format!("{name}: {e}")),
        Ok(text) => match text.trim().replace('_', "").parse::<u64>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => Err(format!(
                "{name}={text:?}: expected a whole number of at least 1"
            )),
        },
    }
}

fn bench() -> Result<(), String> {
    let test_mode = std::env::args().skip(1).any(|a| a == "--test");
    let (rounds, requests) = if test_mode {
        (1, TEST_REQUESTS)
    } else {
        (
            usize::try_from(env_count("RXSIM_BENCH_ROUNDS", DEFAULT_ROUNDS as u64)?)
                .map_err(|e| format!("RXSIM_BENCH_ROUNDS: {e}"))?,
            env_count("RXSIM_BENCH_REQUESTS", DEFAULT_REQUESTS)?,
        )
    };
    let unarmed = config(Side::Unarmed, requests)?;
    let armed = config(Side::Armed, requests)?;
    let started = Instant::now();

    println!("rxsim throughput: cancel routines armed vs never armed, one run");
    println!(
        "  threads mode, {} threads, {} clients, depth {}, {requests} requests a round, zero \
         latency/service/delays, no cancels or timeouts",
        armed.threads, armed.clients, armed.depth
    );
    println!("  mix: {MIX}");
    println!(
        "  figure: report.throughput.requests_per_sec (completed requests / wall time from the \
         run's start to its last completion)"
    );
    if test_mode {
        println!("  --test: 1 round of each, {requests} requests, no warm-up");
    } else {
        println!(
            "  {rounds} rounds of each after one warm-up round of each, alternating unarmed, armed"
        );
        measure("warm-up", Side::Unarmed, &unarmed)?;
        measure("warm-up", Side::Armed, &armed)?;
    }

    let mut figures_unarmed = Vec::with_capacity(rounds);
    let mut figures_armed = Vec::with_capacity(rounds);
    for i in 1..=rounds {
        let label = format!("round {i}");
        let u = measure(&label, Side::Unarmed, &unarmed)?;
        let a = measure(&label, Side::Armed, &armed)?;
        println!("  {:<18} armed / unarmed = {:.4}", "", a / u);
        figures_unarmed.push(u);
        figures_armed.push(a);
    }

    let (mu, ma) = (median(&figures_unarmed), median(&figures_armed));
    let ratio = ma / mu;
    let pair_ratios: Vec<f64> = figures_armed
        .iter()
        .zip(&figures_unarmed)
        .map(|(a, u)| a / u)
        .collect();
    println!();
    println!("throughput summary (requests/s, report.throughput.requests_per_sec)");
    for (side, figures, m) in [
        (Side::Unarmed, &figures_unarmed, mu),
        (Side::Armed, &figures_armed, ma),
    ] {
        let (lo, hi) = spread(figures);
        println!(
            "  {:<8} median {m:>12.0}   spread {lo:.0} .. {hi:.0}   ({} round(s))",
            side.name(),
            figures.len()
        );
    }
    println!("  ratio armed / unarmed = {ratio:.4}   (of the medians)");
    let (lo, hi) = spread(&pair_ratios);
    println!(
        "  median of the per-round ratios = {:.4}   spread {lo:.4} .. {hi:.4}   (reported only)",
        median(&pair_ratios)
    );
    println!(
        "  cost of the cancel machinery = {:.2} %",
        (1.0 - ratio) * 100.0
    );
    if test_mode {
        println!("  test mode: not judged");
    } else if ma >= TARGET_RATIO * mu {
        println!("  PASS  (target: armed median >= {TARGET_RATIO} x unarmed median, cost <= 5 %)");
    } else {
        println!("  MISS  (target: armed median >= {TARGET_RATIO} x unarmed median, cost <= 5 %; reported only, a noisy machine can cause this)");
    }
    common::print_machine();
    println!(
        "  total time of this benchmark: {:.2} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn main() -> ExitCode {
    match bench() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rxsim throughput benchmark failed: {e}");
            ExitCode::FAILURE
        }
    }
}
