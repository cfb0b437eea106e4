//! Shared by the benchmarks: reading back the `estimates.json` files criterion wrote in *this* run,
//! telling whether this invocation measures anything at all, and describing the machine.
//!
//! Included by each benchmark with `mod common;` (a directory module, so cargo does not take it
//! for a benchmark target of its own).
//!
//! The criterion home is found the way criterion 0.8 finds it: `$CRITERION_HOME`, else
//! `$CARGO_TARGET_DIR/criterion`, else `<target directory from cargo metadata>/criterion`, else
//! `./target/criterion`. A file only counts if this run wrote it (its modification time changed
//! since the benchmark started), so stale results from an earlier run are never used.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::SystemTime;

/// The directories criterion 0.8 may write to, in its own order of preference
/// (`default_output_directory` in criterion's `lib.rs`), then fallbacks, without duplicates.
fn criterion_homes() -> Vec<PathBuf> {
    let cwd = std::env::current_dir().unwrap_or_default();
    let mut homes = Vec::new();
    let mut add = |path: PathBuf| {
        let path = cwd.join(path);
        if !homes.contains(&path) {
            homes.push(path);
        }
    };
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        add(PathBuf::from(home));
    }
    if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        add(PathBuf::from(target).join("criterion"));
    }
    if let Some(target) = cargo_metadata_target_dir() {
        add(target.join("criterion"));
    }
    add(PathBuf::from("target/criterion"));
    add(Path::new(env!("CARGO_MANIFEST_DIR")).join("target/criterion"));
    homes
}

/// `target_directory` from `$CARGO metadata`, as criterion asks for it (cargo sets `$CARGO` when it
/// runs a benchmark).
fn cargo_metadata_target_dir() -> Option<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let output = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .output()
        .ok()?;
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).ok()?;
    metadata["target_directory"].as_str().map(PathBuf::from)
}

/// `<home>/<group>/<benchmark>/new/estimates.json`.
fn estimates_file(home: &Path, group: &str, benchmark: &str) -> PathBuf {
    home.join(group)
        .join(benchmark)
        .join("new")
        .join("estimates.json")
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// When each candidate `estimates.json` of one criterion group was last written, taken before
/// anything runs.
pub struct Snapshot {
    group: &'static str,
    benchmarks: &'static [&'static str],
    pub homes: Vec<PathBuf>,
    before: Vec<Vec<Option<SystemTime>>>,
}

impl Snapshot {
    pub fn take(group: &'static str, benchmarks: &'static [&'static str]) -> Snapshot {
        let homes = criterion_homes();
        let before = homes
            .iter()
            .map(|home| {
                benchmarks
                    .iter()
                    .map(|b| modified(&estimates_file(home, group, b)))
                    .collect()
            })
            .collect();
        Snapshot {
            group,
            benchmarks,
            homes,
            before,
        }
    }

    /// The median (ns) and its confidence interval that this run wrote for `benchmark`, and where.
    pub fn fresh_median(&self, benchmark: &str) -> Option<(Median, PathBuf)> {
        let index = self.benchmarks.iter().position(|b| *b == benchmark)?;
        self.homes
            .iter()
            .zip(&self.before)
            .find_map(|(home, before)| {
                let path = estimates_file(home, self.group, benchmark);
                let now = modified(&path)?;
                // Written by this run: it did not exist before, or it has changed since.
                if before[index].is_some_and(|then| now <= then) {
                    return None;
                }
                Some((read_median(&path)?, path))
            })
    }

    /// The candidate homes, comma-separated, for a "nothing found under" message.
    pub fn homes_list(&self) -> String {
        self.homes
            .iter()
            .map(|h| h.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Prints where the estimates behind the ratios came from: the criterion home of `source` (one
/// `estimates.json` this run wrote), or, when there is none, where they were looked for and why
/// a run may write none.
pub fn print_estimates_source(source: Option<&Path>, snapshot: &Snapshot) {
    match source.and_then(home_of) {
        Some(home) => println!("  (estimates read from {})", home.display()),
        None => {
            println!(
                "  no fresh estimates found under: {}",
                snapshot.homes_list()
            );
            println!(
                "  (a filter that skipped benchmarks, --discard-baseline, --load-baseline or \
                 cargo-criterion write none)"
            );
        }
    }
}

/// The criterion home an `estimates.json` path found by [`Snapshot::fresh_median`] lies in
/// (`<home>/<group>/<benchmark>/new/estimates.json`).
pub fn home_of(estimates: &Path) -> Option<&Path> {
    estimates.ancestors().nth(4)
}

/// Criterion's median point estimate of one benchmark, in nanoseconds per iteration.
#[derive(Clone, Copy)]
pub struct Median {
    pub ns: f64,
    pub lower: f64,
    pub upper: f64,
    pub confidence: f64,
}

fn read_median(path: &Path) -> Option<Median> {
    let text = std::fs::read(path).ok()?;
    let estimates: serde_json::Value = serde_json::from_slice(&text).ok()?;
    let median = &estimates["median"];
    let interval = &median["confidence_interval"];
    Some(Median {
        ns: median["point_estimate"].as_f64()?,
        lower: interval["lower_bound"].as_f64().unwrap_or(f64::NAN),
        upper: interval["upper_bound"].as_f64().unwrap_or(f64::NAN),
        confidence: interval["confidence_level"].as_f64().unwrap_or(f64::NAN),
    })
}

fn args() -> Vec<OsString> {
    std::env::args_os().skip(1).collect()
}

/// Why this invocation measures nothing, if criterion's command line says so (criterion decides
/// test mode the same way: `--test`, or no `--bench`, which `cargo test --benches` omits).
pub fn no_measurement_reason() -> Option<&'static str> {
    let args = args();
    let has = |flag: &str| args.iter().any(|a| a == flag);
    if has("--list") {
        Some("--list only lists the benchmarks")
    } else if has("--test") || !has("--bench") {
        Some("criterion's test mode runs each benchmark once and measures nothing")
    } else if args
        .iter()
        .any(|a| a.to_str().is_some_and(|a| a.starts_with("--profile-time")))
    {
        Some("--profile-time iterates without analysis and saves no estimates")
    } else {
        None
    }
}

/// Prints the CPU count and (Linux only) the load average: other load makes the measurements
/// time-slice with whatever else runs.
pub fn print_machine() {
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    match std::fs::read_to_string("/proc/loadavg") {
        Ok(load) => println!(
            "  machine: {cpus} CPU(s), load average (1/5/15 min) {}",
            load.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        ),
        Err(_) => println!("  machine: {cpus} CPU(s)"),
    }
}
