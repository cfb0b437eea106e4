//! `rxfuse-probe FILE [COUNT] [LEN]`: the reader process of `rxfuse::probe` (SIGUSR1 handler
//! without `SA_RESTART`, one line per `read()`), for end-to-end interrupt tests.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let Some(path) = args.next().map(PathBuf::from) else {
        eprintln!("usage: rxfuse-probe FILE [COUNT] [LEN]");
        return ExitCode::from(2);
    };
    let mut number = |default: u64| {
        args.next()
            .map(|a| a.to_string_lossy().parse::<u64>())
            .unwrap_or(Ok(default))
    };
    let (Ok(count), Ok(len)) = (number(1), number(4096)) else {
        eprintln!("rxfuse-probe: COUNT and LEN are numbers");
        return ExitCode::from(2);
    };
    match rxfuse::probe::run(&path, count, len as usize) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rxfuse-probe: {}: {e}", path.display());
            ExitCode::FAILURE
        }
    }
}
