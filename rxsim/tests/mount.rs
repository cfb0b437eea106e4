//! End to end on a real kernel mount: `rxsim`'s share served through the `rxfuse` adapter by the
//! live mini-redirector, read by real processes, interrupted by real signals.
//!
//! The reader is `rxsim probe` (a SIGUSR1 handler without `SA_RESTART`, one line per `read()`).
//! Skips, printing why, only where `/dev/fuse` does not exist; fails where it exists but
//! `fusermount3` is missing. Every mount is undone by an `UnmountGuard`, also when a test fails.
//! The bug-check policy is `Record` and every test asserts no bug check (a double completion
//! would be `MULTIPLE_IRP_COMPLETE_REQUESTS`).

#![cfg(target_os = "linux")]

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdbss::bugcheck::{self, BugCheckPolicy};
use rxfuse::probe::{fuse_available, ProbeChild, ProbeLine};
use rxfuse::{FsOptions, UnmountGuard};
use rxsim::config::{Config, Latency};
use rxsim::mount::{mount, MountSummary, Mounted};

const SLOW: Duration = Duration::from_secs(10);

/// The bug-check count is process-wide: tests that assert on it take turns.
static SERIAL: Mutex<()> = Mutex::new(());

/// A mounted share. Dropped (a failing test), it unmounts first and then stops the runtime with
/// a timeout: a root mount reads `/dev/fuse` on a blocking thread, which only returns once the
/// file system is unmounted, so the other order would hang instead of failing.
struct Fixture {
    runtime: Option<tokio::runtime::Runtime>,
    mounted: Option<Mounted>,
    dir: PathBuf,
    bug_checks_before: usize,
    guard: Option<UnmountGuard>,
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        drop(self.guard.take());
        drop(self.mounted.take());
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

impl Fixture {
    /// Mounts the share with a 10 s `slow` file and a fast network; `None` (after saying why)
    /// where the machine has no `/dev/fuse`.
    fn new(name: &str) -> Option<Fixture> {
        match fuse_available() {
            Ok(true) => {}
            Ok(false) => {
                eprintln!("SKIPPED: /dev/fuse does not exist on this machine; no real mount");
                return None;
            }
            Err(e) => panic!("FUSE is half set up: {e}"),
        }
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        bugcheck::set_policy(BugCheckPolicy::Record);
        let bug_checks_before = bugcheck::count();
        let dir = std::env::temp_dir().join(format!("rxsim-mount-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let guard = UnmountGuard::new(&dir);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let config = Config {
            latency: Latency::Fixed(50),
            jitter: 0,
            service: Latency::Fixed(0),
            loss: 0.0,
            ..Config::default()
        };
        let slow = [("slow".to_string(), SLOW)];
        let mounted = runtime
            .block_on(mount(&config, &slow, &dir, FsOptions::default()))
            .unwrap_or_else(|e| panic!("mount: {e}"));
        Some(Fixture {
            runtime: Some(runtime),
            mounted: Some(mounted),
            dir,
            bug_checks_before,
            guard: Some(guard),
            _serial: serial,
        })
    }

    fn mounted(&self) -> &Mounted {
        self.mounted.as_ref().expect("still mounted")
    }

    fn probe(&self, file: &str, count: u64) -> ProbeChild {
        let path = self.dir.join(file);
        ProbeChild::spawn(
            Path::new(env!("CARGO_BIN_EXE_rxsim")),
            [
                "probe".as_ref(),
                path.as_os_str(),
                "--count".as_ref(),
                count.to_string().as_ref(),
            ],
        )
        .expect("spawn rxsim probe")
    }

    /// Waits until `n` reads of the slow file are open at the server.
    fn wait_reads_at_server(&self, n: usize) {
        let live = self.mounted().live();
        wait_until(
            &format!("{n} reads at the server"),
            Duration::from_secs(10),
            || live.server().open_exchanges() >= n,
        );
    }

    /// Unmounts (cancelling whatever is in flight) and checks the instance drained and no bug
    /// check happened.
    fn unmount(mut self) -> MountSummary {
        let mounted = self.mounted.take().expect("mounted once");
        let runtime = self.runtime.as_ref().expect("running");
        let summary = runtime.block_on(mounted.unmount()).expect("unmount");
        assert_eq!(
            summary.contexts_left, 0,
            "instance did not drain: {summary}"
        );
        assert_eq!(
            bugcheck::count(),
            self.bug_checks_before,
            "bug checks: {:?}",
            bugcheck::recent()
        );
        summary
    }
}

fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_micros(200));
    }
}

#[test]
fn sigusr1_on_a_10s_read_returns_eintr_at_once_and_the_server_aborts_the_exchange() {
    let Some(fixture) = Fixture::new("sigusr1") else {
        return;
    };
    let reader = fixture.probe("slow", 1);
    assert_eq!(
        reader.next_line(Duration::from_secs(10)),
        Some(ProbeLine::Ready)
    );
    fixture.wait_reads_at_server(1);
    let sent = Instant::now();
    reader.signal(libc::SIGUSR1).unwrap();
    let line = reader.next_line(Duration::from_secs(5));
    let took = sent.elapsed();
    assert!(matches!(line, Some(ProbeLine::Eintr(_))), "{line:?}");
    assert!(took < Duration::from_secs(1), "EINTR after {took:?}");

    let live = fixture.mounted().live();
    wait_until("the CANCEL at the server", Duration::from_secs(5), || {
        live.server().stats().cancelled == 1 && live.server().credits_in_use() == 0
    });
    assert_eq!(live.server().open_exchanges(), 0);
    assert_eq!(live.stats().cancelled, 1);
    assert_eq!(fixture.mounted().adapter().stats().replied_eintr, 1);
    let summary = fixture.unmount();
    assert_eq!(summary.server.cancelled, 1);
    assert_eq!(summary.credits_in_use, 0);
}

#[test]
fn sigkill_of_a_blocked_reader_ends_it_promptly_not_after_the_latency() {
    let Some(fixture) = Fixture::new("sigkill") else {
        return;
    };
    let mut reader = fixture.probe("slow", 1);
    assert_eq!(
        reader.next_line(Duration::from_secs(10)),
        Some(ProbeLine::Ready)
    );
    fixture.wait_reads_at_server(1);
    let sent = Instant::now();
    reader.signal(libc::SIGKILL).unwrap();
    let status = reader.wait_exit(Duration::from_secs(5)).unwrap();
    let took = sent.elapsed();
    assert!(status.is_some(), "the killed reader is still there");
    assert!(took < Duration::from_secs(2), "gone only after {took:?}");
    let live = fixture.mounted().live();
    wait_until("the CANCEL at the server", Duration::from_secs(5), || {
        live.server().stats().cancelled == 1 && live.server().credits_in_use() == 0
    });
    fixture.unmount();
}

/// Signals at random moments of a stream of fast reads: some land between reads, some interrupt
/// a read, and now and then one crosses its read's reply (the daemon finds the request already
/// answered and answers `EAGAIN`, which the kernel drops; how many is printed). Every read either
/// returns its data or `EINTR`; nothing completes twice; nothing is left over. The crossing case
/// on its own is `interrupt_for_an_answered_request_changes_nothing` below.
#[test]
fn signals_at_random_moments_of_fast_reads_give_data_or_eintr_never_both() {
    let Some(fixture) = Fixture::new("late") else {
        return;
    };
    const READS: u64 = 2_000;
    let expected = fixture.mounted().live().server().file("d0/f0").unwrap();
    let want = expected.len().min(4096) as u64;
    let reader = fixture.probe("d0/f0", READS);
    assert_eq!(
        reader.next_line(Duration::from_secs(10)),
        Some(ProbeLine::Ready)
    );
    let pid = reader.pid();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let signaller = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = rxfuse::probe::send_signal(pid, libc::SIGUSR1);
                std::thread::sleep(Duration::from_micros(1_500));
            }
        })
    };
    let (mut ok, mut eintr) = (0, 0);
    for i in 0..READS {
        match reader.next_line(Duration::from_secs(10)) {
            Some(ProbeLine::Ok(n, _)) => {
                assert_eq!(n, want, "a short read");
                ok += 1;
            }
            Some(ProbeLine::Eintr(_)) => eintr += 1,
            other => panic!("read {i}: {other:?}"),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    signaller.join().unwrap();
    assert_eq!(ok + eintr, READS);
    assert!(ok > 0 && eintr > 0, "{ok} ok, {eintr} EINTR");
    drop(reader);
    let summary = fixture.unmount();
    assert_eq!(
        summary.live.completed(),
        summary.live.dispatched,
        "every dispatched request completed exactly once: {summary}"
    );
    assert_eq!(
        summary.adapter_eintr,
        summary.live.cancelled + summary.live.refused_at_arm
    );
    // Every EINTR a read saw came from a cancelled request (a signal may also catch the reader's
    // final close, and the unmount cancels whatever is still in flight).
    assert!(summary.adapter_eintr >= eintr, "{summary}");
    eprintln!(
        "{READS} reads: {ok} ok, {eintr} EINTR; {} interrupts, {} answered EAGAIN",
        summary.interrupts, summary.interrupts_eagain
    );
}

#[test]
fn many_readers_interrupted_at_once_all_get_eintr_and_the_instance_drains() {
    let Some(fixture) = Fixture::new("many") else {
        return;
    };
    const READERS: usize = 16;
    let readers: Vec<ProbeChild> = (0..READERS).map(|_| fixture.probe("slow", 1)).collect();
    for reader in &readers {
        assert_eq!(
            reader.next_line(Duration::from_secs(10)),
            Some(ProbeLine::Ready)
        );
    }
    fixture.wait_reads_at_server(READERS);
    let sent = Instant::now();
    for reader in &readers {
        reader.signal(libc::SIGUSR1).unwrap();
    }
    for (i, reader) in readers.iter().enumerate() {
        let line = reader.next_line(Duration::from_secs(5));
        assert!(
            matches!(line, Some(ProbeLine::Eintr(_))),
            "reader {i}: {line:?}"
        );
    }
    assert!(
        sent.elapsed() < Duration::from_secs(2),
        "{:?}",
        sent.elapsed()
    );
    let live = fixture.mounted().live();
    wait_until("every CANCEL at the server", Duration::from_secs(5), || {
        live.server().stats().cancelled == READERS as u64 && live.server().credits_in_use() == 0
    });
    let stats = live.stats();
    assert_eq!(stats.cancelled, READERS as u64, "{stats:?}");
    drop(readers);
    let summary = fixture.unmount();
    // The readers' EINTRs, plus whatever the unmount cancelled (their closes, say).
    assert!(summary.adapter_eintr >= READERS as u64, "{summary}");
    // Exiting readers still close their files; after the unmount everything has completed.
    assert_eq!(
        summary.live.completed(),
        summary.live.dispatched,
        "{summary}"
    );
}

#[test]
fn cp_ls_cat_rm_through_the_mount_give_the_right_data() {
    let Some(fixture) = Fixture::new("files") else {
        return;
    };
    let dir = fixture.dir.clone();
    let scratch = std::env::temp_dir().join(format!("rxsim-scratch-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let data: Vec<u8> = (0..1_000_003u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(scratch.join("in"), &data).unwrap();

    let run = |args: &[&std::ffi::OsStr]| {
        let out = std::process::Command::new(args[0])
            .args(&args[1..])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    // cp in, cp out.
    run(&[
        "cp".as_ref(),
        scratch.join("in").as_os_str(),
        dir.join("d1/copy").as_os_str(),
    ]);
    let live = fixture.mounted().live();
    assert_eq!(live.server().file("d1/copy").as_deref(), Some(&data[..]));
    run(&[
        "cp".as_ref(),
        dir.join("d1/copy").as_os_str(),
        scratch.join("out").as_os_str(),
    ]);
    assert_eq!(std::fs::read(scratch.join("out")).unwrap(), data);
    // Overwrite (O_TRUNC) with something shorter.
    std::fs::write(dir.join("d1/copy"), b"short").unwrap();
    assert_eq!(std::fs::read(dir.join("d1/copy")).unwrap(), b"short");
    // ls.
    let root = String::from_utf8(run(&["ls".as_ref(), dir.as_os_str()])).unwrap();
    for d in ["d0", "d1", "d2", "d3", "slow"] {
        assert!(
            root.lines().any(|l| l == d),
            "ls of the root lacks {d}: {root}"
        );
    }
    let d1 = String::from_utf8(run(&[
        "ls".as_ref(),
        "-l".as_ref(),
        dir.join("d1").as_os_str(),
    ]))
    .unwrap();
    assert!(d1.contains("copy") && d1.contains("f0"), "{d1}");
    // cat of a share file.
    let f3 = run(&["cat".as_ref(), dir.join("d2/f3").as_os_str()]);
    assert_eq!(Some(f3), live.server().file("d2/f3"));
    // rm.
    run(&["rm".as_ref(), dir.join("d1/copy").as_os_str()]);
    assert!(live.server().file("d1/copy").is_none());
    assert!(!dir.join("d1/copy").exists());
    std::fs::remove_dir_all(&scratch).ok();
    let summary = fixture.unmount();
    assert_eq!(summary.adapter_eintr, 0);
    assert_eq!(summary.live.cancelled, 0);
}

/// The adapter's own handling of a `FUSE_INTERRUPT` for a request it has already answered (the
/// interrupt and the reply crossed): no mount needed, the adapter is driven directly. The
/// interrupt is answered `EAGAIN` after the retry delay (the kernel drops that answer for an
/// answered request) and nothing changes: no cancel, no CANCEL to the server, table empty.
#[test]
fn interrupt_for_an_answered_request_changes_nothing() {
    use fuse3::raw::{Filesystem, Request};
    use rxfuse::{FsOp, RxFs};
    use std::sync::Arc;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let live = rxsim::Live::new(&Config::default(), &[]).unwrap();
        let fs = RxFs::new(Arc::new(live.clone()), FsOptions::default(), 0, 0);
        let read = FsOp::Read {
            path: "d0/f0".into(),
            offset: 0,
            len: 100,
        };
        let completion = fs.call(2, read).await.unwrap();
        assert!(completion.status.is_success(), "{completion:?}");
        assert_eq!(completion.data, live.server().file("d0/f0").unwrap()[..100]);

        let before = (live.stats(), live.server().stats());
        let started = Instant::now();
        let answer = fs
            .interrupt(
                Request {
                    unique: 3,
                    ..Request::default()
                },
                2,
            )
            .await;
        assert_eq!(answer.map_err(i32::from), Err(-libc::EAGAIN));
        assert!(started.elapsed() >= FsOptions::default().interrupt_retry_delay);
        assert_eq!((live.stats(), live.server().stats()), before);
        let handle = fs.handle();
        assert!(handle.table().is_empty());
        assert_eq!(handle.stats().interrupts_answered_eagain, 1);
        assert_eq!(handle.stats().replied_eintr, 0);
        // And an interrupt with the interrupt bit set in the target id is refused, never ENOSYS.
        let invalid = fs.interrupt(Request::default(), 5).await;
        assert_eq!(invalid.map_err(i32::from), Err(-libc::EINVAL));
        live.shutdown(Duration::from_secs(5)).await.unwrap();
    });
}

/// Waits until `dir` is (or is no longer) a mount point.
fn wait_mounted(dir: &Path, mounted: bool) {
    wait_until(
        if mounted { "the mount" } else { "the unmount" },
        Duration::from_secs(10),
        || rxfuse::mount::is_mounted(dir) == mounted,
    );
}

/// The command itself: `rxsim mount DIR` in its own process, a reader blocked on the slow file,
/// then SIGINT (as Ctrl-C in its terminal would send) and SIGTERM: the blocked reader gets
/// `EINTR`, the share is unmounted, the summary says the instance drained, the exit code is 0.
#[test]
fn rxsim_mount_command_unmounts_cleanly_on_sigint_and_sigterm() {
    match fuse_available() {
        Ok(true) => {}
        Ok(false) => {
            eprintln!("SKIPPED: /dev/fuse does not exist on this machine; no real mount");
            return;
        }
        Err(e) => panic!("FUSE is half set up: {e}"),
    }
    for (name, signal) in [("sigint", libc::SIGINT), ("sigterm", libc::SIGTERM)] {
        let dir = std::env::temp_dir().join(format!("rxsim-cli-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let _guard = UnmountGuard::new(&dir);
        let mut daemon = std::process::Command::new(env!("CARGO_BIN_EXE_rxsim"))
            .args(["mount".as_ref(), dir.as_os_str()])
            .args([
                "--slow-file",
                "slow=10s",
                "--latency",
                "0",
                "--service",
                "0",
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        wait_mounted(&dir, true);
        let reader = ProbeChild::spawn(
            Path::new(env!("CARGO_BIN_EXE_rxsim")),
            ["probe".as_ref(), dir.join("slow").as_os_str()],
        )
        .unwrap();
        assert_eq!(
            reader.next_line(Duration::from_secs(10)),
            Some(ProbeLine::Ready)
        );
        // Give the read time to reach the daemon (it is in another process here).
        std::thread::sleep(Duration::from_millis(200));
        rxfuse::probe::send_signal(daemon.id(), signal).unwrap();
        let line = reader.next_line(Duration::from_secs(5));
        assert!(
            matches!(line, Some(ProbeLine::Eintr(_))),
            "{name}: {line:?}"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = daemon.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "{name}: rxsim mount did not exit"
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        let out = daemon.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(status.success(), "{name}: {status}: {stdout}");
        assert!(
            stdout.contains("instance drained: 0 contexts left"),
            "{name}: {stdout}"
        );
        assert!(stdout.contains("1 aborted by CANCEL"), "{name}: {stdout}");
        wait_mounted(&dir, false);
    }
}

#[test]
fn rxsim_mount_refuses_a_bad_mount_point_with_exit_code_2_and_a_message() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rxsim"))
        .args(["mount", env!("CARGO_MANIFEST_DIR")])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    // Where /dev/fuse is missing that is what the message names; otherwise the directory.
    assert!(
        stderr.contains("not empty") || stderr.contains("/dev/fuse"),
        "{stderr}"
    );
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_rxsim"))
        .args(["mount", "/tmp", "--slow-file", "no-duration"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("PATH=DURATION"));
}
