//! The simulated directory: endpoint registrations and migration records, with the
//! compare-and-set semantics the real one (etcd) gives the core, and its watches.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use dvs_core::{DirRequest, DirectoryInput, MigrRecord};
use dvs_wire::{DcId, Ep, Errno, NodeId};

/// The kinds of [`DirRequest`], to choose which the simulation leaves to the test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DirKind {
    /// [`DirRequest::Register`].
    Register,
    /// [`DirRequest::Unregister`].
    Unregister,
    /// [`DirRequest::Sync`].
    Sync,
    /// [`DirRequest::Lookup`].
    Lookup,
    /// [`DirRequest::Relocate`].
    Relocate,
    /// [`DirRequest::WriteMigrRecord`].
    WriteMigrRecord,
    /// [`DirRequest::ReadMigrRecord`].
    ReadMigrRecord,
}

impl DirKind {
    /// The kind of `req`.
    pub fn of(req: &DirRequest) -> Self {
        match req {
            DirRequest::Register { .. } => DirKind::Register,
            DirRequest::Unregister { .. } => DirKind::Unregister,
            DirRequest::Sync { .. } => DirKind::Sync,
            DirRequest::Lookup { .. } => DirKind::Lookup,
            DirRequest::Relocate { .. } => DirKind::Relocate,
            DirRequest::WriteMigrRecord { .. } => DirKind::WriteMigrRecord,
            DirRequest::ReadMigrRecord { .. } => DirKind::ReadMigrRecord,
        }
    }
}

/// The directory's contents, and how it answers.
///
/// Each node's requests land in the order the node made them (one connection to the
/// directory per node). By default a request lands and is answered as soon as the node asks;
/// [`Directory::delay`] and [`crate::Sim::hold_directory`] make it slower, and
/// [`crate::Sim::fail_directory`] makes it fail. A failed request is answered as the daemon
/// (`dvs-node/src/dir.rs`) answers when its directory operation fails: a register is refused
/// (`Shutdown`), a lookup finds nothing, a migration record write reports `Err(None)`, an
/// unregister or a record read has no effect and no answer, and a relocate waits and lands
/// when the outage ends (the daemon retries it), unless its node crashes first.
#[derive(Default)]
pub struct Directory {
    endpoints: BTreeMap<(DcId, Ep), NodeId>,
    records: BTreeMap<(DcId, Ep), MigrRecord>,
    /// Requests of these kinds are not carried out: they are noted for the test
    /// ([`crate::Sim::take_noted`]), which answers them itself if it wants to.
    pub manual: BTreeSet<DirKind>,
    /// Requests of these kinds are carried out and also noted for the test.
    pub noted: BTreeSet<DirKind>,
    /// Tell every node of each change of a registration ([`DirectoryInput::Changed`]).
    pub watch_endpoints: bool,
    /// Tell every node of each migration record written ([`DirectoryInput::MigrRecordChanged`]).
    pub watch_migr_records: bool,
    /// How long a request takes to land.
    pub delay: Duration,
    pub(crate) held: BTreeSet<NodeId>,
    /// Nodes whose requests fail (an outage of the directory for them).
    pub(crate) failing: BTreeSet<NodeId>,
    /// During an outage, a migration record write still lands but its answer is lost: the
    /// node gets the failure answer (`Err(None)`), as from etcd when a write times out after
    /// it was applied (its fate is unknown to the writer).
    pub ambiguous_writes: bool,
    /// Requests not landed yet, per node, with when they are due.
    pub(crate) queues: BTreeMap<NodeId, VecDeque<(Duration, DirRequest)>>,
    /// Relocations that failed during an outage, per node, to land again when it ends.
    pub(crate) retry: BTreeMap<NodeId, Vec<DirRequest>>,
}

/// What a request that landed produced: the answer to the node that asked, and the watch
/// notifications for every node.
pub(crate) struct Landed {
    pub answer: Option<DirectoryInput>,
    pub watch: Vec<DirectoryInput>,
}

impl Directory {
    /// Where each registered endpoint runs.
    pub fn endpoints(&self) -> &BTreeMap<(DcId, Ep), NodeId> {
        &self.endpoints
    }

    /// Where `{dc, ep}` runs, if it is registered.
    pub fn node_of(&self, dc: DcId, ep: Ep) -> Option<NodeId> {
        self.endpoints.get(&(dc, ep)).copied()
    }

    /// The migration record of each endpoint that has one.
    pub fn migr_records(&self) -> &BTreeMap<(DcId, Ep), MigrRecord> {
        &self.records
    }

    /// Sets (or with `None` removes) a registration behind the nodes' backs, as an operator
    /// or another writer would; no watch fires.
    pub fn set_endpoint(&mut self, dc: DcId, ep: Ep, node: Option<NodeId>) {
        match node {
            Some(n) => self.endpoints.insert((dc, ep), n),
            None => self.endpoints.remove(&(dc, ep)),
        };
    }

    /// Sets a migration record behind the nodes' backs (a record written by a node the
    /// simulation does not run); no watch fires.
    pub fn set_migr_record(&mut self, dc: DcId, ep: Ep, record: MigrRecord) {
        self.records.insert((dc, ep), record);
    }

    /// Requests waiting to land, per node, oldest first.
    pub fn pending(&self) -> impl Iterator<Item = (NodeId, &DirRequest)> {
        self.queues
            .iter()
            .flat_map(|(n, q)| q.iter().map(move |(_, r)| (*n, r)))
    }

    /// Removes every registration naming `node`, as a starting daemon does with what its
    /// previous run left; returns the watch notifications.
    pub(crate) fn remove_node(&mut self, node: NodeId) -> Vec<DirectoryInput> {
        let stale: Vec<(DcId, Ep)> = self
            .endpoints
            .iter()
            .filter(|(_, n)| **n == node)
            .map(|(k, _)| *k)
            .collect();
        let mut watch = Vec::new();
        for (dc, ep) in stale {
            self.endpoints.remove(&(dc, ep));
            self.changed(&mut watch, dc, ep, None);
        }
        watch
    }

    /// `req` from `node` fails, with the daemon's answer to a failed operation.
    fn fail(req: DirRequest) -> Landed {
        let answer = match req {
            DirRequest::Register { conn, .. } => Some(DirectoryInput::Registered {
                conn,
                result: Err(Errno::Shutdown),
            }),
            // The daemon answers a sync from its queue, without the directory.
            DirRequest::Sync { conn } => Some(DirectoryInput::Synced { conn }),
            DirRequest::Lookup { dc, ep } => Some(DirectoryInput::Located { dc, ep, node: None }),
            DirRequest::WriteMigrRecord { id, .. } => Some(DirectoryInput::MigrRecordWritten {
                id,
                result: Err(None),
            }),
            DirRequest::Unregister { .. }
            | DirRequest::Relocate { .. }
            | DirRequest::ReadMigrRecord { .. } => None,
        };
        Landed {
            answer,
            watch: Vec::new(),
        }
    }

    /// Carries out `req` from `node`.
    pub(crate) fn land(&mut self, node: NodeId, req: DirRequest) -> Landed {
        if self.failing.contains(&node) {
            if self.ambiguous_writes && matches!(req, DirRequest::WriteMigrRecord { .. }) {
                let landed = self.land_now(node, req);
                let answer = landed.answer.map(|a| match a {
                    DirectoryInput::MigrRecordWritten { id, .. } => {
                        DirectoryInput::MigrRecordWritten {
                            id,
                            result: Err(None),
                        }
                    }
                    other => other,
                });
                return Landed { answer, ..landed };
            }
            if matches!(req, DirRequest::Relocate { .. }) {
                self.retry.entry(node).or_default().push(req);
                return Landed {
                    answer: None,
                    watch: Vec::new(),
                };
            }
            return Self::fail(req);
        }
        self.land_now(node, req)
    }

    /// Carries out `req` from `node`, the directory up.
    fn land_now(&mut self, node: NodeId, req: DirRequest) -> Landed {
        let mut watch = Vec::new();
        let answer = match req {
            DirRequest::Register { conn, dc, ep } => {
                // A key held by another node is refused; one naming this node passes (the
                // core itself catches two local connections racing), as in the daemon.
                let result = match self.endpoints.get(&(dc, ep)) {
                    Some(&m) if m != node => Err(Errno::AlreadyBound),
                    Some(_) => Ok(()),
                    None => {
                        self.endpoints.insert((dc, ep), node);
                        self.changed(&mut watch, dc, ep, Some(node));
                        Ok(())
                    }
                };
                Some(DirectoryInput::Registered { conn, result })
            }
            DirRequest::Unregister { dc, ep } => {
                if self.endpoints.get(&(dc, ep)) == Some(&node) {
                    self.endpoints.remove(&(dc, ep));
                    self.changed(&mut watch, dc, ep, None);
                }
                None
            }
            // Every earlier request of this node has landed: they land in order.
            DirRequest::Sync { conn } => Some(DirectoryInput::Synced { conn }),
            DirRequest::Lookup { dc, ep } => Some(DirectoryInput::Located {
                dc,
                ep,
                node: self.node_of(dc, ep),
            }),
            DirRequest::Relocate {
                id,
                dc,
                ep,
                node: to,
            } => {
                // As the daemon does: see `MigrRecord::places_at`.
                let latest = self
                    .records
                    .get(&(dc, ep))
                    .is_some_and(|r| r.places_at(id, to));
                if latest && self.endpoints.insert((dc, ep), to) != Some(to) {
                    self.changed(&mut watch, dc, ep, Some(to));
                }
                None
            }
            DirRequest::WriteMigrRecord {
                id,
                dc,
                ep,
                record,
                require,
            } => {
                let current = self.records.get(&(dc, ep)).copied();
                let result = if require.allows(current.as_ref()) {
                    self.records.insert((dc, ep), record);
                    if self.watch_migr_records {
                        watch.push(DirectoryInput::MigrRecordChanged { dc, ep, record });
                    }
                    Ok(())
                } else {
                    Err(current)
                };
                Some(DirectoryInput::MigrRecordWritten { id, result })
            }
            DirRequest::ReadMigrRecord { id, dc, ep } => Some(DirectoryInput::MigrRecordRead {
                id,
                dc,
                ep,
                record: self.records.get(&(dc, ep)).copied(),
            }),
        };
        Landed { answer, watch }
    }

    fn changed(&self, watch: &mut Vec<DirectoryInput>, dc: DcId, ep: Ep, node: Option<NodeId>) {
        if self.watch_endpoints {
            watch.push(DirectoryInput::Changed { dc, ep, node });
        }
    }
}
