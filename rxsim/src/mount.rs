//! `rxsim mount DIR`: the simulated share mounted through FUSE, with the live mini-redirector
//! ([`crate::live`]) behind the `rxfuse` adapter, so a `FUSE_INTERRUPT` (Ctrl-C on a blocked
//! reader) cancels the in-flight exchange through the core and the server sees the CANCEL.
//!
//! Each FUSE operation becomes one request of the live mini-redirector:
//!
//! | FUSE | adapter ([`FsOp`]) | server ([`Op`]) |
//! |---|---|---|
//! | lookup, getattr | `Stat` | `QueryInfo` (a directory answers `STATUS_FILE_IS_A_DIRECTORY`) |
//! | open, create | `Open` | `Create` (opens, creating if missing; the file id is the handle) |
//! | read | `Read` | `Read` (cancellable at the server) |
//! | write | `Write` | `Write` |
//! | readdir, readdirplus | `ReadDir` | `DirEnum` |
//! | unlink | `Unlink` | `Delete` |
//! | setattr (size), open with `O_TRUNC` | `Truncate` | `Truncate` |
//! | release | `Release` | `Close` |
//!
//! Invariants:
//! 1. The live mini-redirector keeps the adapter's [`rxfuse::backend`] invariants: `prepare`
//!    sends nothing, `dispatch` arms `live_cancel` before the exchange goes out, and its future
//!    resolves exactly once, at completion.
//! 2. [`Mounted::unmount`] cancels everything in flight before it unmounts (so no reader keeps
//!    the mount busy), and reports whether the instance drained to zero contexts.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fuse3::raw::MountHandle;
use rdbss::{ContextRef, NtStatus};
use rxfuse::{AdapterHandle, AdapterStats, Backend, Completion, Dispatched, FsOp, FsOptions, RxFs};
use serde::Serialize;

use crate::config::Config;
use crate::live::{Live, LiveRequest, LiveStats};
use crate::server::{Op, ServerStats};

/// How long an unmount waits for the instance to drain.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The server operation for an adapter operation (the module's table).
pub fn server_op(op: FsOp) -> Op {
    match op {
        FsOp::Stat { path } => Op::QueryInfo { path },
        // The server's create opens an existing file too.
        FsOp::Open { path, .. } => Op::Create { path },
        FsOp::Read { path, offset, len } => Op::Read { path, offset, len },
        FsOp::Write { path, offset, data } => Op::Write { path, offset, data },
        FsOp::ReadDir { path } => Op::DirEnum { dir: path },
        FsOp::Unlink { path } => Op::Delete { path },
        FsOp::Truncate { path, size } => Op::Truncate { path, size },
        FsOp::Release { handle } => Op::Close { fid: handle },
    }
}

impl Backend for Live {
    type Minirdr = LiveRequest;

    fn prepare(&self, op: FsOp) -> Result<ContextRef<LiveRequest>, NtStatus> {
        Live::prepare(self, server_op(op))
    }

    fn dispatch(&self, context: &ContextRef<LiveRequest>) -> Dispatched {
        let reply = Live::dispatch(self, context);
        Box::pin(async move {
            let reply = reply.await;
            Completion {
                status: reply.status,
                data: reply.data,
                info: reply.info,
            }
        })
    }
}

/// What a mount did, reported when it ends.
#[derive(Clone, Debug, Serialize)]
pub struct MountSummary {
    /// The live mini-redirector's counts.
    pub live: LiveStats,
    /// The server's counts.
    pub server: ServerStats,
    /// Requests sent by the adapter.
    pub adapter_requests: u64,
    /// Requests answered `EINTR`.
    pub adapter_eintr: u64,
    /// `FUSE_INTERRUPT`s received.
    pub interrupts: u64,
    /// Interrupts answered `EAGAIN`.
    pub interrupts_eagain: u64,
    /// Contexts still alive after the drain timeout (0: drained).
    pub contexts_left: usize,
    /// Credits still held at the server.
    pub credits_in_use: u64,
}

impl std::fmt::Display for MountSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "requests: {} through FUSE ({} answered EINTR); FUSE_INTERRUPTs: {} ({} answered EAGAIN)",
            self.adapter_requests, self.adapter_eintr, self.interrupts, self.interrupts_eagain
        )?;
        writeln!(
            f,
            "mini-redirector: {} dispatched, {} ok, {} failed, {} cancelled, {} refused at arm, {} disconnected",
            self.live.dispatched,
            self.live.completed_ok,
            self.live.completed_error,
            self.live.cancelled,
            self.live.refused_at_arm,
            self.live.disconnected
        )?;
        writeln!(
            f,
            "server: {} exchanges, {} aborted by CANCEL, {} credits in use at the end",
            self.server.exchanges, self.server.cancelled, self.credits_in_use
        )?;
        if self.contexts_left == 0 {
            writeln!(f, "instance drained: 0 contexts left")
        } else {
            writeln!(
                f,
                "instance NOT drained: {} contexts left",
                self.contexts_left
            )
        }
    }
}

/// A mounted share. Unmount it with [`Mounted::unmount`] or serve it until a signal with
/// [`Mounted::serve_until_signal`].
pub struct Mounted {
    live: Live,
    adapter: AdapterHandle<LiveRequest>,
    dir: PathBuf,
    handle: MountHandle,
}

/// Mounts the share on `dir` (an empty directory), on the current tokio runtime.
pub async fn mount(
    config: &Config,
    slow_files: &[(String, Duration)],
    dir: &Path,
    options: FsOptions,
) -> Result<Mounted, String> {
    let live = Live::new(config, slow_files)?;
    let fs = RxFs::new(
        Arc::new(live.clone()),
        options,
        rxfuse::mount::current_uid(),
        rxfuse::mount::current_gid(),
    );
    let adapter = fs.handle();
    let handle = rxfuse::mount(fs, dir, "rxsim")
        .await
        .map_err(|e| e.to_string())?;
    Ok(Mounted {
        live,
        adapter,
        dir: dir.to_path_buf(),
        handle,
    })
}

fn summary(
    live: &Live,
    adapter: &AdapterHandle<LiveRequest>,
    contexts_left: usize,
) -> MountSummary {
    let AdapterStats {
        requests,
        replied_eintr,
        interrupts,
        interrupts_answered_eagain,
        ..
    } = adapter.stats();
    MountSummary {
        live: live.stats(),
        server: live.server().stats(),
        adapter_requests: requests,
        adapter_eintr: replied_eintr,
        interrupts,
        interrupts_eagain: interrupts_answered_eagain,
        contexts_left,
        credits_in_use: live.server().credits_in_use(),
    }
}

impl Mounted {
    /// The live mini-redirector (its server, stats and instance).
    pub fn live(&self) -> &Live {
        &self.live
    }

    /// The adapter's interrupt table and counts.
    pub fn adapter(&self) -> &AdapterHandle<LiveRequest> {
        &self.adapter
    }

    /// Where it is mounted.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Cancels everything in flight, unmounts, and waits for the instance to drain (invariant 2).
    pub async fn unmount(self) -> Result<MountSummary, String> {
        let drained = self.live.shutdown(DRAIN_TIMEOUT).await;
        let summary = summary(&self.live, &self.adapter, drained.err().unwrap_or(0));
        let Mounted { handle, dir, .. } = self;
        if let Err(e) = handle.unmount().await {
            rxfuse::mount::lazy_unmount(&dir)
                .map_err(|lazy| format!("unmount failed ({e}); lazy unmount too ({lazy})"))?;
        }
        Ok(summary)
    }

    /// Serves until SIGINT or SIGTERM (then cancels everything in flight and unmounts), or until
    /// someone unmounts it from outside.
    pub async fn serve_until_signal(self) -> Result<MountSummary, String> {
        let Mounted {
            live,
            adapter,
            dir,
            handle,
        } = self;
        let shutdown_live = live.clone();
        rxfuse::serve_until_signal(handle, &dir, move || async move {
            // Cancels everything in flight (readers get EINTR); the drain is checked below.
            let _ = shutdown_live.shutdown(DRAIN_TIMEOUT).await;
        })
        .await
        .map_err(|e| e.to_string())?;
        // Unmounted from outside: nothing was cancelled yet.
        let contexts_left = live.shutdown(DRAIN_TIMEOUT).await.err().unwrap_or(0);
        Ok(summary(&live, &adapter, contexts_left))
    }
}
