//! `dvs tls`: the cluster CA and node certificates of a cluster config.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use dvs_config::ClusterConfig;
use dvs_tls::authority::NODE_VALIDITY;

/// What `dvs tls` does.
#[derive(clap::Subcommand)]
pub enum TlsCmd {
    /// Create the cluster CA (ca.crt, ca.key) in the config's `[tls] dir`.
    Init {
        /// Replace an existing CA (every node certificate must then be issued again).
        #[arg(long)]
        force: bool,
    },
    /// Issue (or rotate) a node's certificate and key, signed by the cluster CA.
    Issue {
        /// Node id or name; `all` for every node of the config.
        node: String,
        /// Days the certificate stays valid.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Refuse a node's current certificate from now on: adds its serial to the config's
    /// `[tls] revoked` list, which running nodes reread within seconds.
    Revoke {
        /// Node id or name.
        node: String,
    },
    /// The certificates of the config's nodes: identity, serial, revoked or not.
    Show,
}

/// Runs a `dvs tls` command on the config at `path`.
pub fn run(cmd: TlsCmd, cfg: &ClusterConfig, path: &Path) -> Result<()> {
    let dir = &cfg.tls.dir;
    match cmd {
        TlsCmd::Init { force } => {
            let ca = dvs_tls::init_ca(dir, &cfg.cluster_id, force)?;
            println!(
                "cluster CA for {:?} created: {} (key {}, mode 0600)",
                cfg.cluster_id,
                ca.cert.display(),
                ca.key.display()
            );
            println!("next: `dvs tls issue all`, then copy ca.crt and each NODE.crt/NODE.key to its node");
        }
        TlsCmd::Issue { node, days } => {
            let nodes: Vec<_> = if node == "all" {
                cfg.nodes.iter().collect()
            } else {
                vec![cfg
                    .find_node(&node)
                    .with_context(|| format!("no node {node:?} in {}", path.display()))?]
            };
            let valid = Duration::from_secs(u64::from(days.max(1)) * 24 * 3600);
            for n in nodes {
                let c = dvs_tls::issue_node_cert(dir, &cfg.cluster_id, n.id, &n.name, valid)
                    .with_context(|| format!("cannot issue the certificate of {}", n.name))?;
                println!(
                    "{}: {} (serial {}, {}, valid {days} days; key {} mode 0600)",
                    n.name,
                    c.cert.display(),
                    c.serial,
                    dvs_tls::node_uri(&cfg.cluster_id, n.id),
                    c.key.display()
                );
            }
        }
        TlsCmd::Revoke { node } => {
            let n = cfg
                .find_node(&node)
                .with_context(|| format!("no node {node:?} in {}", path.display()))?;
            let id = identity_of(dir, &n.name)?;
            if cfg.tls.is_revoked(&id.serial) {
                bail!(
                    "the certificate of {} (serial {}) is already revoked",
                    n.name,
                    id.serial
                );
            }
            let mut new = cfg.clone();
            new.tls.revoked.push(id.serial.clone());
            dvs_tls::files::write_file(path, new.to_toml().as_bytes(), 0o600, true)?;
            // Where the CA key is at hand, a CRL says the same to nodes that get only files.
            if dir.join("ca.key").exists() {
                let crl = dvs_tls::authority::write_crl(dir, &new.tls.revoked)?;
                println!(
                    "CRL with {} serial(s) written to {}",
                    new.tls.revoked.len(),
                    crl.display()
                );
            }
            println!(
                "revoked the certificate of {} (serial {}) in {}: running nodes drop its links within seconds; issue a new one with `dvs tls issue {}`",
                n.name,
                id.serial,
                path.display(),
                n.name
            );
        }
        TlsCmd::Show => {
            println!(
                "TLS folder {} (links: {})",
                dir.display(),
                if cfg.link.tls {
                    "mutual TLS"
                } else {
                    "PLAINTEXT"
                }
            );
            for n in &cfg.nodes {
                match identity_of(dir, &n.name) {
                    Ok(id) => println!(
                        "  {:<10} {}  serial {}{}",
                        n.name,
                        dvs_tls::node_uri(&id.cluster, id.node),
                        id.serial,
                        if cfg.tls.is_revoked(&id.serial) {
                            "  REVOKED"
                        } else {
                            ""
                        }
                    ),
                    Err(e) => println!("  {:<10} {e:#}", n.name),
                }
            }
        }
    }
    Ok(())
}

fn identity_of(dir: &Path, name: &str) -> Result<dvs_tls::NodeIdentity> {
    let p = dir.join(format!("{name}.crt"));
    let pem = std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?;
    let der = dvs_tls::verifier::load_certs(&p, &pem)?.remove(0);
    Ok(dvs_tls::NodeIdentity::from_der(&der)?)
}

/// Creates a fresh CA and a certificate for every node of a local cluster (`dvs up`).
pub fn provision_local(cfg: &ClusterConfig) -> Result<()> {
    if !cfg.link.tls {
        return Ok(());
    }
    dvs_tls::init_ca(&cfg.tls.dir, &cfg.cluster_id, true)
        .context("cannot create the cluster CA")?;
    for n in &cfg.nodes {
        dvs_tls::issue_node_cert(&cfg.tls.dir, &cfg.cluster_id, n.id, &n.name, NODE_VALIDITY)
            .with_context(|| format!("cannot issue the certificate of {}", n.name))?;
    }
    Ok(())
}
