//! A criu migration's preflight, on the source node before anything stops: what the
//! process tree holds (`dvs_checkpoint::inventory`) is judged against this host and against
//! what the destination says about itself (`CtlRequest::CanHost`, asked over the relay), so
//! that a process whose state cannot travel is refused while it keeps running, with an
//! error that names the resource. The rules are in `dvs_checkpoint::preflight`.
//!
//! The node's runtime folder (the endpoint's log, its default working folder) is not checked:
//! the destination substitutes its own (see `migrate.rs`). The endpoint's own working folder
//! (`dvs run --workdir`) travels with the image (`workdir.rs`), so it is not checked either.

use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use dvs_checkpoint::inventory::Inventory;
use dvs_checkpoint::preflight::{self, Destination, Source};
use dvs_wire::{DcId, Ep, NodeId};

use crate::ctl::{CtlRequest, CtlResponse, HostFacts};
use crate::event_loop::{blocking, Ctx, Event, Query};

/// How long the destination may take to answer `CanHost` (it stats a few paths).
const ASK_TIMEOUT: Duration = Duration::from_secs(5);
/// Most paths asked of the destination: keeps the relayed request well under a control
/// line's 64 KiB; a process using more is checked on the first ones and the note says so.
const MAX_PATHS: usize = 256;

/// Runs the preflight of migrating the tree rooted at `pid` (endpoint `{dc, ep}`) to node
/// `to` with criu: `Ok` with a note saying what could not be checked, if anything, or the
/// refusal naming every resource that cannot travel.
pub(crate) async fn check(
    ctx: &Rc<Ctx>,
    dc: DcId,
    ep: Ep,
    pid: i32,
    to: NodeId,
    workdir: Option<PathBuf>,
) -> Result<Option<String>, String> {
    let name = ctx
        .cfg
        .dc_by_id(dc)
        .map_or_else(|| dc.to_string(), |d| d.name.clone());
    let me = ctx.me.name.clone();
    let runtime = ctx.me.runtime_dir.clone();
    // The working folder is shipped with the image: the destination need not have it.
    let travelling: Vec<PathBuf> = workdir.into_iter().collect();
    let taken = blocking(move || -> Result<_, String> {
        let inv = Inventory::take(pid).map_err(|e| e.to_string())?;
        let mut src = Source::here(me).map_err(|e| e.to_string())?;
        src.substituted = vec![runtime];
        src.travelling = travelling;
        let network = network_id().map_err(|e| e.to_string())?;
        Ok((inv, src, network))
    })
    .await
    .and_then(|r| r);
    let (inv, src, network) =
        taken.map_err(|e| format!("cannot list what {dc}/{ep} holds: {e}"))?;
    let needs = preflight::needs(&inv, &src);
    let mut notes = Vec::new();
    if needs.paths.len() > MAX_PATHS {
        notes.push(format!(
            "only {MAX_PATHS} of the {} files the process uses were checked on the destination",
            needs.paths.len()
        ));
    }
    let paths = needs
        .paths
        .iter()
        .take(MAX_PATHS)
        .map(|(p, size)| (p.display().to_string(), *size))
        .collect();
    let dest = match ask_can_host(ctx, to, paths).await {
        Ok(facts) => Some(Destination {
            shares_network: facts.network == network,
            node: facts.node,
            addrs: facts.addrs,
            path_problems: facts
                .problems
                .into_iter()
                .map(|(p, why)| (PathBuf::from(p), why))
                .collect(),
        }),
        Err(why) => {
            notes.push(format!("the destination was not asked ({why})"));
            None
        }
    };
    match preflight::judge(&inv, &src, dest.as_ref()) {
        Ok(plan) => {
            notes.extend(
                plan.unchecked
                    .into_iter()
                    .map(|u| format!("not checked: {u}")),
            );
            Ok((!notes.is_empty()).then(|| notes.join("; ")))
        }
        Err(obstacles) => Err(format!(
            "cannot migrate {name}/{ep} with criu: {}",
            preflight::PreflightError::Refused(obstacles)
        )),
    }
}

/// Asks node `to`, over the relay, whether it has `paths` and what its network is.
async fn ask_can_host(
    ctx: &Ctx,
    to: NodeId,
    paths: Vec<(String, Option<u64>)>,
) -> Result<HostFacts, String> {
    let (answers, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let request = CtlRequest::CanHost { paths };
    ctx.events
        .send(Event::Control(Query::Forward {
            to,
            request,
            answers,
        }))
        .await
        .map_err(|_| "the node kernel is stopping".to_string())?;
    match tokio::time::timeout(ASK_TIMEOUT, rx.recv()).await {
        Ok(Some(CtlResponse::CanHost(facts))) => Ok(facts),
        Ok(Some(CtlResponse::Error { message })) => Err(message),
        Ok(Some(other)) => Err(format!("it answered {other:?}")),
        Ok(None) => Err("it did not answer".into()),
        Err(_) => Err(format!("no answer within {ASK_TIMEOUT:?}")),
    }
}

/// Answers `CanHost` for this node (blocking: stats paths, lists addresses).
pub(crate) fn can_host(node: String, paths: &[(String, Option<u64>)]) -> Result<HostFacts, String> {
    let addrs = dvs_checkpoint::inventory::host_addresses().map_err(|e| e.to_string())?;
    let network = network_id().map_err(|e| e.to_string())?;
    let problems = paths
        .iter()
        .take(MAX_PATHS)
        .filter_map(|(p, size)| path_problem(Path::new(p), *size).map(|why| (p.clone(), why)))
        .collect();
    Ok(HostFacts {
        node,
        addrs,
        network,
        problems,
    })
}

/// What is wrong with `path` here for a process that had it with `size`, if anything.
fn path_problem(path: &Path, size: Option<u64>) -> Option<String> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some("does not exist".into()),
        Err(e) => Some(format!("cannot be read ({e})")),
        // criu refuses to reopen a file whose size changed.
        Ok(m) => match size {
            Some(want) if m.is_file() && m.len() != want => {
                Some(format!("has {} bytes, not {want}", m.len()))
            }
            _ => None,
        },
    }
}

/// This node's network stack: the machine's boot id and the inode of its network namespace.
fn network_id() -> std::io::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?;
    let ns = std::fs::metadata("/proc/self/ns/net")?.ino();
    Ok(format!("{}/{ns}", boot.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_judged_by_existence_and_size() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, b"1234").unwrap();
        assert_eq!(path_problem(&f, Some(4)), None);
        assert_eq!(path_problem(d.path(), None), None);
        assert_eq!(
            path_problem(&f, Some(5)).as_deref(),
            Some("has 4 bytes, not 5")
        );
        assert_eq!(
            path_problem(&d.path().join("nope"), None).as_deref(),
            Some("does not exist")
        );
        let facts = can_host("n".into(), &[(f.display().to_string(), Some(4))]).unwrap();
        assert!(facts.problems.is_empty());
        assert_eq!(facts.network, network_id().unwrap());
    }
}
