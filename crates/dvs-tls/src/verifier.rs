//! The rustls configs of one node.
//!
//! Both sides of a link present a certificate and verify the other's against the cluster CA
//! (chain, validity now, and the CA's CRL when `crl.pem` exists). Host names play no part: a
//! peer is named by the node id in its certificate, which the link handshake compares with
//! the node id the peer claims (see [`crate::identity`]).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};

use crate::files::read;
use crate::identity::NodeIdentity;
use crate::TlsError;

/// Where a node's TLS files are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsPaths {
    /// The folder with `ca.crt`, `NAME.crt`, `NAME.key` and optionally `crl.pem`.
    pub dir: PathBuf,
    /// The node's name (its file names).
    pub node_name: String,
}

impl TlsPaths {
    /// The cluster CA certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    /// The node's certificate.
    pub fn cert(&self) -> PathBuf {
        self.dir.join(format!("{}.crt", self.node_name))
    }
    /// The node's private key.
    pub fn key(&self) -> PathBuf {
        self.dir.join(format!("{}.key", self.node_name))
    }
    /// The CA's revocation list, if any.
    pub fn crl(&self) -> PathBuf {
        self.dir.join("crl.pem")
    }

    /// A hash of every file's content: it changes when a file is rotated.
    pub fn fingerprint(&self) -> u64 {
        let mut h = DefaultHasher::new();
        for p in [self.ca(), self.cert(), self.key(), self.crl()] {
            std::fs::read(&p).ok().hash(&mut h);
        }
        h.finish()
    }
}

/// A node's TLS configuration, ready for links in both directions.
#[derive(Clone, Debug)]
pub struct NodeTls {
    /// For links this node accepts.
    pub server: Arc<ServerConfig>,
    /// For links this node dials.
    pub client: Arc<ClientConfig>,
    /// What this node's own certificate says.
    pub identity: NodeIdentity,
    /// [`TlsPaths::fingerprint`] of the files it was built from.
    pub fingerprint: u64,
}

/// The crypto provider: ring, with AES-128-GCM first (the fastest suite on x86-64 with
/// AES-NI, which bulk vcopy traffic benefits from).
fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.sort_by_key(|s| match s.suite() {
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => 1,
        _ => 2,
    });
    Arc::new(p)
}

/// Parses every certificate of a PEM file.
pub fn load_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadPem {
            path: path.into(),
            message: format!("bad PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::BadPem {
            path: path.into(),
            message: "no certificate in it".into(),
        });
    }
    Ok(certs)
}

impl NodeTls {
    /// Loads the files of `paths` and checks that the node's own certificate names node `id`
    /// of `cluster` (a misplaced file is reported here, not as a refused link later).
    pub fn load(paths: &TlsPaths, cluster: &str, id: u16) -> Result<NodeTls, TlsError> {
        let fingerprint = paths.fingerprint();
        let ca_path = paths.ca();
        let mut roots = RootCertStore::empty();
        for c in load_certs(&ca_path, &read(&ca_path)?)? {
            roots.add(c).map_err(|e| TlsError::BadPem {
                path: ca_path.clone(),
                message: format!("not a usable CA certificate: {e}"),
            })?;
        }
        let cert_path = paths.cert();
        let chain = load_certs(&cert_path, &read(&cert_path)?)?;
        let identity = NodeIdentity::from_der(&chain[0]).map_err(|e| TlsError::BadPem {
            path: cert_path.clone(),
            message: e.to_string(),
        })?;
        if identity.cluster != cluster || identity.node != id {
            return Err(TlsError::Identity(format!(
                "{} names node {} of cluster {:?}, but this is node {id} of cluster {cluster:?}",
                cert_path.display(),
                identity.node,
                identity.cluster
            )));
        }
        let key_path = paths.key();
        let key =
            PrivateKeyDer::from_pem_slice(&read(&key_path)?).map_err(|e| TlsError::BadPem {
                path: key_path.clone(),
                message: format!("no private key: {e}"),
            })?;
        let crl_path = paths.crl();
        let crls: Vec<CertificateRevocationListDer<'static>> = match std::fs::read(&crl_path) {
            Ok(pem) => CertificateRevocationListDer::pem_slice_iter(&pem)
                .collect::<Result<_, _>>()
                .map_err(|e| TlsError::BadPem {
                    path: crl_path.clone(),
                    message: format!("bad CRL: {e}"),
                })?,
            Err(_) => Vec::new(),
        };
        let provider = provider();
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .with_crls(crls)
                .allow_unknown_revocation_status()
                .only_check_end_entity_revocation()
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier.clone())
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| TlsError::Config(format!("{}: {e}", key_path.display())))?;
        // Links are long-lived and always fully authenticated: no resumption tickets.
        server.send_tls13_tickets = 0;
        // The record layer runs on the link's own buffers after the handshake (see
        // `crate::records`).
        server.enable_secret_extraction = true;
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PeerVerifier { inner: verifier }))
            .with_client_auth_cert(chain, key)
            .map_err(|e| TlsError::Config(format!("{}: {e}", key_path.display())))?;
        client.enable_secret_extraction = true;
        Ok(NodeTls {
            server: Arc::new(server),
            client: Arc::new(client),
            identity,
            fingerprint,
        })
    }
}

/// The name a dialing node gives the TLS server; unused by the verification.
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from("dvs-node").expect("a valid DNS name")
}

/// The identity of the peer of an established TLS connection.
pub fn peer_identity(conn: &rustls::CommonState) -> Result<NodeIdentity, TlsError> {
    let cert = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or_else(|| TlsError::Identity("the peer presented no certificate".into()))?;
    NodeIdentity::from_der(cert)
}

/// Verifies the accepting node's certificate the way the accepting node verifies ours: by the
/// chain to the cluster CA, not by a host name.
#[derive(Debug)]
struct PeerVerifier {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
            .map(|_| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::{init_ca, issue_node_cert, NODE_VALIDITY};

    fn paths(dir: &Path, name: &str) -> TlsPaths {
        TlsPaths {
            dir: dir.into(),
            node_name: name.into(),
        }
    }

    #[test]
    fn loads_and_refuses_a_certificate_of_another_node() {
        let d = tempfile::tempdir().unwrap();
        init_ca(d.path(), "c1", false).unwrap();
        issue_node_cert(d.path(), "c1", 1, "n1", NODE_VALIDITY).unwrap();
        let t = NodeTls::load(&paths(d.path(), "n1"), "c1", 1).unwrap();
        assert_eq!(t.identity.node, 1);
        let e = NodeTls::load(&paths(d.path(), "n1"), "c1", 2).unwrap_err();
        assert!(e.to_string().contains("names node 1"), "{e}");
        let e = NodeTls::load(&paths(d.path(), "n1"), "other", 1).unwrap_err();
        assert!(e.to_string().contains("cluster"), "{e}");
        let e = NodeTls::load(&paths(d.path(), "missing"), "c1", 1).unwrap_err();
        assert!(e.to_string().contains("missing.crt"), "{e}");
    }

    /// A full handshake in memory: certificates of one CA are accepted both ways; a node
    /// holding a certificate of another CA is refused by either side.
    #[test]
    fn handshake_needs_the_cluster_ca() {
        let good = tempfile::tempdir().unwrap();
        init_ca(good.path(), "c", false).unwrap();
        issue_node_cert(good.path(), "c", 0, "a", NODE_VALIDITY).unwrap();
        issue_node_cert(good.path(), "c", 1, "b", NODE_VALIDITY).unwrap();
        let evil = tempfile::tempdir().unwrap();
        init_ca(evil.path(), "c", false).unwrap();
        issue_node_cert(evil.path(), "c", 0, "a", NODE_VALIDITY).unwrap();

        let a = NodeTls::load(&paths(good.path(), "a"), "c", 0).unwrap();
        let b = NodeTls::load(&paths(good.path(), "b"), "c", 1).unwrap();
        let mallory = NodeTls::load(&paths(evil.path(), "a"), "c", 0).unwrap();

        let (client, server) = handshake(&a, &b).expect("same CA");
        assert_eq!(peer_identity(&server).unwrap().node, 0);
        assert_eq!(peer_identity(&client).unwrap().node, 1);
        assert!(
            handshake(&mallory, &b).is_err(),
            "server must refuse a foreign client"
        );
        assert!(
            handshake(&b, &mallory).is_err(),
            "client must refuse a foreign server"
        );
    }

    /// A certificate that expired, or whose serial the CA's CRL lists, is refused by its peer.
    #[test]
    fn expired_and_crl_revoked_certificates_are_refused() {
        let d = tempfile::tempdir().unwrap();
        init_ca(d.path(), "c", false).unwrap();
        issue_node_cert(d.path(), "c", 0, "a", NODE_VALIDITY).unwrap();
        let day = time::Duration::days(1);
        let now = time::OffsetDateTime::now_utc();
        crate::authority::issue_between(d.path(), "c", 1, "old", now - day * 30, now - day)
            .unwrap();
        let revoked = issue_node_cert(d.path(), "c", 2, "gone", NODE_VALIDITY).unwrap();
        let a = NodeTls::load(&paths(d.path(), "a"), "c", 0).unwrap();
        let old = NodeTls::load(&paths(d.path(), "old"), "c", 1).unwrap();
        let gone = NodeTls::load(&paths(d.path(), "gone"), "c", 2).unwrap();
        assert!(
            handshake(&old, &a).is_err(),
            "an expired client was accepted"
        );
        assert!(
            handshake(&a, &old).is_err(),
            "an expired server was accepted"
        );
        assert!(handshake(&gone, &a).is_ok(), "not revoked yet");

        crate::authority::write_crl(d.path(), std::slice::from_ref(&revoked.serial)).unwrap();
        let a = NodeTls::load(&paths(d.path(), "a"), "c", 0).unwrap();
        assert!(
            handshake(&gone, &a).is_err(),
            "a CRL-revoked client was accepted"
        );
        assert!(
            handshake(&a, &gone).is_err(),
            "a CRL-revoked server was accepted"
        );
    }

    fn handshake(
        client: &NodeTls,
        server: &NodeTls,
    ) -> Result<(rustls::ClientConnection, rustls::ServerConnection), rustls::Error> {
        let mut c = rustls::ClientConnection::new(client.client.clone(), server_name())?;
        let mut s = rustls::ServerConnection::new(server.server.clone())?;
        for _ in 0..10 {
            let mut buf = Vec::new();
            c.write_tls(&mut buf).unwrap();
            s.read_tls(&mut &buf[..]).unwrap();
            s.process_new_packets()?;
            let mut buf = Vec::new();
            s.write_tls(&mut buf).unwrap();
            c.read_tls(&mut &buf[..]).unwrap();
            c.process_new_packets()?;
            if !c.is_handshaking() && !s.is_handshaking() {
                // The server learns of a refused client certificate only from its alert.
                let mut buf = Vec::new();
                c.write_tls(&mut buf).unwrap();
                s.read_tls(&mut &buf[..]).unwrap();
                s.process_new_packets()?;
                return Ok((c, s));
            }
        }
        panic!("handshake did not finish")
    }
}
