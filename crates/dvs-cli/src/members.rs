//! Membership commands: `dvs node leave`, and `dvs dc add-node` / `remove-node`, which change
//! the nodes a DC spans while the cluster runs (stored in the directory as `dcs/{dc}`; every
//! node follows it).

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use dvs_config::ClusterConfig;
use dvs_directory::keys::{
    dc_key, dc_nodes_value, parse_dc_nodes, parse_endpoint_key, ENDPOINT_PREFIX,
};
use dvs_directory::{CasOutcome, Directory};
use dvs_node::ctl::{CtlRequest, CtlResponse};
use dvs_wire::NodeId;

use crate::helpers::{ctl_connect, find_dc, find_node};

/// `dvs dc ...`.
#[derive(Subcommand)]
pub enum DcCmd {
    /// Let DC span NODE too: its endpoints may then run there and talk to it.
    AddNode {
        /// DC id or name.
        dc: String,
        /// Node id or name.
        node: String,
    },
    /// Stop DC spanning NODE; refused while endpoints of the DC run on it.
    RemoveNode {
        /// DC id or name.
        dc: String,
        /// Node id or name.
        node: String,
    },
}

/// `dvs node leave`: the node revokes its membership lease and stops.
pub fn leave(cfg: &ClusterConfig, node: Option<&str>, force: bool) -> Result<ExitCode> {
    let node = match node {
        Some(n) => find_node(cfg, n)?,
        None => local_node(cfg)?,
    };
    let mut c = ctl_connect(cfg, node, Duration::from_secs(10))
        .with_context(|| format!("node {} is not running", node.name))?;
    match c.call(&CtlRequest::Leave { force })? {
        CtlResponse::Left { message } => {
            println!("{message}");
            Ok(ExitCode::SUCCESS)
        }
        other => bail!("unexpected answer from node {}: {other:?}", node.name),
    }
}

/// The node of this host: `$DVS_NODE`, else the only node whose control socket is here.
fn local_node(cfg: &ClusterConfig) -> Result<&dvs_config::NodeConfig> {
    if let Ok(name) = std::env::var("DVS_NODE") {
        return find_node(cfg, &name);
    }
    let here: Vec<_> = cfg
        .nodes
        .iter()
        .filter(|n| n.ctl_socket().exists())
        .collect();
    match here.as_slice() {
        [one] => Ok(one),
        [] => bail!("no node of the cluster runs on this host: name one with --node"),
        _ => bail!(
            "several nodes run on this host ({}): name one with --node",
            here.iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// `dvs dc add-node` / `remove-node`.
pub fn dc(cfg: &ClusterConfig, cmd: DcCmd) -> Result<ExitCode> {
    let (dc_name, node_name, add) = match &cmd {
        DcCmd::AddNode { dc, node } => (dc, node, true),
        DcCmd::RemoveNode { dc, node } => (dc, node, false),
    };
    let dcc = find_dc(cfg, dc_name)?;
    let node = find_node(cfg, node_name)?;
    let dir = dvs_directory::open(&cfg.directory).context("cannot open the cluster directory")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start an async runtime for the directory")?;
    let key = dc_key(dcc.id);
    // Compare-and-set, read again on a race with another operator.
    for _ in 0..10 {
        let current = rt
            .block_on(dir.get(&key))
            .with_context(|| format!("cannot read {key} from the directory"))?;
        let mut nodes: BTreeSet<NodeId> = match &current {
            Some(v) => parse_dc_nodes(&v.value).ok_or_else(|| {
                anyhow!("directory entry {key} holds {:?}, which is not a list of node ids: fix or delete it", v.value)
            })?,
            None => cfg.dc_nodes(dcc).into_iter().collect(),
        };
        if add {
            if !nodes.insert(node.id) {
                println!("DC {} already spans node {}", dcc.name, node.name);
                return Ok(ExitCode::SUCCESS);
            }
        } else {
            if !nodes.contains(&node.id) {
                println!("DC {} does not span node {}", dcc.name, node.name);
                return Ok(ExitCode::SUCCESS);
            }
            let running = endpoints_on(&rt, dir.as_ref(), dcc.id, node.id)?;
            if !running.is_empty() {
                bail!(
                    "DC {} still has endpoints on node {}: {}; migrate them to another node of the DC first (dvs migrate DC/EP --to NODE)",
                    dcc.name,
                    node.name,
                    running
                        .iter()
                        .map(|ep| format!("{}/{ep}", dcc.name))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            nodes.remove(&node.id);
            if nodes.is_empty() {
                bail!("DC {} would span no node at all", dcc.name);
            }
        }
        let outcome = rt
            .block_on(dir.cas(
                &key,
                current.map(|v| v.version),
                Some(dc_nodes_value(&nodes)),
            ))
            .with_context(|| format!("cannot write {key} to the directory"))?;
        if let CasOutcome::Done { .. } = outcome {
            let names: Vec<String> = nodes
                .iter()
                .map(|id| {
                    cfg.node_by_id(*id)
                        .map_or(id.to_string(), |n| n.name.clone())
                })
                .collect();
            println!("DC {} now spans {}", dcc.name, names.join(", "));
            return Ok(ExitCode::SUCCESS);
        }
    }
    bail!("{key} kept changing under this command; try again")
}

/// The endpoints of DC `dc` that the directory records on `node`.
fn endpoints_on(
    rt: &tokio::runtime::Runtime,
    dir: &dyn Directory,
    dc: dvs_wire::DcId,
    node: NodeId,
) -> Result<Vec<dvs_wire::Ep>> {
    let entries = rt
        .block_on(dir.get_prefix(ENDPOINT_PREFIX))
        .context("cannot read the endpoints from the directory")?;
    Ok(entries
        .into_iter()
        .filter_map(|(k, v)| {
            let (d, ep) = parse_endpoint_key(&k)?;
            (d == dc && v.value == node.to_string()).then_some(ep)
        })
        .collect())
}
