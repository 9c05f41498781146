//! The lab's files, made as an operator would: a CA and every certificate on the operator's
//! machine (the lab's `admin` folder, which no host sees), then to each host only what that
//! host needs, in its state folder (seen inside the host at [`HOST_STATE`]).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use dvs_config::{
    AccessConfig, ClusterConfig, DcConfig, DirectoryConfig, EtcdTlsConfig, LinkConfig, NodeConfig,
    NodeRef, TlsConfig,
};
use dvs_tls::authority::NODE_VALIDITY;

use super::hosts::HOST_STATE;
use super::{Host, LabState};

/// The port every node's peer link listens on (each host has an address of its own).
pub const PEER_PORT: u16 = 7400;
/// etcd's client port on the etcd host.
pub const ETCD_PORT: u16 = 2379;
/// Name of etcd's certificate and key files.
pub const ETCD_CERT: &str = "etcd";

/// A node's runtime folder (sockets, logs, images), in its host's private `/run`.
pub fn runtime_dir(node: &str) -> PathBuf {
    Path::new("/run/dvs").join(node)
}

/// The cluster config as `host` sees it: the same for every node except `[directory.tls]`,
/// which names that host's own certificate (`None`: the first node's, for the record).
pub fn cluster_config(lab: &LabState, host: Option<&Host>) -> ClusterConfig {
    let nodes: Vec<NodeConfig> = lab
        .hosts
        .iter()
        .filter_map(|h| {
            Some(NodeConfig {
                id: h.node_id?,
                name: h.node.clone()?,
                peer_addr: SocketAddr::new(IpAddr::V4(h.addr), PEER_PORT),
                runtime_dir: runtime_dir(h.node.as_deref()?),
            })
        })
        .collect();
    let tls_dir = Path::new(HOST_STATE).join("tls");
    let me = host
        .and_then(|h| h.node.clone())
        .or_else(|| nodes.first().map(|n| n.name.clone()))
        .unwrap_or_default();
    let cluster_id = lab.cluster_id();
    ClusterConfig {
        directory: DirectoryConfig::Etcd {
            endpoints: vec![format!("https://{}:{ETCD_PORT}", lab.etcd_addr())],
            prefix: dvs_config::default_etcd_prefix(&cluster_id),
            dial_timeout_ms: dvs_config::DEFAULT_ETCD_DIAL_TIMEOUT_MS,
            request_timeout_ms: dvs_config::DEFAULT_ETCD_REQUEST_TIMEOUT_MS,
            tls: Some(EtcdTlsConfig {
                ca: tls_dir.join("ca.crt"),
                cert: tls_dir.join(format!("{me}.crt")),
                key: tls_dir.join(format!("{me}.key")),
            }),
        },
        cluster_id,
        link: LinkConfig::default(),
        tls: TlsConfig {
            dir: tls_dir,
            revoked: Vec::new(),
        },
        access: AccessConfig::default(),
        membership: Default::default(),
        dcs: vec![DcConfig {
            id: 0,
            name: "dc0".into(),
            nodes: nodes.iter().map(|n| NodeRef::Id(n.id)).collect(),
            max_endpoints: 1024,
            max_queue: 4096,
            bind_uids: vec![0],
        }],
        nodes,
    }
}

fn mkdir(dir: &Path, mode: u32) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))
}

/// Copies `from/name` to `to/name` with `mode`.
fn copy(from: &Path, to: &Path, name: &str, mode: u32) -> Result<()> {
    let src = from.join(name);
    let data = std::fs::read(&src).with_context(|| format!("cannot read {}", src.display()))?;
    dvs_tls::files::write_file(&to.join(name), &data, mode, true)?;
    Ok(())
}

/// Makes the CA and certificates in `admin`, and writes each host's files into its state
/// folder (`lab_dir/HOST`).
pub fn provision(lab: &LabState, lab_dir: &Path) -> Result<()> {
    let admin = lab_dir.join("admin");
    mkdir(&admin, 0o700)?;
    let cluster = lab.cluster_id();
    dvs_tls::init_ca(&admin, &cluster, true).context("cannot create the lab's CA")?;
    // An empty revocation list: nodes find it where an operator would put a real one.
    dvs_tls::authority::write_crl(&admin, &[])?;
    let etcd_ip = IpAddr::V4(lab.etcd_addr());
    dvs_tls::authority::issue_server_cert(&admin, ETCD_CERT, &[etcd_ip], NODE_VALIDITY)
        .context("cannot issue etcd's certificate")?;
    for h in &lab.hosts {
        let dir = lab_dir.join(&h.name);
        let tls = dir.join("tls");
        mkdir(&tls, 0o700)?;
        copy(&admin, &tls, "ca.crt", 0o644)?;
        match (&h.node, h.node_id) {
            (Some(node), Some(id)) => {
                // A node certificate carries both TLS usages: it is also the node's client
                // certificate towards etcd.
                dvs_tls::issue_node_cert(&admin, &cluster, id, node, NODE_VALIDITY)
                    .with_context(|| format!("cannot issue the certificate of {node}"))?;
                copy(&admin, &tls, &format!("{node}.crt"), 0o644)?;
                copy(&admin, &tls, &format!("{node}.key"), 0o600)?;
                copy(&admin, &tls, "crl.pem", 0o644)?;
                let cfg = cluster_config(lab, Some(h));
                let text = cfg.to_toml();
                // What a node will load: refused here rather than on the host.
                ClusterConfig::parse(&text, &dir.join("cluster.toml"))?;
                dvs_tls::files::write_file(
                    &dir.join("cluster.toml"),
                    text.as_bytes(),
                    0o600,
                    true,
                )?;
            }
            _ => {
                copy(&admin, &tls, &format!("{ETCD_CERT}.crt"), 0o644)?;
                copy(&admin, &tls, &format!("{ETCD_CERT}.key"), 0o600)?;
            }
        }
    }
    Ok(())
}

/// The etcd endpoint's address, for messages.
pub fn etcd_url(addr: Ipv4Addr) -> String {
    format!("https://{addr}:{ETCD_PORT}")
}
