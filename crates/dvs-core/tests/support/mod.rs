//! Shared by the core's test simulators: the core's inputs under short names.

#![allow(dead_code)]

use std::time::Instant;

use bytes::Bytes;
use dvs_core::{
    Action, ConnId, DirectoryInput, Input, LocalPeer, MemoryAction, MigrRecord, MigrationInput,
    MigrationRequest, NodeCore, Report, VcopyChunk, VcopyCompletion,
};
use dvs_wire::local::LocalRequest;
use dvs_wire::peer::{MigrationId, PeerFrame};
use dvs_wire::{DcId, Ep, Errno, NodeId};

/// [`NodeCore::handle`] under one method per input. Inputs the tests give without a time
/// happen at the core's latest event time.
pub trait Drive {
    fn core_mut(&mut self) -> &mut NodeCore;

    fn at(&mut self) -> Instant {
        self.core_mut()
            .last_event_time()
            .unwrap_or_else(Instant::now)
    }
    fn input(&mut self, input: Input) {
        let now = self.at();
        self.core_mut().handle(now, input);
    }
    fn on_local_connect(&mut self, conn: ConnId, peer: LocalPeer) {
        self.input(Input::LocalConnect { conn, peer });
    }
    fn on_local_disconnect(&mut self, conn: ConnId) {
        self.input(Input::LocalDisconnect { conn });
    }
    fn on_local_request(&mut self, conn: ConnId, req: LocalRequest, now: Instant) {
        self.core_mut()
            .handle(now, Input::LocalRequest { conn, req });
    }
    fn on_link_up(&mut self, node: NodeId) {
        self.input(Input::LinkUp { node });
    }
    fn on_link_down(&mut self, node: NodeId) {
        self.input(Input::LinkDown { node });
    }
    fn on_peer_frame(&mut self, from: NodeId, frame: PeerFrame, now: Instant) {
        self.core_mut()
            .handle(now, Input::PeerFrame { from, frame });
    }
    fn on_register_result(&mut self, conn: ConnId, result: Result<(), Errno>) {
        self.input(Input::Directory(DirectoryInput::Registered {
            conn,
            result,
        }));
    }
    fn on_directory_synced(&mut self, conn: ConnId) {
        self.input(Input::Directory(DirectoryInput::Synced { conn }));
    }
    fn on_lookup_result(&mut self, dc: DcId, ep: Ep, node: Option<NodeId>, now: Instant) {
        self.core_mut().handle(
            now,
            Input::Directory(DirectoryInput::Located { dc, ep, node }),
        );
    }
    fn on_directory_update(&mut self, dc: DcId, ep: Ep, node: Option<NodeId>) {
        self.input(Input::Directory(DirectoryInput::Changed { dc, ep, node }));
    }
    fn on_migr_record_result(
        &mut self,
        id: MigrationId,
        result: Result<(), Option<MigrRecord>>,
        now: Instant,
    ) {
        self.core_mut().handle(
            now,
            Input::Directory(DirectoryInput::MigrRecordWritten { id, result }),
        );
    }
    fn on_migr_record_read(
        &mut self,
        id: MigrationId,
        dc: DcId,
        ep: Ep,
        record: Option<MigrRecord>,
        now: Instant,
    ) {
        self.core_mut().handle(
            now,
            Input::Directory(DirectoryInput::MigrRecordRead { id, dc, ep, record }),
        );
    }
    fn on_migr_record(&mut self, dc: DcId, ep: Ep, record: MigrRecord, now: Instant) {
        self.core_mut().handle(
            now,
            Input::Directory(DirectoryInput::MigrRecordChanged { dc, ep, record }),
        );
    }
    fn on_vcopy_local_done(&mut self, done: VcopyCompletion, result: Result<(), Errno>) {
        self.input(Input::VcopyLocalDone { done, result });
    }
    fn on_vcopy_stream_failed(&mut self, caller_node: NodeId, op: u64, error: Errno) {
        self.input(Input::VcopyStreamFailed {
            caller_node,
            op,
            error,
        });
    }
    fn on_vcopy_chunk_written(
        &mut self,
        from: NodeId,
        chunk: &VcopyChunk,
        result: Result<(), Errno>,
    ) {
        self.input(Input::VcopyChunkWritten {
            from,
            chunk: *chunk,
            result,
        });
    }
    fn handle_timeout(&mut self, now: Instant) {
        self.core_mut().handle(now, Input::Timeout);
    }
    fn on_checkpoint_done(&mut self, id: MigrationId, result: Result<u64, String>, now: Instant) {
        self.core_mut().handle(
            now,
            Input::Migration(MigrationInput::CheckpointDone { id, result }),
        );
    }
    fn on_image_sent(&mut self, id: MigrationId, result: Result<u64, String>, now: Instant) {
        self.core_mut().handle(
            now,
            Input::Migration(MigrationInput::ImageSent { id, result }),
        );
    }
    fn on_image_chunk(&mut self, id: MigrationId, bytes: u64, now: Instant) {
        self.core_mut().handle(
            now,
            Input::Migration(MigrationInput::ImageChunk { id, bytes }),
        );
    }
    fn on_restored(
        &mut self,
        id: MigrationId,
        result: Result<(ConnId, i32), String>,
        now: Instant,
    ) {
        self.core_mut().handle(
            now,
            Input::Migration(MigrationInput::Restored { id, result }),
        );
    }
}

impl Drive for NodeCore {
    fn core_mut(&mut self) -> &mut NodeCore {
        self
    }
}

/// Hands `chunk` from `from` to `core` and returns the pid the core asks to write it into,
/// with every other action the core queued meanwhile (in order).
pub fn vcopy_chunk(
    core: &mut NodeCore,
    from: NodeId,
    chunk: &VcopyChunk,
) -> (Option<i32>, Vec<Action>) {
    let data = Bytes::from(vec![0u8; chunk.len as usize]);
    core.input(Input::VcopyChunk {
        from,
        chunk: *chunk,
        data,
    });
    let mut pid = None;
    let mut rest = Vec::new();
    while let Some(a) = core.poll_action() {
        match a {
            Action::Memory(MemoryAction::WriteChunk { pid: p, .. }) => pid = Some(p),
            other => rest.push(other),
        }
    }
    (pid, rest)
}

/// Starts a migration on `core` and returns its id (or why it cannot start), with every
/// other action the core queued meanwhile (in order).
pub fn start_migration(
    core: &mut NodeCore,
    req: MigrationRequest,
    now: Instant,
) -> (Result<MigrationId, String>, Vec<Action>) {
    core.handle(
        now,
        Input::Migration(MigrationInput::Start { ticket: 0, req }),
    );
    let mut result = Err("no answer".to_string());
    let mut rest = Vec::new();
    while let Some(a) = core.poll_action() {
        match a {
            Action::Report(Report::MigrationAccepted { result: r, .. }) => {
                result = r.map_err(|e| e.to_string())
            }
            other => rest.push(other),
        }
    }
    (result, rest)
}
