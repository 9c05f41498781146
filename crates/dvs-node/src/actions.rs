//! Carrying out the core's actions: the event loop calls [`Node::execute`] for every action
//! it polls, and nowhere else. Writes are only queued here; the loop flushes them at the end
//! of its round. Work that could block (criu, files, `/proc`) is handed to the blocking pool
//! by the handlers in `migrate.rs` and answers later as an event.

use std::rc::Rc;
use std::time::Instant;

use dvs_core::{Action, Input, LocalAction, MemoryAction, PeerAction, ProcessAction, Report};
use dvs_wire::peer::{PeerFrame, VcopyData};
use dvs_wire::{Errno, NodeId};
use tracing::{error, warn};

use crate::dir::DirJob;
use crate::event_loop::{Event, Node, Waiting};
use crate::vcopy;
use crate::wire::{self, Wire};

impl Node {
    /// Carries out one action of the core.
    pub(crate) fn execute(&mut self, action: Action) {
        match action {
            Action::Local(LocalAction::Respond { conn, resp }) => {
                if let Some(w) = self.conns.get(&conn) {
                    if let Err(e) = w.queue(&resp, &[]) {
                        error!("cannot encode a response: {e}");
                    }
                    mark(&mut self.dirty, w);
                }
            }
            Action::Local(LocalAction::Close { conn, reason }) => {
                // Its reader sees the close and reports the connection gone.
                if let Some(w) = self.conns.get(&conn) {
                    warn!(conn, "closing local connection: {reason}");
                    w.close();
                }
            }
            Action::Peer(PeerAction::Send { node, frame }) => self.send_peer(node, &frame, &[]),
            Action::Peer(PeerAction::Condemn {
                node,
                frame,
                reason,
            }) => {
                // The read loop sees the close and takes the link down.
                warn!(node, frame, %reason, "closing the link to a peer that sent a forged frame");
                if let Some(l) = self.peers.get(&node) {
                    l.wire.close();
                }
            }
            Action::Directory(req) => self.directory(DirJob::Core(req)),
            Action::Memory(m) => self.memory(m),
            Action::Process(p) => self.process(p),
            Action::Report(r) => self.report(r),
        }
    }

    /// Queues a job for the directory thread, which runs them in order.
    pub(crate) fn directory(&mut self, job: DirJob) {
        if self.dir.send(job).is_err() {
            error!("directory worker is gone");
        }
    }

    fn process(&mut self, action: ProcessAction) {
        match action {
            ProcessAction::Checkpoint {
                id,
                dc,
                ep,
                pid,
                to,
                fail,
            } => self.migr_checkpoint(id, (dc, ep), pid, to, fail),
            ProcessAction::SaveSnapshot { id, data, fail } => {
                self.migr_save_snapshot(id, data, fail)
            }
            ProcessAction::SendImage { id, to } => self.migr_send_image(id, to),
            ProcessAction::Restore {
                id,
                dc,
                ep,
                backend,
                fail,
            } => self.migr_restore(id, dc, ep, backend, fail),
            ProcessAction::PrepareRestore {
                id,
                dc,
                ep,
                backend,
                from,
            } => self.migr_prepare_restore(id, dc, ep, backend, from),
            ProcessAction::KillTree { pid } => self.migr_kill_tree(pid),
            ProcessAction::MigratedAway { pid, to } => self.migr_migrated_away(pid, to),
            ProcessAction::ResumeTree { pid } => self.migr_resume_tree(pid),
            ProcessAction::DropImage { id } => {
                // A restorer still waiting for this image is killed when dropped.
                self.migrations.restorers.remove(&id);
                self.migrations.launch_records.remove(&id);
                // The image goes once the outcome is applied: a cooperative program that did
                // not become the endpoint here leaves no working folder behind.
                if let Some((dc, ep, unpacked)) = self.migrations.coop_unpacked.remove(&id) {
                    if self.core.local_pid(dc, ep).is_none() {
                        tokio::task::spawn_blocking(move || unpacked.undo());
                    }
                }
                // So is an image still being streamed (a rollback during the dump).
                if let Some(stream) = self.migrations.streams.remove(&id) {
                    stream.abort();
                }
                self.migrations.images.drop_image(id)
            }
        }
    }

    fn report(&mut self, report: Report) {
        match report {
            Report::MigrProgress { id, phase } => self.migr_progress(id, phase),
            Report::MigrFinished { id, report } => self.migr_finished(id, report),
            Report::Registered { ticket, result } => {
                if let Some(Waiting::Registered(reply)) = self.waiting.remove(&ticket) {
                    let _ = reply.send(result);
                }
            }
            Report::MigrationAccepted { ticket, result } => {
                if let Some(Waiting::Migration { reply, progress }) = self.waiting.remove(&ticket) {
                    // Registered before the progress reports the start queued behind this one.
                    let result = result.map_err(|e| e.to_string());
                    if let Ok(id) = result {
                        self.migrations
                            .requesters
                            .insert(id, (Instant::now(), progress));
                    }
                    let _ = reply.send(result);
                }
            }
        }
    }

    /// Memory copies run inline: `process_vm_readv`/`writev` are short syscalls on memory
    /// that is resident or faulted in by the kernel, never file or network I/O, so they are
    /// cheaper than a trip to the blocking pool (a vcopy is at most `VCOPY_MAX`).
    fn memory(&mut self, action: MemoryAction) {
        match action {
            MemoryAction::CopyLocal {
                src_pid,
                src_addr,
                dst_pid,
                dst_addr,
                len,
                done,
            } => {
                let r = vcopy::copy(src_pid, src_addr, dst_pid, dst_addr, len, &mut self.bounce);
                self.core
                    .handle(Instant::now(), Input::VcopyLocalDone { done, result: r });
            }
            MemoryAction::WriteChunk {
                pid,
                from,
                chunk,
                data,
            } => {
                let result = vcopy::write(pid, chunk.addr(), &data);
                self.core.handle(
                    Instant::now(),
                    Input::VcopyChunkWritten {
                        from,
                        chunk,
                        result,
                    },
                );
            }
            MemoryAction::Stream {
                pid,
                src_addr,
                len,
                to,
                op,
                caller_node,
                dc,
                caller,
                dst,
                dst_addr,
            } => {
                let Some(w) = self.peers.get(&to).map(|l| l.wire.clone()) else {
                    self.core.handle(
                        Instant::now(),
                        Input::VcopyStreamFailed {
                            caller_node,
                            op,
                            error: Errno::NodeUnreachable,
                        },
                    );
                    return;
                };
                // Streamed by a task of its own, paced by what the link has not sent yet, so
                // that a big copy never queues more than `vcopy::STREAM_AHEAD` bytes ahead of
                // the heartbeats and IPC frames that follow it on the link.
                let head = VcopyData {
                    op,
                    caller_node,
                    dc,
                    caller,
                    dst,
                    dst_addr,
                    offset: 0,
                    total: len,
                };
                let events = self.ctx.events.clone();
                tokio::task::spawn_local(async move {
                    if let Err(error) = vcopy::stream(&w, pid, src_addr, head).await {
                        let failed = Input::VcopyStreamFailed {
                            caller_node,
                            op,
                            error,
                        };
                        let _ = events.send(Event::Input(failed)).await;
                    }
                });
            }
        }
    }

    /// Queues a frame to a peer; dropped (with a log line) when the link is down, since the
    /// core already failed whatever depended on it.
    pub(crate) fn send_peer(&mut self, node: NodeId, frame: &PeerFrame, tail: &[u8]) {
        match self.peers.get(&node) {
            Some(l) => {
                let w = &l.wire;
                if let Err(e) = w.queue(frame, tail) {
                    error!("cannot encode a frame for node {node}: {e}");
                }
                if w.over_limit() {
                    // The peer stopped reading: a dead link is better than unbounded memory.
                    error!(
                        "link to node {node}: over {} MiB queued and the peer read nothing for {:?}, closing the link",
                        wire::MAX_PENDING >> 20,
                        wire::STUCK_AFTER
                    );
                    w.close();
                    return;
                }
                mark(&mut self.dirty, w);
            }
            None => tracing::debug!("link to node {node} is down; dropping {frame:?}"),
        }
    }
}

/// Adds `w` to the writers flushed at the end of the round.
fn mark(dirty: &mut Vec<Rc<Wire>>, w: &Rc<Wire>) {
    if !dirty.iter().any(|d| Rc::ptr_eq(d, w)) {
        dirty.push(w.clone());
    }
}
