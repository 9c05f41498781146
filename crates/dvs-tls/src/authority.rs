//! The cluster CA and the node certificates it signs (rcgen).
//!
//! Node certificates carry one URI SAN naming the cluster and the node id, and both the
//! server and client authentication usages: each node is a TLS server for the links it
//! accepts and a client for the links it dials.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

use crate::files::{ensure_private_dir, read, write_file};
use crate::identity::node_uri;
use crate::TlsError;

/// How long a CA stays valid.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long a node certificate stays valid unless asked otherwise.
pub const NODE_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Certificates start being valid this much before they are made, so that a peer whose clock
/// is slightly behind accepts a fresh one.
const BACKDATE: Duration = Duration::from_secs(3600);

/// Paths of a certificate and its key.
#[derive(Clone, Debug)]
pub struct IssuedCert {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, mode 0600).
    pub key: PathBuf,
    /// Serial number in lower-case hex, as a deny list names it.
    pub serial: String,
}

fn random_serial() -> Result<SerialNumber, TlsError> {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(TlsError::io("/dev/urandom"))?;
    // Positive and non-zero as a DER integer.
    b[0] = (b[0] & 0x7f) | 0x01;
    Ok(SerialNumber::from_slice(&b))
}

fn validity(params: &mut CertificateParams, valid_for: Duration) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + valid_for;
}

fn gen(e: rcgen::Error) -> TlsError {
    TlsError::Generate(e.to_string())
}

/// `dvs tls init`: creates `dir/ca.crt` and `dir/ca.key` for `cluster`. With `force`,
/// existing files are replaced (every node certificate must then be issued again).
pub fn init_ca(dir: &Path, cluster: &str, force: bool) -> Result<IssuedCert, TlsError> {
    ensure_private_dir(dir)?;
    let key = KeyPair::generate().map_err(gen)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("dvs cluster CA {cluster}"));
    dn.push(DnType::OrganizationName, "dvs");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let serial = random_serial()?;
    let serial_hex = hex(serial.as_ref());
    params.serial_number = Some(serial);
    validity(&mut params, CA_VALIDITY);
    let cert = params.self_signed(&key).map_err(gen)?;
    let out = IssuedCert {
        cert: dir.join("ca.crt"),
        key: dir.join("ca.key"),
        serial: serial_hex,
    };
    write_file(&out.key, key.serialize_pem().as_bytes(), 0o600, force)?;
    write_file(&out.cert, cert.pem().as_bytes(), 0o644, force)?;
    Ok(out)
}

/// `dvs tls issue`: creates `dir/NAME.crt` and `dir/NAME.key` for node `id` of `cluster`,
/// signed by `dir/ca.crt` + `dir/ca.key`. An existing pair is replaced (rotation).
pub fn issue_node_cert(
    dir: &Path,
    cluster: &str,
    id: u16,
    name: &str,
    valid_for: Duration,
) -> Result<IssuedCert, TlsError> {
    let now = OffsetDateTime::now_utc();
    issue_between(dir, cluster, id, name, now - BACKDATE, now + valid_for)
}

/// Loads the CA of `dir` as an issuer.
fn ca_issuer(dir: &Path) -> Result<Issuer<'static, KeyPair>, TlsError> {
    let ca_cert_path = dir.join("ca.crt");
    let ca_key_path = dir.join("ca.key");
    let ca_pem = String::from_utf8_lossy(&read(&ca_cert_path)?).into_owned();
    let ca_key_pem = String::from_utf8_lossy(&read(&ca_key_path)?).into_owned();
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| TlsError::BadPem {
        path: ca_key_path.clone(),
        message: format!("not a private key: {e}"),
    })?;
    Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|e| TlsError::BadPem {
        path: ca_cert_path.clone(),
        message: format!("not a CA certificate: {e}"),
    })
}

/// Writes `dir/crl.pem`, signed by the CA of `dir`, listing the serials (hex) in `revoked`.
/// Nodes that find it in their TLS folder refuse those certificates.
pub fn write_crl(dir: &Path, revoked: &[String]) -> Result<PathBuf, TlsError> {
    let issuer = ca_issuer(dir)?;
    let now = OffsetDateTime::now_utc();
    let mut certs = Vec::new();
    for r in revoked {
        let bytes = unhex(r).ok_or_else(|| TlsError::Generate(format!("{r:?} is not hex")))?;
        certs.push(rcgen::RevokedCertParams {
            serial_number: SerialNumber::from_slice(&bytes),
            revocation_time: now,
            reason_code: None,
            invalidity_date: None,
        });
    }
    let params = rcgen::CertificateRevocationListParams {
        this_update: now - BACKDATE,
        next_update: now + NODE_VALIDITY,
        crl_number: SerialNumber::from(now.unix_timestamp() as u64),
        issuing_distribution_point: None,
        revoked_certs: certs,
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(&issuer).map_err(gen)?;
    let path = dir.join("crl.pem");
    write_file(&path, crl.pem().map_err(gen)?.as_bytes(), 0o644, true)?;
    Ok(path)
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    let s = if s.len() % 2 == 1 {
        format!("0{s}")
    } else {
        s.to_string()
    };
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// [`issue_node_cert`] with an explicit validity period.
pub fn issue_between(
    dir: &Path,
    cluster: &str,
    id: u16,
    name: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<IssuedCert, TlsError> {
    let uri = rcgen::string::Ia5String::try_from(node_uri(cluster, id)).map_err(gen)?;
    let mut params = leaf_params(
        &format!("{name}.{cluster}"),
        vec![SanType::URI(uri)],
        vec![KeyUsagePurpose::DigitalSignature],
    );
    params.not_before = not_before;
    params.not_after = not_after;
    sign_leaf(dir, name, params)
}

/// Issues `dir/NAME.crt` and `dir/NAME.key`: a server certificate for a service the nodes
/// reach by address, such as etcd, signed by the CA of `dir`. It names `ips` as IP SANs, since
/// clients check a server by the address they dialed, and it carries the client usage too:
/// etcd also presents it when it calls itself (its gRPC gateway).
pub fn issue_server_cert(
    dir: &Path,
    name: &str,
    ips: &[std::net::IpAddr],
    valid_for: Duration,
) -> Result<IssuedCert, TlsError> {
    let mut params = leaf_params(
        name,
        ips.iter().map(|ip| SanType::IpAddress(*ip)).collect(),
        vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ],
    );
    validity(&mut params, valid_for);
    sign_leaf(dir, name, params)
}

/// A certificate that is no CA, named `common_name` (organization "dvs") and `sans`, with
/// both TLS usages (a node and etcd are server and client alike).
fn leaf_params(
    common_name: &str,
    sans: Vec<SanType>,
    key_usages: Vec<KeyUsagePurpose>,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "dvs");
    params.distinguished_name = dn;
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = key_usages;
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params
}

/// Signs `params` with the CA of `dir` under a fresh key and random serial, and writes
/// `dir/NAME.crt` and `dir/NAME.key` (0600).
fn sign_leaf(
    dir: &Path,
    name: &str,
    mut params: CertificateParams,
) -> Result<IssuedCert, TlsError> {
    let issuer = ca_issuer(dir)?;
    let key = KeyPair::generate().map_err(gen)?;
    let serial = random_serial()?;
    let serial_hex = hex(serial.as_ref());
    params.serial_number = Some(serial);
    let cert = params.signed_by(&key, &issuer).map_err(gen)?;
    let out = IssuedCert {
        cert: dir.join(format!("{name}.crt")),
        key: dir.join(format!("{name}.key")),
        serial: serial_hex,
    };
    write_file(&out.key, key.serialize_pem().as_bytes(), 0o600, true)?;
    write_file(&out.cert, cert.pem().as_bytes(), 0o644, true)?;
    Ok(out)
}

/// Lower-case hex of `bytes`, without leading zero bytes (how serials are compared).
pub fn hex(bytes: &[u8]) -> String {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    bytes[start..].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::NodeIdentity;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn issued_certificate_names_cluster_and_node() {
        let d = tempfile::tempdir().unwrap();
        let ca = init_ca(d.path(), "prod", false).unwrap();
        assert!(
            init_ca(d.path(), "prod", false).is_err(),
            "init must not clobber a CA"
        );
        let c = issue_node_cert(d.path(), "prod", 7, "node7", NODE_VALIDITY).unwrap();
        for key in [&ca.key, &c.key] {
            let mode = std::fs::metadata(key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        let pem = std::fs::read(&c.cert).unwrap();
        let der = crate::verifier::load_certs(&c.cert, &pem)
            .unwrap()
            .remove(0);
        let id = NodeIdentity::from_der(&der).unwrap();
        assert_eq!(id.cluster, "prod");
        assert_eq!(id.node, 7);
        assert_eq!(id.serial, c.serial);
    }

    #[test]
    fn server_certificate_names_its_addresses() {
        let d = tempfile::tempdir().unwrap();
        init_ca(d.path(), "prod", false).unwrap();
        let ip: std::net::IpAddr = "10.77.1.250".parse().unwrap();
        let c = issue_server_cert(d.path(), "etcd", &[ip], NODE_VALIDITY).unwrap();
        let mode = std::fs::metadata(&c.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let pem = std::fs::read(&c.cert).unwrap();
        let der = crate::verifier::load_certs(&c.cert, &pem)
            .unwrap()
            .remove(0);
        // The address is in the certificate as its four raw bytes (an iPAddress SAN).
        assert!(der.windows(4).any(|w| w == [10, 77, 1, 250]));
        // It is no node certificate: a peer presenting it is refused as one.
        assert!(NodeIdentity::from_der(&der).is_err());
    }
}
