//! Mutual TLS for dvs peer links.
//!
//! - [`authority`]: the cluster CA (`dvs tls init`) and node certificates (`dvs tls issue`).
//! - [`identity`]: what a node certificate says: cluster, node id and serial, read from its
//!   single URI SAN `spiffe://CLUSTER/node/ID`.
//! - [`verifier`]: the rustls client and server configs of a node, which accept a peer only
//!   when its certificate chains to the cluster CA, is valid now and is not revoked.
//! - [`files`]: writing keys and certificates without following symlinks, keys 0600.
//!
//! A TLS folder holds `ca.crt` (and, where certificates are issued, `ca.key`) and one
//! `NAME.crt` / `NAME.key` pair per node.

pub mod authority;
pub mod files;
pub mod identity;
pub mod records;
pub mod verifier;

use std::path::PathBuf;

pub use authority::{init_ca, issue_node_cert, IssuedCert};
pub use identity::{node_uri, NodeIdentity};
pub use verifier::{NodeTls, TlsPaths};

/// Why TLS material could not be created, read or used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// A file exists where a new one was to be created.
    #[error("{0} already exists (remove it first, or pass --force)")]
    Exists(PathBuf),
    /// A file holds no usable PEM data of the expected kind.
    #[error("{path}: {message}")]
    BadPem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// Certificate generation failed.
    #[error("cannot generate a certificate: {0}")]
    Generate(String),
    /// A certificate does not name a dvs node the expected way.
    #[error("certificate identity: {0}")]
    Identity(String),
    /// The rustls configuration could not be built.
    #[error("TLS setup: {0}")]
    Config(String),
}

impl TlsError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> TlsError {
        let path = path.into();
        move |source| TlsError::Io { path, source }
    }
}
