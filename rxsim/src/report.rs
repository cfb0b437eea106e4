//! The run's report: requests by outcome, cancel outcomes, latency percentiles, server and
//! network figures, throughput and the invariants, as a human summary ([`fmt::Display`]) and as
//! JSON (`serde`).
//!
//! Invariants:
//! 1. Everything in a report is derived from the run's records and counters after the run; it
//!    contains no wall-clock figure in deterministic mode, so the same seed gives a
//!    byte-identical report (text and JSON).
//! 2. Every created request falls in exactly one status bucket, and every request with a cancel
//!    in exactly one of won / lost the race / too late.

use crate::config::{Bug, Micros, Mode, OpKind};
use crate::engine::Shared;
use crate::mi::MiSummary;
use crate::record::{CancelEffect, CancelReason, Invariant, RequestRecord, Violation};
use crate::resource::ResourceSummary;
use crate::server::ServerStats;
use rdbss::NtStatus;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::Ordering;

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// What was run.
    pub config: ConfigSummary,
    /// Requests by outcome.
    pub requests: RequestSummary,
    /// Cancel outcomes.
    pub cancels: CancelSummary,
    /// Latency percentiles, microseconds.
    pub latency_us: LatencySummary,
    /// The server's figures.
    pub server: ServerSummary,
    /// The network's figures.
    pub network: NetworkSummary,
    /// The MI layer: directory enumerations and method calls as MI operations.
    pub mi: MiSummary,
    /// The share connections as cluster resources.
    pub resources: ResourceSummary,
    /// Completed requests per second of the run's clock.
    pub throughput: Throughput,
    /// Each invariant and whether it held.
    pub invariants: Vec<InvariantResult>,
    /// Emulated bug checks during the run.
    pub bug_checks: u64,
    /// Violations found, over all invariants.
    pub violations_total: u64,
    /// The first violations, each with its request's history.
    pub violations: Vec<Violation>,
}

/// The run's parameters.
#[derive(Clone, Debug, Serialize)]
pub struct ConfigSummary {
    /// Seed.
    pub seed: u64,
    /// Execution mode.
    pub mode: Mode,
    /// Simulation threads.
    pub threads: usize,
    /// Clients.
    pub clients: usize,
    /// Requests asked for.
    pub requests: u64,
    /// Outstanding requests per client.
    pub depth: usize,
    /// Cancel probability.
    pub cancel_rate: f64,
    /// Latency distribution.
    pub latency: String,
    /// Jitter.
    pub jitter_us: Micros,
    /// Server service time.
    pub service: String,
    /// Per-request timeout.
    pub timeout_us: Option<Micros>,
    /// Message loss probability.
    pub loss: f64,
    /// Partitions.
    pub partitions: Vec<String>,
    /// Crashes.
    pub crashes: Vec<String>,
    /// Credits per client.
    pub credits: u32,
    /// Operation mix.
    pub mix: String,
    /// Whether cancel routines are armed.
    pub cancel_routines: bool,
    /// Forced teardown time.
    pub teardown_at_us: Option<Micros>,
    /// Injected bug, if any.
    pub bug: Option<Bug>,
    /// The MI session's quota.
    pub mi_quota: usize,
    /// Connect latency (a pending Online).
    pub connect_latency: String,
    /// The connection resources' PendingTimeout.
    pub pending_timeout_us: Micros,
}

/// Requests by outcome.
#[derive(Clone, Debug, Serialize)]
pub struct RequestSummary {
    /// Created.
    pub issued: u64,
    /// Never created (the session was torn down first).
    pub not_issued: u64,
    /// Completed (at least once).
    pub completed: u64,
    /// By final status (`never completed` for none).
    pub by_status: BTreeMap<String, u64>,
    /// By operation.
    pub by_kind: BTreeMap<String, KindSummary>,
}

/// One operation kind's counts.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct KindSummary {
    /// Created.
    pub issued: u64,
    /// Completed with a success status.
    pub succeeded: u64,
    /// Completed with STATUS_CANCELLED.
    pub cancelled: u64,
}

/// Outcomes of requests that had a cancel.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct CancelOutcomes {
    /// The cancel won: completed with STATUS_CANCELLED.
    pub won: u64,
    /// The cancel marked the request, but completion had already disarmed: completed normally.
    pub lost_race: u64,
    /// The request was already completed when the cancel came.
    pub too_late: u64,
}

/// Cancel outcomes.
#[derive(Clone, Debug, Serialize)]
pub struct CancelSummary {
    /// Requests with at least one cancel.
    pub requests_with_cancel: u64,
    /// Over all reasons.
    pub total: CancelOutcomes,
    /// Won before the exchange started (arm or enqueue refused).
    pub won_before_start: u64,
    /// Won while queued (pipe order, credit or connection): the core unlinked and completed it.
    pub won_while_blocked: u64,
    /// Won mid-exchange (the routine ran and sent CANCEL).
    pub won_mid_exchange: u64,
    /// By the first cancel's reason.
    pub by_reason: BTreeMap<String, CancelOutcomes>,
    /// Every cancel call, by reason and by what the core said.
    pub calls: BTreeMap<String, BTreeMap<String, u64>>,
}

/// Percentiles of one latency population, microseconds.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: Micros,
    /// 90th percentile.
    pub p90: Micros,
    /// 99th percentile.
    pub p99: Micros,
    /// 99.9th percentile.
    pub p999: Micros,
    /// Maximum.
    pub max: Micros,
}

impl Percentiles {
    /// The percentiles of `samples` (sorted here).
    pub fn of(mut samples: Vec<Micros>) -> Self {
        if samples.is_empty() {
            return Percentiles::default();
        }
        samples.sort_unstable();
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        Percentiles {
            count: samples.len() as u64,
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            p999: at(0.999),
            max: samples[samples.len() - 1],
        }
    }
}

/// Latency percentiles.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct LatencySummary {
    /// Issue to completion, requests not completed with STATUS_CANCELLED.
    pub normal: Percentiles,
    /// Issue to completion, requests completed with STATUS_CANCELLED.
    pub cancelled: Percentiles,
    /// Cancel request to completion, cancels that won.
    pub cancel_to_completion: Percentiles,
}

/// The server's figures.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct ServerSummary {
    /// What the server counted.
    #[serde(flatten)]
    pub stats: ServerStats,
    /// Credits still in use after the run (0 expected).
    pub credits_in_use_at_end: u64,
    /// Exchanges still open after the run (0 expected).
    pub exchanges_open_at_end: usize,
}

/// The network's figures.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct NetworkSummary {
    /// Retransmissions after a loss.
    pub retransmits: u64,
    /// Messages held by a partition.
    pub partitioned_messages: u64,
    /// Replies dropped because their exchange was already gone (a disconnect).
    pub stale_replies: u64,
    /// Exchanges failed by a disconnect (server crash).
    pub failed_by_disconnect: u64,
}

/// Throughput.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Throughput {
    /// `virtual` (deterministic mode) or `wall` (threads mode).
    pub clock: &'static str,
    /// From the start to the last completion, microseconds.
    pub duration_us: Micros,
    /// Completed requests per second.
    pub requests_per_sec: f64,
}

/// One invariant's result.
#[derive(Clone, Debug, Serialize)]
pub struct InvariantResult {
    /// Which.
    pub invariant: Invariant,
    /// What it says.
    pub description: &'static str,
    /// Whether it held.
    pub holds: bool,
    /// How many violations.
    pub violations: u64,
}

/// Builds the report from the run's state (invariant 1).
pub(crate) fn build(shared: &Shared, records: &[RequestRecord], bug_checks: usize) -> Report {
    let config = &shared.config;
    let counters = &shared.counters;
    let mut by_status: BTreeMap<String, u64> = BTreeMap::new();
    let mut by_kind: BTreeMap<String, KindSummary> = BTreeMap::new();
    let mut cancels = CancelSummary {
        requests_with_cancel: 0,
        total: CancelOutcomes::default(),
        won_before_start: 0,
        won_while_blocked: 0,
        won_mid_exchange: 0,
        by_reason: BTreeMap::new(),
        calls: BTreeMap::new(),
    };
    let (mut normal, mut cancelled, mut cancel_to_completion) = (vec![], vec![], vec![]);
    let (mut issued, mut completed) = (0u64, 0u64);
    for record in records.iter().filter(|r| r.is_created()) {
        issued += 1;
        let kind = by_kind
            .entry(record.op_kind().name().to_string())
            .or_default();
        kind.issued += 1;
        let status = record.final_status();
        let key = status.map_or_else(|| "never completed".to_string(), |s| s.to_string());
        *by_status.entry(key).or_default() += 1;
        let (Some(status), Some(created), Some(done)) =
            (status, record.created.get(), record.completed.get())
        else {
            continue;
        };
        completed += 1;
        let latency = done.saturating_sub(created);
        if status == NtStatus::CANCELLED {
            kind.cancelled += 1;
            cancelled.push(latency);
        } else {
            if status.is_success() {
                kind.succeeded += 1;
            }
            normal.push(latency);
        }
        let Some(requested) = record.cancel_requested.get() else {
            continue;
        };
        cancels.requests_with_cancel += 1;
        let reason = record.reason().map_or("?", CancelReason::name);
        let outcomes = cancels.by_reason.entry(reason.to_string()).or_default();
        let effect = record.effect();
        if status == NtStatus::CANCELLED {
            outcomes.won += 1;
            cancels.total.won += 1;
            cancel_to_completion.push(done.saturating_sub(requested));
            if record.refused.get().is_some() {
                cancels.won_before_start += 1;
            } else if effect == Some(CancelEffect::BlockedOperationCancelled) {
                cancels.won_while_blocked += 1;
            } else if record.routine.get().is_some() {
                cancels.won_mid_exchange += 1;
            }
        } else if effect.is_some_and(CancelEffect::cancelled_now) {
            outcomes.lost_race += 1;
            cancels.total.lost_race += 1;
        } else {
            outcomes.too_late += 1;
            cancels.total.too_late += 1;
        }
    }
    for reason in CancelReason::ALL {
        let mut calls = BTreeMap::new();
        for effect in CancelEffect::ALL {
            let n = counters.cancel_calls[reason as usize - 1][effect as usize - 1]
                .load(Ordering::Relaxed);
            if n > 0 {
                calls.insert(effect.name().to_string(), n);
            }
        }
        if !calls.is_empty() {
            cancels.calls.insert(reason.name().to_string(), calls);
        }
    }
    let duration = counters.last_completion.load(Ordering::Acquire);
    let checker = &shared.checker;
    let invariants: Vec<InvariantResult> = Invariant::ALL
        .into_iter()
        .map(|invariant| InvariantResult {
            invariant,
            description: invariant.description(),
            holds: checker.count(invariant) == 0,
            violations: checker.count(invariant),
        })
        .collect();
    Report {
        config: ConfigSummary {
            seed: config.seed,
            mode: config.mode,
            threads: config.shard_count(),
            clients: config.clients,
            requests: config.requests,
            depth: config.depth,
            cancel_rate: config.cancel_rate,
            latency: config.latency.to_string(),
            jitter_us: config.jitter,
            service: config.service.to_string(),
            timeout_us: config.timeout,
            loss: config.loss,
            partitions: config.partitions.iter().map(|w| w.to_string()).collect(),
            crashes: config.crashes.iter().map(|w| w.to_string()).collect(),
            credits: config.credits,
            mix: config.mix.to_string(),
            cancel_routines: config.arm_cancel_routines,
            teardown_at_us: config.teardown_at,
            bug: config.bug,
            mi_quota: config.mi_quota,
            connect_latency: config.connect_latency.to_string(),
            pending_timeout_us: config.pending_timeout,
        },
        requests: RequestSummary {
            issued,
            not_issued: config.requests - issued,
            completed,
            by_status,
            by_kind,
        },
        cancels,
        latency_us: LatencySummary {
            normal: Percentiles::of(normal),
            cancelled: Percentiles::of(cancelled),
            cancel_to_completion: Percentiles::of(cancel_to_completion),
        },
        server: ServerSummary {
            stats: shared.server.stats(),
            credits_in_use_at_end: shared.server.credits_in_use(),
            exchanges_open_at_end: shared.server.open_exchanges(),
        },
        network: NetworkSummary {
            retransmits: counters.retransmits.load(Ordering::Relaxed),
            partitioned_messages: counters.partitioned.load(Ordering::Relaxed),
            stale_replies: counters.stale_replies.load(Ordering::Relaxed),
            failed_by_disconnect: counters.disconnected.load(Ordering::Relaxed),
        },
        mi: shared.mi.summary(),
        resources: shared.connections.summary(),
        throughput: Throughput {
            clock: match config.mode {
                Mode::Deterministic => "virtual",
                Mode::Threads => "wall",
            },
            duration_us: duration,
            requests_per_sec: if duration == 0 {
                0.0
            } else {
                completed as f64 * 1e6 / duration as f64
            },
        },
        violations_total: invariants.iter().map(|i| i.violations).sum(),
        invariants,
        bug_checks: bug_checks as u64,
        violations: checker.violations(),
    }
}

fn pct(part: u64, whole: u64) -> String {
    if whole == 0 {
        "-".into()
    } else {
        format!("{:.1}%", part as f64 * 100.0 / whole as f64)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        writeln!(
            f,
            "rxsim: {} run, seed {}, {} thread(s), {} clients x depth {}, {} requests, cancel rate {}",
            c.mode, c.seed, c.threads, c.clients, c.depth, c.requests, c.cancel_rate
        )?;
        writeln!(
            f,
            "  network: latency {} + jitter {}us, loss {}, partitions [{}], crashes [{}]; server service {}, {} credits/client; timeout {}",
            c.latency,
            c.jitter_us,
            c.loss,
            c.partitions.join(", "),
            c.crashes.join(", "),
            c.service,
            c.credits,
            c.timeout_us.map_or("none".into(), |t| format!("{t}us")),
        )?;
        if let Some(bug) = c.bug {
            writeln!(f, "  INJECTED BUG: {bug:?}")?;
        }
        if !c.cancel_routines {
            writeln!(f, "  cancel routines: never armed (baseline)")?;
        }
        let r = &self.requests;
        writeln!(f, "\nrequests")?;
        writeln!(
            f,
            "  issued {}   completed {}   not issued (session torn down first) {}",
            r.issued, r.completed, r.not_issued
        )?;
        for (status, n) in &r.by_status {
            writeln!(f, "  {status:<32} {n:>10}  {:>6}", pct(*n, r.issued))?;
        }
        writeln!(
            f,
            "  {:<16} {:>10} {:>10} {:>10}",
            "by operation", "issued", "succeeded", "cancelled"
        )?;
        for kind in OpKind::ALL {
            if let Some(k) = r.by_kind.get(kind.name()) {
                writeln!(
                    f,
                    "  {:<16} {:>10} {:>10} {:>10}",
                    kind.name(),
                    k.issued,
                    k.succeeded,
                    k.cancelled
                )?;
            }
        }
        let x = &self.cancels;
        writeln!(f, "\ncancels ({} requests had one)", x.requests_with_cancel)?;
        writeln!(
            f,
            "  won {} (before the exchange started {}, while queued {}, mid-exchange {})   lost the race {}   too late {}",
            x.total.won,
            x.won_before_start,
            x.won_while_blocked,
            x.won_mid_exchange,
            x.total.lost_race,
            x.total.too_late
        )?;
        for (reason, o) in &x.by_reason {
            writeln!(
                f,
                "  {reason:<9} won {:>8}   lost the race {:>6}   too late {:>8}",
                o.won, o.lost_race, o.too_late
            )?;
        }
        for (reason, calls) in &x.calls {
            let parts: Vec<String> = calls.iter().map(|(e, n)| format!("{e} {n}")).collect();
            writeln!(f, "  {reason} cancel calls: {}", parts.join(", "))?;
        }
        let l = &self.latency_us;
        writeln!(
            f,
            "\nlatency (us)         {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "count", "p50", "p90", "p99", "p99.9", "max"
        )?;
        for (name, p) in [
            ("normal", l.normal),
            ("cancelled", l.cancelled),
            ("cancel->completion", l.cancel_to_completion),
        ] {
            writeln!(
                f,
                "  {name:<18} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
                p.count, p.p50, p.p90, p.p99, p.p999, p.max
            )?;
        }
        let s = &self.server.stats;
        writeln!(f, "\nserver")?;
        writeln!(
            f,
            "  exchanges {}   finished {}   aborted by CANCEL {}   CANCEL for a non-cancellable exchange {}   CANCEL for an unknown exchange {}",
            s.exchanges, s.finished, s.cancelled, s.cancel_not_cancellable, s.cancel_unknown
        )?;
        writeln!(
            f,
            "  change-notifies fired {}   refused for credits {}   stale messages dropped {}   crashes {}   max credits held by a client {}",
            s.notifies_fired, s.rejected_no_credit, s.dropped_stale, s.crashes, s.max_credits_in_use
        )?;
        writeln!(
            f,
            "  at the end: credits in use {}, exchanges open {}",
            self.server.credits_in_use_at_end, self.server.exchanges_open_at_end
        )?;
        let n = &self.network;
        writeln!(
            f,
            "network: retransmits {}   held by a partition {}   stale replies {}   failed by disconnect {}",
            n.retransmits, n.partitioned_messages, n.stale_replies, n.failed_by_disconnect
        )?;
        let m = &self.mi;
        writeln!(
            f,
            "\nMI (quota {}: dir_enum = enumerate, method_call = invoke)",
            m.quota
        )?;
        writeln!(
            f,
            "  started: enumerate {}   invoke {}   refused: SERVER_LIMITS_EXCEEDED {}   SERVER_IS_SHUTTING_DOWN {}   max quota in use {}",
            m.started_enumerate,
            m.started_invoke,
            m.refused_server_limits_exceeded,
            m.refused_shutting_down,
            m.max_quota_in_use
        )?;
        writeln!(
            f,
            "  MI_Operation_Cancel: reason NONE {}   TIMEOUT {}   SHUTDOWN {}   after close {}   (enumerations cancelled {}, invokes cancelled {})",
            m.cancels_reason_none,
            m.cancels_reason_timeout,
            m.cancels_reason_shutdown,
            m.cancels_after_close,
            m.enumerations_cancelled,
            m.invokes_cancelled
        )?;
        writeln!(
            f,
            "  RegisterCancel: registered {}   called at once {}   already delivered {}   NOT_SUPPORTED {}   callbacks run {}",
            m.registered,
            m.registered_after_cancel_called_at_once,
            m.registered_already_delivered,
            m.register_not_supported,
            m.callbacks
        )?;
        writeln!(
            f,
            "  instances posted {}   refused {}   read {}   read after a cancel {}",
            m.instances_posted, m.instances_refused, m.instances_read, m.results_after_cancel
        )?;
        writeln!(
            f,
            "  final results: provider's {}   cancelled {}   PostResult delivered {}   discarded {}   invokes run to completion after a cancel {}",
            m.final_results_delivered,
            m.final_results_cancelled,
            m.posted_delivered,
            m.posted_discarded,
            m.invokes_ran_to_completion_after_cancel
        )?;
        writeln!(
            f,
            "  closes {} (at the cancel {})   at the end: quota in use {}, operations alive {}",
            m.closes, m.closed_at_cancel, m.quota_in_use_at_end, m.live_operations_at_end
        )?;
        let g = &self.resources;
        writeln!(
            f,
            "\nconnections as cluster resources ({}, PendingTimeout {} ms)",
            g.resources, g.pending_timeout_ms
        )?;
        writeln!(
            f,
            "  Online pending {}   completed {}   ended by an abort {}   retried after a timeout {}",
            g.online_started, g.online_completed, g.online_ended_by_abort, g.online_retries
        )?;
        writeln!(
            f,
            "  Cancel: online cancelled {}   nothing pending {}   other errors {}   Terminate {} (of a pending Online {})   pending timeouts {}",
            g.online_cancelled,
            g.cancel_nothing_pending,
            g.cancel_other_errors,
            g.terminations,
            g.terminations_of_a_pending_online,
            g.pending_timeouts
        )?;
        writeln!(
            f,
            "  at the end: online {}, offline {}, failed {}, pending {}",
            g.online_at_end, g.offline_at_end, g.failed_at_end, g.pending_at_end
        )?;
        let t = &self.throughput;
        writeln!(
            f,
            "\nthroughput: {:.0} requests/s ({} time, last completion at {:.3} s)",
            t.requests_per_sec,
            t.clock,
            t.duration_us as f64 / 1e6
        )?;
        writeln!(f, "\ninvariants")?;
        for i in &self.invariants {
            if i.holds {
                writeln!(f, "  [ok]   {}", i.description)?;
            } else {
                writeln!(
                    f,
                    "  [FAIL] {} ({} violation(s))",
                    i.description, i.violations
                )?;
            }
        }
        for v in &self.violations {
            writeln!(
                f,
                "\nVIOLATION: {} (seed {}): {}",
                v.invariant, c.seed, v.detail
            )?;
            if let Some(request) = v.request {
                writeln!(f, "  history of request {request}:")?;
                for line in &v.history {
                    writeln!(f, "  {line}")?;
                }
            }
        }
        if self.violations_total > 0 {
            writeln!(
                f,
                "\n{} violation(s); reproduce with the same options and --seed {}",
                self.violations_total, c.seed
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_right_samples() {
        let p = Percentiles::of((1..=1000).rev().collect());
        assert_eq!(
            (p.count, p.p50, p.p90, p.p99, p.max),
            (1000, 501, 900, 990, 1000)
        );
        assert_eq!(Percentiles::of(Vec::new()), Percentiles::default());
        assert_eq!(pct(1, 4), "25.0%");
        assert_eq!(pct(1, 0), "-");
    }
}
