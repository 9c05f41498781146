//! Timers: call deadlines, remote-call grace periods and migration timeouts.

use std::collections::BTreeSet;
use std::time::Instant;

use dvs_wire::peer::{Delivered, IpcFrame, MigrationId, PeerFrame};
use dvs_wire::{Errno, NodeId};

use super::action::PeerAction;
use super::conn::Blocked;
use super::{err, Action, NodeCore};
use crate::{ConnId, OpId};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum TimerKey {
    Conn { conn: ConnId, gen: u64 },
    Incoming { node: NodeId, op: OpId },
    Migration { id: MigrationId },
}

/// Pending timers, in deadline order (ties in the order they were set).
#[derive(Default)]
pub(super) struct Timers {
    set: BTreeSet<(Instant, u64, TimerKey)>,
    seq: u64,
}

impl Timers {
    /// Fires `key` at `at`. A timer is never cancelled: its handler checks whether it still
    /// matters (e.g. by a connection's generation).
    pub(super) fn add(&mut self, at: Instant, key: TimerKey) {
        self.seq += 1;
        self.set.insert((at, self.seq, key));
    }

    /// The earliest deadline.
    pub(super) fn next(&self) -> Option<Instant> {
        self.set.first().map(|(t, _, _)| *t)
    }

    /// Takes the earliest timer due at `now`.
    pub(super) fn pop_due(&mut self, now: Instant) -> Option<TimerKey> {
        let &(at, _, _) = self.set.first()?;
        if at > now {
            return None;
        }
        self.set.pop_first().map(|(_, _, key)| key)
    }
}

impl NodeCore {
    pub(super) fn add_timer(&mut self, at: Instant, key: TimerKey) {
        self.timers.add(at, key);
    }

    /// Fires every timer due at `now`.
    pub(super) fn handle_timeout(&mut self, now: Instant) {
        while let Some(key) = self.timers.pop_due(now) {
            match key {
                TimerKey::Conn { conn, gen } => {
                    // A migrating endpoint's deadline travels with it; its node applies it.
                    let live = self.conns.get(&conn).is_some_and(|c| {
                        c.gen == gen
                            && c.blocked != Blocked::No
                            && c.migrating_out.is_none()
                            && !matches!(
                                c.blocked,
                                Blocked::Installing { .. } | Blocked::Snapshotting
                            )
                    });
                    if live {
                        self.abandon_call(conn);
                        self.respond(conn, err(Errno::TimedOut));
                    }
                }
                TimerKey::Incoming { node, op } => {
                    if let Some((dc, dst)) = self.calls.unqueue(node, op) {
                        if self.drop_remote_incoming(dc, dst, (node, op)) {
                            self.actions.push_back(Action::Peer(PeerAction::Send {
                                node,
                                frame: PeerFrame::Ipc(IpcFrame::Delivered(Delivered {
                                    op,
                                    result: Err(Errno::TimedOut),
                                })),
                            }));
                        }
                    }
                }
                TimerKey::Migration { id } => self.on_migration_timer(id, now),
            }
        }
    }
}
