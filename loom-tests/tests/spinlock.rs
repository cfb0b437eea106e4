//! `KSpinLock` under loom: mutual exclusion, IRQL raise/restore on every path, owner tracking.
//!
//! Without `--cfg loom` this file compiles to nothing.
#![cfg(loom)]

use loom::sync::Arc;
use loom::thread;

use rdbss::irql::{self, Irql};
use rdbss::KSpinLock;

/// Two processors increment under the lock; no update is lost, each sees DISPATCH while holding
/// the lock and its own level afterwards, and neither is recorded as the owner after release.
#[test]
fn two_processors_exclude_each_other() {
    loom::model(|| {
        let lock = Arc::new(KSpinLock::new(0_u32));
        let other = {
            let lock = lock.clone();
            thread::spawn(move || {
                let _apc = irql::raise(Irql::APC);
                {
                    let mut g = lock.lock();
                    assert_eq!(irql::current(), Irql::DISPATCH);
                    assert_eq!(g.saved_irql(), Irql::APC);
                    assert!(lock.is_held_by_current_processor());
                    *g += 1;
                }
                assert_eq!(irql::current(), Irql::APC);
                assert!(!lock.is_held_by_current_processor());
            })
        };
        {
            let mut g = lock.lock();
            assert_eq!(irql::current(), Irql::DISPATCH);
            *g += 1;
        }
        assert_eq!(irql::current(), Irql::PASSIVE);
        other.join().unwrap();
        assert_eq!(*lock.lock(), 2);
        assert_eq!(irql::current(), Irql::PASSIVE);
    });
}

/// `try_lock` either gets the lock (and raises) or fails (and leaves the IRQL as it was).
#[test]
fn try_lock_restores_irql_on_failure() {
    loom::model(|| {
        let lock = Arc::new(KSpinLock::new(()));
        let holder = {
            let lock = lock.clone();
            thread::spawn(move || {
                let _g = lock.lock();
                thread::yield_now();
            })
        };
        match lock.try_lock() {
            Some(g) => {
                assert_eq!(irql::current(), Irql::DISPATCH);
                drop(g);
            }
            None => {}
        }
        assert_eq!(irql::current(), Irql::PASSIVE);
        holder.join().unwrap();
    });
}
