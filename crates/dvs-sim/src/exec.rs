//! The simulated daemon's side of each action: what the real node's executors do (local
//! connections, links, directory, memory, processes and images, reports), done at once and
//! always successfully unless the test asked otherwise.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use dvs_core::{
    Action, ConnId, DirRequest, Input, LocalAction, LocalPeer, MemoryAction, MigrationError,
    MigrationInput, MigrationReport, PeerAction, ProcessAction, Report, Ticket,
};
use dvs_wire::peer::{BulkFrame, MigrationId, PeerFrame, VcopyData};
use dvs_wire::{DcId, Ep, Errno, NodeId};

use crate::directory::DirKind;
use crate::{Proc, Sim};

/// Size the simulation gives every checkpoint image.
const IMAGE_BYTES: u64 = 1000;

/// A process restored as the destination of a migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Restored {
    /// The migration.
    pub id: MigrationId,
    /// The restored process.
    pub proc: Proc,
    /// The endpoint it was restored as.
    pub dc: DcId,
    /// The endpoint it was restored as.
    pub ep: Ep,
}

/// What the simulated daemons did for the cores, for the test to check.
#[derive(Clone, Debug, Default)]
pub struct Outcomes {
    /// Every finished migration's report, in order.
    pub reports: Vec<MigrationReport>,
    /// Answers to migration starts, by ticket.
    pub accepted: BTreeMap<Ticket, Result<MigrationId, MigrationError>>,
    /// Answers to remote registrations, by ticket.
    pub registered: BTreeMap<Ticket, Result<(), Errno>>,
    /// Pids whose process trees were killed, in order.
    pub killed: Vec<i32>,
    /// Pids whose stopped process trees were resumed, in order.
    pub resumed: Vec<i32>,
    /// The processes restored by migrations, in order.
    pub restored: Vec<Restored>,
    /// Checkpoints waiting for the test (with [`Sim::hold_checkpoints`]), as `(node, id)`;
    /// finish one with `MigrationInput::CheckpointDone`.
    pub held_checkpoints: Vec<(NodeId, MigrationId)>,
}

impl Sim {
    /// Carries out `a`, which `node` asked for.
    pub(crate) fn carry_out(&mut self, node: NodeId, a: Action) {
        match a {
            Action::Local(LocalAction::Respond { conn, resp }) => self
                .responses
                .entry(Proc { node, conn })
                .or_default()
                .push_back(resp),
            Action::Peer(PeerAction::Send { node: to, frame }) => {
                self.send_frame(node, to, frame, Bytes::new())
            }
            Action::Directory(req) => self.directory_request(node, req),
            Action::Memory(m) if self.auto_memory => self.memory(node, m),
            Action::Process(p) if self.auto_process => self.process(node, p),
            Action::Report(r) => self.report(node, r),
            Action::Peer(PeerAction::Condemn { node: peer, .. }) if self.close_condemned => {
                self.condemned.push((node, peer));
                self.noted.push((node, a));
            }
            // A close or a condemned link is the test's to see and act on.
            other => self.noted.push((node, other)),
        }
    }

    // ----- directory -----------------------------------------------------------------------

    fn directory_request(&mut self, node: NodeId, req: DirRequest) {
        let kind = DirKind::of(&req);
        if self.dir.manual.contains(&kind) {
            self.noted.push((node, Action::Directory(req)));
            return;
        }
        if self.dir.noted.contains(&kind) {
            self.noted.push((node, Action::Directory(req.clone())));
        }
        let queue = self.dir.queues.entry(node).or_default();
        if self.dir.delay.is_zero() && queue.is_empty() && !self.dir.held.contains(&node) {
            self.land(node, req);
        } else {
            // In order per node: never before the request ahead of it.
            let due = queue
                .back()
                .map_or(self.elapsed + self.dir.delay, |(d, _)| {
                    (*d).max(self.elapsed + self.dir.delay)
                });
            queue.push_back((due, req));
        }
    }

    fn land(&mut self, node: NodeId, req: DirRequest) {
        let landed = self.dir.land(node, req);
        if let Some(answer) = landed.answer {
            self.input(node, Input::Directory(answer));
        }
        for change in landed.watch {
            for n in self.nodes() {
                self.input(n, Input::Directory(change.clone()));
            }
        }
    }

    /// When the next directory request not held lands, if any waits.
    pub(crate) fn dir_next_due(&self) -> Option<Duration> {
        self.dir
            .queues
            .iter()
            .filter(|(n, _)| !self.dir.held.contains(n))
            .filter_map(|(_, q)| q.front().map(|(d, _)| *d))
            .min()
    }

    /// Lands the directory request due first, if one is due now; false if none.
    pub(crate) fn land_one_due(&mut self) -> bool {
        let next = self
            .dir
            .queues
            .iter()
            .filter(|(n, _)| !self.dir.held.contains(n))
            .filter_map(|(n, q)| q.front().map(|(d, _)| (*d, *n)))
            .filter(|(d, _)| *d <= self.elapsed)
            .min();
        let Some((_, node)) = next else { return false };
        let (_, req) = self
            .dir
            .queues
            .get_mut(&node)
            .and_then(|q| q.pop_front())
            .expect("found above");
        self.land(node, req);
        true
    }

    /// Holds the directory requests of `node`: none lands until
    /// [`Sim::release_directory`].
    pub fn hold_directory(&mut self, node: NodeId) {
        self.dir.held.insert(node);
    }

    /// Lets the held directory requests of `node` land (those due now at once).
    pub fn release_directory(&mut self, node: NodeId) {
        self.dir.held.remove(&node);
        self.pump();
    }

    // ----- memory --------------------------------------------------------------------------

    fn memory(&mut self, node: NodeId, m: MemoryAction) {
        match m {
            MemoryAction::CopyLocal { done, .. } => self.input(
                node,
                Input::VcopyLocalDone {
                    done,
                    result: Ok(()),
                },
            ),
            // The whole range as one chunk: chunking is the daemon's, not the core's.
            MemoryAction::Stream {
                len,
                to,
                op,
                caller_node,
                dc,
                caller,
                dst,
                dst_addr,
                ..
            } => {
                let frame = PeerFrame::Bulk(BulkFrame::VcopyData(VcopyData {
                    op,
                    caller_node,
                    dc,
                    caller,
                    dst,
                    dst_addr,
                    offset: 0,
                    total: len,
                }));
                let data = Bytes::from(vec![0u8; len as usize]);
                self.send_frame(node, to, frame, data);
            }
            MemoryAction::WriteChunk { from, chunk, .. } => self.input(
                node,
                Input::VcopyChunkWritten {
                    from,
                    chunk,
                    result: Ok(()),
                },
            ),
        }
    }

    // ----- processes and images ------------------------------------------------------------

    fn process(&mut self, node: NodeId, p: ProcessAction) {
        let migration = |m| Input::Migration(m);
        match p {
            ProcessAction::Checkpoint { id, .. } if self.hold_checkpoints => {
                self.out.held_checkpoints.push((node, id))
            }
            ProcessAction::Checkpoint { id, fail, .. } => {
                let result = if fail {
                    Err("injected".to_string())
                } else {
                    Ok(IMAGE_BYTES)
                };
                self.input(
                    node,
                    migration(MigrationInput::CheckpointDone { id, result }),
                );
            }
            ProcessAction::SaveSnapshot { id, data, fail } => {
                let result = if fail {
                    Err("injected".to_string())
                } else {
                    Ok(data.len() as u64)
                };
                self.input(
                    node,
                    migration(MigrationInput::CheckpointDone { id, result }),
                );
            }
            // The image goes on its own stream, not the peer link; it reaches a node that is up.
            ProcessAction::SendImage { id, to } => {
                let result = if self.is_alive(to) {
                    let bytes = IMAGE_BYTES;
                    self.input(to, migration(MigrationInput::ImageChunk { id, bytes }));
                    Ok(bytes)
                } else {
                    Err(format!("node {to} is down"))
                };
                self.input(node, migration(MigrationInput::ImageSent { id, result }));
            }
            ProcessAction::Restore { id, fail: true, .. } => {
                let result = Err("injected".to_string());
                self.input(node, migration(MigrationInput::Restored { id, result }));
            }
            ProcessAction::Restore { id, dc, ep, .. } => {
                let p = self.new_proc(node);
                let peer = LocalPeer {
                    pid: Self::pid(p),
                    uid: 0,
                    launched_for: Some((dc, ep)),
                };
                self.input(node, Input::LocalConnect { conn: p.conn, peer });
                self.out.restored.push(Restored {
                    id,
                    proc: p,
                    dc,
                    ep,
                });
                let result: Result<(ConnId, i32), String> = Ok((p.conn, Self::pid(p)));
                self.input(node, migration(MigrationInput::Restored { id, result }));
            }
            ProcessAction::KillTree { pid } => self.out.killed.push(pid),
            ProcessAction::ResumeTree { pid } => self.out.resumed.push(pid),
            // Bookkeeping of the daemon's only: the trace has them.
            ProcessAction::MigratedAway { .. }
            | ProcessAction::DropImage { .. }
            | ProcessAction::PrepareRestore { .. } => {}
        }
    }

    // ----- reports -------------------------------------------------------------------------

    fn report(&mut self, _node: NodeId, r: Report) {
        match r {
            Report::Registered { ticket, result } => {
                self.out.registered.insert(ticket, result);
            }
            Report::MigrationAccepted { ticket, result } => {
                self.out.accepted.insert(ticket, result);
            }
            Report::MigrFinished { report, .. } => self.out.reports.push(report),
            // Progress is in the trace.
            Report::MigrProgress { .. } => {}
        }
    }

    /// Asks `node` to start migration `req` and carries out what follows: the migration's id,
    /// or why it cannot start.
    pub fn start_migration(
        &mut self,
        node: NodeId,
        req: dvs_core::MigrationRequest,
    ) -> Result<MigrationId, MigrationError> {
        let ticket = self.next_ticket();
        self.input(
            node,
            Input::Migration(MigrationInput::Start { ticket, req }),
        );
        self.pump();
        self.out
            .accepted
            .remove(&ticket)
            .expect("the core answers every migration start at once")
    }

    fn next_ticket(&mut self) -> Ticket {
        self.tickets += 1;
        self.tickets
    }
}
