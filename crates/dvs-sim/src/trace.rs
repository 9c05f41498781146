//! The record of a run: what each core was handed and what it asked for, in order.

use std::time::Duration;

use bytes::Bytes;
use dvs_core::{Action, Input, MemoryAction};
use dvs_wire::peer::PeerFrame;
use dvs_wire::NodeId;

/// One thing that happened in a simulation, at `at` after its start.
///
/// Two runs compare equal when their traces do: events compare by their printed form, since
/// the core's inputs have no equality of their own.
#[derive(Clone, Debug)]
pub enum Event {
    /// `node` was handed `input`.
    Input {
        /// When.
        at: Duration,
        /// Which node.
        node: NodeId,
        /// What (vcopy bytes left out).
        input: Input,
    },
    /// `node` asked for `action`.
    Action {
        /// When.
        at: Duration,
        /// Which node.
        node: NodeId,
        /// What (vcopy bytes left out).
        action: Action,
    },
    /// A frame was lost: its link was down or went down, or the link dropped it.
    Lost {
        /// When.
        at: Duration,
        /// Sender.
        from: NodeId,
        /// Addressee.
        to: NodeId,
        /// The frame.
        frame: PeerFrame,
    },
    /// A phantom node received a frame.
    Received {
        /// When.
        at: Duration,
        /// The phantom.
        node: NodeId,
        /// Sender.
        from: NodeId,
        /// The frame.
        frame: PeerFrame,
    },
    /// `node` crashed.
    Crash {
        /// When.
        at: Duration,
        /// Which node.
        node: NodeId,
    },
    /// `node` restarted with a fresh core.
    Restart {
        /// When.
        at: Duration,
        /// Which node.
        node: NodeId,
    },
}

impl Event {
    // The bytes of a vcopy are zeros in the simulation; keeping them would only bloat the
    // trace and its comparison.
    pub(crate) fn input(at: Duration, node: NodeId, input: &Input) -> Self {
        let input = match input {
            Input::VcopyChunk { from, chunk, .. } => Input::VcopyChunk {
                from: *from,
                chunk: *chunk,
                data: Bytes::new(),
            },
            other => other.clone(),
        };
        Event::Input { at, node, input }
    }

    pub(crate) fn action(at: Duration, node: NodeId, action: &Action) -> Self {
        let action = match action {
            Action::Memory(MemoryAction::WriteChunk {
                pid, from, chunk, ..
            }) => Action::Memory(MemoryAction::WriteChunk {
                pid: *pid,
                from: *from,
                chunk: *chunk,
                data: Bytes::new(),
            }),
            other => other.clone(),
        };
        Event::Action { at, node, action }
    }
}

impl PartialEq for Event {
    fn eq(&self, other: &Self) -> bool {
        format!("{self:?}") == format!("{other:?}")
    }
}
