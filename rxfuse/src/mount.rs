//! Mounting: checks that give a clear error before anything is tried, the mount itself, serving
//! until SIGINT or SIGTERM, and an unmount guard for tests.
//!
//! Mounts go through `fusermount3` (FUSE 3's setuid helper) when it is installed, also for root:
//! fuse3 then reads `/dev/fuse` non-blocking on the runtime's threads. Root without `fusermount3`
//! mounts with the `mount(2)` system call directly, so a machine with `/dev/fuse` needs nothing
//! else installed to run the tests.
//!
//! Invariants:
//! 1. [`preflight`] fails, naming what is missing, when `/dev/fuse` cannot be opened, when the
//!    caller is not root and `fusermount3` is not on `PATH`, or when the mount point is not an
//!    empty directory; nothing is mounted then.
//! 2. [`serve_until_signal`] returns only once the file system is unmounted (by a signal, or from
//!    outside with `fusermount3 -u`).
//! 3. An [`UnmountGuard`] unmounts on drop, also while a failing test unwinds; unmounting
//!    something already unmounted is not an error.

use std::fmt;
use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use fuse3::raw::{MountHandle, Session};
use fuse3::MountOptions;
use tokio::signal::unix::{signal, SignalKind};

use crate::backend::Backend;
use crate::fs::RxFs;

/// Why a mount could not be made.
#[derive(Debug)]
pub enum MountError {
    /// `/dev/fuse` is missing or cannot be opened.
    NoDevFuse(io::Error),
    /// `fusermount3` is not on `PATH`.
    NoFusermount3,
    /// The mount point is not an existing, empty directory.
    BadMountPoint(PathBuf, String),
    /// The mount itself failed.
    Mount(io::Error),
}

impl fmt::Display for MountError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MountError::NoDevFuse(e) if e.kind() == io::ErrorKind::PermissionDenied => write!(
                f,
                "cannot open /dev/fuse ({e}): run as root or give this user read and write access \
                 to /dev/fuse"
            ),
            MountError::NoDevFuse(e) => write!(
                f,
                "cannot open /dev/fuse ({e}): load the fuse module (modprobe fuse) or, in a \
                 container, pass the device through (--device /dev/fuse)"
            ),
            MountError::NoFusermount3 => write!(
                f,
                "fusermount3 is not on PATH: install FUSE 3 (Debian/Ubuntu: apt-get install fuse3)"
            ),
            MountError::BadMountPoint(path, why) => {
                write!(f, "cannot mount on {}: {why}", path.display())
            }
            MountError::Mount(e) => write!(f, "mount failed: {e}"),
        }
    }
}

impl std::error::Error for MountError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_what_is_missing_and_how_to_get_it() {
        let missing = MountError::NoDevFuse(io::Error::from(io::ErrorKind::NotFound));
        assert!(missing.to_string().contains("modprobe fuse"), "{missing}");
        let denied = MountError::NoDevFuse(io::Error::from(io::ErrorKind::PermissionDenied));
        assert!(denied.to_string().contains("run as root"), "{denied}");
        let helper = MountError::NoFusermount3.to_string();
        assert!(helper.contains("apt-get install fuse3"), "{helper}");
    }

    #[test]
    fn preflight_refuses_a_missing_or_non_empty_mount_point() {
        if !Path::new("/dev/fuse").exists() {
            eprintln!("SKIPPED: /dev/fuse does not exist (preflight fails on it first)");
            return;
        }
        if !is_root() && find_fusermount3().is_none() {
            assert!(matches!(
                preflight(Path::new("/")),
                Err(MountError::NoFusermount3)
            ));
            return;
        }
        let missing = preflight(Path::new("/nonexistent/rxfuse"));
        assert!(
            matches!(missing, Err(MountError::BadMountPoint(..))),
            "{missing:?}"
        );
        let busy = preflight(Path::new(env!("CARGO_MANIFEST_DIR")));
        let message = busy.as_ref().map_err(ToString::to_string).unwrap_err();
        assert!(message.contains("not empty"), "{message}");
    }
}

/// Where `fusermount3` is, if it is on `PATH`.
pub fn find_fusermount3() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("fusermount3"))
        .find(|candidate| candidate.is_file())
}

/// Checks everything a mount needs (invariant 1).
pub fn preflight(mountpoint: &Path) -> Result<(), MountError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map_err(MountError::NoDevFuse)?;
    if !is_root() {
        find_fusermount3().ok_or(MountError::NoFusermount3)?;
    }
    let bad = |why: String| MountError::BadMountPoint(mountpoint.to_path_buf(), why);
    let mut entries = std::fs::read_dir(mountpoint).map_err(|e| bad(e.to_string()))?;
    if entries.next().is_some() {
        return Err(bad("the directory is not empty".into()));
    }
    Ok(())
}

/// Mounts `fs` on `mountpoint` (after [`preflight`]) and starts serving it on the current tokio
/// runtime. Await the handle to wait for an unmount, or use [`serve_until_signal`].
pub async fn mount<B: Backend>(
    fs: RxFs<B>,
    mountpoint: &Path,
    fs_name: &str,
) -> Result<MountHandle, MountError> {
    preflight(mountpoint)?;
    let mut options = MountOptions::default();
    options
        .fs_name(fs_name)
        .uid(current_uid())
        .gid(current_gid());
    let session = Session::new(options);
    // Through fusermount3 whenever it is there, also for root: fuse3 then reads /dev/fuse
    // non-blocking on the runtime's own threads (epoll), while its mount(2) path reads on a
    // blocking-pool thread, one more thread hop for every request and every FUSE_INTERRUPT.
    // Root without fusermount3 still mounts, with mount(2).
    let mounted = if find_fusermount3().is_none() && is_root() {
        session.mount(fs, mountpoint).await
    } else {
        session.mount_with_unprivileged(fs, mountpoint).await
    };
    mounted.map_err(MountError::Mount)
}

/// Whether the process runs as root (effective user id 0), which mounts without `fusermount3`.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions, touches no memory of ours and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The calling process's user id.
pub fn current_uid() -> u32 {
    // SAFETY: getuid has no preconditions, touches no memory of ours and cannot fail.
    unsafe { libc::getuid() }
}

/// The calling process's group id.
pub fn current_gid() -> u32 {
    // SAFETY: getgid has no preconditions, touches no memory of ours and cannot fail.
    unsafe { libc::getgid() }
}

/// Why [`serve_until_signal`] returned.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Stopped {
    /// SIGINT or SIGTERM arrived; the file system was unmounted.
    Signal,
    /// It was unmounted from outside (`fusermount3 -u`).
    Unmounted,
}

/// Serves until SIGINT or SIGTERM, then calls `before_unmount` (to cancel what is in flight) and
/// unmounts; or until someone else unmounts (invariant 2).
pub async fn serve_until_signal<F, Fut>(
    mut handle: MountHandle,
    mountpoint: &Path,
    before_unmount: F,
) -> io::Result<Stopped>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::select! {
        result = &mut handle => {
            result?;
            return Ok(Stopped::Unmounted);
        }
        _ = interrupt.recv() => {}
        _ = terminate.recv() => {}
    }
    before_unmount().await;
    if let Err(e) = handle.unmount().await {
        // A process still has the mount busy (its working directory, say): detach it lazily so
        // the daemon can still exit; the kernel finishes the unmount when it is no longer used.
        lazy_unmount(mountpoint).map_err(|lazy| {
            io::Error::other(format!(
                "unmount failed ({e}), and so did a lazy one ({lazy})"
            ))
        })?;
    }
    Ok(Stopped::Signal)
}

/// Detaches the mount at once, even if it is busy (the kernel finishes when it is no longer
/// used): `umount2(MNT_DETACH)` as root, `fusermount3 -u -z` otherwise.
pub fn lazy_unmount(mountpoint: &Path) -> io::Result<()> {
    if is_root() {
        let path = std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes())
            .map_err(|_| io::Error::other("mount point path holds a NUL byte"))?;
        // SAFETY: `path` is a valid NUL-terminated string that outlives the call.
        let rc = unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        return if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        };
    }
    let fusermount = find_fusermount3().ok_or_else(|| io::Error::other("fusermount3 not found"))?;
    let status = Command::new(fusermount)
        .arg("-u")
        .arg("-z")
        .arg(mountpoint)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "fusermount3 -u -z exited with {status}"
        )))
    }
}

/// Whether `path` is a mount point right now (per `/proc/self/mountinfo`).
pub fn is_mounted(path: &Path) -> bool {
    let Ok(path) = path
        .canonicalize()
        .or_else(|_| Ok::<_, io::Error>(path.to_path_buf()))
    else {
        return false;
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = path.to_string_lossy();
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|mount| mount == wanted)
}

/// Unmounts its mount point when dropped, even while a failing test unwinds (invariant 3).
#[must_use = "the guard unmounts when it is dropped"]
pub struct UnmountGuard {
    mountpoint: PathBuf,
}

impl UnmountGuard {
    /// A guard for `mountpoint`.
    pub fn new(mountpoint: &Path) -> Self {
        UnmountGuard {
            mountpoint: mountpoint.to_path_buf(),
        }
    }
}

impl Drop for UnmountGuard {
    fn drop(&mut self) {
        if is_mounted(&self.mountpoint) {
            let _ = lazy_unmount(&self.mountpoint);
        }
    }
}
