//! The cluster the IPC tests run on: three nodes of [`dvs_sim::Sim`] and two DCs, with the
//! shorthands the tests share.

// Each test file uses only part of this.
#![allow(dead_code)]

use std::collections::BTreeSet;

use dvs_core::{CoreConfig, DcInfo, DirectoryInput, Input, VcopyChunk};
pub use dvs_sim::req::*;
use dvs_sim::DirKind;
pub use dvs_sim::{Proc as P, Sim};
use dvs_wire::local::LocalRequest;
use dvs_wire::{DcId, Ep, NodeId, Timeout};

/// DC spanning nodes 1, 2 and 3.
pub const DC: DcId = 1;
/// DC spanning nodes 1 and 2 only, with a queue limit of 2.
pub const DC2: DcId = 2;
/// A DC that does not exist.
pub const NO_DC: DcId = 9;
/// Endpoints of every DC are `0..MAX_EP`.
pub const MAX_EP: u32 = 16;
pub const NODES: [NodeId; 3] = [1, 2, 3];

pub fn config(node: NodeId) -> CoreConfig {
    CoreConfig {
        node,
        dcs: vec![
            DcInfo {
                id: DC,
                nodes: BTreeSet::from([1, 2, 3]),
                max_endpoints: MAX_EP,
                max_queue: 8,
                bind_uids: BTreeSet::from([0]),
            },
            DcInfo {
                id: DC2,
                nodes: BTreeSet::from([1, 2]),
                max_endpoints: MAX_EP,
                max_queue: 2,
                bind_uids: BTreeSet::from([0, 1000]),
            },
        ],
        migration_seed: 0,
    }
}

/// Three nodes, every link up, nothing bound. Frames go out in sending order as soon as they
/// are sent. Memory copies, process actions and the directory's migration requests are left
/// to the test (in the noted actions); so are unregistrations, which the directory also
/// carries out.
pub fn cluster() -> Sim {
    let mut s = Sim::with_nodes(0, NODES.map(config));
    s.auto_memory = false;
    s.auto_process = false;
    let dir = s.directory_mut();
    dir.noted.insert(DirKind::Unregister);
    dir.manual.extend([
        DirKind::Relocate,
        DirKind::WriteMigrRecord,
        DirKind::ReadMigrRecord,
    ]);
    s.take_frames();
    s
}

/// Leaves directory requests of `kind` to the test (`on`), or to the directory.
pub fn manual(s: &mut Sim, kind: DirKind, on: bool) {
    let manual = &mut s.directory_mut().manual;
    if on {
        manual.insert(kind);
    } else {
        manual.remove(&kind);
    }
}

/// The directory's answer to a `Lookup` of node `n`, given by hand.
pub fn lookup_result(s: &mut Sim, n: NodeId, dc: DcId, ep: Ep, at: Option<NodeId>) {
    s.input(
        n,
        Input::Directory(DirectoryInput::Located { dc, ep, node: at }),
    );
    s.pump();
}

pub const SRC_ADDR: u64 = 0x1000;
pub const DST_ADDR: u64 = 0x8000;

/// Chunk `offset..offset + len` of a `total`-byte vcopy `op` of `{dc, caller}` on
/// `caller_node`, into `dst` at `DST_ADDR`.
#[allow(clippy::too_many_arguments)]
pub fn chunk(
    op: u64,
    caller_node: NodeId,
    dc: DcId,
    caller: Ep,
    dst: Ep,
    offset: u64,
    len: u64,
    total: u64,
) -> VcopyChunk {
    VcopyChunk {
        op,
        caller_node,
        dc,
        caller,
        dst,
        dst_addr: DST_ADDR,
        offset,
        total,
        len,
    }
}

pub fn vcopy(src: Ep, dst: Ep, len: u64, timeout: Timeout) -> LocalRequest {
    LocalRequest::Vcopy {
        src,
        src_addr: SRC_ADDR,
        dst,
        dst_addr: DST_ADDR,
        len,
        timeout,
    }
}

/// A server `srv` on node 1 (ep 1) holding the sendrec of client `c` (ep 2, on `client_node`).
pub fn server_with_client(s: &mut Sim, client_node: NodeId) -> (P, P) {
    let srv = s.bind(1, DC, 1);
    let c = s.bind(client_node, DC, 2);
    s.call(c, sendrec(1, 1, FOREVER));
    s.call(srv, any());
    s.expect_msg_from(srv, 2, 1);
    s.take_frames();
    (srv, c)
}
