//! The `fuse3` file system: every FUSE operation becomes one request of the [`Backend`], tracked
//! in an [`InterruptTable`] under its FUSE id, so a `FUSE_INTERRUPT` cancels it through the core.
//!
//! The path of one request ([`RxFs::call`]):
//! 1. `prepare` creates the `RX_CONTEXT` (nothing sent);
//! 2. the FUSE id is registered; an interrupt that overtook the request cancels it here;
//! 3. `dispatch` arms the minirdr routine and sends; its future resolves at completion;
//! 4. the id is unregistered, and the completion becomes the reply (`STATUS_CANCELLED` is
//!    `EINTR`).
//!
//! A `FUSE_INTERRUPT` ([`RxFs::interrupt`](fuse3::raw::Filesystem::interrupt)) cancels the
//! registered context, or, for an id not registered yet, waits
//! [`FsOptions::interrupt_retry_delay`] and answers `EAGAIN` unless the request registered (and
//! was cancelled) meanwhile. It never answers `ENOSYS`.
//!
//! Invariants:
//! 1. Each request is registered from before it is sent until after it completed, so an interrupt
//!    at any moment of its life either cancels it or is answered `EAGAIN` (the kernel retries).
//! 2. Every file is opened with `FOPEN_DIRECT_IO`: reads reach the daemon as the reader's own
//!    requests (no page cache, no background readahead, which the kernel never interrupts).
//! 3. No lock is held across an `.await`; the inode table's lock is only held to map ids.
//! 4. Bad input from the kernel (unknown inode, a name that is not UTF-8 or holds `/`, an invalid
//!    FUSE id) gets an errno, never a panic.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use fuse3::raw::prelude::*;
use fuse3::{Errno, Result, Timestamp};
use futures_util::stream::{self, Stream};
use rdbss::{InterruptOutcome, InterruptTable, NtStatus, Settled};

use crate::backend::{errno_of, Backend, Completion, FsOp, STATUS_FILE_IS_A_DIRECTORY};

/// `FOPEN_DIRECT_IO` of `fuse_kernel.h`: bypass the page cache for this open file.
pub const FOPEN_DIRECT_IO: u32 = 1 << 0;

/// The root directory's inode number.
pub const ROOT_INODE: u64 = 1;

/// How the adapter behaves.
#[derive(Clone, Copy, Debug)]
pub struct FsOptions {
    /// How long a remembered interrupt waits for its request before it is answered `EAGAIN`.
    /// Not zero: the kernel requeues an `EAGAIN` interrupt at once.
    pub interrupt_retry_delay: Duration,
    /// How long the kernel may cache entries and attributes.
    pub ttl: Duration,
    /// The largest write the kernel may send.
    pub max_write: u32,
}

impl Default for FsOptions {
    fn default() -> Self {
        FsOptions {
            interrupt_retry_delay: Duration::from_millis(5),
            ttl: Duration::from_secs(1),
            max_write: 128 * 1024,
        }
    }
}

/// What the adapter counted.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct AdapterStats {
    /// Requests sent through the backend.
    pub requests: u64,
    /// Requests answered `EINTR` (completed `STATUS_CANCELLED`).
    pub replied_eintr: u64,
    /// `FUSE_INTERRUPT`s received.
    pub interrupts: u64,
    /// Interrupts answered `EAGAIN` (their request never registered in time).
    pub interrupts_answered_eagain: u64,
    /// Requests refused before reaching the backend (bad inode, bad name, bad id).
    pub refused: u64,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    replied_eintr: AtomicU64,
    interrupts: AtomicU64,
    interrupts_answered_eagain: AtomicU64,
    refused: AtomicU64,
}

/// A handle on a mounted adapter's state, usable after the file system moved into its session.
pub struct AdapterHandle<M> {
    table: Arc<InterruptTable<M>>,
    counters: Arc<Counters>,
}

impl<M> Clone for AdapterHandle<M> {
    fn clone(&self) -> Self {
        AdapterHandle {
            table: self.table.clone(),
            counters: self.counters.clone(),
        }
    }
}

impl<M> AdapterHandle<M> {
    /// The interrupt table (its stats, and how many requests are in flight).
    pub fn table(&self) -> &InterruptTable<M> {
        &self.table
    }

    /// What the adapter counted.
    pub fn stats(&self) -> AdapterStats {
        let c = &self.counters;
        AdapterStats {
            requests: c.requests.load(Ordering::Relaxed),
            replied_eintr: c.replied_eintr.load(Ordering::Relaxed),
            interrupts: c.interrupts.load(Ordering::Relaxed),
            interrupts_answered_eagain: c.interrupts_answered_eagain.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
        }
    }
}

/// Inode numbers for paths. An inode stays mapped until its file is unlinked.
struct Inodes {
    paths: HashMap<u64, String>,
    inodes: HashMap<String, u64>,
    next: u64,
}

impl Inodes {
    fn new() -> Self {
        let mut inodes = Inodes {
            paths: HashMap::new(),
            inodes: HashMap::new(),
            next: ROOT_INODE + 1,
        };
        inodes.paths.insert(ROOT_INODE, String::new());
        inodes.inodes.insert(String::new(), ROOT_INODE);
        inodes
    }

    fn inode(&mut self, path: &str) -> u64 {
        if let Some(&ino) = self.inodes.get(path) {
            return ino;
        }
        let ino = self.next;
        self.next += 1;
        self.inodes.insert(path.to_string(), ino);
        self.paths.insert(ino, path.to_string());
        ino
    }

    fn forget(&mut self, path: &str) {
        if let Some(ino) = self.inodes.remove(path) {
            self.paths.remove(&ino);
        }
    }
}

/// The `fuse3` file system over a [`Backend`].
pub struct RxFs<B: Backend> {
    backend: Arc<B>,
    table: Arc<InterruptTable<B::Minirdr>>,
    counters: Arc<Counters>,
    inodes: Mutex<Inodes>,
    options: FsOptions,
    mounted_at: SystemTime,
    uid: u32,
    gid: u32,
}

fn errno(code: i32) -> Errno {
    Errno::from(code)
}

impl<B: Backend> RxFs<B> {
    /// A file system serving `backend`. Files and directories belong to `uid`/`gid`.
    pub fn new(backend: Arc<B>, options: FsOptions, uid: u32, gid: u32) -> Self {
        RxFs {
            backend,
            table: Arc::new(InterruptTable::new()),
            counters: Arc::new(Counters::default()),
            inodes: Mutex::new(Inodes::new()),
            options,
            mounted_at: SystemTime::now(),
            uid,
            gid,
        }
    }

    /// A handle on the interrupt table and the counters.
    pub fn handle(&self) -> AdapterHandle<B::Minirdr> {
        AdapterHandle {
            table: self.table.clone(),
            counters: self.counters.clone(),
        }
    }

    fn inodes(&self) -> MutexGuard<'_, Inodes> {
        // The map is consistent after any panic (each method changes it in one step).
        self.inodes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn refuse(&self, code: i32) -> Errno {
        self.counters.refused.fetch_add(1, Ordering::Relaxed);
        errno(code)
    }

    fn path_of(&self, inode: u64) -> Result<String> {
        let path = self.inodes().paths.get(&inode).cloned();
        path.ok_or_else(|| self.refuse(libc::ENOENT))
    }

    fn child_of(&self, parent: u64, name: &OsStr) -> Result<String> {
        let parent = self.path_of(parent)?;
        let name = name.to_str().ok_or_else(|| self.refuse(libc::EINVAL))?;
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(self.refuse(libc::EINVAL));
        }
        Ok(if parent.is_empty() {
            name.to_string()
        } else {
            format!("{parent}/{name}")
        })
    }

    /// One request through the backend, tracked under its FUSE id (module steps 1 to 4).
    pub async fn call(&self, unique: u64, op: FsOp) -> Result<Completion> {
        let context = self.backend.prepare(op).map_err(|s| errno(errno_of(s)))?;
        if self.table.register(unique, &context).is_err() {
            // An id the kernel never sends (zero, odd or live): nothing was sent.
            return Err(self.refuse(libc::EINVAL));
        }
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let completion = self.backend.dispatch(&context).await;
        drop(self.table.unregister(unique, &context));
        if completion.status == NtStatus::CANCELLED {
            self.counters.replied_eintr.fetch_add(1, Ordering::Relaxed);
        }
        Ok(completion)
    }

    /// [`call`](Self::call), with every error status turned into its errno.
    async fn call_ok(&self, unique: u64, op: FsOp) -> Result<Completion> {
        let completion = self.call(unique, op).await?;
        if completion.status.is_error() {
            return Err(errno(errno_of(completion.status)));
        }
        Ok(completion)
    }

    fn attr(&self, inode: u64, kind: FileType, size: u64) -> FileAttr {
        let time = Timestamp::from(self.mounted_at);
        FileAttr {
            ino: inode,
            size,
            blocks: size.div_ceil(512),
            atime: time,
            mtime: time,
            ctime: time,
            kind,
            perm: if kind == FileType::Directory {
                0o755
            } else {
                0o644
            },
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
        }
    }

    /// A path's attributes, from a `Stat` request.
    async fn stat(&self, unique: u64, path: String) -> Result<FileAttr> {
        let completion = self.call(unique, FsOp::Stat { path: path.clone() }).await?;
        let inode = self.inodes().inode(&path);
        match completion.status {
            STATUS_FILE_IS_A_DIRECTORY => Ok(self.attr(inode, FileType::Directory, 0)),
            status if status.is_error() => Err(errno(errno_of(status))),
            _ => Ok(self.attr(inode, FileType::RegularFile, completion.info)),
        }
    }
}

impl<B: Backend> RxFs<B> {
    /// A directory's entries (`.`, `..`, then the listing), with inode numbers.
    async fn list(&self, unique: u64, parent: u64) -> Result<Vec<(u64, FileType, OsString)>> {
        let path = self.path_of(parent)?;
        let listing = self
            .call_ok(unique, FsOp::ReadDir { path: path.clone() })
            .await?;
        let parent_of_parent = match path.rsplit_once('/') {
            Some((up, _)) => self.inodes().inode(up),
            None => ROOT_INODE,
        };
        let mut entries = vec![
            (parent, FileType::Directory, OsString::from(".")),
            (parent_of_parent, FileType::Directory, OsString::from("..")),
        ];
        let mut inodes = self.inodes();
        for line in String::from_utf8_lossy(&listing.data).lines() {
            let (name, kind) = match line.strip_suffix('/') {
                Some(dir) => (dir, FileType::Directory),
                None => (line, FileType::RegularFile),
            };
            if name.is_empty() || name.contains('/') {
                continue;
            }
            let child = if path.is_empty() {
                name.to_string()
            } else {
                format!("{path}/{name}")
            };
            entries.push((inodes.inode(&child), kind, OsString::from(name)));
        }
        Ok(entries)
    }
}

impl<B: Backend> Filesystem for RxFs<B> {
    async fn init(&self, _req: Request) -> Result<ReplyInit> {
        let max_write =
            NonZeroU32::new(self.options.max_write.max(4096)).unwrap_or(NonZeroU32::MIN);
        Ok(ReplyInit { max_write })
    }

    async fn destroy(&self, _req: Request) {}

    async fn lookup(&self, req: Request, parent: u64, name: &OsStr) -> Result<ReplyEntry> {
        let path = self.child_of(parent, name)?;
        let attr = self.stat(req.unique, path).await?;
        Ok(ReplyEntry {
            ttl: self.options.ttl,
            attr,
            generation: 0,
        })
    }

    async fn getattr(
        &self,
        req: Request,
        inode: u64,
        _fh: Option<u64>,
        _flags: u32,
    ) -> Result<ReplyAttr> {
        let path = self.path_of(inode)?;
        let attr = self.stat(req.unique, path).await?;
        Ok(ReplyAttr {
            ttl: self.options.ttl,
            attr,
        })
    }

    /// Only the size is applied (truncate); modes, owners and times are accepted and ignored.
    async fn setattr(
        &self,
        req: Request,
        inode: u64,
        _fh: Option<u64>,
        set_attr: SetAttr,
    ) -> Result<ReplyAttr> {
        let path = self.path_of(inode)?;
        if let Some(size) = set_attr.size {
            let op = FsOp::Truncate {
                path: path.clone(),
                size,
            };
            self.call_ok(req.unique, op).await?;
        }
        let attr = self.stat(req.unique, path).await?;
        Ok(ReplyAttr {
            ttl: self.options.ttl,
            attr,
        })
    }

    async fn unlink(&self, req: Request, parent: u64, name: &OsStr) -> Result<()> {
        let path = self.child_of(parent, name)?;
        let op = FsOp::Unlink { path: path.clone() };
        self.call_ok(req.unique, op).await?;
        self.inodes().forget(&path);
        Ok(())
    }

    async fn open(&self, req: Request, inode: u64, flags: u32) -> Result<ReplyOpen> {
        let path = self.path_of(inode)?;
        if flags & libc::O_TRUNC as u32 != 0 {
            let op = FsOp::Truncate {
                path: path.clone(),
                size: 0,
            };
            self.call_ok(req.unique, op).await?;
        }
        let opened = self
            .call_ok(
                req.unique,
                FsOp::Open {
                    path,
                    create: false,
                },
            )
            .await?;
        Ok(ReplyOpen {
            fh: opened.info,
            flags: FOPEN_DIRECT_IO,
        })
    }

    async fn read(
        &self,
        req: Request,
        inode: u64,
        _fh: u64,
        offset: u64,
        size: u32,
    ) -> Result<ReplyData> {
        let path = self.path_of(inode)?;
        let op = FsOp::Read {
            path,
            offset,
            len: size,
        };
        let completion = self.call(req.unique, op).await?;
        match completion.status {
            NtStatus::END_OF_FILE => Ok(ReplyData { data: Bytes::new() }),
            status if status.is_error() => Err(errno(errno_of(status))),
            _ => Ok(ReplyData {
                data: Bytes::from(completion.data),
            }),
        }
    }

    async fn write(
        &self,
        req: Request,
        inode: u64,
        _fh: u64,
        offset: u64,
        data: &[u8],
        _write_flags: u32,
        _flags: u32,
    ) -> Result<ReplyWrite> {
        let path = self.path_of(inode)?;
        let op = FsOp::Write {
            path,
            offset,
            data: data.to_vec(),
        };
        let written = self.call_ok(req.unique, op).await?;
        Ok(ReplyWrite {
            written: u32::try_from(written.info).unwrap_or(u32::MAX),
        })
    }

    async fn statfs(&self, _req: Request, _inode: u64) -> Result<ReplyStatFs> {
        Ok(ReplyStatFs {
            blocks: 1 << 20,
            bfree: 1 << 19,
            bavail: 1 << 19,
            files: 1 << 16,
            ffree: 1 << 15,
            bsize: 4096,
            namelen: 255,
            frsize: 4096,
        })
    }

    async fn release(
        &self,
        req: Request,
        _inode: u64,
        fh: u64,
        _flags: u32,
        _lock_owner: u64,
        _flush: bool,
    ) -> Result<()> {
        self.call_ok(req.unique, FsOp::Release { handle: fh })
            .await
            .map(|_| ())
    }

    async fn flush(&self, _req: Request, _inode: u64, _fh: u64, _lock_owner: u64) -> Result<()> {
        Ok(())
    }

    async fn fsync(&self, _req: Request, _inode: u64, _fh: u64, _datasync: bool) -> Result<()> {
        Ok(())
    }

    async fn opendir(&self, _req: Request, inode: u64, _flags: u32) -> Result<ReplyOpen> {
        self.path_of(inode)?;
        Ok(ReplyOpen { fh: 0, flags: 0 })
    }

    async fn releasedir(&self, _req: Request, _inode: u64, _fh: u64, _flags: u32) -> Result<()> {
        Ok(())
    }

    async fn readdir<'a>(
        &'a self,
        req: Request,
        parent: u64,
        _fh: u64,
        offset: i64,
    ) -> Result<ReplyDirectory<impl Stream<Item = Result<DirectoryEntry>> + Send + 'a>> {
        let entries = self.list(req.unique, parent).await?;
        let skip = usize::try_from(offset).unwrap_or(0);
        let entries: Vec<Result<DirectoryEntry>> = entries
            .into_iter()
            .enumerate()
            .skip(skip)
            .map(|(i, (inode, kind, name))| {
                Ok(DirectoryEntry {
                    inode,
                    kind,
                    name,
                    offset: i as i64 + 1,
                })
            })
            .collect();
        Ok(ReplyDirectory {
            entries: stream::iter(entries),
        })
    }

    /// The kernel asks for this one when it can (fuse3 turns `READDIRPLUS` on). A listing has
    /// no sizes, so the attributes come with a zero time to live: the kernel asks `getattr`
    /// before it uses them.
    async fn readdirplus<'a>(
        &'a self,
        req: Request,
        parent: u64,
        _fh: u64,
        offset: u64,
        _lock_owner: u64,
    ) -> Result<ReplyDirectoryPlus<impl Stream<Item = Result<DirectoryEntryPlus>> + Send + 'a>>
    {
        let entries = self.list(req.unique, parent).await?;
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        let entries: Vec<Result<DirectoryEntryPlus>> = entries
            .into_iter()
            .enumerate()
            .skip(skip)
            .map(|(i, (inode, kind, name))| {
                Ok(DirectoryEntryPlus {
                    inode,
                    generation: 0,
                    kind,
                    name,
                    offset: i as i64 + 1,
                    attr: self.attr(inode, kind, 0),
                    entry_ttl: Duration::ZERO,
                    attr_ttl: Duration::ZERO,
                })
            })
            .collect();
        Ok(ReplyDirectoryPlus {
            entries: stream::iter(entries),
        })
    }

    async fn access(&self, _req: Request, inode: u64, _mask: u32) -> Result<()> {
        self.path_of(inode).map(|_| ())
    }

    async fn create(
        &self,
        req: Request,
        parent: u64,
        name: &OsStr,
        _mode: u32,
        flags: u32,
    ) -> Result<ReplyCreated> {
        let path = self.child_of(parent, name)?;
        let opened = self
            .call_ok(
                req.unique,
                FsOp::Open {
                    path: path.clone(),
                    create: true,
                },
            )
            .await?;
        if flags & libc::O_TRUNC as u32 != 0 {
            let op = FsOp::Truncate {
                path: path.clone(),
                size: 0,
            };
            self.call_ok(req.unique, op).await?;
        }
        let attr = self.stat(req.unique, path).await?;
        Ok(ReplyCreated {
            ttl: self.options.ttl,
            attr,
            generation: 0,
            fh: opened.info,
            flags: FOPEN_DIRECT_IO,
        })
    }

    /// `FUSE_INTERRUPT` for request `unique`: cancel it through the core, or remember it and
    /// answer `EAGAIN` after the retry delay if it never registers. Never `ENOSYS`.
    async fn interrupt(&self, _req: Request, unique: u64) -> Result<()> {
        self.counters.interrupts.fetch_add(1, Ordering::Relaxed);
        match self.table.interrupt(unique) {
            InterruptOutcome::Cancelled(_) => Ok(()),
            InterruptOutcome::InvalidId => Err(self.refuse(libc::EINVAL)),
            InterruptOutcome::Pending(pending) => {
                tokio::time::sleep(self.options.interrupt_retry_delay).await;
                match self.table.settle(pending) {
                    Settled::Delivered => Ok(()),
                    Settled::Retry => {
                        self.counters
                            .interrupts_answered_eagain
                            .fetch_add(1, Ordering::Relaxed);
                        Err(errno(libc::EAGAIN))
                    }
                }
            }
        }
    }
}
