//! The sockets side of an inventory: the kernel's tables of TCP and UDP sockets
//! (`/proc/PID/net/{tcp,tcp6,udp,udp6}`), unix sockets with their peers (sock_diag over
//! netlink, since `/proc/net/unix` does not say who a socket is connected to), and the
//! addresses of this host's interfaces.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// TCP or UDP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proto {
    /// A TCP socket.
    Tcp,
    /// A UDP socket.
    Udp,
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        })
    }
}

/// The kernel's TCP states as `/proc/net/tcp` numbers them.
pub mod tcp_state {
    /// A connection that carries data.
    pub const ESTABLISHED: u8 = 0x01;
    /// An outgoing connection being set up.
    pub const SYN_SENT: u8 = 0x02;
    /// An incoming connection being set up.
    pub const SYN_RECV: u8 = 0x03;
    /// Not connected (created, or bound without `listen`); UDP sockets show this too.
    pub const CLOSE: u8 = 0x07;
    /// A listening socket.
    pub const LISTEN: u8 = 0x0A;
}

/// One TCP or UDP socket from the kernel's table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InetSocket {
    /// Its inode (`socket:[INODE]` in `/proc/PID/fd`).
    pub inode: u64,
    /// TCP or UDP.
    pub proto: Proto,
    /// The local address and port (unspecified address: bound to every address).
    pub local: SocketAddr,
    /// The remote end (unspecified, port 0: not connected).
    pub remote: SocketAddr,
    /// The state number ([`tcp_state`]; UDP uses ESTABLISHED for connected, CLOSE otherwise).
    pub state: u8,
}

impl InetSocket {
    /// Whether it has a remote end.
    pub fn connected(&self) -> bool {
        self.remote.port() != 0
    }

    /// Whether it is bound to a local port.
    pub fn bound(&self) -> bool {
        self.local.port() != 0
    }
}

/// Parses one of `/proc/net/{tcp,tcp6,udp,udp6}`: the header line, then a socket per line
/// (`sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...`). Lines that do not
/// parse are skipped: the format has stayed the same for decades, and a partial answer is
/// better than none.
pub fn parse_inet_table(text: &str, proto: Proto) -> Vec<InetSocket> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 {
                return None;
            }
            Some(InetSocket {
                local: parse_hex_addr(f[1])?,
                remote: parse_hex_addr(f[2])?,
                state: u8::from_str_radix(f[3], 16).ok()?,
                inode: f[9].parse().ok()?,
                proto,
            })
        })
        .collect()
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6): the kernel prints the address
/// as 32-bit words in host byte order, each as hex.
fn parse_hex_addr(s: &str) -> Option<SocketAddr> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok()?;
        Some(w.to_ne_bytes())
    };
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            let v6 = Ipv6Addr::from(b);
            // A v4 peer of a dual-stack socket: compare it as the v4 address it is.
            match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            }
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The TCP and UDP sockets of the network namespace process `pid` is in, by inode.
pub fn inet_sockets(pid: i32) -> io::Result<HashMap<u64, InetSocket>> {
    let mut out = HashMap::new();
    for (file, proto) in [
        ("tcp", Proto::Tcp),
        ("tcp6", Proto::Tcp),
        ("udp", Proto::Udp),
        ("udp6", Proto::Udp),
    ] {
        let text = match std::fs::read_to_string(format!("/proc/{pid}/net/{file}")) {
            Ok(t) => t,
            // A kernel without IPv6 has no tcp6/udp6.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for s in parse_inet_table(&text, proto) {
            // Inode 0: a socket without a file (TIME_WAIT, a request not yet accepted).
            if s.inode != 0 {
                out.insert(s.inode, s);
            }
        }
    }
    Ok(out)
}

/// One unix socket as sock_diag reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnixSocket {
    /// Its inode.
    pub inode: u64,
    /// `SOCK_STREAM`, `SOCK_DGRAM` or `SOCK_SEQPACKET`.
    pub kind: u8,
    /// Its state (`TCP_LISTEN` = 10 for a listening socket, 1 connected, 7 unconnected).
    pub state: u8,
    /// The name it is bound to: a path, or `@name` for the abstract namespace.
    pub name: Option<String>,
    /// The inode of the socket at the other end, if connected.
    pub peer: Option<u64>,
}

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const UDIAG_SHOW_NAME: u32 = 0x1;
const UDIAG_SHOW_PEER: u32 = 0x4;
const UNIX_DIAG_NAME: u16 = 0;
const UNIX_DIAG_PEER: u16 = 2;
/// `struct nlmsghdr`.
const NLMSG_HDR: usize = 16;
/// `struct unix_diag_msg`.
const UNIX_DIAG_MSG: usize = 16;
/// Most receive rounds of one dump: far more than any host has sockets to send.
const MAX_ROUNDS: usize = 100_000;

/// Every unix socket of the caller's network namespace, by inode, with its name and peer.
pub fn unix_sockets() -> io::Result<HashMap<u64, UnixSocket>> {
    // SAFETY: socket(2) has no memory preconditions; the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&sock);
    let mut req = Vec::with_capacity(NLMSG_HDR + 24);
    req.extend_from_slice(&((NLMSG_HDR + 24) as u32).to_ne_bytes());
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    req.extend_from_slice(&flags.to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
    req.push(libc::AF_UNIX as u8);
    req.push(0); // protocol
    req.extend_from_slice(&0u16.to_ne_bytes());
    req.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    req.extend_from_slice(&0u32.to_ne_bytes()); // any inode
    req.extend_from_slice(&(UDIAG_SHOW_NAME | UDIAG_SHOW_PEER).to_ne_bytes());
    req.extend_from_slice(&[0xff; 8]); // no cookie
                                       // SAFETY: req is a valid buffer of req.len() bytes.
    let sent = unsafe { libc::send(raw, req.as_ptr().cast(), req.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = HashMap::new();
    let mut buf = vec![0u8; 64 * 1024];
    for _ in 0..MAX_ROUNDS {
        // SAFETY: buf is a valid writable buffer of buf.len() bytes.
        let n = unsafe { libc::recv(raw, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let (socks, done) = parse_unix_diag(&buf[..n as usize])?;
        out.extend(socks.into_iter().map(|s| (s.inode, s)));
        if done || n == 0 {
            return Ok(out);
        }
    }
    Err(io::Error::other(
        "sock_diag sent no end of its unix socket dump",
    ))
}

/// Parses one receive of a sock_diag unix dump: the sockets, and whether the dump ended.
pub fn parse_unix_diag(mut buf: &[u8]) -> io::Result<(Vec<UnixSocket>, bool)> {
    let u16_at = |b: &[u8], i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
    let u32_at = |b: &[u8], i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HDR {
        let len = u32_at(buf, 0) as usize;
        if len < NLMSG_HDR || len > buf.len() {
            return Err(io::Error::other("malformed sock_diag message"));
        }
        let ty = u16_at(buf, 4);
        let body = &buf[NLMSG_HDR..len];
        match ty {
            NLMSG_DONE => return Ok((out, true)),
            NLMSG_ERROR => {
                let errno = if body.len() >= 4 {
                    -(u32_at(body, 0) as i32)
                } else {
                    libc::EIO
                };
                return Err(io::Error::from_raw_os_error(errno));
            }
            SOCK_DIAG_BY_FAMILY if body.len() >= UNIX_DIAG_MSG => {
                let mut s = UnixSocket {
                    kind: body[1],
                    state: body[2],
                    inode: u32_at(body, 4) as u64,
                    name: None,
                    peer: None,
                };
                let mut attrs = &body[UNIX_DIAG_MSG..];
                while attrs.len() >= 4 {
                    let alen = u16_at(attrs, 0) as usize;
                    if alen < 4 || alen > attrs.len() {
                        break;
                    }
                    let data = &attrs[4..alen];
                    match u16_at(attrs, 2) {
                        UNIX_DIAG_NAME if !data.is_empty() => {
                            s.name = Some(match data.split_first() {
                                // The abstract namespace: a leading NUL, shown as '@'.
                                Some((0, rest)) => format!("@{}", String::from_utf8_lossy(rest)),
                                _ => String::from_utf8_lossy(data)
                                    .trim_end_matches('\0')
                                    .to_string(),
                            })
                        }
                        UNIX_DIAG_PEER if data.len() >= 4 => {
                            s.peer = Some(u32_at(data, 0) as u64).filter(|p| *p != 0)
                        }
                        _ => {}
                    }
                    let step = (alen + 3) & !3;
                    attrs = attrs.get(step..).unwrap_or(&[]);
                }
                out.push(s);
            }
            _ => {}
        }
        let step = (len + 3) & !3;
        buf = buf.get(step..).unwrap_or(&[]);
    }
    Ok((out, false))
}

/// The addresses of this host's interfaces (the caller's network namespace), loopback
/// included.
pub fn host_addresses() -> io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: cur is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr whose family says its real type.
            let family = unsafe { (*ifa.ifa_addr).sa_family } as libc::c_int;
            if family == libc::AF_INET {
                // SAFETY: an AF_INET address is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                    sin.sin_addr.s_addr,
                ))));
            } else if family == libc::AF_INET6 {
                // SAFETY: an AF_INET6 address is a sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: head came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out.sort();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_tables_parse() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1538 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 40112 1 0000000000000000 100 0 0 10 0\n\
   1: 0100007F:9CB0 0100007F:1538 01 00000000:00000000 00:00000000 00000000     0        0 40113 1 0000000000000000 20 4 30 10 -1\n\
   2: garbage\n";
        let t = parse_inet_table(text, Proto::Tcp);
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].local, "127.0.0.1:5432".parse().unwrap());
        assert_eq!(t[0].state, tcp_state::LISTEN);
        assert!(!t[0].connected() && t[0].bound());
        assert_eq!(t[1].remote, "127.0.0.1:5432".parse().unwrap());
        assert_eq!(t[1].local.port(), 40112);
        assert_eq!(t[1].inode, 40113);
        assert!(t[1].connected());
    }

    #[test]
    fn v6_tables_parse_and_mapped_v4_becomes_v4() {
        let text = "header\n\
   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 7 1 0\n\
   1: 0000000000000000FFFF00000100007F:1F90 0000000000000000FFFF00000100007F:A000 01 00000000:00000000 00:00000000 00000000     0        0 8 1 0\n\
   2: 00000000000000000000000001000000:0035 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 9 2 0\n";
        let t = parse_inet_table(text, Proto::Udp);
        assert_eq!(t[0].local, "[::]:8080".parse().unwrap());
        assert_eq!(t[1].local, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(t[1].remote.port(), 0xA000);
        assert_eq!(t[2].local, "[::1]:53".parse().unwrap());
        assert_eq!(t[2].proto, Proto::Udp);
    }

    /// A sock_diag message as the kernel lays it out.
    fn diag_msg(inode: u32, state: u8, name: Option<&[u8]>, peer: Option<u32>) -> Vec<u8> {
        let mut body = vec![libc::AF_UNIX as u8, libc::SOCK_STREAM as u8, state, 0];
        body.extend_from_slice(&inode.to_ne_bytes());
        body.extend_from_slice(&[0; 8]);
        let mut attr = |ty: u16, data: &[u8]| {
            body.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
            body.extend_from_slice(&ty.to_ne_bytes());
            body.extend_from_slice(data);
            while body.len() % 4 != 0 {
                body.push(0);
            }
        };
        if let Some(n) = name {
            attr(UNIX_DIAG_NAME, n);
        }
        if let Some(p) = peer {
            attr(UNIX_DIAG_PEER, &p.to_ne_bytes());
        }
        let mut m = ((NLMSG_HDR + body.len()) as u32).to_ne_bytes().to_vec();
        m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&body);
        m
    }

    #[test]
    fn unix_diag_messages_parse() {
        let mut buf = diag_msg(11, 10, Some(b"/run/dvs/ipc.sock"), None);
        buf.extend(diag_msg(12, 1, Some(b"\0hidden"), Some(13)));
        buf.extend(diag_msg(13, 1, None, Some(12)));
        let (socks, done) = parse_unix_diag(&buf).unwrap();
        assert!(!done);
        assert_eq!(socks.len(), 3);
        assert_eq!(socks[0].name.as_deref(), Some("/run/dvs/ipc.sock"));
        assert_eq!(socks[0].peer, None);
        assert_eq!(socks[1].name.as_deref(), Some("@hidden"));
        assert_eq!(socks[1].peer, Some(13));
        assert_eq!((socks[2].inode, socks[2].peer), (13, Some(12)));
        let mut end = (NLMSG_HDR as u32 + 4).to_ne_bytes().to_vec();
        end.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        end.extend_from_slice(&[0; 14]);
        assert_eq!(parse_unix_diag(&end).unwrap(), (vec![], true));
        assert!(parse_unix_diag(&[0xff; 20]).is_err());
    }

    #[test]
    fn live_tables_see_our_own_sockets() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ino = crate::socket_inode(&l).unwrap();
        let me = std::process::id() as i32;
        let t = inet_sockets(me).unwrap();
        assert_eq!(t[&ino].local, l.local_addr().unwrap());
        assert_eq!(t[&ino].state, tcp_state::LISTEN);
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let (ia, ib) = (
            crate::socket_inode(&a).unwrap(),
            crate::socket_inode(&b).unwrap(),
        );
        let u = unix_sockets().unwrap();
        assert_eq!(u[&ia].peer, Some(ib));
        assert!(host_addresses()
            .unwrap()
            .contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)));
    }
}
