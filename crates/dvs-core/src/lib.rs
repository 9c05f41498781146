//! The sans-IO core of a dvs node kernel.
//!
//! No sockets, threads or clocks live here: the daemon feeds events (a request from a local
//! process, a frame from a peer, a directory answer), each with the current time, into
//! [`NodeCore::handle`] as an [`Input`], and carries out the [`Action`]s it polls. That makes the IPC semantics testable without
//! processes and simulable deterministically.
//!
//! - [`table`]: per-DC endpoint registrations (RUNNING here, REMOTE, BACKUP).
//! - [`node`]: the node kernel core: M3-IPC calls, peer frames, timeouts.
//! - [`node::migration`]: the migration state machine (coordinator and participants).
//! - [`node::peer_check`]: what a frame from a peer must match before it has any effect.

pub mod node;
pub mod table;

pub use node::migration::{
    FailAt, MigrRecord, MigrationError, MigrationReport, MigrationRequest, Phase, PhaseTime,
    RecordState, Require, PARTICIPANT_TIMEOUT,
};
pub use node::peer_check::Violation;
pub use node::vcopy_in::{VcopyChunk, MAX_INCOMING_VCOPIES_PER_PEER};
pub use node::{
    Action, CoreConfig, DcInfo, DirRequest, DirectoryInput, Input, LocalAction, LocalPeer,
    MemoryAction, MigrationInput, NodeCore, PeerAction, ProcessAction, Report, Ticket,
    VcopyCompletion, VCOPY_MAX,
};
pub use table::{Registration, RegistrationKind};

/// A hash map with a fixed hasher. The core's behaviour, including the order of the actions
/// it emits, must depend only on its inputs, so that a simulation seed replays identically
/// (std's default hasher is seeded at random per map).
pub(crate) type Map<K, V> = std::collections::HashMap<K, V, FixedHasher>;
/// A hash set with a fixed hasher (see [`Map`]).
pub(crate) type Set<K> = std::collections::HashSet<K, FixedHasher>;
type FixedHasher = std::hash::BuildHasherDefault<std::collections::hash_map::DefaultHasher>;

/// Identifies one local connection (one process's endpoint) inside a node.
pub type ConnId = u64;
/// Identifies one outstanding remote operation, unique per originating node.
pub type OpId = u64;
