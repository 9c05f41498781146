//! What a node certificate says about its holder.

use x509_parser::extensions::GeneralName;

use crate::authority::hex;
use crate::TlsError;

/// The URI that names node `id` of `cluster` in its certificate.
pub fn node_uri(cluster: &str, id: u16) -> String {
    format!("spiffe://{cluster}/node/{id}")
}

/// The identity a node certificate carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeIdentity {
    /// Cluster id.
    pub cluster: String,
    /// Node id.
    pub node: u16,
    /// Serial number, lower-case hex without leading zeros.
    pub serial: String,
}

impl NodeIdentity {
    /// Reads the identity of a DER certificate: exactly one URI SAN of the form
    /// `spiffe://CLUSTER/node/ID`.
    pub fn from_der(der: &[u8]) -> Result<Self, TlsError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| TlsError::Identity(format!("unparsable certificate: {e}")))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| TlsError::Identity(format!("bad subjectAltName: {e}")))?
            .ok_or_else(|| TlsError::Identity("no subjectAltName".into()))?;
        let uris: Vec<&str> = san
            .value
            .general_names
            .iter()
            .filter_map(|g| match g {
                GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect();
        let [uri] = uris[..] else {
            return Err(TlsError::Identity(format!(
                "expected exactly one URI name, found {}",
                uris.len()
            )));
        };
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| TlsError::Identity(format!("{uri:?} is not a spiffe:// URI")))?;
        let (cluster, id) = rest
            .rsplit_once("/node/")
            .ok_or_else(|| TlsError::Identity(format!("{uri:?} names no node")))?;
        let node = id
            .parse::<u16>()
            .map_err(|_| TlsError::Identity(format!("{uri:?}: bad node id")))?;
        if cluster.is_empty() || cluster.contains('/') {
            return Err(TlsError::Identity(format!("{uri:?}: bad cluster id")));
        }
        Ok(NodeIdentity {
            cluster: cluster.to_string(),
            node,
            serial: hex(cert.raw_serial()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_not_an_identity() {
        let e = NodeIdentity::from_der(b"not a certificate").unwrap_err();
        assert!(e.to_string().contains("unparsable"), "{e}");
    }
}
