//! Nodes crashing and restarting under the workload: the processes of a crashed node die
//! with it (their calls are owed no answer), and once the node is back its endpoints are
//! bound again by new processes, as an operator relaunching them would.

use dvs_core::Registration;
use dvs_sim::req::{any, bind};
use dvs_wire::local::LocalResponse;
use dvs_wire::{Ep, NodeId};

use super::{World, DC};

impl World {
    /// Crashes `node`: its clients' calls are owed nothing any more, and the servers it ran
    /// are bound again when it restarts.
    pub fn crash(&mut self, node: NodeId) {
        if !self.sim.is_alive(node) {
            return;
        }
        self.sim.crash(node);
        let (dead, alive): (Vec<_>, Vec<_>) =
            self.clients.drain(..).partition(|(p, _)| p.node == node);
        self.clients = alive;
        for (p, waiting) in dead {
            if let Some(id) = waiting {
                self.calls.get_mut(&id).expect("a call").caller_died = true;
            }
            self.dead.insert(self.eps[&p], node);
        }
        // A server died if its process, or a copy restored there that may have taken over,
        // was on the node.
        let on_node = self
            .servers
            .iter()
            .chain(self.moved.iter().map(|(e, p)| (e, p)));
        let died: Vec<Ep> = on_node
            .filter(|(_, p)| p.node == node)
            .map(|(e, _)| *e)
            .collect();
        for ep in died {
            self.dead.insert(ep, node);
            self.lost_in_crash.insert(ep, node);
        }
        self.moved.retain(|(_, p)| p.node != node);
    }

    /// Restarts the crashed `node` (its directory must answer) and binds its endpoints again.
    pub fn restart(&mut self, node: NodeId) {
        if self.sim.is_alive(node) {
            return;
        }
        self.sim.restart(node);
        let eps: Vec<Ep> = self
            .dead
            .iter()
            .filter(|(_, n)| **n == node)
            .map(|(ep, _)| *ep)
            .collect();
        for ep in eps {
            self.dead.remove(&ep);
            self.relaunch(node, ep);
        }
    }

    /// A new process on `node` binds `ep` (a client, or a server that then receives); false
    /// if the bind is refused (the endpoint runs elsewhere: a migration moved it away before
    /// the crash).
    pub fn relaunch(&mut self, node: NodeId, ep: Ep) -> bool {
        let p = self.sim.connect(node);
        self.sim.call(p, bind(DC, ep));
        match self.sim.resp(p) {
            Some(LocalResponse::Ep { .. }) => {}
            _ => {
                self.sim.disconnect(p);
                return false;
            }
        }
        self.eps.insert(p, ep);
        if let Some(server) = self.servers.get_mut(&ep) {
            *server = p;
            self.sim.call(p, any());
        } else {
            self.clients.push((p, None));
        }
        true
    }

    /// The nodes on which `ep` is RUNNING now.
    pub fn running_on(&self, ep: Ep) -> Vec<NodeId> {
        self.sim
            .nodes()
            .into_iter()
            .filter(|&n| {
                self.sim.core(n).registrations().iter().any(|(dc, e, r)| {
                    (*dc, *e) == (DC, ep) && matches!(r, Registration::Local { .. })
                })
            })
            .collect()
    }

    /// Binds again every server that runs nowhere because a node it ran on crashed (on
    /// that node); returns those that run nowhere with no crash to explain it.
    pub fn relaunch_lost_servers(&mut self) -> Vec<Ep> {
        let mut unexplained = Vec::new();
        let eps: Vec<Ep> = self.servers.keys().copied().collect();
        for ep in eps {
            if !self.running_on(ep).is_empty() {
                continue;
            }
            match self.lost_in_crash.get(&ep).copied() {
                Some(n) if self.relaunch(n, ep) => {}
                _ => unexplained.push(ep),
            }
        }
        unexplained
    }
}
