//! The adapter on its own, on a real kernel mount, over a minimal in-memory backend (the
//! simulator's mini-redirector is tested the same way in `rxsim/tests/mount.rs`).
//!
//! The backend keeps files in a map; a read of `slow` takes 10 s unless cancelled. Its cancel
//! routine completes the request with `STATUS_CANCELLED` at once, as a mini-redirector's must.
//!
//! Skips (printing why) only where `/dev/fuse` does not exist. Every mount is undone by an
//! `UnmountGuard`, also when a test fails.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdbss::{ContextInit, ContextRef, NtStatus, Rdbss, RxContext};
use rxfuse::probe::{fuse_available, ProbeChild, ProbeLine};
use rxfuse::{Backend, Completion, Dispatched, FsOp, FsOptions, RxFs, UnmountGuard};
use tokio::sync::oneshot;

const SLOW: Duration = Duration::from_secs(10);

struct Req {
    op: FsOp,
    done: Mutex<Option<oneshot::Sender<Completion>>>,
    waiter: Mutex<Option<oneshot::Receiver<Completion>>>,
    cancels: Arc<AtomicU64>,
}

struct Mem {
    rdbss: Rdbss<Req>,
    files: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
    cancels: Arc<AtomicU64>,
}

fn finish(ctx: &RxContext<Req>, completion: Completion) {
    if ctx.complete_request(completion.status, 0).is_ok() {
        if let Some(done) = ctx.minirdr().done.lock().unwrap().take() {
            let _ = done.send(completion);
        }
    }
}

fn cancel_routine(ctx: &RxContext<Req>) -> NtStatus {
    ctx.minirdr().cancels.fetch_add(1, Ordering::SeqCst);
    finish(ctx, Completion::status(NtStatus::CANCELLED));
    NtStatus::SUCCESS
}

fn apply(files: &Mutex<BTreeMap<String, Vec<u8>>>, op: &FsOp) -> Completion {
    let mut files = files.lock().unwrap();
    let ok = |data: Vec<u8>, info: u64| Completion {
        status: NtStatus::SUCCESS,
        data,
        info,
    };
    let missing = Completion::status(NtStatus::OBJECT_NAME_NOT_FOUND);
    match op {
        FsOp::Stat { path } if path.is_empty() => {
            Completion::status(rxfuse::STATUS_FILE_IS_A_DIRECTORY)
        }
        FsOp::Stat { path } => files
            .get(path)
            .map_or(missing, |f| ok(Vec::new(), f.len() as u64)),
        FsOp::Open { path, create } => {
            if *create {
                files.entry(path.clone()).or_default();
            }
            if files.contains_key(path) {
                ok(Vec::new(), 1)
            } else {
                missing
            }
        }
        FsOp::Read { path, offset, len } => match files.get(path) {
            None => missing,
            Some(f) => {
                let start = (*offset as usize).min(f.len());
                let end = (start + *len as usize).min(f.len());
                ok(f[start..end].to_vec(), (end - start) as u64)
            }
        },
        FsOp::Write { path, offset, data } => match files.get_mut(path) {
            None => missing,
            Some(f) => {
                let end = *offset as usize + data.len();
                if f.len() < end {
                    f.resize(end, 0);
                }
                f[*offset as usize..end].copy_from_slice(data);
                ok(Vec::new(), data.len() as u64)
            }
        },
        FsOp::ReadDir { .. } => {
            let listing: String = files.keys().map(|k| format!("{k}\n")).collect();
            ok(listing.into_bytes(), 0)
        }
        FsOp::Unlink { path } => files.remove(path).map_or(missing, |_| ok(Vec::new(), 0)),
        FsOp::Truncate { path, size } => match files.get_mut(path) {
            None => missing,
            Some(f) => {
                f.resize(*size as usize, 0);
                ok(Vec::new(), 0)
            }
        },
        FsOp::Release { .. } => ok(Vec::new(), 0),
    }
}

impl Backend for Mem {
    type Minirdr = Req;

    fn prepare(&self, op: FsOp) -> Result<ContextRef<Req>, NtStatus> {
        let (done, waiter) = oneshot::channel();
        let req = Req {
            op,
            done: Mutex::new(Some(done)),
            waiter: Mutex::new(Some(waiter)),
            cancels: self.cancels.clone(),
        };
        self.rdbss
            .create_context(ContextInit::default(), req)
            .map_err(|(status, _)| status)
    }

    fn dispatch(&self, ctx: &ContextRef<Req>) -> Dispatched {
        let waiter = ctx.minirdr().waiter.lock().unwrap().take();
        if ctx
            .set_minirdr_cancel_routine(Some(cancel_routine))
            .is_err()
        {
            finish(ctx, Completion::status(NtStatus::CANCELLED));
        } else {
            let (ctx, files) = (ctx.reference(), self.files.clone());
            tokio::spawn(async move {
                if matches!(&ctx.minirdr().op, FsOp::Read { path, .. } if path == "slow") {
                    tokio::time::sleep(SLOW).await;
                }
                let completion = apply(&files, &ctx.minirdr().op);
                if ctx.set_minirdr_cancel_routine(None).is_ok() {
                    finish(&ctx, completion);
                }
            });
        }
        Box::pin(async move {
            match waiter {
                Some(waiter) => waiter
                    .await
                    .unwrap_or(Completion::status(NtStatus::UNSUCCESSFUL)),
                None => Completion::status(NtStatus::INVALID_PARAMETER),
            }
        })
    }
}

fn mount_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rxfuse-{name}-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// A mounted in-memory backend. On drop it unmounts first, then stops the runtime with a
/// timeout: a root mount reads `/dev/fuse` on a blocking thread, which only returns once the
/// file system is unmounted, so the other order would hang.
struct Mounted {
    runtime: Option<tokio::runtime::Runtime>,
    mem: Arc<Mem>,
    handle: rxfuse::AdapterHandle<Req>,
    dir: PathBuf,
    guard: Option<UnmountGuard>,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        drop(self.guard.take());
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

/// Mounts a fresh in-memory backend on a runtime of its own; `None` (after saying why) where the
/// machine has no `/dev/fuse`.
fn mount(name: &str) -> Option<Mounted> {
    match fuse_available() {
        Ok(true) => {}
        Ok(false) => {
            eprintln!("SKIPPED: /dev/fuse does not exist on this machine; no real mount possible");
            return None;
        }
        Err(e) => panic!("FUSE is half set up: {e}"),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let files = Arc::new(Mutex::new(BTreeMap::from([
        ("slow".to_string(), b"never seen".to_vec()),
        ("hello".to_string(), b"hello, world\n".to_vec()),
    ])));
    let mem = Arc::new(Mem {
        rdbss: Rdbss::new(),
        files,
        cancels: Arc::default(),
    });
    let dir = mount_dir(name);
    let fs = RxFs::new(mem.clone(), FsOptions::default(), 0, 0);
    let handle = fs.handle();
    let guard = UnmountGuard::new(&dir);
    let mount = runtime
        .block_on(rxfuse::mount(fs, &dir, "rxfuse-test"))
        .unwrap_or_else(|e| panic!("mount: {e}"));
    // The session runs on the runtime; dropping the handle would unmount.
    std::mem::forget(mount);
    Some(Mounted {
        runtime: Some(runtime),
        mem,
        handle,
        dir,
        guard: Some(guard),
    })
}

fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn probe(path: &Path) -> ProbeChild {
    ProbeChild::spawn(
        Path::new(env!("CARGO_BIN_EXE_rxfuse-probe")),
        [path.as_os_str(), "1".as_ref(), "4096".as_ref()],
    )
    .expect("spawn the probe")
}

#[test]
fn sigusr1_interrupts_a_slow_read_with_eintr_and_files_work() {
    let Some(mounted) = mount("basic") else {
        return;
    };
    let Mounted {
        mem, handle, dir, ..
    } = &mounted;
    // Plain file operations through the adapter.
    assert_eq!(std::fs::read(dir.join("hello")).unwrap(), b"hello, world\n");
    std::fs::write(dir.join("new"), b"fresh data").unwrap();
    assert_eq!(std::fs::read(dir.join("new")).unwrap(), b"fresh data");
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["hello", "new", "slow"]);
    std::fs::remove_file(dir.join("new")).unwrap();
    assert!(!dir.join("new").exists());

    // The interrupt.
    let child = probe(&dir.join("slow"));
    assert_eq!(
        child.next_line(Duration::from_secs(5)),
        Some(ProbeLine::Ready)
    );
    wait_until("the read in flight", Duration::from_secs(5), || {
        handle.table().in_flight() == 1
    });
    let started = Instant::now();
    child.signal(libc::SIGUSR1).unwrap();
    let line = child.next_line(Duration::from_secs(5));
    assert!(matches!(line, Some(ProbeLine::Eintr(_))), "{line:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(mem.cancels.load(Ordering::SeqCst), 1);
    let stats = handle.stats();
    assert_eq!(stats.replied_eintr, 1);
    assert!(stats.interrupts >= 1);
    wait_until("the table to empty", Duration::from_secs(5), || {
        handle.table().is_empty()
    });
}
