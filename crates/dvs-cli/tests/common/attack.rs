//! Tools of the hostile-input tests: raw frames, a connection that expects to be closed, fake
//! peers (plaintext, or TLS with a stolen or foreign certificate) and a witness client/server
//! pair that proves the cluster still serves.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread;

use dvs_wire::frame;
use dvs_wire::local::Source;
use dvs_wire::FrameDecoder;
use m3ipc::{Endpoint, Message, NodeId};

use super::{Cluster, CALL_TIMEOUT, PATIENCE};

/// Something that can be written to and read from with a timeout (a Unix or TCP socket).
pub trait Conn: Read + Write {
    /// Makes reads fail after [`PATIENCE`] instead of hanging.
    fn set_timeout(&self);
    /// Half-closes: the node reads end of stream, the socket can still be read.
    fn shutdown_write(&self);
}

impl Conn for UnixStream {
    fn set_timeout(&self) {
        self.set_read_timeout(Some(PATIENCE)).unwrap();
    }
    fn shutdown_write(&self) {
        let _ = self.shutdown(Shutdown::Write);
    }
}

impl Conn for TcpStream {
    fn set_timeout(&self) {
        self.set_read_timeout(Some(PATIENCE)).unwrap();
    }
    fn shutdown_write(&self) {
        let _ = self.shutdown(Shutdown::Write);
    }
}

/// Writes `bytes` (the node may close the connection before taking them all, so write errors
/// are fine), optionally half-closes, then reads until the node closes the connection.
/// Returns what the node sent. Fails the test if the node keeps the connection open.
pub fn send_and_expect_close<C: Conn>(
    mut conn: C,
    bytes: &[u8],
    half_close: bool,
    what: &str,
) -> Vec<u8> {
    conn.set_timeout();
    let _ = conn.write_all(bytes);
    if half_close {
        conn.shutdown_write();
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            // A close with our bytes still unread may reset the connection.
            // A TLS peer may also close without close_notify.
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::ConnectionReset | ErrorKind::UnexpectedEof
                ) =>
            {
                return got
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("{what}: the node kept the connection open")
            }
            Err(e) => panic!("{what}: read: {e}"),
        }
    }
}

/// Every frame of type `T` in `bytes`.
pub fn frames<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Vec<T> {
    let mut dec = FrameDecoder::new();
    dec.extend(bytes);
    let mut out = Vec::new();
    while let Ok(Some((f, _))) = dec.next_frame::<T>() {
        out.push(f);
    }
    out
}

/// A frame with the given flags and payload (body length field included by the caller).
pub fn raw_frame(flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = ((payload.len() + 1) as u32).to_le_bytes().to_vec();
    v.push(flags);
    v.extend_from_slice(payload);
    v
}

/// A frame whose body is `body` verbatim (not necessarily a valid encoding).
pub fn frame_with_body(body: &[u8]) -> Vec<u8> {
    let mut payload = (body.len() as u32).to_le_bytes().to_vec();
    payload.extend_from_slice(body);
    raw_frame(0, &payload)
}

/// One valid frame holding `v`.
pub fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    frame::encode_to_vec(v, &[], false).unwrap().to_vec()
}

/// A client/server pair on `node` that answers a sendrec, proving the node still serves.
pub struct Witness {
    client: Endpoint,
    server: Option<thread::JoinHandle<Endpoint>>,
    server_ep: m3ipc::Ep,
}

impl Witness {
    pub fn new(c: &Cluster, client_node: NodeId, server_node: NodeId, base: m3ipc::Ep) -> Witness {
        let mut w = Witness {
            client: c.bind(client_node, base),
            server: None,
            server_ep: base + 1,
        };
        let server = c.bind(server_node, base + 1);
        w.server = Some(Self::serve(server));
        w
    }

    fn serve(mut server: Endpoint) -> thread::JoinHandle<Endpoint> {
        // Errors are left to `check` to notice: the last round ends with the cluster.
        thread::spawn(move || {
            if let Ok(req) = server.receive_timeout(Source::Any, CALL_TIMEOUT) {
                let _ = server.reply(req.source, &Message::new(req.mtype + 1));
            }
            server
        })
    }

    /// One sendrec round trip; fails the test if it does not work.
    pub fn check(&mut self, what: &str) {
        let r = self
            .client
            .sendrec_timeout(self.server_ep, &Message::new(0x10), CALL_TIMEOUT)
            .unwrap_or_else(|e| panic!("{what}: the normal client stopped working: {e}"));
        assert_eq!(r.mtype, 0x11, "{what}");
        let server = self.server.take().unwrap().join().unwrap();
        self.server = Some(Self::serve(server));
    }
}

/// A connection to a node's peer port, as a fake peer makes it.
pub enum PeerConn {
    /// No TLS at all.
    Plain(TcpStream),
    /// TLS, with whatever certificate the attacker holds.
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Read for PeerConn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            PeerConn::Plain(s) => s.read(buf),
            PeerConn::Tls(s) => s.read(buf),
        }
    }
}

impl Write for PeerConn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            PeerConn::Plain(s) => s.write(buf),
            PeerConn::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            PeerConn::Plain(s) => s.flush(),
            PeerConn::Tls(s) => s.flush(),
        }
    }
}

impl Conn for PeerConn {
    fn set_timeout(&self) {
        let s = match self {
            PeerConn::Plain(s) => s,
            PeerConn::Tls(s) => s.get_ref(),
        };
        s.set_read_timeout(Some(PATIENCE)).unwrap();
    }
    fn shutdown_write(&self) {
        match self {
            PeerConn::Plain(s) => {
                let _ = s.shutdown(Shutdown::Write);
            }
            PeerConn::Tls(s) => {
                let _ = s.get_ref().shutdown(Shutdown::Write);
            }
        }
    }
}

impl PeerConn {
    /// A plaintext connection.
    pub fn plain(addr: SocketAddr) -> PeerConn {
        PeerConn::Plain(TcpStream::connect(addr).unwrap())
    }

    /// A TLS connection presenting `tls`'s certificate (the handshake runs on first use).
    pub fn tls(addr: SocketAddr, tls: &dvs_tls::NodeTls) -> PeerConn {
        let conn =
            rustls::ClientConnection::new(tls.client.clone(), dvs_tls::verifier::server_name())
                .unwrap();
        PeerConn::Tls(Box::new(rustls::StreamOwned::new(
            conn,
            TcpStream::connect(addr).unwrap(),
        )))
    }

    /// A TLS connection that presents no certificate at all (and trusts any server).
    pub fn tls_anonymous(addr: SocketAddr) -> PeerConn {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(TrustAnything(provider)))
            .with_no_client_auth();
        let conn =
            rustls::ClientConnection::new(Arc::new(cfg), dvs_tls::verifier::server_name()).unwrap();
        PeerConn::Tls(Box::new(rustls::StreamOwned::new(
            conn,
            TcpStream::connect(addr).unwrap(),
        )))
    }
}

/// An attacker's client: any server certificate will do.
#[derive(Debug)]
struct TrustAnything(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for TrustAnything {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The TLS material of node `id` of cluster `c`, as an attacker who stole its key has it.
pub fn stolen_identity(c: &Cluster, id: NodeId) -> dvs_tls::NodeTls {
    let paths = dvs_tls::TlsPaths {
        dir: c.cfg.tls.dir.clone(),
        node_name: c.node(id).name.clone(),
    };
    dvs_tls::NodeTls::load(&paths, &c.cfg.cluster_id, id).unwrap()
}

/// A certificate that names node `id` of the cluster but is signed by another CA.
pub fn forged_identity(c: &Cluster, id: NodeId) -> (tempfile::TempDir, dvs_tls::NodeTls) {
    let dir = tempfile::tempdir().unwrap();
    let name = c.node(id).name.clone();
    dvs_tls::init_ca(dir.path(), &c.cfg.cluster_id, false).unwrap();
    dvs_tls::issue_node_cert(
        dir.path(),
        &c.cfg.cluster_id,
        id,
        &name,
        dvs_tls::authority::NODE_VALIDITY,
    )
    .unwrap();
    let paths = dvs_tls::TlsPaths {
        dir: dir.path().into(),
        node_name: name,
    };
    let tls = dvs_tls::NodeTls::load(&paths, &c.cfg.cluster_id, id).unwrap();
    (dir, tls)
}

/// Reads frames from a fake peer's link until `stop` says one is the awaited frame.
pub fn read_until<T: serde::de::DeserializeOwned + std::fmt::Debug>(
    conn: &mut impl Read,
    what: &str,
    mut stop: impl FnMut(&T) -> bool,
) -> T {
    let mut dec = FrameDecoder::new();
    let mut buf = [0u8; 4096];
    loop {
        while let Some((f, _)) = dec.next_frame::<T>().unwrap() {
            if stop(&f) {
                return f;
            }
        }
        let n = conn.read(&mut buf).unwrap();
        assert!(n > 0, "{what}: the node closed the link");
        dec.extend(&buf[..n]);
    }
}
