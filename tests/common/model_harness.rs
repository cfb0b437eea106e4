//! The machinery of the model-based property tests (`tests/model.rs`, `tests/model_interrupt.rs`,
//! `tests/model_mi.rs`, `tests/model_resmon.rs`). Each of them keeps its own model, operations,
//! strategy, harness, `simpler` and `MUST_SEE` list; this module runs them:
//!
//! - [`check_property`], the body of each file's main `#[test]`: `RDBSS_MODEL_CASES` ([`cases`])
//!   random sequences under `BugCheckPolicy::Record` ([`record_policy`]), no
//!   `proptest-regressions/` files; a failing sequence is shrunk by proptest, then further by
//!   `minimize`, and the test panics with the reason and the `numbered` sequence; then the
//!   [`Tally`] of outcomes is printed (shown with `--nocapture`) and, when at least the file's
//!   default number of cases ran, every entry of its `MUST_SEE` must have been reached;
//! - [`check_sequence`], the body of each file's hand-written `#[test]`: one fixed sequence,
//!   also under `Record`;
//! - [`run_sequence`], the body of each file's `run_case`: one sequence through its harness,
//!   step by step, checked after every step, then torn down;
//! - [`ensure_eq!`] and [`label`], used by the harnesses' steps and checks.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt::Debug;

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};
use rdbss::bugcheck::{self, BugCheckPolicy};

use super::{exclusive, Exclusive};

/// How often each outcome was seen, over all cases.
pub type Tally = RefCell<BTreeMap<String, usize>>;

/// Counts one more `outcome` in `tally`.
pub fn count(tally: &Tally, outcome: String) {
    *tally.borrow_mut().entry(outcome).or_default() += 1;
}

/// The `Record` policy for the guard's life, holding the lock of [`exclusive`] (the bug-check
/// policy and counter are process-wide); on drop (also on failure) restores `Panic` and clears.
pub fn record_policy() -> Exclusive {
    exclusive(BugCheckPolicy::Record)
}

/// `RDBSS_MODEL_CASES` (`_` separators allowed), or `default_cases` when it is not set.
pub fn cases(default_cases: u32) -> u32 {
    match std::env::var("RDBSS_MODEL_CASES") {
        Ok(n) => n
            .trim()
            .replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("RDBSS_MODEL_CASES={n:?} is not a number")),
        Err(_) => default_cases,
    }
}

/// Runs `ops` on a harness made by `new` (after clearing the bug-check state): `step` runs an
/// operation on the implementation and the model and says what it saw, for the tally (`None`:
/// skipped, tallied as `skipped: Name`), then `check` compares them; on a mismatch, says at which
/// step and shows `model` (printed with `{:#?}`). At the end `finish` releases everything and
/// runs the final checks.
pub fn run_sequence<Op: Debug, H>(
    ops: &[Op],
    tally: &Tally,
    new: impl FnOnce() -> H,
    step: impl Fn(&mut H, &Op) -> Result<Option<String>, String>,
    check: impl Fn(&mut H) -> Result<(), String>,
    model: impl Fn(&H) -> &dyn Debug,
    finish: impl FnOnce(H) -> Result<(), String>,
) -> Result<(), TestCaseError> {
    bugcheck::clear();
    let mut harness = new();
    for (n, op) in ops.iter().enumerate() {
        let result = step(&mut harness, op).and_then(|seen| {
            check(&mut harness)?;
            Ok(seen)
        });
        match result {
            Ok(seen) => {
                let seen = seen.unwrap_or_else(|| {
                    let name = format!("{op:?}");
                    let name = name.split([' ', '{']).next().unwrap_or_default();
                    format!("skipped: {name}")
                });
                count(tally, seen);
            }
            Err(why) => {
                return Err(TestCaseError::fail(format!(
                    "step {n} {op:?}: {why}\nmodel after the step: {:#?}",
                    model(&harness)
                )))
            }
        }
    }
    finish(harness).map_err(|why| TestCaseError::fail(format!("teardown: {why}")))
}

/// The main property of a model test, under [`record_policy`]: [`cases`]`(default_cases)`
/// sequences from `sequences`, each run by `run_case`. A failure is shrunk by proptest and then
/// by `minimize` (with `simpler`), and panics with the reason and the `numbered` sequence.
/// Prints the tally, and when at least `default_cases` ran, asserts that every outcome of
/// `must_see` was reached, so the generator cannot silently stop exercising a path.
pub fn check_property<Op: Clone + Debug>(
    sequences: impl Strategy<Value = Vec<Op>>,
    run_case: impl Fn(&[Op], &Tally) -> Result<(), TestCaseError>,
    simpler: impl Fn(&Op) -> Vec<Op>,
    default_cases: u32,
    must_see: &[&str],
) {
    let _record = record_policy();
    let mut runner = TestRunner::new(Config {
        cases: cases(default_cases),
        // No `proptest-regressions/` files: a failure prints its minimal sequence instead.
        failure_persistence: None,
        ..Config::default()
    });
    let tally = Tally::default();
    match runner.run(&sequences, |ops| run_case(&ops, &tally)) {
        Ok(()) => {}
        Err(TestError::Fail(why, ops)) => {
            let fails = |ops: &[Op]| fails(&run_case, ops);
            let (ops, why) = minimize(ops, why.to_string(), fails, simpler);
            panic!("{why}\n\nminimal failing sequence:\n{}", numbered(&ops))
        }
        Err(TestError::Abort(why)) => panic!("aborted: {why}"),
    }
    let tally = tally.into_inner();
    // Shown with `--nocapture`.
    for (outcome, n) in &tally {
        eprintln!("{n:>9}  {outcome}");
    }
    if runner.config().cases >= default_cases {
        let missing: Vec<_> = must_see
            .iter()
            .filter(|outcome| !tally.contains_key(**outcome))
            .collect();
        assert!(missing.is_empty(), "outcomes never reached: {missing:#?}");
    }
}

/// A fixed, hand-written sequence, under [`record_policy`]: panics with the reason and the
/// `numbered` sequence if `run_case` fails.
pub fn check_sequence<Op: Debug>(
    ops: &[Op],
    run_case: impl Fn(&[Op], &Tally) -> Result<(), TestCaseError>,
) {
    let _record = record_policy();
    if let Err(e) = run_case(ops, &Tally::default()) {
        panic!("{e}\n\nsequence:\n{}", numbered(ops));
    }
}

/// `run_case`, with a panic counted as a failure.
fn fails<Op>(
    run_case: &impl Fn(&[Op], &Tally) -> Result<(), TestCaseError>,
    ops: &[Op],
) -> Option<String> {
    let tally = Tally::default();
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_case(ops, &tally))) {
        Ok(Ok(())) => None,
        Ok(Err(why)) => Some(why.to_string()),
        Err(panic) => Some(
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".to_string()),
        ),
    }
}

/// Shrinks a failing sequence further than proptest does, until nothing changes: removes
/// operations one at a time, then tries `simpler` versions of each, keeping a change while
/// `fails` still gives a reason. proptest removes elements before it shrinks them, so its
/// minimum can keep operations that only mattered for a handle index it shrank afterwards.
fn minimize<Op: Clone>(
    mut ops: Vec<Op>,
    mut why: String,
    fails: impl Fn(&[Op]) -> Option<String>,
    simpler: impl Fn(&Op) -> Vec<Op>,
) -> (Vec<Op>, String) {
    loop {
        let mut changed = false;
        let mut i = ops.len();
        while i > 0 {
            i -= 1;
            let mut shorter = ops.clone();
            shorter.remove(i);
            if let Some(still) = fails(&shorter) {
                (ops, why, changed) = (shorter, still, true);
                i = ops.len();
            }
        }
        for i in 0..ops.len() {
            for candidate in simpler(&ops[i]) {
                let mut tried = ops.clone();
                tried[i] = candidate;
                if let Some(still) = fails(&tried) {
                    (ops, why, changed) = (tried, still, true);
                    break;
                }
            }
        }
        if !changed {
            return (ops, why);
        }
    }
}

/// One operation a line, numbered from 0.
fn numbered<Op: Debug>(ops: &[Op]) -> String {
    ops.iter()
        .enumerate()
        .map(|(n, op)| format!("  {n:2}: {op:?}\n"))
        .collect()
}

/// `what: result` for the coverage tally, without the hex codes of statuses.
pub fn label(what: &str, result: &impl Debug) -> String {
    let text = format!("{result:?}");
    let mut out = format!("{what}: ");
    let mut rest = text.as_str();
    while let Some(at) = rest.find("(0x") {
        out.push_str(&rest[..at]);
        rest = rest[at..].find(')').map_or("", |end| &rest[at + end + 1..]);
    }
    out.push_str(rest);
    out
}

/// `Err` with both sides unless `actual == expected`.
// Unused in the test binaries other than the model tests, like the rest of `common`.
#[allow(unused_macros)]
macro_rules! ensure_eq {
    ($actual:expr, $expected:expr, $($what:tt)+) => {{
        let (actual, expected) = (&$actual, &$expected);
        if actual != expected {
            return Err(format!(
                "{}: implementation {:?}, model {:?}",
                format_args!($($what)+),
                actual,
                expected
            ));
        }
    }};
}
#[allow(unused_imports)]
pub(crate) use ensure_eq;
