//! The cancel-routine protocol at work: a mini-redirector exchange races a user cancel.
//!
//! For each request, an "exchange" thread arms a cancel routine, does some work, then disarms it
//! and completes the request only if disarming succeeds; meanwhile the "user" cancels the request
//! at a random moment. Whoever wins, the request must be completed exactly once and the cancel
//! routine must run at most once. The example tallies who won and checks both rules.
//!
//! ```text
//! cargo run --example protocol            # 20000 requests
//! cargo run --example protocol -- 500     # 500 requests
//! ```

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;

use rdbss::irql::{self, Irql};
use rdbss::{
    bugcheck, BugCheckPolicy, CancelOutcome, Cancelled, MajorFunction, NtStatus, RxContext,
};

/// The mini-redirector's per-request state.
#[derive(Default)]
struct Exchange {
    /// How many times the request was completed (must end at exactly 1).
    completions: AtomicU32,
    /// How many times the cancel routine ran (must end at 0 or 1).
    routine_calls: AtomicU32,
}

/// The minirdr cancel routine: abort the exchange and complete the request as cancelled.
fn abort_exchange(ctx: &RxContext<Exchange>) -> NtStatus {
    assert!(irql::current() < Irql::DISPATCH, "routine ran at DISPATCH");
    let ex = ctx.minirdr();
    ex.routine_calls.fetch_add(1, Ordering::SeqCst);
    ctx.set_stored_status(NtStatus::CANCELLED);
    ex.completions.fetch_add(1, Ordering::SeqCst);
    NtStatus::SUCCESS
}

#[derive(Default)]
struct Tally {
    cancelled_before_arming: AtomicUsize,
    cancel_won: AtomicUsize,
    completion_won: AtomicUsize,
}

fn main() -> ExitCode {
    let requests: usize = match std::env::args().nth(1).map(|a| a.parse()) {
        None => 20_000,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            eprintln!("usage: protocol [REQUESTS>0]");
            return ExitCode::from(2);
        }
    };
    // A simulator wants a report, not a crash: record IRQL violations instead of panicking.
    bugcheck::set_policy(BugCheckPolicy::Record);

    let tally = Tally::default();
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut broken = 0;
    for serial in 0..requests {
        // xorshift: how long the exchange "works" and how long the user waits before cancelling.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let (work, wait) = ((seed & 0x3ff) as u32, ((seed >> 16) & 0x3ff) as u32);

        let ctx = Arc::new(RxContext::new(MajorFunction::READ, Exchange::default()));
        // A spin handshake, so both sides are running when the race starts.
        let (ready, go) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let exchange = {
            let (ctx, ready, go) = (ctx.clone(), ready.clone(), go.clone());
            thread::spawn(move || {
                ready.store(true, Ordering::Release);
                while !go.load(Ordering::Acquire) {
                    std::hint::spin_loop();
                }
                if let Err(Cancelled) = ctx.set_minirdr_cancel_routine(Some(abort_exchange)) {
                    // The cancel came first and found nothing to call: we complete it as cancelled.
                    ctx.set_stored_status(NtStatus::CANCELLED);
                    ctx.minirdr().completions.fetch_add(1, Ordering::SeqCst);
                    return 0;
                }
                spin(work); // the network exchange
                match ctx.set_minirdr_cancel_routine(None) {
                    Ok(()) => {
                        ctx.set_stored_status(NtStatus::SUCCESS);
                        ctx.minirdr().completions.fetch_add(1, Ordering::SeqCst);
                        2
                    }
                    Err(Cancelled) => 1, // the routine completes it
                }
            })
        };
        while !ready.load(Ordering::Acquire) {
            std::hint::spin_loop();
        }
        go.store(true, Ordering::Release);
        spin(wait);
        let outcome = ctx.cancel();
        let who = exchange.join().expect("exchange thread panicked");
        match who {
            0 => &tally.cancelled_before_arming,
            1 => &tally.cancel_won,
            _ => &tally.completion_won,
        }
        .fetch_add(1, Ordering::Relaxed);

        let ex = ctx.minirdr();
        let (completions, calls) = (
            ex.completions.load(Ordering::SeqCst),
            ex.routine_calls.load(Ordering::SeqCst),
        );
        let expected_calls = u32::from(matches!(outcome, CancelOutcome::RoutineCalled(_)));
        if completions != 1 || calls != expected_calls {
            broken += 1;
            eprintln!(
                "request {serial}: completed {completions} times, routine ran {calls} times, \
                 cancel said {outcome:?}"
            );
        }
    }

    let violations = bugcheck::count();
    println!("requests:                      {requests}");
    println!(
        "cancelled before arming:       {}",
        tally.cancelled_before_arming.load(Ordering::Relaxed)
    );
    println!(
        "cancel won (routine ran):      {}",
        tally.cancel_won.load(Ordering::Relaxed)
    );
    println!(
        "completion won (disarm ok):    {}",
        tally.completion_won.load(Ordering::Relaxed)
    );
    println!("requests not completed once:  {broken}");
    println!("IRQL / bug-check violations:   {violations}");
    if broken == 0 && violations == 0 {
        println!("invariants: hold");
        ExitCode::SUCCESS
    } else {
        println!("invariants: BROKEN");
        ExitCode::FAILURE
    }
}

fn spin(iterations: u32) {
    for _ in 0..iterations {
        std::hint::spin_loop();
    }
}
