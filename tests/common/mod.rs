//! Helpers shared by the integration tests. Each test binary uses a subset of them.
//!
//! The bug-check policy, the counter and the ring of recent bug checks are process-wide, and the
//! tests of one file run on parallel threads, so a test that switches the policy holds
//! [`exclusive`]'s guard for its whole run.
//!
//! [`model_harness`] runs the model-based property tests (`tests/model*.rs`).

#![allow(dead_code)]

use std::any::Any;
use std::sync::{Mutex, MutexGuard};

use rdbss::bugcheck::{self, BugCheckPolicy};

pub mod model_harness;

/// Serialises the tests of one test binary: they share the process-wide bug-check state.
static LOCK: Mutex<()> = Mutex::new(());

/// Holds [`LOCK`]; on drop (also when the test fails) restores the `Panic` policy and clears.
pub struct Exclusive {
    _lock: MutexGuard<'static, ()>,
}

impl Drop for Exclusive {
    fn drop(&mut self) {
        bugcheck::set_policy(BugCheckPolicy::Panic);
        bugcheck::clear();
        // `_lock` is released after this body: the next test finds the defaults.
    }
}

/// Takes the lock (surviving a poisoned one), clears the bug-check state and sets `policy`.
pub fn exclusive(policy: BugCheckPolicy) -> Exclusive {
    let lock = LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    bugcheck::clear();
    bugcheck::set_policy(policy);
    Exclusive { _lock: lock }
}

/// The text of a panic payload (`panic!` with format arguments gives a `String`).
pub fn panic_text(payload: Box<dyn Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(text) => *text,
        Err(payload) => match payload.downcast::<&'static str>() {
            Ok(text) => (*text).to_owned(),
            Err(_) => String::from("<non-string panic payload>"),
        },
    }
}
