//! The control socket: JSON lines from the CLI (see [`crate::ctl`]).
//!
//! Every request, `status` and `ps` included (they show pids and command lines), needs the
//! caller to be root or a member of the configured admin group; the socket's mode already
//! keeps others out, and this check holds if that mode is ever wrong. Lines are at most
//! [`MAX_LINE`] bytes.
//!
//! Each connection is a task of its own; what needs the node's state is asked of the event
//! loop as a [`Query`] with a reply channel, and what may block (criu, `/proc`, the log
//! file) runs on the blocking pool.

use dvs_core::{DirectoryInput, Input, MigrationInput};
use std::io::SeekFrom;
use std::rc::Rc;
use std::time::Duration;

use dvs_core::RegistrationKind;
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncSeekExt, AsyncWriteExt, BufReader,
};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::oneshot;
use tracing::warn;

/// Longest control request line, newline excluded; a longer one gets an error and the
/// connection is closed (the rest is never buffered).
pub(crate) const MAX_LINE: usize = 64 * 1024;

use dvs_core::{FailAt, MigrationRequest};
use dvs_wire::peer::Backend;
use dvs_wire::{DcId, Ep, NodeId};

use crate::ctl::{
    CtlRequest, CtlResponse, DcSpan, DoctorCheck, EndpointState, EndpointStatus, LinkStatus,
    MemberStatus, NodeStatus,
};
use crate::event_loop::{blocking, Ctx, Event, MigrationSource, Node, Query, Waiting};
use crate::launcher::{self, Ended};
use crate::migrate;

pub(crate) async fn serve(ctx: Rc<Ctx>, listener: UnixListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::task::spawn_local(connection(ctx.clone(), stream));
            }
            Err(e) => {
                warn!("accept on the control socket failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Where the answers to one control request go: the CLI's socket, or (for a request that
/// another node relayed) back over the peer link.
pub(crate) trait Responder {
    /// Sends one answer; an error means nobody listens any more.
    async fn send(&mut self, r: &CtlResponse) -> std::io::Result<()>;
}

impl Responder for tokio::net::unix::OwnedWriteHalf {
    async fn send(&mut self, r: &CtlResponse) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(r).expect("responses serialize");
        line.push(b'\n');
        self.write_all(&line).await
    }
}

async fn send(w: &mut impl Responder, r: &CtlResponse) -> std::io::Result<()> {
    w.send(r).await
}

/// What [`read_line`] got.
#[derive(Debug, PartialEq, Eq)]
enum LineRead {
    /// A line (without its newline) is in the buffer; the last one may lack its newline.
    Line,
    /// The stream ended.
    Eof,
    /// The line is longer than the limit.
    TooLong,
}

/// Reads one line of at most `limit` bytes into `line`, without ever holding more than
/// `limit` bytes of it.
async fn read_line<R: AsyncBufRead + Unpin>(
    r: &mut R,
    line: &mut Vec<u8>,
    limit: usize,
) -> std::io::Result<LineRead> {
    line.clear();
    loop {
        let avail = r.fill_buf().await?;
        if avail.is_empty() {
            return Ok(if line.is_empty() {
                LineRead::Eof
            } else {
                LineRead::Line
            });
        }
        let (part, used, done) = match avail.iter().position(|b| *b == b'\n') {
            Some(i) => (&avail[..i], i + 1, true),
            None => (avail, avail.len(), false),
        };
        if line.len() + part.len() > limit {
            return Ok(LineRead::TooLong);
        }
        line.extend_from_slice(part);
        r.consume(used);
        if done {
            return Ok(LineRead::Line);
        }
    }
}

/// Most log bytes in one `Output` answer.
const OUTPUT_CHUNK: u64 = 64 * 1024;

/// What a connection answers when the event loop is gone.
const STOPPING: &str = "the node kernel is stopping";

/// Asks the event loop `query` (made around its reply channel); `None` once it stopped.
async fn ask<T>(ctx: &Ctx, query: impl FnOnce(oneshot::Sender<T>) -> Query) -> Option<T> {
    let (reply, answer) = oneshot::channel();
    ctx.events.send(Event::Control(query(reply))).await.ok()?;
    answer.await.ok()
}

async fn connection(ctx: Rc<Ctx>, stream: UnixStream) {
    // Credentials are the caller's at connect time; decided once per connection (reading
    // its groups from /proc, off the loop).
    let allowed = match crate::access::peer_cred(&stream) {
        Ok(cred) => {
            let admin = ctx.admin.clone();
            blocking(move || admin.check_control(&cred))
                .await
                .and_then(|r| r)
                .map_err(|m| (cred, m))
        }
        Err(e) => {
            return warn!("control connection without peer credentials refused: {e}");
        }
    };
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        match read_line(&mut r, &mut buf, MAX_LINE).await {
            Ok(LineRead::Line) => {}
            Ok(LineRead::Eof) | Err(_) => return,
            Ok(LineRead::TooLong) => {
                warn!("control request line longer than {MAX_LINE} bytes; closing the connection");
                let _ = send(
                    &mut w,
                    &CtlResponse::Error {
                        message: format!(
                            "control request too long (more than {MAX_LINE} bytes); closing the connection"
                        ),
                    },
                )
                .await;
                return;
            }
        }
        let req: CtlRequest = match serde_json::from_slice(&buf) {
            Ok(r) => r,
            Err(e) => {
                let _ = send(
                    &mut w,
                    &CtlResponse::Error {
                        message: format!("bad control request: {e}"),
                    },
                )
                .await;
                continue;
            }
        };
        if let Err((cred, message)) = &allowed {
            warn!(
                pid = cred.pid,
                uid = cred.uid,
                gid = cred.gid,
                "control request {req:?} refused: {message}"
            );
            let r = send(
                &mut w,
                &CtlResponse::Error {
                    message: message.clone(),
                },
            )
            .await;
            if r.is_err() {
                return;
            }
            continue;
        }
        let result = match req {
            CtlRequest::Forward { to, request } => relay(&ctx, to, *request, &mut w).await,
            req => handle(&ctx, req, &mut w).await,
        };
        if result.is_err() {
            return;
        }
    }
}

/// Answers one control request (other than `Forward`) on `w`: the CLI's socket, or the
/// link back to the node that relayed it. An error means nobody listens any more.
pub(crate) async fn handle(
    ctx: &Rc<Ctx>,
    req: CtlRequest,
    w: &mut impl Responder,
) -> std::io::Result<()> {
    match req {
        CtlRequest::Status => match ask(ctx, Query::Status).await {
            Some(status) => send(w, &CtlResponse::Status(status)).await,
            None => Ok(()),
        },
        CtlRequest::Ps => match ask(ctx, Query::Ps).await {
            Some(procs) => send(w, &CtlResponse::Ps { procs }).await,
            None => Ok(()),
        },
        CtlRequest::Shutdown => {
            let r = send(w, &CtlResponse::Ok).await;
            let _ = ctx.events.send(Event::Shutdown).await;
            r
        }
        CtlRequest::Migrate {
            dc,
            ep,
            to,
            backend,
            fail_at,
            quiesce_ms,
        } => match prepare_migration(ctx, dc, ep, to, backend, fail_at, quiesce_ms).await {
            Ok((req, note)) => migrate(ctx, req, note, w).await,
            Err(message) => send(w, &CtlResponse::Error { message }).await,
        },
        CtlRequest::Register { dc, ep, at, backup } => {
            let answer = ask(ctx, |reply| Query::Register {
                dc,
                ep,
                at,
                backup,
                reply,
            })
            .await;
            let resp = match answer {
                Some(Ok(())) => CtlResponse::Ok,
                Some(Err(e)) => CtlResponse::Error {
                    message: format!("cannot register {dc}/{ep} at node {at}: {e}"),
                },
                None => CtlResponse::Error {
                    message: "the node kernel did not answer the request".into(),
                },
            };
            send(w, &resp).await
        }
        CtlRequest::Doctor => {
            let checks = doctor(ctx).await;
            send(w, &CtlResponse::Doctor { checks }).await
        }
        CtlRequest::Run {
            dc,
            ep,
            cmd,
            wait,
            workdir,
        } => {
            match launcher::start(
                ctx,
                dc,
                ep,
                cmd,
                Vec::new(),
                workdir.map(std::path::PathBuf::from),
            )
            .await
            {
                Err(message) => send(w, &CtlResponse::Error { message }).await,
                Ok(mut launched) => {
                    let r = send(
                        w,
                        &CtlResponse::Started {
                            pid: launched.pid,
                            log: launched.log.display().to_string(),
                        },
                    )
                    .await;
                    if wait && r.is_ok() {
                        stream_until_exit(&mut launched, w).await
                    } else {
                        r
                    }
                }
            }
        }
        CtlRequest::Leave { force } => {
            let resp = match ask(ctx, |reply| Query::Leave { force, reply }).await {
                Some(Ok(done)) => CtlResponse::Left { message: done },
                Some(Err(message)) => CtlResponse::Error { message },
                None => CtlResponse::Error {
                    message: STOPPING.into(),
                },
            };
            send(w, &resp).await
        }
        CtlRequest::CanHost { paths } => {
            let node = ctx.me.name.clone();
            let resp = match blocking(move || crate::preflight::can_host(node, &paths)).await {
                Ok(Ok(facts)) => CtlResponse::CanHost(facts),
                Ok(Err(message)) | Err(message) => CtlResponse::Error { message },
            };
            send(w, &resp).await
        }
        CtlRequest::Forward { .. } => {
            send(
                w,
                &CtlResponse::Error {
                    message: "a relayed request cannot be relayed again".into(),
                },
            )
            .await
        }
    }
}

/// Relays `request` to node `to` (the CLI talks only to its own node) and passes its
/// answers on until the last.
async fn relay(
    ctx: &Rc<Ctx>,
    to: NodeId,
    request: CtlRequest,
    w: &mut impl Responder,
) -> std::io::Result<()> {
    if to == ctx.me.id {
        return handle(ctx, request, w).await;
    }
    let (answers, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let sent = ctx
        .events
        .send(Event::Control(Query::Forward {
            to,
            request,
            answers,
        }))
        .await;
    if sent.is_err() {
        return send(
            w,
            &CtlResponse::Error {
                message: STOPPING.into(),
            },
        )
        .await;
    }
    while let Some(r) = rx.recv().await {
        send(w, &r).await?;
    }
    Ok(())
}

/// Streams what the process writes to its log until it ends, then its exit status.
async fn stream_until_exit(
    launched: &mut launcher::Launched,
    w: &mut impl Responder,
) -> std::io::Result<()> {
    // A tokio file: its reads run on the blocking pool.
    let mut file = tokio::fs::File::open(&launched.log).await?;
    // Output of earlier runs with the same endpoint stays in the log; show only this run's.
    file.seek(SeekFrom::Start(launched.log_start)).await?;
    let mut buf = Vec::new();
    let mut ended = None;
    loop {
        if ended.is_none() {
            ended = match launched.exit.try_recv() {
                Ok(e) => Some(e),
                Err(oneshot::error::TryRecvError::Empty) => None,
                Err(oneshot::error::TryRecvError::Closed) => Some(Ended::Code(-1)),
            };
        }
        buf.clear();
        // At most OUTPUT_CHUNK per answer, so that a relayed answer stays a small frame.
        (&mut file).take(OUTPUT_CHUNK).read_to_end(&mut buf).await?;
        if !buf.is_empty() {
            send(
                w,
                &CtlResponse::Output {
                    data: String::from_utf8_lossy(&buf).into_owned(),
                },
            )
            .await?;
        }
        if buf.len() as u64 == OUTPUT_CHUNK {
            continue;
        }
        if let Some(e) = ended {
            let (code, signal) = match e {
                Ended::Code(c) => (Some(c), None),
                Ended::Signal(s) => (None, Some(s)),
            };
            return send(w, &CtlResponse::Exited { code, signal }).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Which checkpoint backends work here (criu is checked anew, and the event loop told).
async fn doctor(ctx: &Ctx) -> Vec<DoctorCheck> {
    let criu = blocking(migrate::check_criu).await.and_then(|c| c);
    let _ = ctx.events.send(Event::CriuChecked(criu.clone())).await;
    vec![
        DoctorCheck {
            name: "criu".into(),
            ok: criu.is_ok(),
            detail: match &criu {
                Ok(c) => format!("criu {} at {} (criu check: Looks good.)", c.version(), c.bin().display()),
                Err(e) => format!("{e}; install it with scripts/install-criu.sh"),
            },
        },
        DoctorCheck {
            name: "cooperative".into(),
            ok: true,
            detail: "always available: the program registers m3ipc snapshot/restore hooks and was started with `dvs run`".into(),
        },
    ]
}

/// Starts the migration `req` and streams its progress to the requester until it ends.
async fn migrate(
    ctx: &Ctx,
    req: MigrationRequest,
    note: Option<String>,
    w: &mut impl Responder,
) -> std::io::Result<()> {
    let backend = req.backend.to_string();
    let (progress, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let started = ask(ctx, |reply| Query::StartMigration {
        req,
        progress,
        reply,
    })
    .await
    .unwrap_or_else(|| Err("the node kernel did not answer the request".into()));
    let id = match started {
        Ok(id) => id,
        Err(message) => return send(w, &CtlResponse::Error { message }).await,
    };
    send(w, &CtlResponse::Accepted { id, backend, note }).await?;
    while let Some(r) = rx.recv().await {
        let last = matches!(r, CtlResponse::Migrated(_));
        send(w, &r).await?;
        if last {
            break;
        }
    }
    Ok(())
}

/// Chooses the backend of a migration of `{dc, ep}` and checks that it can work: the request
/// for the core, and a note for the operator when the choice was not theirs.
async fn prepare_migration(
    ctx: &Rc<Ctx>,
    dc: DcId,
    ep: Ep,
    to: NodeId,
    backend: Option<Backend>,
    fail_at: Option<FailAt>,
    quiesce_ms: Option<u64>,
) -> Result<(MigrationRequest, Option<String>), String> {
    let source = ask(ctx, |reply| Query::MigrationSource { dc, ep, reply })
        .await
        .ok_or(STOPPING)??;
    let mut note = None;
    let backend = match backend {
        Some(Backend::Criu) => {
            migrate::criu(&ctx.events, source.criu)
                .await
                .map_err(|e| format!("the criu backend does not work on this node: {e}"))?;
            Backend::Criu
        }
        Some(Backend::Cooperative) => Backend::Cooperative,
        None => match migrate::criu(&ctx.events, source.criu).await {
            Ok(_) => Backend::Criu,
            Err(e) => {
                note = Some(format!(
                    "criu does not work here ({e}); using the cooperative backend"
                ));
                Backend::Cooperative
            }
        },
    };
    let pid = source.pid;
    match backend {
        // CRIU restores a whole PID namespace; the process must be its init.
        Backend::Criu => {
            let ns_pid = blocking(move || dvs_checkpoint::ns_pid(pid).ok().flatten()).await;
            if ns_pid != Ok(Some(1)) {
                return Err(format!("process {pid} of {dc}/{ep} is not in its own PID namespace: start it with `dvs run` to migrate it with criu"));
            }
            // Before anything stops: what the process holds must be able to travel.
            if to != ctx.me.id {
                if let Some(unchecked) = crate::preflight::check(ctx, dc, ep, pid, to, source.workdir.clone()).await? {
                    note = Some(match note {
                        Some(n) => format!("{n}; {unchecked}"),
                        None => unchecked,
                    });
                }
            }
        }
        Backend::Cooperative if source.cmd.is_none() => {
            return Err(format!("the cooperative backend restarts the program on the destination: start {dc}/{ep} with `dvs run`"))
        }
        _ => {}
    }
    let req = MigrationRequest {
        dc,
        ep,
        to,
        backend,
        fail_at,
        quiesce_timeout: Duration::from_millis(quiesce_ms.unwrap_or(2000)),
    };
    Ok((req, note))
}

impl Node {
    /// Answers a control request.
    pub(crate) fn query(&mut self, q: Query) {
        match q {
            Query::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Query::Ps(reply) => {
                let _ = reply.send(self.all_procs());
            }
            Query::Register {
                dc,
                ep,
                at,
                backup,
                reply,
            } => {
                let ticket = self.ticket();
                self.waiting.insert(ticket, Waiting::Registered(reply));
                self.input(Input::Directory(DirectoryInput::RegisterRemote {
                    ticket,
                    dc,
                    ep,
                    node: at,
                    backup,
                }));
                // The core answers at once; an unanswered request gets none.
                self.waiting.remove(&ticket);
            }
            Query::MigrationSource { dc, ep, reply } => {
                let source = match self.core.local_pid(dc, ep) {
                    None => Err(format!("endpoint {dc}/{ep} does not run on this node")),
                    Some(pid) => Ok(MigrationSource {
                        pid,
                        cmd: self
                            .procs
                            .cmd_of(dc, ep)
                            .or_else(|| self.migrations.cmd_of(dc, ep)),
                        criu: self.migrations.criu.clone(),
                        workdir: self.migrations.workdirs.get(&(dc, ep)).cloned(),
                    }),
                };
                let _ = reply.send(source);
            }
            Query::StartMigration {
                req,
                progress,
                reply,
            } => {
                let ticket = self.ticket();
                self.waiting
                    .insert(ticket, Waiting::Migration { reply, progress });
                self.input(Input::Migration(MigrationInput::Start { ticket, req }));
                self.waiting.remove(&ticket);
            }
            Query::Forward {
                to,
                request,
                answers,
            } => self.relay_request(to, request, answers),
            Query::Leave { force, reply } => self.leave_request(force, reply),
        }
    }

    fn all_procs(&self) -> Vec<crate::ctl::ProcStatus> {
        let mut p = self.procs.status();
        p.extend(self.migrations.restored_status());
        p
    }

    fn status(&self) -> NodeStatus {
        let me = self.core.node_id();
        let mut links = self
            .links
            .iter()
            .map(|(node, l)| {
                let link = self.peers.get(node);
                LinkStatus {
                    node: *node,
                    name: self.node_name(*node),
                    up: l.up,
                    since_ms: l.since.elapsed().as_millis() as u64,
                    last_error: l.last_error.clone(),
                    max_silence_ms: link
                        .map_or(l.max_silence, |p| p.max_silence())
                        .as_secs_f64()
                        * 1e3,
                    frames_out: link.map(|p| p.wire.frames_out.get()).unwrap_or(0),
                    bytes_out: link.map(|p| p.wire.bytes_out.get()).unwrap_or(0),
                }
            })
            .collect::<Vec<_>>();
        links.sort_by_key(|l| l.node);
        let endpoints = self
            .core
            .registrations()
            .into_iter()
            .map(|(dc, ep, r)| {
                let (state, node) = match r.kind() {
                    RegistrationKind::Running => (EndpointState::Running, me),
                    RegistrationKind::Remote(n) => (EndpointState::Remote, n),
                    RegistrationKind::Backup(n) => (EndpointState::Backup, n),
                };
                EndpointStatus {
                    dc,
                    ep,
                    state,
                    node,
                    pid: self.core.local_pid(dc, ep),
                    migrating: self.core.migrating(dc, ep),
                }
            })
            .collect();
        NodeStatus {
            node: me,
            name: self.ctx.me.name.clone(),
            pid: std::process::id(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            links,
            endpoints,
            procs: self.all_procs(),
            members: self
                .members
                .iter()
                .map(|(node, m)| MemberStatus {
                    node: *node,
                    name: self.node_name(*node),
                    addr: m.record.as_ref().map(|r| r.addr.clone()),
                    alive: m.record.is_some(),
                    since_ms: m.since.elapsed().as_millis() as u64,
                    pid: m.record.as_ref().map(|r| r.pid),
                })
                .collect(),
            fenced: self.fenced,
            dcs: self
                .ctx
                .cfg
                .dcs
                .iter()
                .map(|d| DcSpan {
                    dc: d.id,
                    nodes: self
                        .core
                        .dc_nodes(d.id)
                        .map(|n| n.iter().copied().collect())
                        .unwrap_or_default(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn lines(input: &[u8], limit: usize) -> Vec<(LineRead, String)> {
        // A tiny buffer, so that lines span several reads.
        let mut r = tokio::io::BufReader::with_capacity(3, input);
        let mut out = Vec::new();
        let mut buf = Vec::new();
        loop {
            let got = read_line(&mut r, &mut buf, limit).await.unwrap();
            let stop = got != LineRead::Line;
            out.push((got, String::from_utf8_lossy(&buf).into_owned()));
            if stop {
                return out;
            }
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn lines_are_split_and_bounded() {
        let got = lines(b"ab\n\ncdefg\nhi", 5).await;
        let kinds: Vec<_> = got.iter().map(|(k, l)| (k, l.as_str())).collect();
        assert_eq!(
            kinds,
            vec![
                (&LineRead::Line, "ab"),
                (&LineRead::Line, ""),
                (&LineRead::Line, "cdefg"),
                (&LineRead::Line, "hi"),
                (&LineRead::Eof, ""),
            ]
        );
        let got = lines(b"abcdefgh\nok\n", 5).await;
        assert_eq!(got[0].0, LineRead::TooLong);
        assert!(got[0].1.len() <= 5);
    }
}
