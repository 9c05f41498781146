//! Operator requests relayed between nodes.
//!
//! The CLI talks only to the node of its own host (hosts share no file, so it cannot reach
//! another node's `ctl.sock`). A request for another node arrives as
//! `CtlRequest::Forward { to, request }`; this node sends it to `to` as a
//! [`CtlFrame::Forward`] on their peer link, and passes every [`CtlFrame::Answer`] back to the
//! CLI until [`CtlFrame::End`]. The node that serves a relayed request answers it as it would
//! answer its own CLI (`ctl_server::handle`), in a task whose answers come back to the loop
//! as [`Event::Relayed`].
//!
//! Trust: the relaying node checked its caller's credentials (root or the admin group), and
//! the link is authenticated by the cluster's certificates, so a relayed request is served
//! like a local one, unless `[access] remote_control = false`. Plaintext links never carry
//! relayed requests: their peer could be anyone.

use std::collections::HashMap;
use std::rc::Rc;

use dvs_wire::peer::{CtlAnswer, CtlForward, CtlFrame, CtlId, PeerFrame};
use dvs_wire::NodeId;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::ctl::{CtlRequest, CtlResponse};
use crate::ctl_server::{self, Responder};
use crate::event_loop::{Ctx, Event, Node};

/// Most requests one peer may have served here at once; more are refused (each holds a
/// task, and a `run --wait` may last as long as its program).
const MAX_SERVED_PER_PEER: usize = 64;

/// The relayed requests of a node, both ways.
#[derive(Default)]
pub(crate) struct Relays {
    next: CtlId,
    /// Requests relayed from here: where to, and the CLI connection's answer channel.
    out: HashMap<CtlId, (NodeId, mpsc::UnboundedSender<CtlResponse>)>,
    /// Requests served here for other nodes, to stop when the asker cancels or goes away.
    served: HashMap<(NodeId, CtlId), tokio::task::AbortHandle>,
}

/// Sends a served request's answers to the loop, which puts them on the link.
struct RelayResponder {
    ctx: Rc<Ctx>,
    to: NodeId,
    id: CtlId,
}

impl Responder for RelayResponder {
    async fn send(&mut self, r: &CtlResponse) -> std::io::Result<()> {
        let response = serde_json::to_string(r).expect("responses serialize");
        let frame = CtlFrame::Answer(CtlAnswer {
            id: self.id,
            response,
        });
        self.ctx
            .events
            .send(Event::Relayed { to: self.to, frame })
            .await
            .map_err(|_| std::io::Error::other("the node kernel is stopping"))
    }
}

/// An answer for a request that fails before it reaches the node that should serve it.
fn refusal(message: String) -> CtlResponse {
    CtlResponse::Error { message }
}

impl Node {
    /// Relays `request` to node `to` for a CLI connection (see the module documentation).
    pub(crate) fn relay_request(
        &mut self,
        to: NodeId,
        request: CtlRequest,
        answers: mpsc::UnboundedSender<CtlResponse>,
    ) {
        let name = self.node_name(to);
        if !self.links.contains_key(&to) {
            let _ = answers.send(refusal(format!(
                "no node {to} in the cluster (neither in the config nor holding a membership lease)"
            )));
            return;
        }
        if !self.ctx.cfg.link.tls {
            let _ = answers.send(refusal(format!(
                "cannot relay to node {name}: the cluster's links are plaintext ([link] tls = false), so nodes do not relay operator requests; run the command on node {name}'s host"
            )));
            return;
        }
        if !self.peers.contains_key(&to) {
            let _ = answers.send(refusal(format!(
                "cannot reach node {name}: the link to it is down"
            )));
            return;
        }
        self.relays.next += 1;
        let id = self.relays.next;
        let request = serde_json::to_string(&request).expect("requests serialize");
        self.relays.out.insert(id, (to, answers));
        self.send_peer(
            to,
            &PeerFrame::Ctl(CtlFrame::Forward(CtlForward { id, request })),
            &[],
        );
    }

    /// A control frame from node `from`.
    pub(crate) fn relay_frame(&mut self, from: NodeId, frame: CtlFrame) {
        match frame {
            CtlFrame::Forward(CtlForward { id, request }) => self.serve_relayed(from, id, &request),
            CtlFrame::Answer(CtlAnswer { id, response }) => {
                let Some((to, answers)) = self.relays.out.get(&id) else {
                    return debug!(
                        "answer {id} from node {from} to no request (ended or cancelled)"
                    );
                };
                if *to != from {
                    return warn!(
                        "node {from} answered request {id}, which went to node {to}; ignored"
                    );
                }
                let r = serde_json::from_str(&response).unwrap_or_else(|e| {
                    refusal(format!("node {from} sent an unreadable answer: {e}"))
                });
                if answers.send(r).is_err() {
                    // The CLI went away: the serving node can stop.
                    self.relays.out.remove(&id);
                    self.send_peer(from, &PeerFrame::Ctl(CtlFrame::Cancel(id)), &[]);
                }
            }
            CtlFrame::End(id) => {
                if self.relays.out.get(&id).is_some_and(|(to, _)| *to == from) {
                    self.relays.out.remove(&id);
                }
            }
            CtlFrame::Cancel(id) => {
                if let Some(task) = self.relays.served.remove(&(from, id)) {
                    task.abort();
                }
            }
        }
    }

    /// Serves request `id` that node `from` relayed, in a task of its own.
    fn serve_relayed(&mut self, from: NodeId, id: CtlId, request: &str) {
        let refuse = |node: &mut Node, message: String| {
            warn!("relayed control request {id} from node {from} refused: {message}");
            let response = serde_json::to_string(&refusal(message)).expect("responses serialize");
            node.relayed_answer(from, CtlFrame::Answer(CtlAnswer { id, response }));
            node.relayed_answer(from, CtlFrame::End(id));
        };
        if !self.ctx.cfg.link.tls {
            // Unreachable from an honest node, which never relays over plaintext links.
            return refuse(
                self,
                "this node serves no relayed request over a plaintext link".into(),
            );
        }
        if !self.ctx.cfg.access.remote_control {
            return refuse(
                self,
                format!(
                    "node {} does not serve requests relayed by other nodes ([access] remote_control = false); run the command on its host",
                    self.ctx.me.name
                ),
            );
        }
        let served = self
            .relays
            .served
            .keys()
            .filter(|(n, _)| *n == from)
            .count();
        if served >= MAX_SERVED_PER_PEER {
            return refuse(
                self,
                format!("node {from} already has {served} requests served here; try again later"),
            );
        }
        let req: CtlRequest = match serde_json::from_str(request) {
            Ok(r) => r,
            Err(e) => return refuse(self, format!("bad control request: {e}")),
        };
        if matches!(req, CtlRequest::Forward { .. }) {
            return refuse(self, "a relayed request cannot be relayed again".into());
        }
        debug!("serving control request {id} relayed by node {from}: {req:?}");
        let ctx = self.ctx.clone();
        let task = tokio::task::spawn_local(async move {
            let mut out = RelayResponder {
                ctx: ctx.clone(),
                to: from,
                id,
            };
            let _ = ctl_server::handle(&ctx, req, &mut out).await;
            let _ = ctx
                .events
                .send(Event::Relayed {
                    to: from,
                    frame: CtlFrame::End(id),
                })
                .await;
        });
        self.relays.served.insert((from, id), task.abort_handle());
    }

    /// Sends an answer of a served request back to the node that relayed it.
    pub(crate) fn relayed_answer(&mut self, to: NodeId, frame: CtlFrame) {
        if let CtlFrame::End(id) = frame {
            self.relays.served.remove(&(to, id));
        }
        self.send_peer(to, &PeerFrame::Ctl(frame), &[]);
    }

    /// The link to `node` went down: the requests relayed there get an error, and those
    /// served here for it stop.
    pub(crate) fn relays_link_down(&mut self, node: NodeId) {
        let name = self.node_name(node);
        self.relays.out.retain(|_, (to, answers)| {
            if *to == node {
                let _ = answers.send(refusal(format!(
                    "the link to node {name} went down before it answered"
                )));
            }
            *to != node
        });
        self.relays.served.retain(|(n, _), task| {
            if *n == node {
                task.abort();
            }
            *n != node
        });
    }
}
