//! The handshake of a peer link: mutual TLS (unless `[link] tls = false`), then `Hello`
//! answered by `Welcome` or `Refuse`, then the takeover of the TLS session by the link's own
//! record layer. It runs in the dialing or accepting task, before the event loop learns of
//! the link; only small frames are accepted until it is done.

use bytes::{Buf, BytesMut};
use dvs_wire::frame::HANDSHAKE_MAX_FRAME;
use dvs_wire::peer::{Hello, LinkFrame, PeerFrame, Refuse, Welcome};
use dvs_wire::{FrameDecoder, NodeId, PROTOCOL_VERSION};
use std::net::SocketAddr;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::event_loop::Ctx;
use crate::wire::{Sock, TlsLink};

/// What a refused peer is told: nothing about the cluster. The node logs the real reason.
const REFUSAL: &str = "link refused";

/// Reads one frame during the handshake (before the link is shared with the event loop).
async fn read_frame<S: AsyncRead + Unpin>(
    stream: &mut S,
    dec: &mut FrameDecoder,
) -> Result<PeerFrame, String> {
    let mut buf = [0u8; 4096];
    loop {
        match dec.next_frame::<PeerFrame>() {
            Ok(Some((f, _))) => return Ok(f),
            Ok(None) => {}
            Err(e) => return Err(format!("malformed handshake frame: {e}")),
        }
        let n = match stream.read(&mut buf).await {
            // A TLS peer that closes without close_notify.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
            r => r.map_err(|e| e.to_string())?,
        };
        if n == 0 {
            return Err("connection closed during the handshake".into());
        }
        dec.extend(&buf[..n]);
    }
}

async fn write_frame<S: AsyncWrite + Unpin>(stream: &mut S, f: &PeerFrame) -> std::io::Result<()> {
    let b = dvs_wire::frame::encode_to_vec(f, &[], false).expect("handshake frames encode");
    stream.write_all(&b).await?;
    stream.flush().await
}

/// Tells a refused peer [`REFUSAL`] and ends the stream (over TLS with close_notify, so
/// that the peer sees a clean end rather than a truncation).
async fn refuse<S: AsyncWrite + Unpin>(stream: &mut S) {
    let _ = write_frame(
        stream,
        &PeerFrame::Link(LinkFrame::Refuse(Refuse {
            reason: REFUSAL.into(),
        })),
    )
    .await;
    let _ = stream.shutdown().await;
}

/// A link that finished its handshake: the socket (with its TLS session), the frames read
/// past the handshake, and the serial of the peer's certificate.
pub(crate) struct Established {
    pub sock: Sock,
    pub dec: FrameDecoder,
    pub serial: Option<String>,
}

/// The accepting side's handshake: TLS (unless off), then `Hello` → `Welcome`.
pub(crate) async fn accept_handshake(
    ctx: &Ctx,
    mut tcp: TcpStream,
) -> Result<(NodeId, Established), String> {
    let me = ctx.me.id;
    let cluster = ctx.cfg.cluster_id.clone();
    let tls = ctx.auth.borrow().tls.as_ref().map(|t| t.server.clone());
    let mut dec = FrameDecoder::with_limit(HANDSHAKE_MAX_FRAME);
    let check_hello = |hello: &PeerFrame, cert_node: Option<NodeId>| -> Result<NodeId, String> {
        match hello {
            PeerFrame::Link(LinkFrame::Hello(Hello { version, .. }))
                if *version != PROTOCOL_VERSION =>
            {
                Err(format!(
                    "protocol version mismatch (ours {PROTOCOL_VERSION}, theirs {version})"
                ))
            }
            PeerFrame::Link(LinkFrame::Hello(Hello { cluster: c, .. })) if *c != cluster => {
                Err(format!("its Hello names another cluster ({c:?})"))
            }
            PeerFrame::Link(LinkFrame::Hello(Hello { node, .. }))
                if cert_node.is_some_and(|n| n != *node) =>
            {
                Err(format!(
                    "it claims node id {node} but its certificate names node {}",
                    cert_node.unwrap_or_default()
                ))
            }
            // With TLS the cluster's CA vouches for the node id (a node may join without
            // being in this node's config); a plaintext link has only the config to go by.
            PeerFrame::Link(LinkFrame::Hello(Hello { node, .. }))
                if *node == me || (cert_node.is_none() && ctx.cfg.node_by_id(*node).is_none()) =>
            {
                Err(format!(
                    "node id {node} is not a peer in our cluster config"
                ))
            }
            PeerFrame::Link(LinkFrame::Hello(Hello { node, .. })) => Ok(*node),
            other => Err(format!("expected Hello, got {}", other.kind())),
        }
    };
    match tls {
        Some(cfg) => {
            let mut stream = tokio_rustls::TlsAcceptor::from(cfg)
                .accept(tcp)
                .await
                .map_err(|e| format!("TLS handshake failed: {e}"))?;
            let id =
                dvs_tls::verifier::peer_identity(stream.get_ref().1).map_err(|e| e.to_string())?;
            let refusal = ctx.auth.borrow().refuse(&cluster, &id);
            let hello = match refusal {
                Some(r) => Err(r),
                None => read_frame(&mut stream, &mut dec).await,
            };
            let node = hello.and_then(|h| check_hello(&h, Some(id.node)));
            let node = match node {
                Ok(n) => n,
                Err(e) => {
                    refuse(&mut stream).await;
                    return Err(e);
                }
            };
            write_frame(
                &mut stream,
                &PeerFrame::Link(LinkFrame::Welcome(Welcome { node: me })),
            )
            .await
            .map_err(|e| e.to_string())?;
            let (mut tcp, conn) = stream.into_inner();
            let (sealer, mut opener) = dvs_tls::records::take_over(conn)?;
            // The dialer speaks first on the record layer (see `dial_handshake`): until then
            // nothing is sent, so no record of ours can reach the dialer's rustls session.
            // (A dialer that sent more behind its Hello broke the protocol: its bytes are
            // already in `dec`, and the link fails on them.)
            let mut cipher_in = BytesMut::new();
            while dec.buffered() == 0 {
                let used = opener
                    .open(&mut cipher_in, |d| dec.extend(d))
                    .map_err(|e| format!("first record: {e}"))?;
                cipher_in.advance(used);
                if dec.buffered() > 0 {
                    break;
                }
                if cipher_in.len() > 2 * HANDSHAKE_MAX_FRAME + 64 {
                    return Err("first record too large".into());
                }
                cipher_in.reserve(4096);
                let n = tcp
                    .read_buf(&mut cipher_in)
                    .await
                    .map_err(|e| e.to_string())?;
                if n == 0 {
                    return Err("connection closed during the handshake".into());
                }
            }
            Ok((
                node,
                Established {
                    sock: Sock::Tls(
                        tcp,
                        Box::new(TlsLink {
                            sealer,
                            opener,
                            cipher_in,
                        }),
                    ),
                    dec,
                    serial: Some(id.serial),
                },
            ))
        }
        None => {
            let hello = read_frame(&mut tcp, &mut dec).await;
            let node = match hello.and_then(|h| check_hello(&h, None)) {
                Ok(n) => n,
                Err(e) => {
                    refuse(&mut tcp).await;
                    return Err(e);
                }
            };
            write_frame(
                &mut tcp,
                &PeerFrame::Link(LinkFrame::Welcome(Welcome { node: me })),
            )
            .await
            .map_err(|e| e.to_string())?;
            Ok((
                node,
                Established {
                    sock: Sock::Tcp(tcp),
                    dec,
                    serial: None,
                },
            ))
        }
    }
}

/// The dialing side's handshake: TLS (unless off), then `Hello` → `Welcome`.
pub(crate) async fn dial_handshake(
    ctx: &Ctx,
    peer: NodeId,
    addr: SocketAddr,
) -> Result<Established, String> {
    let me = ctx.me.id;
    let cluster = ctx.cfg.cluster_id.clone();
    let tls = ctx.auth.borrow().tls.as_ref().map(|t| t.client.clone());
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let hello = PeerFrame::Link(LinkFrame::Hello(Hello {
        version: PROTOCOL_VERSION,
        cluster: cluster.clone(),
        node: me,
    }));
    let mut dec = FrameDecoder::with_limit(HANDSHAKE_MAX_FRAME);
    let answer = |f: Result<PeerFrame, String>| match f {
        Ok(PeerFrame::Link(LinkFrame::Welcome(Welcome { node }))) if node == peer => Ok(()),
        Ok(PeerFrame::Link(LinkFrame::Welcome(Welcome { node }))) => Err(format!(
            "{addr} is node {node}, not node {peer} as configured"
        )),
        Ok(PeerFrame::Link(LinkFrame::Refuse(Refuse { reason }))) => Err(format!(
            "node {peer} refused our link: {reason} (its log says why)"
        )),
        Ok(other) => Err(format!("unexpected handshake answer {}", other.kind())),
        Err(e) => Err(e),
    };
    match tls {
        Some(cfg) => {
            let mut stream = tokio_rustls::TlsConnector::from(cfg)
                .connect(dvs_tls::verifier::server_name(), tcp)
                .await
                .map_err(|e| format!("TLS handshake with {addr} failed: {e}"))?;
            let id =
                dvs_tls::verifier::peer_identity(stream.get_ref().1).map_err(|e| e.to_string())?;
            let refusal = ctx.auth.borrow().refuse(&cluster, &id);
            if let Some(r) = refusal {
                return Err(format!("refusing the link to {addr}: {r}"));
            }
            if id.node != peer {
                return Err(format!(
                    "{addr} presents the certificate of node {}, not node {peer} as configured",
                    id.node
                ));
            }
            write_frame(&mut stream, &hello)
                .await
                .map_err(|e| e.to_string())?;
            answer(read_frame(&mut stream, &mut dec).await)?;
            let (mut tcp, conn) = stream.into_inner();
            let (mut sealer, opener) = dvs_tls::records::take_over(conn)?;
            // The first record on the record layer, which the accepting side waits for.
            let ping =
                dvs_wire::frame::encode_to_vec(&PeerFrame::Link(LinkFrame::Ping), &[], false)
                    .expect("a ping encodes");
            let mut out = Vec::new();
            sealer.seal(&ping, &mut out).map_err(|e| e.to_string())?;
            tcp.write_all(&out).await.map_err(|e| e.to_string())?;
            Ok(Established {
                sock: Sock::Tls(
                    tcp,
                    Box::new(TlsLink {
                        sealer,
                        opener,
                        cipher_in: BytesMut::new(),
                    }),
                ),
                dec,
                serial: Some(id.serial),
            })
        }
        None => {
            let mut tcp = tcp;
            write_frame(&mut tcp, &hello)
                .await
                .map_err(|e| e.to_string())?;
            answer(read_frame(&mut tcp, &mut dec).await)?;
            Ok(Established {
                sock: Sock::Tcp(tcp),
                dec,
                serial: None,
            })
        }
    }
}
