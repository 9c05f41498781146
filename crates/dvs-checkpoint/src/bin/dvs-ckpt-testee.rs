//! A tiny migratable program for the checkpoint tests.
//!
//! Usage: `dvs-ckpt-testee [--fd N] [--ballast-mib M]`
//!
//! It serves requests of one byte on the stream socket at fd N (default 0) and answers each
//! with 8 bytes, little endian:
//! * `n`: increments its counter and returns it (state that must survive a migration);
//! * `c`: returns a checksum of its ballast (memory that must survive a migration);
//! * `p`: returns its pid as it sees it (1 in its own pid namespace).
//!
//! It exits on EOF. The ballast (M MiB, default 0, filled with a pattern so that every page is
//! really there) makes images of a chosen size.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::FromRawFd;

fn main() {
    let mut fd = 0;
    let mut ballast_mib = 0usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().unwrap_or_else(|| usage(&a));
        match a.as_str() {
            "--fd" => fd = v.parse().unwrap_or_else(|_| usage(&a)),
            "--ballast-mib" => ballast_mib = v.parse().unwrap_or_else(|_| usage(&a)),
            _ => usage(&a),
        }
    }
    let ballast: Vec<u8> = (0..ballast_mib << 20).map(|i| (i % 251) as u8).collect();
    // SAFETY: the fd is handed to us by whoever started us, and nothing else in this program
    // uses it.
    let mut sock = unsafe { File::from_raw_fd(fd) };
    let mut counter: u64 = 0;
    let mut req = [0u8; 1];
    loop {
        match sock.read(&mut req) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
        let answer = match req[0] {
            b'n' => {
                counter += 1;
                counter
            }
            b'c' => ballast
                .iter()
                .fold(0u64, |h, &b| h.wrapping_mul(31).wrapping_add(b as u64)),
            b'p' => std::process::id() as u64,
            _ => u64::MAX,
        };
        if sock.write_all(&answer.to_le_bytes()).is_err() {
            return;
        }
    }
}

fn usage(arg: &str) -> ! {
    eprintln!(
        "dvs-ckpt-testee: bad argument {arg:?}; usage: dvs-ckpt-testee [--fd N] [--ballast-mib M]"
    );
    std::process::exit(2)
}
