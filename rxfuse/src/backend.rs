//! What the adapter asks of a mini-redirector: turn one file-system operation into an
//! `RX_CONTEXT`, send it, and complete it exactly once.
//!
//! Invariants a [`Backend`] must keep (the adapter relies on them):
//! 1. [`Backend::prepare`] only creates the context; nothing goes out before
//!    [`Backend::dispatch`], so the adapter can register the request's FUSE id in between and an
//!    interrupt that overtook its request cancels the context before the minirdr arms its routine.
//! 2. `dispatch` arms a minirdr cancel routine with `set_minirdr_cancel_routine` before the
//!    request goes out. If arming reports `STATUS_CANCELLED`, the request is completed with
//!    `STATUS_CANCELLED` at once and never sent.
//! 3. The future `dispatch` returns resolves exactly once, when the context is completed, with
//!    the completion's status, whichever side completed it (the reply after winning the disarm,
//!    the cancel routine, a refused arm, a disconnect). A cancel through the core therefore
//!    resolves it promptly with `STATUS_CANCELLED`: the routine must complete the request itself,
//!    not wait for the server.

use std::future::Future;
use std::pin::Pin;

use rdbss::{ContextRef, NtStatus};

/// `STATUS_FILE_IS_A_DIRECTORY`: the answer to [`FsOp::Stat`] on a directory.
pub const STATUS_FILE_IS_A_DIRECTORY: NtStatus = NtStatus::from_code(0xC000_00BA);

/// One file-system operation, on paths relative to the share's root (`""` is the root, `/`
/// separates components, no leading `/`).
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum FsOp {
    /// A path's attributes: `info` is the file's size; a directory answers
    /// [`STATUS_FILE_IS_A_DIRECTORY`].
    Stat {
        /// The path.
        path: String,
    },
    /// Opens an existing file, or creates it when `create`; `info` is the handle.
    Open {
        /// The path.
        path: String,
        /// Whether to create it if missing.
        create: bool,
    },
    /// Reads up to `len` bytes at `offset`; `data` is what was read (`STATUS_END_OF_FILE` past
    /// the end).
    Read {
        /// The path.
        path: String,
        /// Where.
        offset: u64,
        /// How much at most.
        len: u32,
    },
    /// Writes `data` at `offset`; `info` is the number of bytes written.
    Write {
        /// The path.
        path: String,
        /// Where.
        offset: u64,
        /// What.
        data: Vec<u8>,
    },
    /// Lists a directory: `data` holds one name per line, directories with a trailing `/`.
    ReadDir {
        /// The directory.
        path: String,
    },
    /// Deletes a file.
    Unlink {
        /// The path.
        path: String,
    },
    /// Sets a file's length.
    Truncate {
        /// The path.
        path: String,
        /// The new length.
        size: u64,
    },
    /// Closes a handle from [`FsOp::Open`].
    Release {
        /// The handle.
        handle: u64,
    },
}

/// How a request completed.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Completion {
    /// The completion status (`STATUS_CANCELLED` when a cancel won).
    pub status: NtStatus,
    /// Data returned (read, directory listing).
    pub data: Vec<u8>,
    /// A number returned (size, handle, bytes written).
    pub info: u64,
}

impl Completion {
    /// A completion with a status and nothing else.
    pub fn status(status: NtStatus) -> Self {
        Completion {
            status,
            data: Vec::new(),
            info: 0,
        }
    }
}

/// The future [`Backend::dispatch`] returns.
pub type Dispatched = Pin<Box<dyn Future<Output = Completion> + Send + 'static>>;

/// A mini-redirector the adapter can drive (see the module invariants).
pub trait Backend: Send + Sync + 'static {
    /// The mini-redirector's part of each `RX_CONTEXT`.
    type Minirdr: Send + Sync + 'static;

    /// Creates the request's context without sending it (invariant 1). `Err(status)` if the
    /// instance refuses (it is draining, say).
    fn prepare(&self, op: FsOp) -> Result<ContextRef<Self::Minirdr>, NtStatus>;

    /// Sends the request (invariant 2); the future resolves when it is completed (invariant 3).
    fn dispatch(&self, context: &ContextRef<Self::Minirdr>) -> Dispatched;
}

/// The errno a completion status becomes (the adapter's one mapping).
///
/// `STATUS_CANCELLED` is `EINTR`: that is how an interrupted FUSE request is answered.
pub fn errno_of(status: NtStatus) -> i32 {
    match status {
        NtStatus::CANCELLED => libc::EINTR,
        NtStatus::OBJECT_NAME_NOT_FOUND | NtStatus::NOT_FOUND => libc::ENOENT,
        NtStatus::OBJECT_NAME_COLLISION => libc::EEXIST,
        STATUS_FILE_IS_A_DIRECTORY => libc::EISDIR,
        NtStatus::INVALID_PARAMETER | NtStatus::INVALID_HANDLE => libc::EINVAL,
        NtStatus::ACCESS_DENIED => libc::EACCES,
        NtStatus::IO_TIMEOUT | NtStatus::TIMEOUT => libc::ETIMEDOUT,
        NtStatus::INSUFFICIENT_RESOURCES | NtStatus::QUOTA_EXCEEDED => libc::EAGAIN,
        NtStatus::NOT_SUPPORTED | NtStatus::NOT_IMPLEMENTED => libc::EOPNOTSUPP,
        // The instance is draining: the mount is going away.
        NtStatus::INVALID_DEVICE_STATE => libc::ESHUTDOWN,
        // Lost connection, and every other failure: an I/O error, as network file systems do.
        _ => libc::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancelled_is_eintr_and_every_error_maps_to_a_nonzero_errno() {
        assert_eq!(errno_of(NtStatus::CANCELLED), libc::EINTR);
        assert_eq!(errno_of(NtStatus::OBJECT_NAME_NOT_FOUND), libc::ENOENT);
        assert_eq!(errno_of(STATUS_FILE_IS_A_DIRECTORY), libc::EISDIR);
        assert_eq!(errno_of(NtStatus::CONNECTION_DISCONNECTED), libc::EIO);
        assert_eq!(errno_of(NtStatus::INVALID_DEVICE_STATE), libc::ESHUTDOWN);
        assert_eq!(errno_of(NtStatus::UNSUCCESSFUL), libc::EIO);
        // Never ENOSYS: that would tell the kernel the operation does not exist.
        for code in [
            0xC000_0001u32,
            0xC000_0120,
            0xC000_0034,
            0xC000_020C,
            0xC000_00BA,
        ] {
            let errno = errno_of(NtStatus::from_code(code));
            assert!(errno > 0 && errno != libc::ENOSYS);
        }
    }
}
