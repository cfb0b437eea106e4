//! The simulated file server: a share held in memory, SMB-like exchanges keyed by (client,
//! message id), per-client credits, and a CANCEL message that aborts an exchange.
//!
//! Invariants:
//! 1. A running exchange holds exactly one credit of its client, from the moment the server
//!    accepts it until it finishes, is aborted by CANCEL, or the server crashes. So with no
//!    exchange open, no credit is in use.
//! 2. Every accepted exchange gets exactly one reply (its result, or STATUS_CANCELLED when CANCEL
//!    aborted it), unless a crash drops it; a crash drops every exchange and every credit, and
//!    starts a new connection epoch, so nothing from before the crash is answered after it.
//! 3. CANCEL aborts only exchanges whose kind is cancellable at the server
//!    ([`OpKind::cancellable_at_server`]); for the others, and for exchanges the server does not
//!    know (already finished, or overtaken on the network), it changes nothing.
//! 4. All state is behind one mutex; no method calls out while holding it.
//! 5. Directories are implied by files: `d` is a directory when it is the root `""` or some file
//!    is named `d/...`. There are no empty directories; deleting a directory's last file removes
//!    the directory.
//! 6. No request panics the server, whatever its path, offset or size: a file never grows beyond
//!    [`MAX_FILE_SIZE`] (`STATUS_INVALID_PARAMETER`), and reads clamp to the file.

use crate::config::OpKind;
use rdbss::NtStatus;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard};

/// `STATUS_FILE_IS_A_DIRECTORY` (0xC00000BA): a file operation named a directory. The core has
/// no constant for it, so it prints as `0xC00000BA`.
pub const STATUS_FILE_IS_A_DIRECTORY: NtStatus = NtStatus::from_code(0xC000_00BA);

/// The largest size a file may reach by a write or a truncate (invariant 6): 4 GiB.
pub const MAX_FILE_SIZE: u64 = 1 << 32;

/// What a request asks the server to do.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Op {
    /// Open `path`, creating it if missing; the reply's `info` is the file id.
    Create {
        /// The file.
        path: String,
    },
    /// Read `len` bytes at `offset`.
    Read {
        /// The file.
        path: String,
        /// Where.
        offset: u64,
        /// How much.
        len: u32,
    },
    /// Write `data` at `offset`.
    Write {
        /// The file.
        path: String,
        /// Where.
        offset: u64,
        /// What.
        data: Vec<u8>,
    },
    /// The file's size (`info`); [`STATUS_FILE_IS_A_DIRECTORY`] for a directory (invariant 5).
    QueryInfo {
        /// The file.
        path: String,
    },
    /// The directory's entries, one name per line, in name order: each file directly in it, and
    /// each immediate subdirectory once, with a trailing `/`. The root is `""`.
    DirEnum {
        /// The directory.
        dir: String,
    },
    /// Completes when something in `dir` changes.
    ChangeNotify {
        /// The directory watched.
        dir: String,
    },
    /// A pipe message; the reply echoes it.
    PipeTransact {
        /// The message.
        data: Vec<u8>,
    },
    /// Closes a file id from `Create`.
    Close {
        /// The file id.
        fid: u64,
    },
    /// Removes a file (`STATUS_OBJECT_NAME_NOT_FOUND` if missing); changes its directory. Open
    /// file ids stay valid for `Close`. Its kind is [`OpKind::Write`]: not cancellable at the
    /// server, and counted with writes in reports.
    Delete {
        /// The file.
        path: String,
    },
    /// Sets a file's length, cutting it or zero-filling it; changes its directory. Its kind is
    /// [`OpKind::Write`], like [`Op::Delete`].
    Truncate {
        /// The file.
        path: String,
        /// The new length.
        size: u64,
    },
}

impl Op {
    /// Which kind of operation this is.
    pub fn kind(&self) -> OpKind {
        match self {
            Op::Create { .. } => OpKind::Create,
            Op::Read { .. } => OpKind::Read,
            // Delete and truncate change the share like a write and, like it, run to completion
            // once the server has them; no kind of their own keeps the reports unchanged.
            Op::Write { .. } | Op::Delete { .. } | Op::Truncate { .. } => OpKind::Write,
            Op::QueryInfo { .. } => OpKind::QueryInfo,
            Op::DirEnum { .. } => OpKind::DirEnum,
            Op::ChangeNotify { .. } => OpKind::ChangeNotify,
            Op::PipeTransact { .. } => OpKind::PipeTransact,
            Op::Close { .. } => OpKind::Close,
        }
    }
}

/// A request as it arrives at the server.
#[derive(Clone, Debug)]
pub struct Request {
    /// The sending client.
    pub client: u32,
    /// The client's message id for this exchange.
    pub msg: u64,
    /// The connection epoch it was sent on (invariant 2).
    pub epoch: u32,
    /// What to do.
    pub op: Op,
}

/// A reply to one exchange.
#[derive(Clone, Debug)]
pub struct Reply {
    /// The client it goes to.
    pub client: u32,
    /// The exchange's message id.
    pub msg: u64,
    /// The connection epoch.
    pub epoch: u32,
    /// The result.
    pub status: NtStatus,
    /// Data returned (read, directory listing, pipe echo).
    pub data: Vec<u8>,
    /// A number returned (file id, file size).
    pub info: u64,
}

/// What the server did with an arriving request.
#[derive(Debug)]
pub enum Received {
    /// Accepted; it holds a credit. `finishes` is false for change-notify, which waits for a
    /// change (or a CANCEL) instead of finishing after its service time.
    Started {
        /// Whether to schedule [`Server::finish`] after the service time.
        finishes: bool,
    },
    /// Refused at once (no credit left).
    Rejected(Reply),
    /// Sent on a dead connection or to a crashed server: dropped.
    Dropped,
}

/// What the server counted.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug, Serialize)]
pub struct ServerStats {
    /// Exchanges accepted.
    pub exchanges: u64,
    /// Exchanges that ran to their end and replied with their result.
    pub finished: u64,
    /// Exchanges aborted by CANCEL (replied STATUS_CANCELLED, credit returned).
    pub cancelled: u64,
    /// CANCELs for an exchange that cannot be cancelled at the server (it ran to completion).
    pub cancel_not_cancellable: u64,
    /// CANCELs for an exchange the server did not know: already finished, or the CANCEL overtook
    /// its request on the network.
    pub cancel_unknown: u64,
    /// Requests refused for lack of credits.
    pub rejected_no_credit: u64,
    /// Messages dropped because they belong to a connection the server no longer has.
    pub dropped_stale: u64,
    /// Change-notify exchanges completed by a change.
    pub notifies_fired: u64,
    /// Server crashes.
    pub crashes: u64,
    /// The most credits one client held at once.
    pub max_credits_in_use: u32,
}

struct File {
    data: Vec<u8>,
}

struct Exchange {
    kind: OpKind,
    op: Op,
}

struct State {
    up: bool,
    epoch: u32,
    files: BTreeMap<String, File>,
    opens: HashMap<u64, String>,
    next_fid: u64,
    exchanges: HashMap<(u32, u64), Exchange>,
    credits: Vec<u32>,
    stats: ServerStats,
}

/// The server. Shared by every thread of a run.
pub struct Server {
    state: Mutex<State>,
    credit_limit: u32,
    keeps_quota_on_cancel: bool,
}

/// Where a path's directory is.
fn parent(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(dir, _)| dir)
}

/// What the names of the files in directory `dir` start with: `dir/`, or nothing for the root.
fn dir_prefix(dir: &str) -> String {
    if dir.is_empty() {
        String::new()
    } else {
        format!("{dir}/")
    }
}

impl Server {
    /// A server for `clients` clients with `credit_limit` credits each, whose share holds
    /// `dirs` directories of `files_per_dir` files of `file_size` bytes.
    ///
    /// `keeps_quota_on_cancel` is the [`crate::config::Bug::ServerKeepsQuota`] variant.
    pub fn new(
        clients: usize,
        credit_limit: u32,
        share: &[(String, Vec<u8>)],
        keeps_quota_on_cancel: bool,
    ) -> Self {
        let files = share
            .iter()
            .map(|(path, data)| (path.clone(), File { data: data.clone() }))
            .collect();
        Server {
            state: Mutex::new(State {
                up: true,
                epoch: 1,
                files,
                opens: HashMap::new(),
                next_fid: 1,
                exchanges: HashMap::new(),
                credits: vec![0; clients],
                stats: ServerStats::default(),
            }),
            credit_limit,
            keeps_quota_on_cancel,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent-enough state for a report.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current connection epoch (clients reconnect to it).
    pub fn epoch(&self) -> u32 {
        self.state().epoch
    }

    /// A request arrives.
    pub fn receive(&self, request: Request) -> Received {
        let mut state = self.state();
        if !state.up || request.epoch != state.epoch {
            state.stats.dropped_stale += 1;
            return Received::Dropped;
        }
        let client = request.client as usize;
        if state.credits[client] >= self.credit_limit {
            state.stats.rejected_no_credit += 1;
            return Received::Rejected(Reply {
                client: request.client,
                msg: request.msg,
                epoch: request.epoch,
                status: NtStatus::QUOTA_EXCEEDED,
                data: Vec::new(),
                info: 0,
            });
        }
        // Invariant 1: the credit is taken with the exchange.
        state.credits[client] += 1;
        state.stats.max_credits_in_use = state.stats.max_credits_in_use.max(state.credits[client]);
        state.stats.exchanges += 1;
        let kind = request.op.kind();
        state.exchanges.insert(
            (request.client, request.msg),
            Exchange {
                kind,
                op: request.op,
            },
        );
        Received::Started {
            finishes: kind != OpKind::ChangeNotify,
        }
    }

    /// An exchange's service time is over: run it and reply, plus the change-notifies its
    /// change fires. Nothing if the exchange was aborted or lost in a crash meanwhile.
    pub fn finish(&self, client: u32, msg: u64, epoch: u32) -> Vec<Reply> {
        let mut state = self.state();
        if epoch != state.epoch {
            return Vec::new();
        }
        let Some(exchange) = state.exchanges.remove(&(client, msg)) else {
            return Vec::new();
        };
        state.credits[client as usize] -= 1;
        state.stats.finished += 1;
        let (status, data, info, changed) = state.apply(exchange.op);
        let mut replies = vec![Reply {
            client,
            msg,
            epoch,
            status,
            data,
            info,
        }];
        if let Some(dir) = changed {
            state.fire_notifies(&dir, epoch, &mut replies);
        }
        replies
    }

    /// A CANCEL arrives for `(client, msg)` (invariant 3). The reply is STATUS_CANCELLED for
    /// the aborted exchange, if it was aborted.
    pub fn cancel(&self, client: u32, msg: u64, epoch: u32) -> Option<Reply> {
        let mut state = self.state();
        if !state.up || epoch != state.epoch {
            state.stats.dropped_stale += 1;
            return None;
        }
        let kind = match state.exchanges.get(&(client, msg)) {
            None => {
                state.stats.cancel_unknown += 1;
                return None;
            }
            Some(exchange) => exchange.kind,
        };
        if !kind.cancellable_at_server() {
            state.stats.cancel_not_cancellable += 1;
            return None;
        }
        state.exchanges.remove(&(client, msg));
        if !self.keeps_quota_on_cancel {
            state.credits[client as usize] -= 1;
        }
        state.stats.cancelled += 1;
        Some(Reply {
            client,
            msg,
            epoch,
            status: NtStatus::CANCELLED,
            data: Vec::new(),
            info: 0,
        })
    }

    /// The server crashes: every exchange, credit and open file id is gone, and the connection
    /// epoch moves on (invariant 2). The files themselves survive.
    pub fn crash(&self) {
        let mut state = self.state();
        state.up = false;
        state.epoch += 1;
        state.exchanges.clear();
        state.opens.clear();
        state.credits.iter_mut().for_each(|c| *c = 0);
        state.stats.crashes += 1;
    }

    /// The server is back; clients reconnect to [`Server::epoch`].
    pub fn restart(&self) {
        self.state().up = true;
    }

    /// Credits in use, over every client.
    pub fn credits_in_use(&self) -> u64 {
        self.state().credits.iter().map(|&c| u64::from(c)).sum()
    }

    /// Exchanges still open.
    pub fn open_exchanges(&self) -> usize {
        self.state().exchanges.len()
    }

    /// The exchanges still open, as (client, message id, kind, epoch), in order.
    pub fn open_exchange_list(&self) -> Vec<(u32, u64, OpKind, u32)> {
        let state = self.state();
        let mut open: Vec<_> = state
            .exchanges
            .iter()
            .map(|(&(client, msg), e)| (client, msg, e.kind, state.epoch))
            .collect();
        open.sort_unstable_by_key(|&(client, msg, _, _)| (client, msg));
        open
    }

    /// What the server counted so far.
    pub fn stats(&self) -> ServerStats {
        self.state().stats
    }

    /// The contents of a file (for tests and the FUSE adapter).
    pub fn file(&self, path: &str) -> Option<Vec<u8>> {
        self.state().files.get(path).map(|f| f.data.clone())
    }
}

impl State {
    /// Runs an operation on the share: status, data, info, and the directory it changed.
    fn apply(&mut self, op: Op) -> (NtStatus, Vec<u8>, u64, Option<String>) {
        match op {
            Op::Create { path } => {
                let created = !self.files.contains_key(&path);
                if created {
                    self.files.insert(path.clone(), File { data: Vec::new() });
                }
                let fid = self.next_fid;
                self.next_fid += 1;
                let dir = created.then(|| parent(&path).to_string());
                self.opens.insert(fid, path);
                (NtStatus::SUCCESS, Vec::new(), fid, dir)
            }
            Op::Read { path, offset, len } => match self.files.get(&path) {
                None => (NtStatus::OBJECT_NAME_NOT_FOUND, Vec::new(), 0, None),
                Some(file) => {
                    let size = file.data.len() as u64;
                    if offset >= size && len > 0 {
                        return (NtStatus::END_OF_FILE, Vec::new(), 0, None);
                    }
                    // Invariant 6: a zero-length read past the end reads nothing.
                    let start = offset.min(size);
                    let end = offset.saturating_add(u64::from(len)).min(size);
                    let data = file.data[start as usize..end as usize].to_vec();
                    let n = data.len() as u64;
                    (NtStatus::SUCCESS, data, n, None)
                }
            },
            Op::Write { path, offset, data } => match self.files.get_mut(&path) {
                None => (NtStatus::OBJECT_NAME_NOT_FOUND, Vec::new(), 0, None),
                Some(_) if offset.saturating_add(data.len() as u64) > MAX_FILE_SIZE => {
                    (NtStatus::INVALID_PARAMETER, Vec::new(), 0, None)
                }
                Some(file) => {
                    let end = offset as usize + data.len();
                    if file.data.len() < end {
                        file.data.resize(end, 0);
                    }
                    file.data[offset as usize..end].copy_from_slice(&data);
                    let dir = parent(&path).to_string();
                    (NtStatus::SUCCESS, Vec::new(), data.len() as u64, Some(dir))
                }
            },
            Op::QueryInfo { path } => match self.files.get(&path) {
                Some(file) => (NtStatus::SUCCESS, Vec::new(), file.data.len() as u64, None),
                None if self.is_dir(&path) => (STATUS_FILE_IS_A_DIRECTORY, Vec::new(), 0, None),
                None => (NtStatus::OBJECT_NAME_NOT_FOUND, Vec::new(), 0, None),
            },
            Op::DirEnum { dir } => {
                let prefix = dir_prefix(&dir);
                let mut listing = Vec::new();
                // Names under a prefix are contiguous in the ordered map, and so are those of one
                // subdirectory: comparing with the last subdirectory listed lists each once.
                let mut last_dir: Option<&str> = None;
                let under = self
                    .files
                    .range::<str, _>((Bound::Included(prefix.as_str()), Bound::Unbounded))
                    .map(|(name, _)| name)
                    .take_while(|name| name.starts_with(&prefix));
                for name in under {
                    let rest = &name[prefix.len()..];
                    match rest.split_once('/') {
                        None => {
                            listing.extend_from_slice(rest.as_bytes());
                            listing.push(b'\n');
                        }
                        Some((sub, _)) if last_dir != Some(sub) => {
                            last_dir = Some(sub);
                            listing.extend_from_slice(sub.as_bytes());
                            listing.extend_from_slice(b"/\n");
                        }
                        Some(_) => {}
                    }
                }
                let n = listing.len() as u64;
                (NtStatus::SUCCESS, listing, n, None)
            }
            // Change-notify never finishes by service time (`Received::Started { finishes:
            // false }`); reaching here would be an engine mistake, reported as a failed request.
            Op::ChangeNotify { .. } => (NtStatus::INVALID_DEVICE_STATE, Vec::new(), 0, None),
            Op::PipeTransact { data } => {
                let n = data.len() as u64;
                (NtStatus::SUCCESS, data, n, None)
            }
            Op::Close { fid } => match self.opens.remove(&fid) {
                Some(_) => (NtStatus::SUCCESS, Vec::new(), 0, None),
                None => (NtStatus::INVALID_HANDLE, Vec::new(), 0, None),
            },
            Op::Delete { path } => match self.files.remove(&path) {
                None => (NtStatus::OBJECT_NAME_NOT_FOUND, Vec::new(), 0, None),
                Some(_) => {
                    let dir = parent(&path).to_string();
                    (NtStatus::SUCCESS, Vec::new(), 0, Some(dir))
                }
            },
            Op::Truncate { path, size } => match self.files.get_mut(&path) {
                None => (NtStatus::OBJECT_NAME_NOT_FOUND, Vec::new(), 0, None),
                // Invariant 6.
                Some(_) if size > MAX_FILE_SIZE => {
                    (NtStatus::INVALID_PARAMETER, Vec::new(), 0, None)
                }
                Some(file) => {
                    file.data.resize(size as usize, 0);
                    let dir = parent(&path).to_string();
                    (NtStatus::SUCCESS, Vec::new(), size, Some(dir))
                }
            },
        }
    }

    /// Whether `path` is a directory (invariant 5): the root, or a prefix of some file's name.
    fn is_dir(&self, path: &str) -> bool {
        if path.is_empty() {
            return true;
        }
        let prefix = dir_prefix(path);
        self.files
            .range::<str, _>((Bound::Included(prefix.as_str()), Bound::Unbounded))
            .next()
            .is_some_and(|(name, _)| name.starts_with(&prefix))
    }

    /// Completes every change-notify watching `dir` (each returns its credit).
    fn fire_notifies(&mut self, dir: &str, epoch: u32, replies: &mut Vec<Reply>) {
        let mut fired: Vec<(u32, u64)> = self
            .exchanges
            .iter()
            .filter(|(_, e)| matches!(&e.op, Op::ChangeNotify { dir: d } if d == dir))
            .map(|(key, _)| *key)
            .collect();
        // HashMap order is random per process: sort so deterministic runs stay deterministic.
        fired.sort_unstable();
        for (client, msg) in fired {
            self.exchanges.remove(&(client, msg));
            self.credits[client as usize] -= 1;
            self.stats.notifies_fired += 1;
            replies.push(Reply {
                client,
                msg,
                epoch,
                status: NtStatus::SUCCESS,
                data: dir.as_bytes().to_vec(),
                info: 0,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> Server {
        let share = vec![("d0/f0".to_string(), b"hello".to_vec())];
        Server::new(2, 2, &share, false)
    }

    fn request(msg: u64, op: Op) -> Request {
        Request {
            client: 0,
            msg,
            epoch: 1,
            op,
        }
    }

    #[test]
    fn exchanges_hold_credits_until_they_end() {
        let s = server();
        let read = Op::Read {
            path: "d0/f0".into(),
            offset: 1,
            len: 3,
        };
        assert!(matches!(
            s.receive(request(1, read.clone())),
            Received::Started { finishes: true }
        ));
        assert!(matches!(
            s.receive(request(2, read.clone())),
            Received::Started { .. }
        ));
        assert!(
            matches!(s.receive(request(3, read)), Received::Rejected(r) if r.status == NtStatus::QUOTA_EXCEEDED)
        );
        assert_eq!(s.credits_in_use(), 2);
        let replies = s.finish(0, 1, 1);
        assert_eq!(replies[0].data, b"ell");
        // Invariant 3: a read is cancellable; the reply is STATUS_CANCELLED.
        assert_eq!(
            s.cancel(0, 2, 1).map(|r| r.status),
            Some(NtStatus::CANCELLED)
        );
        assert!(s.finish(0, 2, 1).is_empty());
        assert!(s.cancel(0, 2, 1).is_none());
        assert_eq!(s.credits_in_use(), 0);
        assert_eq!(s.stats().cancel_unknown, 1);
    }

    #[test]
    fn writes_run_to_completion_and_fire_notifies() {
        let s = server();
        s.receive(request(1, Op::ChangeNotify { dir: "d0".into() }));
        s.receive(request(
            2,
            Op::Write {
                path: "d0/f0".into(),
                offset: 5,
                data: b"!".to_vec(),
            },
        ));
        assert!(s.cancel(0, 2, 1).is_none());
        assert_eq!(s.stats().cancel_not_cancellable, 1);
        let replies = s.finish(0, 2, 1);
        assert_eq!(replies.len(), 2);
        assert_eq!(replies[1].msg, 1);
        assert_eq!(s.file("d0/f0").unwrap(), b"hello!");
        assert_eq!(s.credits_in_use(), 0);
    }

    #[test]
    fn a_crash_drops_everything_and_moves_the_epoch() {
        let s = server();
        s.receive(request(
            1,
            Op::QueryInfo {
                path: "d0/f0".into(),
            },
        ));
        s.crash();
        assert_eq!((s.credits_in_use(), s.open_exchanges()), (0, 0));
        assert!(matches!(
            s.receive(request(
                2,
                Op::QueryInfo {
                    path: "d0/f0".into()
                }
            )),
            Received::Dropped
        ));
        s.restart();
        assert_eq!(s.epoch(), 2);
        assert!(s.finish(0, 1, 1).is_empty());
        assert!(matches!(
            s.receive(Request {
                epoch: 2,
                ..request(3, Op::Close { fid: 9 })
            }),
            Received::Started { .. }
        ));
        assert_eq!(s.finish(0, 3, 2)[0].status, NtStatus::INVALID_HANDLE);
    }

    /// Runs one operation to its end and returns its reply.
    fn run(s: &Server, msg: u64, op: Op) -> Reply {
        assert!(matches!(
            s.receive(request(msg, op)),
            Received::Started { finishes: true }
        ));
        s.finish(0, msg, 1).remove(0)
    }

    #[test]
    fn delete_and_truncate_change_the_share_and_run_like_writes() {
        let s = server();
        let delete = Op::Delete {
            path: "d0/f0".into(),
        };
        let truncate = Op::Truncate {
            path: "d0/f0".into(),
            size: 8,
        };
        assert_eq!(
            (delete.kind(), truncate.kind()),
            (OpKind::Write, OpKind::Write)
        );
        s.receive(request(1, Op::ChangeNotify { dir: "d0".into() }));
        // Zero-filling, and the directory's change-notify fires.
        s.receive(request(2, truncate));
        assert!(s.cancel(0, 2, 1).is_none(), "not cancellable at the server");
        let replies = s.finish(0, 2, 1);
        assert_eq!((replies[0].status, replies[0].info), (NtStatus::SUCCESS, 8));
        assert_eq!(replies[1].msg, 1);
        assert_eq!(s.file("d0/f0").unwrap(), b"hello\0\0\0");
        let cut = Op::Truncate {
            path: "d0/f0".into(),
            size: 2,
        };
        assert_eq!(run(&s, 3, cut).status, NtStatus::SUCCESS);
        assert_eq!(s.file("d0/f0").unwrap(), b"he");
        let huge = Op::Truncate {
            path: "d0/f0".into(),
            size: u64::MAX,
        };
        assert_eq!(run(&s, 4, huge).status, NtStatus::INVALID_PARAMETER);
        assert_eq!(run(&s, 5, delete.clone()).status, NtStatus::SUCCESS);
        assert_eq!(s.file("d0/f0"), None);
        assert_eq!(run(&s, 6, delete).status, NtStatus::OBJECT_NAME_NOT_FOUND);
        let missing = Op::Truncate {
            path: "d0/f0".into(),
            size: 1,
        };
        assert_eq!(run(&s, 7, missing).status, NtStatus::OBJECT_NAME_NOT_FOUND);
        // The last file gone, the directory is gone too (invariant 5).
        let query = Op::QueryInfo { path: "d0".into() };
        assert_eq!(run(&s, 8, query).status, NtStatus::OBJECT_NAME_NOT_FOUND);
        assert_eq!(s.credits_in_use(), 0);
    }

    #[test]
    fn directories_are_listed_and_refused_as_files() {
        let share: Vec<(String, Vec<u8>)> =
            ["top", "a/x", "a/b/y", "a/b/z", "a/c/w", "a.txt", "a0"]
                .iter()
                .map(|p| (p.to_string(), vec![1, 2, 3]))
                .collect();
        let s = Server::new(1, 64, &share, false);
        let mut msg = 0;
        let mut list = |dir: &str| {
            msg += 1;
            let reply = run(&s, msg, Op::DirEnum { dir: dir.into() });
            assert_eq!(reply.status, NtStatus::SUCCESS);
            String::from_utf8(reply.data).unwrap()
        };
        assert_eq!(list(""), "a.txt\na/\na0\ntop\n");
        assert_eq!(list("a"), "b/\nc/\nx\n");
        assert_eq!(list("a/b"), "y\nz\n");
        assert_eq!(list("nothing"), "");
        for (msg, path, status, info) in [
            (100, "", STATUS_FILE_IS_A_DIRECTORY, 0),
            (101, "a", STATUS_FILE_IS_A_DIRECTORY, 0),
            (102, "a/b", STATUS_FILE_IS_A_DIRECTORY, 0),
            (103, "a/x", NtStatus::SUCCESS, 3),
            (104, "a/", NtStatus::OBJECT_NAME_NOT_FOUND, 0),
            (105, "a/q", NtStatus::OBJECT_NAME_NOT_FOUND, 0),
            (106, "b", NtStatus::OBJECT_NAME_NOT_FOUND, 0),
        ] {
            let reply = run(&s, msg, Op::QueryInfo { path: path.into() });
            assert_eq!((reply.status, reply.info), (status, info), "{path:?}");
        }
        assert_eq!(STATUS_FILE_IS_A_DIRECTORY.to_string(), "0xC00000BA");
    }

    #[test]
    fn bad_offsets_never_panic() {
        let s = server();
        let read = |offset, len| Op::Read {
            path: "d0/f0".into(),
            offset,
            len,
        };
        assert_eq!(run(&s, 1, read(100, 0)).data, b"");
        assert_eq!(run(&s, 2, read(u64::MAX, 7)).status, NtStatus::END_OF_FILE);
        assert_eq!(run(&s, 3, read(3, u32::MAX)).data, b"lo");
        let write = Op::Write {
            path: "d0/f0".into(),
            offset: u64::MAX,
            data: vec![1],
        };
        assert_eq!(run(&s, 4, write).status, NtStatus::INVALID_PARAMETER);
        assert_eq!(s.file("d0/f0").unwrap(), b"hello");
    }
}
