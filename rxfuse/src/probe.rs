//! A reader process for end-to-end interrupt tests and the latency benchmark: it installs a
//! SIGUSR1 handler *without* `SA_RESTART`, so a signal that arrives while it is blocked in
//! `read()` on a FUSE file makes that `read()` return `-1`/`EINTR` (DESIGN.md section 5).
//!
//! Protocol on stdout, one line per event, flushed at once:
//! - `ready` once the file is open;
//! - per read: `eintr T`, `ok N T` (N bytes) or `err ERRNO T`, where `T` is `CLOCK_MONOTONIC` in
//!   nanoseconds just after `read()` returned (comparable with [`monotonic_ns`] in another
//!   process on the same machine).
//!
//! Invariants:
//! 1. The handler does nothing but return (async-signal-safe); the probe's behaviour on a signal
//!    is entirely `read()`'s.
//! 2. Every `unsafe` block is one libc call whose arguments are valid for it, as its `// SAFETY:`
//!    comment says.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

extern "C" fn on_sigusr1(_signal: libc::c_int) {}

/// `CLOCK_MONOTONIC` now, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec; CLOCK_MONOTONIC is always supported on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// Installs the do-nothing SIGUSR1 handler without `SA_RESTART` (invariant 1).
pub fn install_sigusr1_handler() -> io::Result<()> {
    // SAFETY: an all-zero sigaction is a valid starting value (empty mask, no flags).
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigusr1 as extern "C" fn(libc::c_int) as libc::sighandler_t;
    action.sa_flags = 0; // no SA_RESTART: read() returns EINTR
                         // SAFETY: `action.sa_mask` is a valid sigset_t owned by us.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: `action` is fully initialised and the handler is async-signal-safe (it does
    // nothing); a null old-action pointer is allowed.
    let rc = unsafe { libc::sigaction(libc::SIGUSR1, &action, std::ptr::null_mut()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// One `pread()` of `buf.len()` bytes at `offset`, reported as the protocol's line.
pub fn read_once(file: &File, buf: &mut [u8], offset: u64) -> String {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the whole call, and the fd is
    // open for as long as `file` lives.
    let n = unsafe {
        libc::pread(
            file.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            offset as libc::off_t,
        )
    };
    let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
    let at = monotonic_ns();
    if n >= 0 {
        format!("ok {n} {at}")
    } else if errno == libc::EINTR {
        format!("eintr {at}")
    } else {
        format!("err {errno} {at}")
    }
}

/// The probe's main: open `path`, say `ready`, then `count` reads of `len` bytes at offset 0.
pub fn run(path: &Path, count: u64, len: usize) -> io::Result<()> {
    install_sigusr1_handler()?;
    let file = File::open(path)?;
    let mut out = io::stdout().lock();
    writeln!(out, "ready")?;
    out.flush()?;
    let mut buf = vec![0u8; len.max(1)];
    for _ in 0..count {
        let line = read_once(&file, &mut buf, 0);
        writeln!(out, "{line}")?;
        out.flush()?;
    }
    Ok(())
}

/// Sends `signal` to process `pid`.
pub fn send_signal(pid: u32, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: kill has no memory arguments; a bad pid or signal is reported through errno.
    let rc = unsafe { libc::kill(pid as libc::pid_t, signal) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// One line of the probe's output, parsed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ProbeLine {
    /// `ready`.
    Ready,
    /// `read()` returned `EINTR` at this monotonic time.
    Eintr(u64),
    /// `read()` returned this many bytes at this time.
    Ok(u64, u64),
    /// `read()` failed with this errno at this time.
    Err(i32, u64),
}

impl ProbeLine {
    /// Parses one line; `None` if it is not a probe line.
    pub fn parse(line: &str) -> Option<ProbeLine> {
        let mut words = line.split_whitespace();
        match words.next()? {
            "ready" => Some(ProbeLine::Ready),
            "eintr" => Some(ProbeLine::Eintr(words.next()?.parse().ok()?)),
            "ok" => Some(ProbeLine::Ok(
                words.next()?.parse().ok()?,
                words.next()?.parse().ok()?,
            )),
            "err" => Some(ProbeLine::Err(
                words.next()?.parse().ok()?,
                words.next()?.parse().ok()?,
            )),
            _ => None,
        }
    }
}

/// A running probe process, seen from the test or benchmark that started it. Killed and reaped
/// on drop.
pub struct ProbeChild {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl ProbeChild {
    /// Starts `program` with `args` (a probe: `rxfuse-probe FILE COUNT LEN`, or `rxsim probe
    /// ...`), reading its stdout line by line on a thread.
    pub fn spawn<I, S>(program: &Path, args: I) -> io::Result<ProbeChild>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| io::Error::other("no stdout pipe"))?;
        let (send, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(ProbeChild { child, lines })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next protocol line within `timeout`; `None` on timeout or end of output.
    pub fn next_line(&self, timeout: Duration) -> Option<ProbeLine> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(parsed) = ProbeLine::parse(&line) {
                        return Some(parsed);
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// Sends `signal` to the probe.
    pub fn signal(&self, signal: libc::c_int) -> io::Result<()> {
        send_signal(self.pid(), signal)
    }

    /// Waits up to `timeout` for the probe to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for ProbeChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether this machine can mount FUSE file systems: `Ok(false)` only when `/dev/fuse` does not
/// exist (tests skip, saying so); an error when it exists but something else is missing
/// (`fusermount3`, for a user other than root), so a half-set-up machine fails loudly instead of
/// skipping.
pub fn fuse_available() -> Result<bool, String> {
    if !Path::new("/dev/fuse").exists() {
        return Ok(false);
    }
    if crate::mount::is_root() {
        return Ok(true);
    }
    crate::mount::find_fusermount3()
        .map(|_| true)
        .ok_or_else(|| "fusermount3 is not on PATH (apt-get install fuse3)".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_lines_round_trip_and_garbage_is_refused() {
        assert_eq!(ProbeLine::parse("ready"), Some(ProbeLine::Ready));
        assert_eq!(ProbeLine::parse("eintr 17"), Some(ProbeLine::Eintr(17)));
        assert_eq!(ProbeLine::parse("ok 5 9"), Some(ProbeLine::Ok(5, 9)));
        assert_eq!(ProbeLine::parse("err 4 9"), Some(ProbeLine::Err(4, 9)));
        assert_eq!(ProbeLine::parse("eintr"), None);
        assert_eq!(ProbeLine::parse("hello"), None);
        assert_eq!(ProbeLine::parse(""), None);
    }

    #[test]
    fn monotonic_clock_moves_forward() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(b >= a && a > 0);
    }

    #[test]
    fn read_once_on_a_regular_file_reports_the_bytes_read() {
        let path = std::env::temp_dir().join(format!("rxfuse-probe-{}", std::process::id()));
        std::fs::write(&path, b"hello").unwrap();
        let file = File::open(&path).unwrap();
        let mut buf = [0u8; 16];
        let line = read_once(&file, &mut buf, 0);
        std::fs::remove_file(&path).ok();
        assert!(
            matches!(ProbeLine::parse(&line), Some(ProbeLine::Ok(5, _))),
            "{line}"
        );
    }
}
