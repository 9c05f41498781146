//! Control frames: an operator's request that the CLI gave to one node, carried to the node
//! it concerns, and that node's answers carried back. The CLI talks only to its own node, so
//! that `dvs status`, `ps`, `run` and `migrate` work from any host of a cluster whose hosts
//! share no file.
//!
//! The request and its answers travel as the control socket's JSON lines (the types live
//! with the control protocol in `dvs-node`); this module only frames them.

use serde::{Deserialize, Serialize};

/// Number of a forwarded request, chosen by the node that forwards it; unique per link.
pub type CtlId = u64;

/// A control request forwarded by the node the operator asked.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CtlForward {
    /// Names this request in the answers.
    pub id: CtlId,
    /// The request, one JSON control line without its newline.
    pub request: String,
}

/// One answer line to a forwarded request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CtlAnswer {
    /// The request answered.
    pub id: CtlId,
    /// The answer, one JSON control line without its newline.
    pub response: String,
}

/// A control frame.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum CtlFrame {
    /// See [`CtlForward`].
    Forward(CtlForward),
    /// See [`CtlAnswer`].
    Answer(CtlAnswer),
    /// The request has no more answers.
    End(CtlId),
    /// The operator went away: stop answering (e.g. a `run --wait` that streams a log).
    Cancel(CtlId),
}

impl CtlFrame {
    /// The frame's name, for logs (never its contents).
    pub fn kind(&self) -> &'static str {
        match self {
            CtlFrame::Forward(_) => "CtlForward",
            CtlFrame::Answer(_) => "CtlAnswer",
            CtlFrame::End(_) => "CtlEnd",
            CtlFrame::Cancel(_) => "CtlCancel",
        }
    }
}
