//! The control socket: JSON lines from the CLI (see [`crate::ctl`]).

use std::io::{Read, Seek, SeekFrom};
use std::time::Duration;

use dvs_core::RegistrationKind;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::warn;

use crate::ctl::{CtlRequest, CtlResponse, EndpointStatus, LinkStatus, NodeStatus};
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

async fn connection(state: State, stream: UnixStream) {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let req: CtlRequest = match serde_json::from_str(&line) {
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
        let result = match req {
            CtlRequest::Status => send(&mut w, &CtlResponse::Status(status(&state))).await,
            CtlRequest::Ps => {
                send(
                    &mut w,
                    &CtlResponse::Ps {
                        procs: state.borrow().procs.status(),
                    },
                )
                .await
            }
            CtlRequest::Shutdown => {
                let r = send(&mut w, &CtlResponse::Ok).await;
                state.borrow().shutdown.notify_one();
                r
            }
            CtlRequest::Run { dc, ep, cmd, wait } => match launcher::launch(&state, dc, ep, cmd) {
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
            },
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
            let (state_name, node) = match r.kind() {
                RegistrationKind::Running => ("RUNNING", me),
                RegistrationKind::Remote(n) => ("REMOTE", n),
                RegistrationKind::Backup(n) => ("BACKUP", n),
            };
            EndpointStatus {
                dc,
                ep,
                state: state_name.into(),
                node,
                pid: s.core.local_pid(dc, ep),
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
        procs: s.procs.status(),
    }
}
