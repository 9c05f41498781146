//! `dvs status` and `dvs ps`: one table over every node of the cluster.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;
use dvs_config::ClusterConfig;
use dvs_node::ctl::{DcSpan, EndpointState, MemberStatus, NodeStatus};
use serde::Serialize;

use crate::helpers::{node_name, node_status};

#[derive(Serialize)]
struct ClusterStatus {
    cluster_id: String,
    config: String,
    nodes: Vec<NodeEntry>,
}

#[derive(Serialize)]
struct NodeEntry {
    id: u16,
    name: String,
    reachable: bool,
    error: Option<String>,
    /// Its membership as the directory shows it (seen by the first node that answered).
    member: Option<MemberStatus>,
    status: Option<NodeStatus>,
}

fn gather(cfg: &ClusterConfig) -> Vec<NodeEntry> {
    let mut nodes: Vec<NodeEntry> = cfg
        .nodes
        .iter()
        .map(|n| match node_status(cfg, n) {
            Ok(s) => NodeEntry {
                id: n.id,
                name: n.name.clone(),
                reachable: true,
                error: None,
                member: None,
                status: Some(s),
            },
            Err(e) => NodeEntry {
                id: n.id,
                name: n.name.clone(),
                reachable: false,
                error: Some(format!("{e:#}")),
                member: None,
                status: None,
            },
        })
        .collect();
    let view: Vec<MemberStatus> = nodes
        .iter()
        .find_map(|n| n.status.as_ref().map(|s| s.members.clone()))
        .unwrap_or_default();
    for n in &mut nodes {
        n.member = view.iter().find(|m| m.node == n.id).cloned();
    }
    nodes
}

/// A node's membership in words, for the table.
fn lease_text(n: &NodeEntry) -> String {
    let fenced = n.status.as_ref().is_some_and(|s| s.fenced);
    match &n.member {
        _ if fenced => "FENCED".into(),
        Some(m) if m.alive => "alive".into(),
        Some(m) => format!("gone {} ago", secs(m.since_ms)),
        None => "never".into(),
    }
}

fn secs(ms: u64) -> String {
    if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        format!("{}m{:02}s", ms / 60_000, (ms / 1000) % 60)
    }
}

/// Prints the cluster's status; fails (exit 1) when a node is unreachable.
pub fn status(cfg: &ClusterConfig, path: &Path, json: bool) -> Result<ExitCode> {
    let nodes = gather(cfg);
    let all_ok = nodes.iter().all(|n| n.reachable);
    if json {
        let s = ClusterStatus {
            cluster_id: cfg.cluster_id.clone(),
            config: path.display().to_string(),
            nodes,
        };
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(if all_ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    println!(
        "cluster {} ({} nodes, config {})",
        cfg.cluster_id,
        cfg.nodes.len(),
        path.display()
    );
    println!();
    println!(
        "{:<4} {:<10} {:<14} {:<8} {:<8} LINKS",
        "ID", "NODE", "LEASE", "PID", "UPTIME"
    );
    for n in &nodes {
        match &n.status {
            Some(s) => {
                let links: Vec<String> = s
                    .links
                    .iter()
                    .map(|l| format!("{} {}", l.name, if l.up { "up" } else { "DOWN" }))
                    .collect();
                println!(
                    "{:<4} {:<10} {:<14} {:<8} {:<8} {}",
                    n.id,
                    n.name,
                    lease_text(n),
                    s.pid,
                    secs(s.uptime_ms),
                    links.join(", ")
                );
            }
            None => println!(
                "{:<4} {:<10} {:<14} {:<8} {:<8} unreachable: {}",
                n.id,
                n.name,
                lease_text(n),
                "-",
                "-",
                n.error.clone().unwrap_or_default()
            ),
        }
    }
    // One row per endpoint, one column per node: the registration each node holds.
    let mut rows: BTreeMap<(u16, i32), BTreeMap<u16, String>> = BTreeMap::new();
    for n in &nodes {
        let Some(s) = &n.status else { continue };
        for e in &s.endpoints {
            let cell = match e.state {
                EndpointState::Running => match e.pid {
                    Some(p) => format!("RUNNING pid {p}"),
                    None => "RUNNING".into(),
                },
                other => {
                    format!("{other}({})", node_name(cfg, e.node))
                }
            };
            let cell = if e.migrating {
                format!("{cell} MIGRATING")
            } else {
                cell
            };
            rows.entry((e.dc, e.ep)).or_default().insert(n.id, cell);
        }
    }
    println!();
    // The DCs' node sets as the nodes hold them (changed at runtime by `dvs dc`).
    let spans: Vec<DcSpan> = nodes
        .iter()
        .find_map(|n| n.status.as_ref().map(|s| s.dcs.clone()))
        .unwrap_or_default();
    for dc in &cfg.dcs {
        let span_ids = spans
            .iter()
            .find(|s| s.dc == dc.id)
            .map(|s| s.nodes.clone())
            .unwrap_or_else(|| cfg.dc_nodes(dc));
        let span: Vec<String> = span_ids
            .iter()
            .filter_map(|id| cfg.node_by_id(*id).map(|n| n.name.clone()))
            .collect();
        println!("DC {} (id {}) spans {}", dc.name, dc.id, span.join(", "));
        let dc_rows: Vec<_> = rows.iter().filter(|((d, _), _)| *d == dc.id).collect();
        if dc_rows.is_empty() {
            println!("  no endpoints");
            continue;
        }
        // Columns as wide as their widest cell (a MIGRATING mark makes cells longer).
        let width = dc_rows
            .iter()
            .flat_map(|(_, cells)| cells.values().map(String::len))
            .chain(cfg.nodes.iter().map(|n| n.name.len()))
            .max()
            .unwrap_or(0)
            .max(18);
        print!("  {:<6}", "EP");
        for n in &cfg.nodes {
            print!(" {:<width$}", n.name);
        }
        println!();
        for ((_, ep), cells) in dc_rows {
            print!("  {:<6}", ep);
            for n in &cfg.nodes {
                let cell = cells.get(&n.id).map(String::as_str).unwrap_or("-");
                print!(" {cell:<width$}");
            }
            println!();
        }
    }
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Prints the processes launched by every node.
pub fn ps(cfg: &ClusterConfig, json: bool) -> Result<ExitCode> {
    let nodes = gather(cfg);
    if json {
        let v: Vec<_> = nodes
            .iter()
            .filter_map(|n| {
                n.status
                    .as_ref()
                    .map(|s| serde_json::json!({"node": n.name, "procs": s.procs}))
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<10} {:<8} {:<6} {:<6} {:<8} {:<18} COMMAND",
        "NODE", "PID", "DC", "EP", "AGE", "STATE"
    );
    for n in &nodes {
        let Some(s) = &n.status else {
            println!(
                "{:<10} unreachable: {}",
                n.name,
                n.error.clone().unwrap_or_default()
            );
            continue;
        };
        for p in &s.procs {
            let dc = cfg
                .dc_by_id(p.dc)
                .map(|d| d.name.clone())
                .unwrap_or_else(|| p.dc.to_string());
            println!(
                "{:<10} {:<8} {:<6} {:<6} {:<8} {:<18} {}",
                n.name,
                p.pid,
                dc,
                p.ep,
                secs(p.age_ms),
                p.state,
                p.cmd.join(" ")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
