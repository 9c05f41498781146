//! Copies between process address spaces with `process_vm_readv` / `process_vm_writev`.

use std::io::{IoSlice, IoSliceMut};

use dvs_wire::peer::{BulkFrame, PeerFrame, VcopyData};
use dvs_wire::Errno;
use nix::sys::uio::{process_vm_readv, process_vm_writev, RemoteIoVec};
use nix::unistd::Pid;

use crate::wire::Wire;

/// Size of the chunks a vcopy moves in (locally through a bounce buffer, remotely per frame).
pub const CHUNK: usize = 256 * 1024;

/// Most bytes of a vcopy stream queued on a link and not sent yet: what a heartbeat or an IPC
/// frame queued behind it waits for at worst.
pub const STREAM_AHEAD: usize = 4 * CHUNK;

/// Streams `head.total` bytes at `src_addr` of process `pid` to the link `w` as `VcopyData`
/// frames (`head` with each chunk's offset), a chunk at a time, never more than
/// [`STREAM_AHEAD`] bytes ahead of what the link has sent. A closed link ends the stream
/// quietly: the core fails the copy when it learns the link is down.
pub(crate) async fn stream(
    w: &Wire,
    pid: i32,
    src_addr: u64,
    head: VcopyData,
) -> Result<(), Errno> {
    let mut bounce = Vec::new();
    let mut off = 0u64;
    while off < head.total && !w.is_closed() {
        let n = ((head.total - off) as usize).min(CHUNK);
        let frame = PeerFrame::Bulk(BulkFrame::VcopyData(VcopyData {
            offset: off,
            ..head.clone()
        }));
        let at = src_addr.wrapping_add(off);
        // Read the process's memory straight into the link's buffer when the link does not
        // compress; through a bounce buffer otherwise.
        let queued = match w.queue_filled(&frame, n, |buf| read(pid, at, buf)) {
            Some(r) => r,
            None => {
                bounce.resize(n, 0);
                match read(pid, at, &mut bounce[..n]) {
                    Ok(()) => w.queue(&frame, &bounce[..n]).map(Ok),
                    Err(e) => Ok(Err(e)),
                }
            }
        };
        match queued {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(e) => {
                tracing::error!("cannot encode a vcopy chunk: {e}");
                return Err(Errno::Invalid);
            }
        }
        off += n as u64;
        w.flush();
        w.wait_pending_below(STREAM_AHEAD).await;
    }
    Ok(())
}

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
