//! Copies between process address spaces with `process_vm_readv` / `process_vm_writev`.

use std::io::{IoSlice, IoSliceMut};

use dvs_wire::Errno;
use nix::sys::uio::{process_vm_readv, process_vm_writev, RemoteIoVec};
use nix::unistd::Pid;

/// Size of the chunks a vcopy moves in (locally through a bounce buffer, remotely per frame).
pub const CHUNK: usize = 256 * 1024;

fn map_errno(e: nix::Error, died: Errno) -> Errno {
    match e {
        nix::Error::EFAULT => Errno::BadAddress,
        nix::Error::ESRCH => died,
        nix::Error::EPERM => Errno::Permission,
        _ => Errno::Invalid,
    }
}

/// Reads `buf.len()` bytes at `addr` of process `pid`.
pub fn read(pid: i32, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
    let mut done = 0;
    while done < buf.len() {
        let remote = [RemoteIoVec {
            base: (addr as usize).wrapping_add(done),
            len: buf.len() - done,
        }];
        let n = process_vm_readv(
            Pid::from_raw(pid),
            &mut [IoSliceMut::new(&mut buf[done..])],
            &remote,
        )
        .map_err(|e| map_errno(e, Errno::SrcDied))?;
        if n == 0 {
            return Err(Errno::BadAddress);
        }
        done += n;
    }
    Ok(())
}

/// Writes `data` at `addr` of process `pid`.
pub fn write(pid: i32, addr: u64, data: &[u8]) -> Result<(), Errno> {
    let mut done = 0;
    while done < data.len() {
        let remote = [RemoteIoVec {
            base: (addr as usize).wrapping_add(done),
            len: data.len() - done,
        }];
        let n = process_vm_writev(Pid::from_raw(pid), &[IoSlice::new(&data[done..])], &remote)
            .map_err(|e| map_errno(e, Errno::DstDied))?;
        if n == 0 {
            return Err(Errno::BadAddress);
        }
        done += n;
    }
    Ok(())
}

/// Copies `len` bytes between two processes through `bounce`.
pub fn copy(
    src_pid: i32,
    src_addr: u64,
    dst_pid: i32,
    dst_addr: u64,
    len: u64,
    bounce: &mut Vec<u8>,
) -> Result<(), Errno> {
    let mut off = 0u64;
    while off < len {
        let n = ((len - off) as usize).min(CHUNK);
        bounce.resize(n, 0);
        read(src_pid, src_addr + off, &mut bounce[..n])?;
        write(dst_pid, dst_addr + off, &bounce[..n])?;
        off += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_within_own_process_and_reports_bad_addresses() {
        let me = std::process::id() as i32;
        let src: Vec<u8> = (0..600_000u32).map(|i| i as u8).collect();
        let mut dst = vec![0u8; src.len()];
        let mut bounce = Vec::new();
        copy(
            me,
            src.as_ptr() as u64,
            me,
            dst.as_mut_ptr() as u64,
            src.len() as u64,
            &mut bounce,
        )
        .unwrap();
        assert_eq!(src, dst);
        let mut small = [0u8; 16];
        assert_eq!(read(me, 8, &mut small), Err(Errno::BadAddress));
    }
}
