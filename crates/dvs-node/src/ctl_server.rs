//! The control socket: JSON lines from the CLI (see [`crate::ctl`]).
//!
//! Every request, `status` and `ps` included (they show pids and command lines), needs the
//! caller to be root or a member of the configured admin group; the socket's mode already
//! keeps others out, and this check holds if that mode is ever wrong. Lines are at most
//! [`MAX_LINE`] bytes.

use dvs_core::{Action, DirectoryInput, Input, MigrationInput, Report};
use std::io::{Read, Seek, SeekFrom};
use std::time::Duration;

use dvs_core::RegistrationKind;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::warn;

/// Longest control request line, newline excluded; a longer one gets an error and the
/// connection is closed (the rest is never buffered).
pub(crate) const MAX_LINE: usize = 64 * 1024;

use std::time::Instant;

use dvs_core::{FailAt, MigrationRequest};
use dvs_wire::peer::Backend;
use dvs_wire::{DcId, Ep, NodeId};

use crate::ctl::{
    CtlRequest, CtlResponse, DoctorCheck, EndpointState, EndpointStatus, LinkStatus, NodeStatus,
};
use crate::launcher::{self, Ended};
use crate::State;

pub(crate) async fn serve(state: State, listener: UnixListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::task::spawn_local(connection(state.clone(), stream));
            }
            Err(e) => {
                warn!("accept on the control socket failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn send(w: &mut tokio::net::unix::OwnedWriteHalf, r: &CtlResponse) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(r).expect("responses serialize");
    line.push(b'\n');
    w.write_all(&line).await
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

async fn connection(state: State, stream: UnixStream) {
    // Credentials are the caller's at connect time; decided once per connection.
    let allowed = match crate::access::peer_cred(&stream) {
        Ok(cred) => state
            .borrow()
            .admin
            .check_control(&cred)
            .map_err(|m| (cred, m)),
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
            CtlRequest::Status => send(&mut w, &CtlResponse::Status(status(&state))).await,
            CtlRequest::Ps => {
                send(
                    &mut w,
                    &CtlResponse::Ps {
                        procs: all_procs(&state),
                    },
                )
                .await
            }
            CtlRequest::Shutdown => {
                let r = send(&mut w, &CtlResponse::Ok).await;
                state.borrow().shutdown.notify_one();
                r
            }
            CtlRequest::Migrate {
                dc,
                ep,
                to,
                backend,
                fail_at,
                quiesce_ms,
            } => migrate(&state, dc, ep, to, backend, fail_at, quiesce_ms, &mut w).await,
            CtlRequest::Register { dc, ep, at, backup } => {
                let r = {
                    let mut s = state.borrow_mut();
                    let ticket = s.ticket();
                    s.input(Input::Directory(DirectoryInput::RegisterRemote {
                        ticket,
                        dc,
                        ep,
                        node: at,
                        backup,
                    }));
                    s.answers.remove(&ticket)
                };
                let resp = match r {
                    Some(Report::Registered { result: Ok(()), .. }) => CtlResponse::Ok,
                    Some(Report::Registered { result: Err(e), .. }) => CtlResponse::Error {
                        message: format!("cannot register {dc}/{ep} at node {at}: {e}"),
                    },
                    other => CtlResponse::Error {
                        message: format!("the node kernel did not answer the request: {other:?}"),
                    },
                };
                send(&mut w, &resp).await
            }
            CtlRequest::Doctor => {
                send(
                    &mut w,
                    &CtlResponse::Doctor {
                        checks: doctor(&state),
                    },
                )
                .await
            }
            CtlRequest::Run { dc, ep, cmd, wait } => {
                match launcher::launch(&state, dc, ep, cmd, Vec::new()) {
                    Err(message) => send(&mut w, &CtlResponse::Error { message }).await,
                    Ok((pid, log)) => {
                        let r = send(
                            &mut w,
                            &CtlResponse::Started {
                                pid,
                                log: log.display().to_string(),
                            },
                        )
                        .await;
                        if wait && r.is_ok() {
                            stream_until_exit(&state, pid, &log, &mut w).await
                        } else {
                            r
                        }
                    }
                }
            }
        };
        if result.is_err() {
            return;
        }
    }
}

/// Streams what the process writes to its log until it ends, then its exit status.
async fn stream_until_exit(
    state: &State,
    pid: i32,
    log: &std::path::Path,
    w: &mut tokio::net::unix::OwnedWriteHalf,
) -> std::io::Result<()> {
    let mut file = std::fs::File::open(log)?;
    // Output of earlier runs with the same endpoint stays in the log; show only this run's.
    file.seek(SeekFrom::End(0))?;
    let mut buf = Vec::new();
    loop {
        let ended = launcher::ended(state, pid);
        buf.clear();
        file.read_to_end(&mut buf)?;
        if !buf.is_empty() {
            send(
                w,
                &CtlResponse::Output {
                    data: String::from_utf8_lossy(&buf).into_owned(),
                },
            )
            .await?;
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

/// Which checkpoint backends work here.
fn doctor(state: &State) -> Vec<DoctorCheck> {
    let mut s = state.borrow_mut();
    s.migrations.criu = None;
    let criu = s.migrations.criu();
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

#[allow(clippy::too_many_arguments)]
async fn migrate(
    state: &State,
    dc: DcId,
    ep: Ep,
    to: NodeId,
    backend: Option<Backend>,
    fail_at: Option<FailAt>,
    quiesce_ms: Option<u64>,
    w: &mut tokio::net::unix::OwnedWriteHalf,
) -> std::io::Result<()> {
    let prepared = (|| -> Result<(MigrationRequest, Option<String>), String> {
        let mut s = state.borrow_mut();
        let pid = s
            .core
            .local_pid(dc, ep)
            .ok_or_else(|| format!("endpoint {dc}/{ep} does not run on this node"))?;
        let cmd = s
            .procs
            .cmd_of(dc, ep)
            .or_else(|| s.migrations.cmd_of(dc, ep));
        let mut note = None;
        let backend = match backend {
            Some(Backend::Criu) => {
                s.migrations
                    .criu()
                    .map_err(|e| format!("the criu backend does not work on this node: {e}"))?;
                Backend::Criu
            }
            Some(Backend::Cooperative) => Backend::Cooperative,
            None => match s.migrations.criu() {
                Ok(_) => Backend::Criu,
                Err(e) => {
                    note = Some(format!(
                        "criu does not work here ({e}); using the cooperative backend"
                    ));
                    Backend::Cooperative
                }
            },
        };
        match backend {
            // CRIU restores a whole PID namespace; the process must be its init.
            Backend::Criu if dvs_checkpoint::ns_pid(pid).ok().flatten() != Some(1) => {
                return Err(format!("process {pid} of {dc}/{ep} is not in its own PID namespace: start it with `dvs run` to migrate it with criu"))
            }
            Backend::Cooperative if cmd.is_none() => {
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
    })();
    let (req, note) = match prepared {
        Ok(p) => p,
        Err(message) => return send(w, &CtlResponse::Error { message }).await,
    };
    let backend = req.backend.to_string();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let started = {
        let mut s = state.borrow_mut();
        let ticket = s.ticket();
        s.core.handle(
            Instant::now(),
            Input::Migration(MigrationInput::Start { ticket, req }),
        );
        // The acceptance comes before anything else the start queued: register the
        // requester before progress reports are carried out.
        let r = match s.core.poll_action() {
            Some(Action::Report(Report::MigrationAccepted { result, .. })) => {
                result.map_err(|e| e.to_string())
            }
            other => Err(format!(
                "the node kernel did not answer the request: {other:?}"
            )),
        };
        if let Ok(id) = r {
            s.migrations.requesters.insert(id, (Instant::now(), tx));
        }
        s.drive();
        r
    };
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

fn all_procs(state: &State) -> Vec<crate::ctl::ProcStatus> {
    let s = state.borrow();
    let mut p = s.procs.status();
    p.extend(s.migrations.restored_status());
    p
}

fn status(state: &State) -> NodeStatus {
    let s = state.borrow();
    let me = s.core.node_id();
    let links = s
        .links
        .iter()
        .map(|(node, l)| {
            let wire = s.peers.get(node);
            LinkStatus {
                node: *node,
                name: s
                    .cfg
                    .node_by_id(*node)
                    .map(|n| n.name.clone())
                    .unwrap_or_default(),
                up: l.up,
                since_ms: l.since.elapsed().as_millis() as u64,
                last_error: l.last_error.clone(),
                max_silence_ms: l.max_silence.as_secs_f64() * 1e3,
                frames_out: wire.map(|w| w.frames_out.get()).unwrap_or(0),
                bytes_out: wire.map(|w| w.bytes_out.get()).unwrap_or(0),
            }
        })
        .collect::<Vec<_>>();
    let mut links = links;
    links.sort_by_key(|l| l.node);
    let endpoints = s
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
                pid: s.core.local_pid(dc, ep),
                migrating: s.core.migrating(dc, ep),
            }
        })
        .collect();
    NodeStatus {
        node: me,
        name: s.me.name.clone(),
        pid: std::process::id(),
        uptime_ms: s.started.elapsed().as_millis() as u64,
        links,
        endpoints,
        procs: all_procs(state),
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
