//! Endpoint registrations of one node, per DC (docs/ARCHITECTURE.md §7.1).

use dvs_wire::{DcId, Ep, NodeId};

use crate::ConnId;
use crate::Map;

/// How an endpoint is registered on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Registration {
    /// Bound to a local process (RUNNING).
    Local { conn: ConnId },
    /// Runs on another node.
    Remote { node: NodeId },
    /// Runs on another node as the backup of a replicated primary.
    Backup { node: NodeId },
}

/// The kind of a registration, for status displays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegistrationKind {
    /// RUNNING here.
    Running,
    /// REMOTE(node).
    Remote(NodeId),
    /// BACKUP(node).
    Backup(NodeId),
}

impl Registration {
    /// The node that runs the endpoint, given this node's id.
    pub fn node(&self, here: NodeId) -> NodeId {
        match *self {
            Registration::Local { .. } => here,
            Registration::Remote { node } | Registration::Backup { node } => node,
        }
    }
    /// The kind, for displays.
    pub fn kind(&self) -> RegistrationKind {
        match *self {
            Registration::Local { .. } => RegistrationKind::Running,
            Registration::Remote { node } => RegistrationKind::Remote(node),
            Registration::Backup { node } => RegistrationKind::Backup(node),
        }
    }
}

/// Registrations of every DC this node knows.
#[derive(Default, Debug)]
pub struct EndpointTable {
    dcs: Map<DcId, Map<Ep, Registration>>,
}

impl EndpointTable {
    /// The registration of `{dc, ep}`, if any.
    pub fn get(&self, dc: DcId, ep: Ep) -> Option<Registration> {
        self.dcs.get(&dc).and_then(|t| t.get(&ep)).copied()
    }
    /// Sets the registration of `{dc, ep}`; returns the previous one.
    pub fn set(&mut self, dc: DcId, ep: Ep, reg: Registration) -> Option<Registration> {
        self.dcs.entry(dc).or_default().insert(ep, reg)
    }
    /// Removes the registration of `{dc, ep}`.
    pub fn remove(&mut self, dc: DcId, ep: Ep) -> Option<Registration> {
        self.dcs.get_mut(&dc).and_then(|t| t.remove(&ep))
    }
    /// Every registration, sorted by DC and endpoint.
    pub fn entries(&self) -> Vec<(DcId, Ep, Registration)> {
        let mut v: Vec<_> = self
            .dcs
            .iter()
            .flat_map(|(dc, t)| t.iter().map(move |(ep, r)| (*dc, *ep, *r)))
            .collect();
        v.sort_by_key(|(dc, ep, _)| (*dc, *ep));
        v
    }
    /// Whether `ep` is registered in a DC other than `dc`.
    pub fn registered_elsewhere(&self, dc: DcId, ep: Ep) -> bool {
        self.dcs
            .iter()
            .any(|(d, t)| *d != dc && t.contains_key(&ep))
    }
}
