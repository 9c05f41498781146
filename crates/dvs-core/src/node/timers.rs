//! Timers: call deadlines, remote-call grace periods and migration timeouts.

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

impl NodeCore {
    pub(super) fn add_timer(&mut self, at: Instant, key: TimerKey) {
        self.timer_seq += 1;
        self.timers.insert((at, self.timer_seq, key));
    }

    /// Fires every timer due at `now`.
    pub(super) fn handle_timeout(&mut self, now: Instant) {
        while let Some(&(at, seq, key)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.remove(&(at, seq, key));
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
                    if let Some((dc, dst)) = self.remote_incoming.remove(&(node, op)) {
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
