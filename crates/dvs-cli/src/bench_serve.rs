//! The IPC bench's server and the client loops that measure it, shared by `dvs bench ipc`
//! (the server is a thread of the bench) and `dvs bench ipc --lab` (the server is a
//! separate process, `dvs bench ipc-serve`, launched with `dvs run` on another host, since a
//! process can only bind an endpoint on its own host's node).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::ExitCode;
use std::thread::{self, JoinHandle};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use m3ipc::{DcId, Endpoint, Ep, Message, Source, Timeout};

/// Size of a raw ping-pong message: the size of an M3-IPC message on the wire.
pub const RAW_MSG: usize = 64;
/// Size of one write of the raw TCP stream and of one dvs vcopy.
pub const BLOCK: usize = 1 << 20;

/// Request: reply with the same message.
const MT_PING: i32 = 0x6201;
/// One-way message: taken, not answered.
const MT_ONEWAY: i32 = 0x6202;
/// Request: vcopy word 1 bytes of the server's block to address word 0 of the caller, reply.
const MT_VCOPY: i32 = 0x6203;
/// Request: reply and stop serving.
const MT_STOP: i32 = 0x6204;

/// First byte of a raw connection to `ipc-serve`: echo [`RAW_MSG`]-byte messages until EOF.
pub const RAW_PINGPONG: u8 = b'P';
/// First byte of a raw connection to `ipc-serve`: then a u64 (LE) byte count, that many
/// bytes, answered by one byte once all arrived.
pub const RAW_STREAM: u8 = b'S';

/// A bench server: an endpoint served by its own thread until [`MT_STOP`].
pub struct Server {
    ep: Ep,
    thread: JoinHandle<Result<u64>>,
}

impl Server {
    /// Binds `ep` of `dc` on the node kernel at `socket` and serves it from a new thread.
    pub fn start(socket: &Path, dc: DcId, ep: Ep) -> Result<Server> {
        let mut e = Endpoint::bind_at(socket, dc, ep)
            .with_context(|| format!("cannot bind bench server ep {ep}"))?;
        let thread = thread::spawn(move || serve(&mut e));
        Ok(Server { ep, thread })
    }

    /// Stops the server (through `client`) and joins its thread.
    pub fn stop(self, client: &mut Endpoint) -> Result<u64> {
        stop_server(client, self.ep)?;
        self.thread
            .join()
            .map_err(|_| anyhow!("bench server ep {} panicked", self.ep))?
    }
}

/// Asks the server at `ep` to stop, and waits for its answer.
pub fn stop_server(client: &mut Endpoint, ep: Ep) -> Result<()> {
    client
        .sendrec_timeout(ep, &Message::new(MT_STOP), Timeout::Millis(5000))
        .with_context(|| format!("cannot stop bench server ep {ep}"))?;
    Ok(())
}

/// The server loop: echo pings, take one-way messages, vcopy on request. Returns how many
/// messages it took.
fn serve(ep: &mut Endpoint) -> Result<u64> {
    let block: Vec<u8> = (0..BLOCK).map(|i| (i % 251) as u8 + 1).collect();
    let mut taken = 0u64;
    loop {
        let m = ep.receive(Source::Any)?;
        taken += 1;
        match m.mtype {
            MT_PING => ep.reply(m.source, &m)?,
            MT_ONEWAY => {}
            MT_VCOPY => {
                let addr = m.word(0);
                let len = (m.word(1) as usize).min(BLOCK);
                ep.vcopy_to(m.source, addr, &block[..len])?;
                ep.reply(m.source, &Message::new(MT_VCOPY))?;
            }
            MT_STOP => {
                ep.reply(m.source, &m)?;
                return Ok(taken);
            }
            other => bail!("bench server got an unexpected message type {other:#x}"),
        }
    }
}

/// `dvs bench ipc-serve`: the bench server as a process of its own, bound to the endpoint
/// `dvs run` gave it; with `raw`, it also serves the raw TCP baselines on that address.
pub fn ipc_serve(raw: Option<SocketAddr>) -> Result<ExitCode> {
    // Listening before the bind: once the endpoint is visible, the raw side is ready too.
    if let Some(addr) = raw {
        let l = TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
        thread::spawn(move || {
            for s in l.incoming().flatten() {
                thread::spawn(move || {
                    if let Err(e) = raw_serve(s) {
                        eprintln!("dvs bench ipc-serve: raw connection: {e}");
                    }
                });
            }
        });
    }
    let mut ep = Endpoint::from_env().context("cannot bind the endpoint `dvs run` gave")?;
    let taken = serve(&mut ep)?;
    eprintln!("dvs bench ipc-serve: stopped after {taken} messages");
    Ok(ExitCode::SUCCESS)
}

/// One raw connection: ping-pong echo or stream sink, by its first byte.
fn raw_serve(mut s: TcpStream) -> io::Result<()> {
    s.set_nodelay(true)?;
    let mut mode = [0u8; 1];
    s.read_exact(&mut mode)?;
    match mode[0] {
        RAW_PINGPONG => {
            let mut buf = [0u8; RAW_MSG];
            loop {
                match s.read_exact(&mut buf) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(e),
                }
                s.write_all(&buf)?;
            }
        }
        RAW_STREAM => {
            let mut len = [0u8; 8];
            s.read_exact(&mut len)?;
            let total = u64::from_le_bytes(len) as usize;
            let mut buf = vec![0u8; BLOCK];
            let mut got = 0;
            while got < total {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                got += n;
            }
            s.write_all(&[1])
        }
        other => Err(io::Error::other(format!("unknown raw mode {other}"))),
    }
}

/// Sendrec round trips to `server`: `n` after `warmup`, in nanoseconds.
pub fn sendrec_samples(
    client: &mut Endpoint,
    server: Ep,
    warmup: usize,
    n: usize,
) -> Result<Vec<u64>> {
    let mut msg = Message::new(MT_PING);
    let mut samples = Vec::with_capacity(n);
    for i in 0..warmup + n {
        msg.set_word(0, i as u64);
        let t = Instant::now();
        let r = client.sendrec(server, &msg)?;
        let dt = t.elapsed();
        if r.mtype != MT_PING || r.word(0) != i as u64 {
            bail!("sendrec to ep {server}: wrong reply (type {:#x})", r.mtype);
        }
        if i >= warmup {
            samples.push(dt.as_nanos() as u64);
        }
    }
    Ok(samples)
}

/// Rendezvous sends per second to `server`: `n` after `warmup`.
pub fn send_rate(client: &mut Endpoint, server: Ep, warmup: usize, n: usize) -> Result<f64> {
    let msg = Message::new(MT_ONEWAY);
    for _ in 0..warmup {
        client.send(server, &msg)?;
    }
    let t = Instant::now();
    for _ in 0..n {
        client.send(server, &msg)?;
    }
    let secs = t.elapsed().as_secs_f64();
    Ok(n as f64 / secs)
}

/// The client asks the server (sendrec) to vcopy 1 MiB into `buf`, `mib` times. Returns
/// MB/s (10^6 bytes per second).
pub fn vcopy_rate(client: &mut Endpoint, server: Ep, buf: &mut [u8], mib: usize) -> Result<f64> {
    let once = |client: &mut Endpoint, buf: &mut [u8]| -> Result<()> {
        let mut m = Message::new(MT_VCOPY);
        m.set_word(0, buf.as_mut_ptr() as u64);
        m.set_word(1, buf.len() as u64);
        let r = client.sendrec(server, &m)?;
        if r.mtype != MT_VCOPY {
            bail!(
                "vcopy request to ep {server}: wrong reply (type {:#x})",
                r.mtype
            );
        }
        Ok(())
    };
    buf.fill(0);
    // Warm-up: faults the client's pages in and fills the link's buffers.
    for _ in 0..3 {
        once(client, buf)?;
    }
    if buf[0] != 1 || buf[BLOCK - 1] != ((BLOCK - 1) % 251) as u8 + 1 {
        bail!("vcopy from ep {server} did not fill the client's buffer");
    }
    let t = Instant::now();
    for _ in 0..mib {
        once(client, buf)?;
    }
    let secs = t.elapsed().as_secs_f64();
    Ok((mib * BLOCK) as f64 / secs / 1e6)
}
