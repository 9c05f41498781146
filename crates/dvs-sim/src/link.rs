//! The peer links: which are up, how they behave, and the frames in flight on them.
//!
//! Each direction of a link is a FIFO queue, as the real links are TCP streams: a frame never
//! overtakes an earlier one on the same link, whatever delay it was given. Only frames on
//! different links may be delivered out of sending order.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use dvs_wire::peer::PeerFrame;
use dvs_wire::NodeId;

/// How a link between two nodes behaves (both ways).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LinkConfig {
    /// Every frame takes at least this long.
    pub delay: Duration,
    /// A frame takes up to this much longer, drawn from the simulation's PRNG.
    pub jitter: Duration,
    /// Probability (0 to 1) that a frame is lost while the link stays up, as when a peer
    /// daemon drops what it cannot parse.
    pub drop: f64,
}

/// A frame on its way, with the bytes of a vcopy chunk (empty for other frames).
#[derive(Clone, Debug)]
pub(crate) struct InFlight {
    pub seq: u64,
    /// Offset from the simulation's start at which it may arrive.
    pub due: Duration,
    pub from: NodeId,
    pub to: NodeId,
    pub frame: PeerFrame,
    pub data: Bytes,
}

#[derive(Default)]
pub(crate) struct Links {
    /// Links that are up, as `(low, high)` pairs (a crashed node's links stay listed: they
    /// come back when it restarts).
    up: BTreeSet<(NodeId, NodeId)>,
    config: BTreeMap<(NodeId, NodeId), LinkConfig>,
    pub default: LinkConfig,
    /// Frames in flight per direction `(from, to)`.
    queues: BTreeMap<(NodeId, NodeId), VecDeque<InFlight>>,
    next_seq: u64,
}

pub(crate) fn pair(a: NodeId, b: NodeId) -> (NodeId, NodeId) {
    (a.min(b), a.max(b))
}

impl Links {
    pub fn is_up(&self, a: NodeId, b: NodeId) -> bool {
        self.up.contains(&pair(a, b))
    }

    pub fn set_up(&mut self, a: NodeId, b: NodeId) {
        self.up.insert(pair(a, b));
    }

    /// Takes the link down; what was in flight on it is lost (returned).
    pub fn set_down(&mut self, a: NodeId, b: NodeId) -> Vec<InFlight> {
        self.up.remove(&pair(a, b));
        self.lose(|f, t| pair(f, t) == pair(a, b))
    }

    /// Loses every frame to or from `node` (it crashed).
    pub fn lose_node(&mut self, node: NodeId) -> Vec<InFlight> {
        self.lose(|f, t| f == node || t == node)
    }

    fn lose(&mut self, which: impl Fn(NodeId, NodeId) -> bool) -> Vec<InFlight> {
        let mut lost = Vec::new();
        for ((f, t), q) in self.queues.iter_mut() {
            if which(*f, *t) {
                lost.extend(q.drain(..));
            }
        }
        lost.sort_by_key(|f| f.seq);
        lost
    }

    /// The pairs that are up and involve `node`, other end first.
    pub fn peers_of(&self, node: NodeId) -> Vec<NodeId> {
        self.up
            .iter()
            .filter_map(|&(a, b)| match (a == node, b == node) {
                (true, _) => Some(b),
                (_, true) => Some(a),
                _ => None,
            })
            .collect()
    }

    pub fn set_config(&mut self, a: NodeId, b: NodeId, cfg: LinkConfig) {
        self.config.insert(pair(a, b), cfg);
    }

    pub fn config(&self, a: NodeId, b: NodeId) -> LinkConfig {
        self.config
            .get(&pair(a, b))
            .copied()
            .unwrap_or(self.default)
    }

    /// Queues `frame` from `from` to `to` at `now`; `None` if the link lost it, else when it
    /// is due. The PRNG is drawn from only for a link that drops or jitters, so that a run
    /// without either does not depend on the seed.
    pub fn send(
        &mut self,
        now: Duration,
        from: NodeId,
        to: NodeId,
        frame: PeerFrame,
        data: Bytes,
        rng: &mut fastrand::Rng,
    ) -> Option<Duration> {
        let cfg = self.config(from, to);
        if cfg.drop > 0.0 && rng.f64() < cfg.drop {
            return None;
        }
        let mut delay = cfg.delay;
        if !cfg.jitter.is_zero() {
            let max = u64::try_from(cfg.jitter.as_nanos()).unwrap_or(u64::MAX);
            delay += Duration::from_nanos(rng.u64(0..=max));
        }
        let q = self.queues.entry((from, to)).or_default();
        // FIFO per link: never due before the frame ahead of it.
        let due = q.back().map_or(now + delay, |b| b.due.max(now + delay));
        self.next_seq += 1;
        q.push_back(InFlight {
            seq: self.next_seq,
            due,
            from,
            to,
            frame,
            data,
        });
        Some(due)
    }

    /// When the next frame is due, if any is in flight.
    pub fn next_due(&self) -> Option<Duration> {
        self.queues
            .values()
            .filter_map(|q| q.front().map(|f| f.due))
            .min()
    }

    /// Takes the next frame due by `now`: the earliest due (then the first sent), or with
    /// `reorder`, the head of
    /// a link drawn at random among those with a frame due.
    pub fn pop(
        &mut self,
        now: Duration,
        reorder: bool,
        rng: &mut fastrand::Rng,
    ) -> Option<InFlight> {
        let due: Vec<((NodeId, NodeId), (Duration, u64))> = self
            .queues
            .iter()
            .filter_map(|(k, q)| {
                q.front()
                    .filter(|f| f.due <= now)
                    .map(|f| (*k, (f.due, f.seq)))
            })
            .collect();
        let key = if reorder && due.len() > 1 {
            due[rng.usize(..due.len())].0
        } else {
            due.iter().min_by_key(|(_, order)| *order)?.0
        };
        self.queues.get_mut(&key)?.pop_front()
    }

    /// Every frame in flight, in sending order.
    pub fn in_flight(&self) -> Vec<&InFlight> {
        let mut all: Vec<&InFlight> = self.queues.values().flatten().collect();
        all.sort_by_key(|f| f.seq);
        all
    }
}
