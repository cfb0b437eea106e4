//! The `rxsim` command line: `rxsim run` simulates a network mini-redirector on the rdbss core and
//! checks its invariants. Exit codes: 0 every invariant held, 1 an invariant failed, 2 bad
//! arguments (or a report file that cannot be written).

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rxsim::config::{parse_micros, Bug, Config, Latency, Mode, OpMix, Window};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// A simulated network mini-redirector on the rdbss cancellation core.
#[derive(Parser)]
#[command(name = "rxsim", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a simulation and check its invariants (the defaults finish in seconds).
    Run(RunArgs),
    /// Mount the simulated share on DIR through FUSE; Ctrl-C on a blocked reader interrupts its
    /// request (the server sees the CANCEL). SIGINT or SIGTERM to rxsim unmounts.
    #[cfg(target_os = "linux")]
    Mount(MountArgs),
    /// A reader with a SIGUSR1 handler, for interrupt tests and benchmarks (prints one line per
    /// read: `eintr T`, `ok N T` or `err ERRNO T`).
    #[cfg(target_os = "linux")]
    #[command(hide = true)]
    Probe(ProbeArgs),
}

#[cfg(target_os = "linux")]
#[derive(Args)]
struct MountArgs {
    /// An empty directory to mount on.
    dir: PathBuf,
    /// A file whose reads and writes take this long at the server, PATH=DURATION (repeatable),
    /// e.g. slow=10s; created empty if the share lacks it.
    #[arg(long = "slow-file", value_parser = parse_slow_file)]
    slow_files: Vec<(String, Duration)>,
    /// How long an interrupt whose request has not arrived waits before it is answered EAGAIN.
    #[arg(long, default_value = "5ms", value_parser = parse_micros)]
    interrupt_retry: u64,
    /// Print the summary as JSON on exit.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    net: NetArgs,
}

#[cfg(target_os = "linux")]
#[derive(Args)]
struct ProbeArgs {
    /// The file to read.
    file: PathBuf,
    /// How many reads.
    #[arg(long, default_value_t = 1)]
    count: u64,
    /// Bytes per read.
    #[arg(long, default_value_t = 4096)]
    len: usize,
}

fn parse_slow_file(text: &str) -> Result<(String, Duration), String> {
    let (path, duration) = text
        .split_once('=')
        .ok_or_else(|| format!("`{text}`: expected PATH=DURATION, e.g. slow=10s"))?;
    let micros = parse_micros(duration)?;
    Ok((
        path.trim_start_matches('/').to_string(),
        Duration::from_micros(micros),
    ))
}

/// The network and server options `run` and `mount` share.
#[derive(Args)]
struct NetArgs {
    /// Seed for every random choice; the same seed in deterministic mode gives the same report.
    #[arg(long, default_value_t = Config::default().seed)]
    seed: u64,
    /// One-way network latency: D, uniform:A..B, exp:MEAN or normal:MEAN,SD (e.g. exp:400us).
    #[arg(long, default_value_t = Config::default().latency, value_parser = parse_latency)]
    latency: Latency,
    /// Extra uniform jitter per message, 0..=D.
    #[arg(long, default_value = "100us", value_parser = parse_micros)]
    jitter: u64,
    /// Server time per exchange (same forms as --latency).
    #[arg(long, default_value_t = Config::default().service, value_parser = parse_latency)]
    service: Latency,
    /// Probability that a message is lost and retransmitted.
    #[arg(long, default_value_t = Config::default().loss)]
    loss: f64,
    /// Retransmission timeout.
    #[arg(long, default_value = "5ms", value_parser = parse_micros)]
    rto: u64,
    /// A network partition START+LENGTH (repeatable), e.g. 100ms+20ms.
    #[arg(long = "partition", value_parser = parse_window)]
    partitions: Vec<Window>,
    /// A server crash START+DOWNTIME (repeatable), e.g. 300ms+50ms.
    #[arg(long = "crash", value_parser = parse_window)]
    crashes: Vec<Window>,
    /// Credits (concurrent exchanges) per client at the server.
    #[arg(long, default_value_t = Config::default().credits)]
    credits: u32,
}

#[derive(Args)]
struct RunArgs {
    /// deterministic: one thread, virtual time. threads: real threads, wall-clock time.
    #[arg(long, value_enum, default_value_t = Mode::Deterministic)]
    mode: Mode,
    /// Simulation threads in threads mode.
    #[arg(long, default_value_t = Config::default().threads)]
    threads: usize,
    /// Simulated clients (sessions).
    #[arg(long, default_value_t = Config::default().clients)]
    clients: usize,
    /// Requests over the whole run.
    #[arg(long, default_value_t = Config::default().requests)]
    requests: u64,
    /// Requests each client keeps outstanding.
    #[arg(long, default_value_t = Config::default().depth)]
    depth: usize,
    /// Probability that a request is cancelled by the user at a random time.
    #[arg(long, default_value_t = Config::default().cancel_rate)]
    cancel_rate: f64,
    /// Per-request timeout (0: none); change-notify never times out.
    #[arg(long, default_value = "5ms", value_parser = parse_micros)]
    timeout: u64,
    #[command(flatten)]
    net: NetArgs,
    /// Operation mix, e.g. read=30,write=20,query_info=12,create=8,close=8,dir_enum=8,change_notify=4,pipe_transact=10,method_call=4.
    #[arg(long, default_value_t = OpMix::default(), value_parser = parse_mix)]
    mix: OpMix,
    /// Never arm cancel routines (the benchmark baseline; needs --cancel-rate 0 --timeout 0 and no change_notify).
    #[arg(long)]
    no_cancel_routines: bool,
    /// Tear the session down at this time, cancelling everything in flight.
    #[arg(long, value_parser = parse_micros)]
    teardown_at: Option<u64>,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// No progress bar and no summary on stdout (the exit code and --json still tell).
    #[arg(long)]
    quiet: bool,
    /// Run a deliberately broken variant, to see the checker catch it (for testing).
    #[arg(long, value_enum, hide = true)]
    inject_bug: Option<Bug>,
    /// The MI session's quota of running operations (dir_enum and method_call requests).
    #[arg(long, default_value_t = Config::default().mi_quota)]
    mi_quota: usize,
    /// How long bringing a client's connection (a cluster resource) Online takes (same forms as --latency).
    #[arg(long, default_value_t = Config::default().connect_latency, value_parser = parse_latency)]
    connect_latency: Latency,
    /// PendingTimeout of the connection resources (at least 10ms, whole milliseconds).
    #[arg(long, default_value = "180s", value_parser = parse_micros)]
    pending_timeout: u64,
}

fn parse_latency(text: &str) -> Result<Latency, String> {
    text.parse()
}
fn parse_window(text: &str) -> Result<Window, String> {
    text.parse()
}
fn parse_mix(text: &str) -> Result<OpMix, String> {
    text.parse()
}

impl RunArgs {
    fn config(&self) -> Config {
        Config {
            seed: self.net.seed,
            mode: self.mode,
            threads: self.threads,
            clients: self.clients,
            requests: self.requests,
            depth: self.depth,
            cancel_rate: self.cancel_rate,
            latency: self.net.latency,
            jitter: self.net.jitter,
            service: self.net.service,
            timeout: (self.timeout > 0).then_some(self.timeout),
            loss: self.net.loss,
            rto: self.net.rto,
            partitions: self.net.partitions.clone(),
            crashes: self.net.crashes.clone(),
            credits: self.net.credits,
            mix: self.mix.clone(),
            arm_cancel_routines: !self.no_cancel_routines,
            teardown_at: self.teardown_at,
            bug: self.inject_bug,
            mi_quota: self.mi_quota,
            connect_latency: self.connect_latency,
            pending_timeout: self.pending_timeout,
            ..Config::default()
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(&args),
        #[cfg(target_os = "linux")]
        Command::Mount(args) => mount(&args),
        #[cfg(target_os = "linux")]
        Command::Probe(args) => match rxfuse::probe::run(&args.file, args.count, args.len) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("rxsim probe: {}: {e}", args.file.display());
                ExitCode::FAILURE
            }
        },
    }
}

#[cfg(target_os = "linux")]
fn mount(args: &MountArgs) -> ExitCode {
    let config = Config {
        seed: args.net.seed,
        latency: args.net.latency,
        jitter: args.net.jitter,
        service: args.net.service,
        loss: args.net.loss,
        rto: args.net.rto,
        partitions: args.net.partitions.clone(),
        crashes: args.net.crashes.clone(),
        credits: args.net.credits,
        mode: Mode::Threads,
        ..Config::default()
    };
    let options = rxfuse::FsOptions {
        interrupt_retry_delay: Duration::from_micros(args.interrupt_retry.max(1)),
        ..rxfuse::FsOptions::default()
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("rxsim: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = runtime.block_on(async {
        let mounted = match rxsim::mount::mount(&config, &args.slow_files, &args.dir, options).await
        {
            Ok(mounted) => mounted,
            Err(message) => {
                eprintln!("rxsim: {message}");
                return ExitCode::from(2);
            }
        };
        eprintln!(
            "rxsim: the simulated share is mounted on {}; SIGINT (Ctrl-C) or SIGTERM unmounts",
            args.dir.display()
        );
        match mounted.serve_until_signal().await {
            Ok(summary) => {
                if args.json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&summary).unwrap_or_default()
                    );
                } else {
                    print!("{summary}");
                }
                if summary.contexts_left == 0 {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                }
            }
            Err(message) => {
                eprintln!("rxsim: {message}");
                ExitCode::from(1)
            }
        }
    });
    // A root mount reads /dev/fuse on a blocking thread that returns only once the kernel drops
    // the connection; after a lazy unmount of a busy mount that may be much later. Do not wait.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

fn run(args: &RunArgs) -> ExitCode {
    let config = args.config();
    if let Err(message) = config.validate() {
        eprintln!("rxsim: {message}");
        return ExitCode::from(2);
    }
    // The bar appears only on runs longer than a second, on a terminal.
    let bar = ProgressBar::with_draw_target(Some(config.requests), ProgressDrawTarget::hidden());
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} requests ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let started = Instant::now();
    let shown = AtomicBool::new(false);
    let progress = |completed: u64, _total: u64| {
        if args.quiet {
            return;
        }
        if !shown.load(Ordering::Relaxed) && started.elapsed() > Duration::from_secs(1) {
            shown.store(true, Ordering::Relaxed);
            bar.set_draw_target(ProgressDrawTarget::stderr());
        }
        bar.set_position(completed);
    };
    let outcome = match rxsim::run(&config, &progress) {
        Ok(outcome) => outcome,
        Err(message) => {
            eprintln!("rxsim: {message}");
            return ExitCode::from(2);
        }
    };
    bar.finish_and_clear();
    if !args.quiet {
        print!("{}", outcome.report);
        eprintln!("(wall-clock time {:.2} s)", outcome.wall.as_secs_f64());
    }
    if let Some(path) = &args.json {
        let written = serde_json::to_string_pretty(&outcome.report)
            .map_err(|e| e.to_string())
            .and_then(|json| std::fs::write(path, json + "\n").map_err(|e| e.to_string()));
        if let Err(e) = written {
            eprintln!(
                "rxsim: cannot write the JSON report to {}: {e}",
                path.display()
            );
            return ExitCode::from(2);
        }
    }
    if outcome.passed() {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "rxsim: {} invariant violation(s); seed {}",
            outcome.report.violations_total, config.seed
        );
        ExitCode::from(1)
    }
}
