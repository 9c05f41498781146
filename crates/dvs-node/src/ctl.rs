//! The control protocol between the `dvs` CLI and a node kernel: one JSON object per line
//! over the node's `ctl.sock`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use dvs_wire::peer::{Backend, FailAt};
use dvs_wire::{DcId, Ep, NodeId};
use serde::{Deserialize, Serialize};

pub use dvs_wire::report::{MigrationError, MigrationReport, Phase, PhaseTime};

/// A request of the CLI.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum CtlRequest {
    /// Links, registrations and processes of the node.
    Status,
    /// Processes launched by the node.
    Ps,
    /// Launch a program as endpoint `{dc, ep}`; with `wait`, stream its output and exit status.
    Run {
        dc: DcId,
        ep: Ep,
        cmd: Vec<String>,
        wait: bool,
        /// The program's working folder (absolute; created if missing): it travels with the
        /// process when it migrates. None: the node's runtime folder, which does not travel.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        workdir: Option<String>,
    },
    /// Stop the node kernel (and the processes it launched).
    Shutdown,
    /// Migrate endpoint `{dc, ep}` (running on this node) to node `to`; the answer is an
    /// `Accepted`, a `MigrPhase` per phase and one `Migrated`.
    Migrate {
        dc: DcId,
        ep: Ep,
        to: NodeId,
        /// `criu`, `cooperative`, or none for criu when it works here, else cooperative.
        backend: Option<Backend>,
        /// `checkpoint`, `transfer` or `restore`: make that phase fail to show a rollback.
        fail_at: Option<FailAt>,
        /// Longest wait for the process to become quiescent, in milliseconds.
        quiesce_ms: Option<u64>,
    },
    /// Which checkpoint backends work on this node, and why not.
    Doctor,
    /// Register `{dc, ep}` on this node as running on `at` (REMOTE) or as a backup kept on
    /// `at` (BACKUP).
    Register {
        dc: DcId,
        ep: Ep,
        at: NodeId,
        backup: bool,
    },
    /// Leave the cluster: revoke this node's membership lease, then stop. Refused while
    /// endpoints run here, unless `force` (they are stopped with the node).
    Leave { force: bool },
    /// Whether this node could host a process migrated here with criu (asked by the source
    /// node's preflight, through the relay): which of `paths` (with the size a file must
    /// have) it lacks, and its addresses and network stack. The answer is a `CanHost`.
    CanHost {
        /// Files and folders the process uses: `(path, size of a file)`.
        paths: Vec<(String, Option<u64>)>,
    },
    /// Have node `to` answer `request`: this node relays it over its peer link and passes
    /// the answers back (the CLI talks only to the node of its own host).
    Forward {
        to: NodeId,
        request: Box<CtlRequest>,
    },
}

/// One line of the node's answer. `Run` with `wait` gets `Started`, any number of `Output`
/// and one `Exited`; every other request gets one line.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CtlResponse {
    /// Answer to `Status`.
    Status(NodeStatus),
    /// Answer to `Ps`.
    Ps { procs: Vec<ProcStatus> },
    /// The program runs.
    Started { pid: i32, log: String },
    /// Output the program wrote (stdout and stderr, as written to its log).
    Output { data: String },
    /// The program ended.
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
    },
    /// Done.
    Ok,
    /// The request failed.
    Error { message: String },
    /// A migration started.
    Accepted {
        id: u64,
        backend: String,
        note: Option<String>,
    },
    /// A migration entered a phase, `at_ms` after it started.
    MigrPhase { phase: Phase, at_ms: f64 },
    /// A migration ended (committed or rolled back).
    Migrated(MigrationReport),
    /// Answer to `Doctor`.
    Doctor { checks: Vec<DoctorCheck> },
    /// Answer to `Leave`: the node left the cluster and stops.
    Left { message: String },
    /// Answer to `CanHost`.
    CanHost(HostFacts),
}

/// What a node says about itself for a migration's preflight.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostFacts {
    /// The node's name.
    pub node: String,
    /// Its host's addresses (its network namespace's).
    pub addrs: Vec<std::net::IpAddr>,
    /// Its network stack: the machine's boot id and the network namespace's inode; two
    /// nodes with the same value share their ports and connections.
    pub network: String,
    /// The asked paths it lacks or has with another size: `(path, what is wrong)`.
    pub problems: Vec<(String, String)>,
}

/// One line of `dvs doctor`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DoctorCheck {
    /// What was checked.
    pub name: String,
    /// Whether it works.
    pub ok: bool,
    /// Version, or why not.
    pub detail: String,
}

/// State of one peer link.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LinkStatus {
    /// The peer.
    pub node: NodeId,
    /// The peer's name.
    pub name: String,
    /// Whether the link is up.
    pub up: bool,
    /// Milliseconds since the link last changed state.
    pub since_ms: u64,
    /// Why the last connection attempt failed, if it did.
    pub last_error: Option<String>,
    /// Frames and bytes sent on the current link.
    pub frames_out: u64,
    /// Bytes sent on the current link (after compression).
    pub bytes_out: u64,
    /// Longest time the current link went without receiving anything, in milliseconds.
    #[serde(default)]
    pub max_silence_ms: f64,
}

/// How a node holds an endpoint in its table. Serialized in capitals (`"RUNNING"`), the
/// names `dvs status` shows and scripts read.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "UPPERCASE")]
pub enum EndpointState {
    /// The endpoint runs on this node.
    Running,
    /// It runs on another node ([`EndpointStatus::node`]).
    Remote,
    /// This node keeps a backup of the primary running on another node.
    Backup,
}

impl EndpointState {
    /// The name as serialized: `RUNNING`, `REMOTE` or `BACKUP`.
    pub fn as_str(self) -> &'static str {
        match self {
            EndpointState::Running => "RUNNING",
            EndpointState::Remote => "REMOTE",
            EndpointState::Backup => "BACKUP",
        }
    }
}

impl std::fmt::Display for EndpointState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `pad`, so that table columns (`{:<8}`) line up.
        f.pad(self.as_str())
    }
}

/// One registration in a node's endpoint table.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EndpointStatus {
    /// DC id.
    pub dc: DcId,
    /// Endpoint.
    pub ep: Ep,
    /// RUNNING, REMOTE or BACKUP.
    pub state: EndpointState,
    /// Node running the endpoint.
    pub node: NodeId,
    /// Local pid, for RUNNING endpoints.
    pub pid: Option<i32>,
    /// Calls to it are held here: it is migrating (MIGRATING is layered on the registration).
    #[serde(default)]
    pub migrating: bool,
}

/// A process launched by the node.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProcStatus {
    /// Host pid of the launcher (the process tree's root in the host namespace).
    pub pid: i32,
    /// DC id.
    pub dc: DcId,
    /// Endpoint.
    pub ep: Ep,
    /// Command line.
    pub cmd: Vec<String>,
    /// Log file of stdout and stderr.
    pub log: String,
    /// Milliseconds since launch.
    pub age_ms: u64,
    /// `running`, or how it ended.
    pub state: ProcState,
}

/// What became of a launched process. Serialized as the text `dvs ps` shows (`"running"`,
/// `"exited 0"`, `"killed by signal 9"`, `"migrated to node 2"`), which scripts read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum ProcState {
    /// It runs.
    Running,
    /// It exited with this code.
    Exited(i32),
    /// A signal (this number) ended it.
    Killed(i32),
    /// It was migrated to this node.
    MigratedTo(NodeId),
}

impl std::fmt::Display for ProcState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            ProcState::Running => "running".to_string(),
            ProcState::Exited(c) => format!("exited {c}"),
            ProcState::Killed(s) => format!("killed by signal {s}"),
            ProcState::MigratedTo(n) => format!("migrated to node {n}"),
        };
        // `pad`, so that table columns (`{:<18}`) line up.
        f.pad(&s)
    }
}

impl From<ProcState> for String {
    fn from(s: ProcState) -> String {
        s.to_string()
    }
}

impl std::str::FromStr for ProcState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let number = |rest: &str| rest.parse().map_err(|_| format!("bad process state {s:?}"));
        if s == "running" {
            Ok(ProcState::Running)
        } else if let Some(c) = s.strip_prefix("exited ") {
            number(c).map(ProcState::Exited)
        } else if let Some(n) = s.strip_prefix("killed by signal ") {
            number(n).map(ProcState::Killed)
        } else if let Some(n) = s.strip_prefix("migrated to node ") {
            n.parse()
                .map(ProcState::MigratedTo)
                .map_err(|_| format!("bad process state {s:?}"))
        } else {
            Err(format!("unknown process state {s:?}"))
        }
    }
}

impl TryFrom<String> for ProcState {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

/// Everything `dvs status` shows of one node.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Node id.
    pub node: NodeId,
    /// Node name.
    pub name: String,
    /// Pid of the node kernel.
    pub pid: u32,
    /// Milliseconds since start.
    pub uptime_ms: u64,
    /// Peer links.
    pub links: Vec<LinkStatus>,
    /// Endpoint registrations.
    pub endpoints: Vec<EndpointStatus>,
    /// Launched processes.
    pub procs: Vec<ProcStatus>,
    /// Every node's membership as this node sees the directory's `nodes/`.
    #[serde(default)]
    pub members: Vec<MemberStatus>,
    /// This node lost its membership lease: its endpoints are stopped and it has no link.
    #[serde(default)]
    pub fenced: bool,
    /// The nodes each DC spans now (the config's, or what `dvs dc add-node` /
    /// `remove-node` set).
    #[serde(default)]
    pub dcs: Vec<DcSpan>,
}

/// A node's membership as the directory shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemberStatus {
    /// The node.
    pub node: NodeId,
    /// Its name (from the config, or from its membership record for a node that joined).
    #[serde(default)]
    pub name: String,
    /// Its peer address, while alive.
    #[serde(default)]
    pub addr: Option<String>,
    /// Whether it holds its membership lease.
    pub alive: bool,
    /// Milliseconds since that changed (as this node saw it).
    pub since_ms: u64,
    /// The pid of its node kernel, while alive.
    pub pid: Option<u32>,
}

/// The nodes a DC spans.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DcSpan {
    /// The DC.
    pub dc: DcId,
    /// Its nodes.
    pub nodes: Vec<NodeId>,
}

/// Errors of a control call.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// No node kernel listens on the socket.
    #[error("cannot reach the node kernel at {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    /// The connection broke.
    #[error("control connection to {path} failed: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// The node answered something unexpected.
    #[error("bad answer from the node kernel at {path}: {message}")]
    Protocol { path: String, message: String },
    /// The node refused the request.
    #[error("{0}")]
    Refused(String),
}

/// A blocking control connection (used by the CLI).
pub struct CtlClient {
    path: String,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// The node that answers, when it is not the one whose socket this is: every request
    /// is sent as a [`CtlRequest::Forward`] to it.
    relay_to: Option<NodeId>,
}

impl CtlClient {
    /// Connects to the node kernel's control socket.
    pub fn connect(path: &Path) -> Result<Self, CtlError> {
        let p = path.display().to_string();
        let s = UnixStream::connect(path).map_err(|source| CtlError::Connect {
            path: p.clone(),
            source,
        })?;
        let writer = s.try_clone().map_err(|source| CtlError::Io {
            path: p.clone(),
            source,
        })?;
        Ok(CtlClient {
            path: p,
            reader: BufReader::new(s),
            writer,
            relay_to: None,
        })
    }

    /// Connects to the control socket of one node (`path`) to talk to node `to` through
    /// it: the way to a node on another host.
    pub fn relayed(path: &Path, to: NodeId) -> Result<Self, CtlError> {
        let mut c = CtlClient::connect(path)?;
        c.path = format!("{} (relaying to node {to})", c.path);
        c.relay_to = Some(to);
        Ok(c)
    }

    /// Sets how long to wait for each answer line (`None`: forever).
    pub fn set_timeout(&mut self, t: Option<Duration>) -> Result<(), CtlError> {
        self.writer
            .set_read_timeout(t)
            .map_err(|source| CtlError::Io {
                path: self.path.clone(),
                source,
            })
    }

    /// Sends a request.
    pub fn send(&mut self, req: &CtlRequest) -> Result<(), CtlError> {
        let mut line = match self.relay_to {
            None => serde_json::to_vec(req),
            Some(to) => serde_json::to_vec(&CtlRequest::Forward {
                to,
                request: Box::new(req.clone()),
            }),
        }
        .expect("requests serialize");
        line.push(b'\n');
        self.writer.write_all(&line).map_err(|source| CtlError::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// Reads the next answer line; an `Error` answer becomes [`CtlError::Refused`].
    pub fn recv(&mut self) -> Result<CtlResponse, CtlError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|source| CtlError::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Err(CtlError::Protocol {
                path: self.path.clone(),
                message: "connection closed".into(),
            });
        }
        match serde_json::from_str(&line) {
            Ok(CtlResponse::Error { message }) => Err(CtlError::Refused(message)),
            Ok(r) => Ok(r),
            Err(e) => Err(CtlError::Protocol {
                path: self.path.clone(),
                message: e.to_string(),
            }),
        }
    }

    /// Sends a request and reads one answer.
    pub fn call(&mut self, req: &CtlRequest) -> Result<CtlResponse, CtlError> {
        self.send(req)?;
        self.recv()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_states_keep_their_json_names() {
        for (state, name) in [
            (EndpointState::Running, "RUNNING"),
            (EndpointState::Remote, "REMOTE"),
            (EndpointState::Backup, "BACKUP"),
        ] {
            assert_eq!(serde_json::to_value(state).unwrap(), name);
            assert_eq!(state.to_string(), name);
            let back: EndpointState = serde_json::from_value(name.into()).unwrap();
            assert_eq!(back, state);
        }
        assert_eq!(format!("[{:<9}]", EndpointState::Remote), "[REMOTE   ]");
        assert!(serde_json::from_str::<EndpointState>("\"running\"").is_err());
    }

    #[test]
    fn process_states_keep_their_json_text() {
        for (state, text) in [
            (ProcState::Running, "running"),
            (ProcState::Exited(0), "exited 0"),
            (ProcState::Exited(-1), "exited -1"),
            (ProcState::Killed(9), "killed by signal 9"),
            (ProcState::MigratedTo(2), "migrated to node 2"),
        ] {
            assert_eq!(serde_json::to_value(state).unwrap(), text);
            let back: ProcState = serde_json::from_value(text.into()).unwrap();
            assert_eq!(back, state);
        }
        assert_eq!(format!("[{:<9}]", ProcState::Running), "[running  ]");
        for bad in ["", "Running", "exited", "exited x", "migrated to node -1"] {
            assert!(bad.parse::<ProcState>().is_err(), "{bad:?}");
        }
    }
}
