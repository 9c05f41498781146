//! Link frames: the handshake that opens a peer link and the heartbeat that keeps it.

use serde::{Deserialize, Serialize};

use crate::NodeId;

/// First frame of the dialing side.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// The sender's protocol version ([`crate::PROTOCOL_VERSION`]).
    pub version: u32,
    /// The cluster the sender belongs to.
    pub cluster: String,
    /// The sender's node id (checked against its certificate).
    pub node: NodeId,
}

/// Accepting side's answer to a matching [`Hello`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// The acceptor's node id.
    pub node: NodeId,
}

/// Accepting side refuses the link; the connection closes after it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Refuse {
    /// Why, in words that tell an unauthenticated peer nothing about the cluster.
    pub reason: String,
}

/// A link frame.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum LinkFrame {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`Welcome`].
    Welcome(Welcome),
    /// See [`Refuse`].
    Refuse(Refuse),
    /// Liveness probe.
    Ping,
    /// Answer to `Ping`.
    Pong,
}

impl LinkFrame {
    /// The frame's name, for logs (never its contents).
    pub fn kind(&self) -> &'static str {
        match self {
            LinkFrame::Hello(_) => "Hello",
            LinkFrame::Welcome(_) => "Welcome",
            LinkFrame::Refuse(_) => "Refuse",
            LinkFrame::Ping => "Ping",
            LinkFrame::Pong => "Pong",
        }
    }
}
