//! The commands' standard output. A reader that stops reading (`flotilla workflows list | head`)
//! ends the command quietly, as it ends any Unix tool, where `println!` would panic.

use std::io::{self, Write};

/// Prints to standard output, like `print!`.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::out::write(format_args!($($arg)*))
    };
}

/// Prints a line to standard output, like `println!`.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::out::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}

pub(crate) use {out, outln};

/// Writes and flushes (so a followed log shows each line as it comes); a closed pipe exits 0,
/// any other failure to write exits 2 naming it.
pub(crate) fn write(args: std::fmt::Arguments<'_>) {
    let mut stdout = io::stdout().lock();
    if let Err(err) = stdout.write_fmt(args).and_then(|()| stdout.flush()) {
        if err.kind() == io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: could not write to standard output: {err}");
        std::process::exit(2);
    }
}
