//! Faults a test injects: nodes that crash and restart, a directory that fails for a while,
//! and an invariant checked after every input, so that a fault's effect is caught at the step
//! that breaks something rather than at the end of a run.

use dvs_core::{DirectoryInput, Input, NodeCore};
use dvs_wire::NodeId;

use crate::{Event, Sim};

/// A check run after every input a core handles: `Err` says what does not hold.
pub type Invariant = Box<dyn FnMut(&Sim) -> Result<(), String>>;

impl Sim {
    /// Crashes `node`: its core is dropped with its processes and what it had in flight, and
    /// the nodes linked to it see the link go down. Its directory requests not landed yet are
    /// lost with it.
    pub fn crash(&mut self, node: NodeId) {
        if self.cores.remove(&node).is_none() {
            return;
        }
        self.disruptions += 1;
        if self.tracing {
            self.trace.push(Event::Crash {
                at: self.elapsed,
                node,
            });
        }
        let lost = self.links.lose_node(node);
        self.lost(lost);
        self.dir.queues.remove(&node);
        self.dir.retry.remove(&node);
        self.responses.retain(|p, _| p.node != node);
        for peer in self.links.peers_of(node) {
            self.input(peer, Input::LinkDown { node });
        }
        self.pump();
    }

    /// Restarts the crashed `node` with a fresh core (new migration ids), started as the
    /// daemon starts one: the directory's registrations naming `node` are stale (nothing runs
    /// there yet) and are removed, which the other nodes' watches see; the core is then given
    /// every remaining registration before anything else; then its links that are up come
    /// back. The daemon cannot start without its directory, so neither can this: the
    /// directory must not be held or failing for `node`.
    #[track_caller]
    pub fn restart(&mut self, node: NodeId) {
        if self.cores.contains_key(&node) {
            return;
        }
        assert!(
            !self.dir.held.contains(&node) && !self.dir.failing.contains(&node),
            "a node restarts only with its directory answering"
        );
        let mut cfg = self.configs[&node].clone();
        let run = self.restarts.entry(node).or_default();
        *run += 1;
        // A restarted node must not reuse the migration ids of its previous run.
        cfg.migration_seed += *run << 32;
        if self.tracing {
            self.trace.push(Event::Restart {
                at: self.elapsed,
                node,
            });
        }
        for change in self.dir.remove_node(node) {
            for n in self.nodes() {
                self.input(n, Input::Directory(change.clone()));
            }
        }
        self.cores.insert(node, NodeCore::new(cfg));
        let snapshot: Vec<_> = self
            .dir
            .endpoints()
            .iter()
            .map(|(&(dc, ep), &n)| (dc, ep, n))
            .collect();
        for (dc, ep, n) in snapshot {
            let node_of = Some(n);
            let change = DirectoryInput::Changed {
                dc,
                ep,
                node: node_of,
            };
            self.input(node, Input::Directory(change));
        }
        for peer in self.links.peers_of(node) {
            self.input(node, Input::LinkUp { node: peer });
            self.input(peer, Input::LinkUp { node });
        }
        self.pump();
    }

    /// The directory fails every request of `node` until [`Sim::directory_back`]: each is
    /// answered as the daemon answers one whose directory operation failed (see
    /// [`crate::Directory`]). Requests already waiting land when they are due, failing if the
    /// outage still lasts.
    pub fn fail_directory(&mut self, node: NodeId) {
        self.dir.failing.insert(node);
    }

    /// Ends the outage [`Sim::fail_directory`] began.
    pub fn directory_back(&mut self, node: NodeId) {
        self.dir.failing.remove(&node);
        // The relocations the daemon kept retrying land first, in their order.
        let retry = self.dir.retry.remove(&node).unwrap_or_default();
        let queue = self.dir.queues.entry(node).or_default();
        for req in retry.into_iter().rev() {
            queue.push_front((self.elapsed, req));
        }
        self.pump();
    }

    /// Whether the directory answers `node` now (neither held nor failing).
    pub fn directory_answers(&self, node: NodeId) -> bool {
        !self.dir.held.contains(&node) && !self.dir.failing.contains(&node)
    }

    /// Checks `check` after every input any core handles from now on; the first failure is
    /// kept ([`Sim::violation`]) with the time and the input that led to it.
    pub fn set_invariant(&mut self, check: Invariant) {
        self.invariant = Some(check);
    }

    /// The first failure of the invariant set with [`Sim::set_invariant`], if any.
    pub fn violation(&self) -> Option<&str> {
        self.violation.as_deref()
    }

    pub(crate) fn check_invariant(&mut self, node: NodeId) {
        if self.violation.is_some() {
            return;
        }
        let Some(mut check) = self.invariant.take() else {
            return;
        };
        if let Err(why) = check(self) {
            self.violation = Some(format!(
                "at {:?}, after node {node} handled an input: {why}",
                self.elapsed
            ));
        }
        self.invariant = Some(check);
    }
}
