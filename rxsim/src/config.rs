//! What a simulation run is asked to do: the workload, the network, the faults and the execution
//! mode, with the embedded defaults that `rxsim run` uses.
//!
//! Invariants:
//! 1. A `Config` that passed [`Config::validate`] describes a run that terminates: every request
//!    either completes on its own or is cancelled by the session teardown.
//! 2. All times are microseconds ([`Micros`]) of the run's clock: virtual time in
//!    [`Mode::Deterministic`], wall-clock time since the start in [`Mode::Threads`].
//! 3. Parsing never panics: bad text is an `Err(String)` that names what was wrong.

use serde::Serialize;
use std::fmt;
use std::str::FromStr;

/// Microseconds of the run's clock (invariant 2).
pub type Micros = u64;

/// How the simulation is executed.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One thread, virtual time: the same seed gives a byte-identical report.
    Deterministic,
    /// Real OS threads and wall-clock time: the real spin lock and atomics race for real.
    Threads,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Deterministic => "deterministic",
            Mode::Threads => "threads",
        })
    }
}

/// A distribution of durations (network latency, server service time).
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Latency {
    /// Always this long.
    Fixed(Micros),
    /// Uniform in `[low, high]`.
    Uniform(Micros, Micros),
    /// Exponential with this mean.
    Exp(Micros),
    /// Normal with this mean and standard deviation, cut at zero.
    Normal(Micros, Micros),
}

impl Latency {
    /// The distribution's mean, in microseconds.
    pub fn mean(self) -> Micros {
        match self {
            Latency::Fixed(m) | Latency::Exp(m) | Latency::Normal(m, _) => m,
            Latency::Uniform(low, high) => low + (high - low) / 2,
        }
    }
}

/// Parses a duration such as `250us`, `1.5ms`, `10s` or `0` into microseconds.
pub fn parse_micros(text: &str) -> Result<Micros, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(0);
    }
    let duration = humantime::parse_duration(text)
        .map_err(|e| format!("`{text}` is not a duration ({e}); write e.g. 500us, 2ms or 1s"))?;
    u64::try_from(duration.as_micros()).map_err(|_| format!("`{text}` is too long"))
}

impl FromStr for Latency {
    type Err = String;

    /// `D` (fixed), `uniform:A..B`, `exp:MEAN`, `normal:MEAN,SD`, each duration as in
    /// [`parse_micros`].
    fn from_str(text: &str) -> Result<Self, String> {
        let (kind, rest) = text.split_once(':').unwrap_or(("fixed", text));
        match kind {
            "fixed" => Ok(Latency::Fixed(parse_micros(rest)?)),
            "exp" => Ok(Latency::Exp(parse_micros(rest)?)),
            "uniform" => {
                let (a, b) = rest
                    .split_once("..")
                    .ok_or_else(|| format!("`{text}`: write uniform:LOW..HIGH"))?;
                let (low, high) = (parse_micros(a)?, parse_micros(b)?);
                if low > high {
                    return Err(format!("`{text}`: LOW is above HIGH"));
                }
                Ok(Latency::Uniform(low, high))
            }
            "normal" => {
                let (m, s) = rest
                    .split_once(',')
                    .ok_or_else(|| format!("`{text}`: write normal:MEAN,SD"))?;
                Ok(Latency::Normal(parse_micros(m)?, parse_micros(s)?))
            }
            other => Err(format!(
                "`{other}` is not a distribution: use D, uniform:A..B, exp:MEAN or normal:MEAN,SD"
            )),
        }
    }
}

impl fmt::Display for Latency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Latency::Fixed(m) => write!(f, "{m}us"),
            Latency::Uniform(a, b) => write!(f, "uniform:{a}us..{b}us"),
            Latency::Exp(m) => write!(f, "exp:{m}us"),
            Latency::Normal(m, s) => write!(f, "normal:{m}us,{s}us"),
        }
    }
}

/// A time window `START+LENGTH`: a network partition, or a server crash and its downtime.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize)]
pub struct Window {
    /// When it starts.
    pub start: Micros,
    /// How long it lasts.
    pub length: Micros,
}

impl Window {
    /// The first instant after the window.
    pub fn end(self) -> Micros {
        self.start + self.length
    }
}

impl FromStr for Window {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (start, length) = text
            .split_once('+')
            .ok_or_else(|| format!("`{text}`: write START+LENGTH, e.g. 200ms+50ms"))?;
        Ok(Window {
            start: parse_micros(start)?,
            length: parse_micros(length)?,
        })
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}us+{}us", self.start, self.length)
    }
}

/// The operations a simulated application issues, each an SMB-like exchange.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    /// Create or open a file (cancellable at the server).
    Create,
    /// Read a file range (cancellable at the server).
    Read,
    /// Write a file range (not cancellable at the server once it runs).
    Write,
    /// Query a file's size and version (not cancellable at the server).
    QueryInfo,
    /// Enumerate a directory (cancellable at the server).
    DirEnum,
    /// Wait for a change in a directory: long-lived, the classic cancel case.
    ChangeNotify,
    /// A message on a named pipe: ordered, one at a time per client through the core's
    /// blocked-operation queue (not cancellable at the server).
    PipeTransact,
    /// Close a handle (not cancellable at the server).
    Close,
    /// A server-side method call: an MI invoke operation (`MI_Session_Invoke`) carried as a
    /// pipe transaction (RPC over a named pipe). Not cancellable at the provider nor at the
    /// server: a cancel gives the client its final result at once, the call runs to completion.
    MethodCall,
}

impl OpKind {
    /// Every kind, in report order.
    pub const ALL: [OpKind; 9] = [
        OpKind::Create,
        OpKind::Read,
        OpKind::Write,
        OpKind::QueryInfo,
        OpKind::DirEnum,
        OpKind::ChangeNotify,
        OpKind::PipeTransact,
        OpKind::Close,
        OpKind::MethodCall,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Create => "create",
            OpKind::Read => "read",
            OpKind::Write => "write",
            OpKind::QueryInfo => "query_info",
            OpKind::DirEnum => "dir_enum",
            OpKind::ChangeNotify => "change_notify",
            OpKind::PipeTransact => "pipe_transact",
            OpKind::Close => "close",
            OpKind::MethodCall => "method_call",
        }
    }

    /// Whether the server can abort a running exchange of this kind on CANCEL (like MI's
    /// "enumerate can, invoke cannot").
    pub fn cancellable_at_server(self) -> bool {
        matches!(
            self,
            OpKind::Create | OpKind::Read | OpKind::DirEnum | OpKind::ChangeNotify
        )
    }

    /// The MI operation a request of this kind runs as, if any: directory enumeration is an
    /// enumeration (cancellable at the provider), the method call an invoke (not).
    pub fn mi_kind(self) -> Option<rdbss::mi::MiOperationKind> {
        match self {
            OpKind::DirEnum => Some(rdbss::mi::MiOperationKind::Enumerate),
            OpKind::MethodCall => Some(rdbss::mi::MiOperationKind::Invoke),
            _ => None,
        }
    }

    pub(crate) fn from_index(index: u8) -> OpKind {
        OpKind::ALL[usize::from(index) % OpKind::ALL.len()]
    }

    pub(crate) fn index(self) -> u8 {
        OpKind::ALL.iter().position(|k| *k == self).unwrap_or(0) as u8
    }
}

/// The operation mix: a weight per kind.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct OpMix(pub Vec<(OpKind, u32)>);

impl Default for OpMix {
    fn default() -> Self {
        OpMix(vec![
            (OpKind::Create, 8),
            (OpKind::Read, 30),
            (OpKind::Write, 20),
            (OpKind::QueryInfo, 12),
            (OpKind::DirEnum, 8),
            (OpKind::ChangeNotify, 4),
            (OpKind::PipeTransact, 10),
            (OpKind::Close, 8),
            (OpKind::MethodCall, 4),
        ])
    }
}

impl OpMix {
    /// The weight of `kind` (0 if absent).
    pub fn weight(&self, kind: OpKind) -> u32 {
        self.0
            .iter()
            .filter(|(k, _)| *k == kind)
            .map(|(_, w)| *w)
            .sum()
    }

    /// The sum of the weights.
    pub fn total(&self) -> u32 {
        self.0.iter().map(|(_, w)| *w).sum()
    }
}

impl FromStr for OpMix {
    type Err = String;

    /// `read=30,write=20,...`; kinds left out get weight 0.
    fn from_str(text: &str) -> Result<Self, String> {
        let mut mix = Vec::new();
        for part in text.split(',').filter(|p| !p.trim().is_empty()) {
            let (name, weight) = part
                .split_once('=')
                .ok_or_else(|| format!("`{part}`: write KIND=WEIGHT"))?;
            let kind = OpKind::ALL
                .into_iter()
                .find(|k| k.name() == name.trim())
                .ok_or_else(|| {
                    let names: Vec<_> = OpKind::ALL.iter().map(|k| k.name()).collect();
                    format!("`{name}` is not an operation; use {}", names.join(", "))
                })?;
            let weight = weight
                .trim()
                .parse::<u32>()
                .map_err(|_| format!("`{weight}` is not a whole-number weight"))?;
            mix.push((kind, weight));
        }
        let mix = OpMix(mix);
        if mix.total() == 0 {
            return Err("the operation mix has no weight at all".into());
        }
        Ok(mix)
    }
}

impl fmt::Display for OpMix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|(k, w)| format!("{}={w}", k.name()))
            .collect();
        f.write_str(&parts.join(","))
    }
}

/// A deliberately broken mini-redirector or server, to show that the invariant checker catches
/// what it guards against. Never on in a normal run.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Bug {
    /// The response path completes the request even when disarming reports that the cancel side
    /// owns it: a request is completed twice (invariant: exactly once).
    CompleteTwice,
    /// The cancel routine leaves completion to the response path, and the response path leaves it
    /// to the cancel side: a cancelled request is never completed (invariant: exactly once).
    LoseCompletion,
    /// Arming the cancel routine reports STATUS_CANCELLED, and the exchange is sent anyway without
    /// a routine (invariant: cancelled before the exchange started means STATUS_CANCELLED).
    IgnoreArmRefusal,
    /// A user cancel also calls the mini-redirector's cancel routine directly after RDBSS did
    /// (invariant: the routine runs at most once).
    RoutineTwice,
    /// The handle of an exchange whose response lost to a cancel is forgotten, not released
    /// (invariant: no context leaks; the instance drains to zero).
    LeakReference,
    /// The server aborts a cancelled exchange but keeps its credit (invariant: quota back to zero).
    ServerKeepsQuota,
    /// Responses are processed in the receive DPC, at DISPATCH_LEVEL, where disarming the cancel
    /// routine is not allowed (invariant: no IRQL violations).
    DisarmAtDispatch,
}

/// A whole run's parameters. [`Config::default`] is what `rxsim run` uses with no options.
#[derive(Clone, Debug)]
pub struct Config {
    /// Seeds every random choice.
    pub seed: u64,
    /// Deterministic (virtual time) or threads (real time).
    pub mode: Mode,
    /// Worker threads in threads mode (each runs a shard of the clients).
    pub threads: usize,
    /// Simulated clients, each with its own session and credits.
    pub clients: usize,
    /// Requests issued over the whole run.
    pub requests: u64,
    /// Requests each client keeps outstanding (closed loop).
    pub depth: usize,
    /// Probability that the application cancels a request at a random time.
    pub cancel_rate: f64,
    /// One-way network latency.
    pub latency: Latency,
    /// Extra uniform jitter added to every message, `[0, jitter]`.
    pub jitter: Micros,
    /// Server time to run an exchange.
    pub service: Latency,
    /// Client-side processing before a request is dispatched (the "before dispatch" window).
    pub dispatch_delay: Latency,
    /// Client-side processing between disarming and completing (the "racing completion" window).
    pub completion_delay: Latency,
    /// Per-request timeout; change-notify has none. `None`: no timeouts.
    pub timeout: Option<Micros>,
    /// Probability that a message is lost (and retransmitted after `rto`).
    pub loss: f64,
    /// Retransmission timeout.
    pub rto: Micros,
    /// Network partitions.
    pub partitions: Vec<Window>,
    /// Server crashes and their downtime.
    pub crashes: Vec<Window>,
    /// Credits (concurrent exchanges) the server grants each client.
    pub credits: u32,
    /// The operation mix.
    pub mix: OpMix,
    /// Whether the mini-redirector arms cancel routines (off only for the benchmark baseline).
    pub arm_cancel_routines: bool,
    /// Tear the session down at this time, cancelling everything in flight; by default the
    /// teardown comes when every request except the long-lived ones has finished.
    pub teardown_at: Option<Micros>,
    /// A deliberately broken variant, to test the checker.
    pub bug: Option<Bug>,
    /// The MI session's quota of running operations (`dir_enum` and `method_call` requests);
    /// a start beyond it is refused with `MI_RESULT_SERVER_LIMITS_EXCEEDED`.
    pub mi_quota: usize,
    /// How long a pending `Online` of a client's connection (a cluster resource) takes.
    pub connect_latency: Latency,
    /// The connection resources' `PendingTimeout` (at least 10 ms; whole milliseconds).
    pub pending_timeout: Micros,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            seed: 1,
            mode: Mode::Deterministic,
            threads: 2,
            clients: 16,
            requests: 200_000,
            depth: 4,
            cancel_rate: 0.1,
            latency: Latency::Exp(400),
            jitter: 100,
            service: Latency::Uniform(50, 400),
            dispatch_delay: Latency::Uniform(0, 40),
            completion_delay: Latency::Uniform(0, 20),
            timeout: Some(5_000),
            loss: 0.001,
            rto: 5_000,
            partitions: Vec::new(),
            crashes: Vec::new(),
            credits: 32,
            mix: OpMix::default(),
            arm_cancel_routines: true,
            teardown_at: None,
            bug: None,
            mi_quota: 16,
            connect_latency: Latency::Uniform(500, 2_000),
            pending_timeout: 180_000_000,
        }
    }
}

impl Config {
    /// Checks that the parameters make a run that can terminate (invariant 1).
    pub fn validate(&self) -> Result<(), String> {
        if self.clients == 0 {
            return Err("--clients must be at least 1".into());
        }
        if self.depth == 0 {
            return Err("--depth must be at least 1".into());
        }
        if self.threads == 0 {
            return Err("--threads must be at least 1".into());
        }
        if self.credits == 0 {
            return Err("--credits must be at least 1".into());
        }
        if self.clients > u32::MAX as usize / 2 || self.requests > u32::MAX as u64 {
            return Err("--clients or --requests is too large".into());
        }
        for (name, p) in [("--cancel-rate", self.cancel_rate), ("--loss", self.loss)] {
            if !(0.0..=1.0).contains(&p) || p.is_nan() {
                return Err(format!("{name} must be between 0 and 1, got {p}"));
            }
        }
        if self.loss >= 1.0 {
            return Err("--loss 1 would lose every message forever".into());
        }
        if self.loss > 0.0 && self.rto == 0 {
            return Err("--rto must be above 0 when messages can be lost".into());
        }
        if self.mix.total() == 0 {
            return Err("the operation mix has no weight at all".into());
        }
        if self.mi_quota == 0 {
            return Err("--mi-quota must be at least 1".into());
        }
        let min_timeout = u64::from(rdbss::resmon::MIN_PENDING_TIMEOUT_MS) * 1000;
        if self.pending_timeout < min_timeout || self.pending_timeout / 1000 > u64::from(u32::MAX) {
            return Err(format!(
                "--pending-timeout must be between {}ms and {}ms",
                rdbss::resmon::MIN_PENDING_TIMEOUT_MS,
                u32::MAX
            ));
        }
        if !self.arm_cancel_routines
            && (self.cancel_rate > 0.0
                || self.timeout.is_some()
                || self.teardown_at.is_some()
                || self.mix.weight(OpKind::ChangeNotify) > 0
                || !self.crashes.is_empty())
        {
            return Err(
                "--no-cancel-routines is the benchmark baseline: it needs --cancel-rate 0, \
                        --timeout 0, no --teardown-at, no --crash and no change_notify in --mix \
                        (without a cancel routine nothing could abort those exchanges)"
                    .into(),
            );
        }
        Ok(())
    }

    /// How many threads the run uses for the simulation itself.
    pub fn shard_count(&self) -> usize {
        match self.mode {
            Mode::Deterministic => 1,
            Mode::Threads => self.threads.min(self.clients),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_forms_parse_and_print() {
        assert_eq!("1ms".parse(), Ok(Latency::Fixed(1000)));
        assert_eq!("0".parse(), Ok(Latency::Fixed(0)));
        assert_eq!("exp:250us".parse(), Ok(Latency::Exp(250)));
        assert_eq!("uniform:1ms..3ms".parse(), Ok(Latency::Uniform(1000, 3000)));
        assert_eq!("normal:1ms,100us".parse(), Ok(Latency::Normal(1000, 100)));
        assert!("uniform:3ms..1ms".parse::<Latency>().is_err());
        assert!("gamma:1ms".parse::<Latency>().is_err());
        assert!("soon".parse::<Latency>().is_err());
        let l: Latency = "uniform:1ms..3ms".parse().unwrap();
        assert_eq!(l.to_string().parse(), Ok(l));
        assert_eq!(l.mean(), 2000);
    }

    #[test]
    fn windows_and_mixes_parse() {
        assert_eq!(
            "200ms+50ms".parse(),
            Ok(Window {
                start: 200_000,
                length: 50_000
            })
        );
        assert!("200ms".parse::<Window>().is_err());
        let mix: OpMix = "read=3,write=1".parse().unwrap();
        assert_eq!(mix.weight(OpKind::Read), 3);
        assert_eq!(mix.weight(OpKind::Close), 0);
        assert!("read=x".parse::<OpMix>().is_err());
        assert!("fly=1".parse::<OpMix>().is_err());
        assert!("read=0".parse::<OpMix>().is_err());
        assert_eq!(OpMix::default().to_string().parse(), Ok(OpMix::default()));
    }

    #[test]
    fn validation_names_the_bad_option() {
        assert_eq!(Config::default().validate(), Ok(()));
        let bad = Config {
            cancel_rate: 1.5,
            ..Config::default()
        };
        assert!(bad.validate().unwrap_err().contains("--cancel-rate"));
        let baseline = Config {
            arm_cancel_routines: false,
            ..Config::default()
        };
        assert!(baseline
            .validate()
            .unwrap_err()
            .contains("--no-cancel-routines"));
        for kind in OpKind::ALL {
            assert_eq!(OpKind::from_index(kind.index()), kind);
        }
    }
}
