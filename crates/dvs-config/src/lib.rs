//! The cluster configuration: one TOML file naming the cluster, its nodes and its DCs.
//!
//! ```toml
//! cluster_id = "demo"
//! [directory]
//! kind = "embedded"
//! path = "/tmp/dvs/directory"
//! [link]
//! compression = "lz4"
//! tls = true                    # the default; `false` sends plaintext, with a warning
//! [tls]
//! dir = "/etc/dvs/tls"          # ca.crt, NAME.crt, NAME.key per node, optional crl.pem
//! revoked = ["5a1f..."]         # serials of refused certificates, reread without restart
//! [[node]]
//! id = 0
//! name = "node0"
//! peer_addr = "127.0.0.1:7400"
//! runtime_dir = "/tmp/dvs/node0"
//! [[dc]]
//! id = 0
//! name = "dc0"
//! nodes = [0, "node1"]
//! max_endpoints = 256
//! bind_uids = [0]
//! [access]
//! admin_group = "dvs"
//! ```
//!
//! Names (`cluster_id`, `node[].name`, `dc[].name`) become path components of runtime and
//! image folders, so they are restricted to ASCII letters, digits, `-`, `_` and `.`, at most
//! 64 bytes, with no leading dot (see [`check_name`]).
//!
//! Local access control:
//! - `[access] admin_group`: the Unix group whose members may use the node's sockets besides
//!   root. With it, `ipc.sock` and `ctl.sock` are mode 0660 with that group and the runtime
//!   folder 0710; without it (the default) they are 0600 and 0700, root only. Every control
//!   request (`status` and `ps` included, since they show pids and command lines) needs uid 0
//!   or membership of this group.
//! - `[[dc]] bind_uids`: uids whose processes may bind any endpoint of the DC although the
//!   node did not launch them (default `[0]`, root only). A process launched by the node (or
//!   restored there by a migration), and its descendants, may bind only the endpoint it was
//!   launched for, whatever its uid. A non-root uid listed here also needs `admin_group`
//!   membership to reach `ipc.sock` at all.
//! - `[access] remote_control` (default `true`): the node serves operator requests that
//!   another node relays for its own operator (root or `admin_group` there), so that the CLI
//!   of any host acts on the whole cluster. Only over links authenticated by the cluster's
//!   certificates; a plaintext cluster (`[link] tls = false`) never relays.

use std::collections::{BTreeSet, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use dvs_wire::{DcId, Ep, NodeId};
use serde::{Deserialize, Serialize};

/// A configuration that could not be loaded; the message names the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid TOML for a cluster config.
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A key holds a value that is not allowed.
    #[error("config {path}: key `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// Compression used on peer links.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Frames go as they are.
    #[default]
    None,
    /// A frame is lz4-compressed when that makes it smaller.
    Lz4,
}

/// Peer-link settings, the same for every link of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LinkConfig {
    /// Compression of frames on the links.
    pub compression: Compression,
    /// Interval of liveness probes on an idle link, in milliseconds.
    pub heartbeat_ms: u64,
    /// A link with no traffic for this long is declared down, in milliseconds.
    pub dead_after_ms: u64,
    /// Delay before redialing a lost link, in milliseconds (doubles up to 1 s).
    pub reconnect_ms: u64,
    /// Mutual TLS on every link (see [`TlsConfig`]). Off only when set to `false`
    /// explicitly, and then every node warns at start.
    pub tls: bool,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            compression: Compression::None,
            heartbeat_ms: 250,
            dead_after_ms: 1500,
            reconnect_ms: 50,
            tls: true,
        }
    }
}

/// Where the TLS material of the cluster is, and which certificates are revoked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Folder with `ca.crt`, each node's `NAME.crt` and `NAME.key`, and optionally the CA's
    /// revocation list `crl.pem`.
    pub dir: PathBuf,
    /// Serial numbers (hex) of node certificates that are refused even though the CA
    /// signed them. Nodes reread this list, and the files, without a restart.
    pub revoked: Vec<String>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            dir: PathBuf::from("/etc/dvs/tls"),
            revoked: Vec::new(),
        }
    }
}

impl TlsConfig {
    /// Whether a serial (hex, any case, leading zeros allowed) is on the deny list.
    pub fn is_revoked(&self, serial: &str) -> bool {
        let norm = |s: &str| s.trim_start_matches('0').to_ascii_lowercase();
        let serial = norm(serial);
        self.revoked.iter().any(|r| norm(r) == serial)
    }
}

/// Where endpoint locations, node membership and migration records live.
///
/// ```toml
/// [directory]
/// kind = "etcd"
/// endpoints = ["https://10.0.0.1:2379", "https://10.0.0.2:2379"]
/// prefix = "/dvs/prod/"         # default "/dvs/CLUSTER_ID/"
/// dial_timeout_ms = 2000        # connecting to one member
/// request_timeout_ms = 5000     # one directory operation, retries included
/// [directory.tls]               # required by https:// endpoints, refused with http://
/// ca = "/etc/dvs/tls/ca.crt"    # the CA that signed etcd's server certificate
/// cert = "/etc/dvs/tls/node0.crt"
/// key = "/etc/dvs/tls/node0.key"
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum DirectoryConfig {
    /// A directory in a folder shared by the nodes of a cluster on one machine.
    Embedded {
        /// Folder holding the directory's state.
        path: PathBuf,
    },
    /// An etcd cluster.
    Etcd {
        /// Client URLs of the etcd members: `http://HOST:PORT`, `https://HOST:PORT` or
        /// `HOST:PORT` (https with `tls`, http without).
        endpoints: Vec<String>,
        /// Every key of this cluster lives under this prefix, which starts and ends with
        /// `/`. Empty in a config file means `/dvs/CLUSTER_ID/` ([`ClusterConfig::parse`]
        /// fills it in), so that clusters sharing one etcd never see each other's keys.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        prefix: String,
        /// Longest wait for a connection to one member, in milliseconds.
        #[serde(default = "default_etcd_dial_timeout_ms")]
        dial_timeout_ms: u64,
        /// Longest wait for one directory operation (with its retries on other members),
        /// in milliseconds; past it the operation fails with an error naming the endpoints.
        #[serde(default = "default_etcd_request_timeout_ms")]
        request_timeout_ms: u64,
        /// Client TLS towards etcd; `None` talks plaintext.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tls: Option<EtcdTlsConfig>,
    },
}

/// The files a node presents to and checks etcd with: certificates of the cluster CA
/// (`dvs tls`), or of whatever CA the etcd operators use.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdTlsConfig {
    /// The CA certificate (PEM) that etcd's server certificates must chain to.
    pub ca: PathBuf,
    /// The client certificate (PEM) presented to etcd.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
}

/// Default of `[directory] dial_timeout_ms` for etcd.
pub const DEFAULT_ETCD_DIAL_TIMEOUT_MS: u64 = 2000;
/// Default of `[directory] request_timeout_ms` for etcd.
pub const DEFAULT_ETCD_REQUEST_TIMEOUT_MS: u64 = 5000;
/// Largest accepted etcd timeout (10 minutes): beyond it a typo is likelier than intent.
pub const MAX_ETCD_TIMEOUT_MS: u64 = 600_000;

fn default_etcd_dial_timeout_ms() -> u64 {
    DEFAULT_ETCD_DIAL_TIMEOUT_MS
}
fn default_etcd_request_timeout_ms() -> u64 {
    DEFAULT_ETCD_REQUEST_TIMEOUT_MS
}

/// The etcd key prefix a cluster uses when its config names none.
pub fn default_etcd_prefix(cluster_id: &str) -> String {
    format!("/dvs/{cluster_id}/")
}

/// Why `prefix` cannot be an etcd key prefix of a cluster, or `None` if it can.
///
/// It must start with `/` and end with `/`: with the trailing slash, one cluster's prefix can
/// never be the beginning of another's (`/dvs/a` would also cover `/dvs/ab/...`).
pub fn check_etcd_prefix(prefix: &str) -> Option<&'static str> {
    if !prefix.starts_with('/') || !prefix.ends_with('/') || prefix.len() < 2 {
        Some("must start and end with '/' and name a folder below the root, e.g. \"/dvs/prod/\"")
    } else if prefix.len() > 256 {
        Some("longer than 256 bytes")
    } else if !prefix.bytes().all(|b| b.is_ascii_graphic()) {
        Some("only printable ASCII without spaces is allowed")
    } else {
        None
    }
}

/// Why `url` is not an etcd client URL, or `None` if it is: `http://HOST:PORT`,
/// `https://HOST:PORT` or `HOST:PORT`, with no path.
pub fn check_etcd_endpoint(url: &str) -> Option<&'static str> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .unwrap_or(url);
    if rest.contains("://") {
        return Some("the scheme must be http:// or https://");
    }
    let Some((host, port)) = rest.rsplit_once(':') else {
        return Some("must be HOST:PORT, with an optional http:// or https://");
    };
    if host.is_empty() || !host.bytes().all(|b| b.is_ascii_graphic() && b != b'/') {
        return Some("the host is missing or has characters a host cannot have");
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => None,
        _ => Some("the port must be a number from 1 to 65535, with no path after it"),
    }
}

/// One node of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Node id, unique in the cluster.
    pub id: NodeId,
    /// Node name, unique in the cluster.
    pub name: String,
    /// Address the node's peer link listens on.
    pub peer_addr: SocketAddr,
    /// Folder of the node's sockets, logs and checkpoint images.
    pub runtime_dir: PathBuf,
}

impl NodeConfig {
    /// The Unix socket that application processes connect to.
    pub fn ipc_socket(&self) -> PathBuf {
        self.runtime_dir.join("ipc.sock")
    }
    /// The Unix socket of the control protocol (CLI).
    pub fn ctl_socket(&self) -> PathBuf {
        self.runtime_dir.join("ctl.sock")
    }
}

/// A node named by id or by name in the config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum NodeRef {
    /// By id.
    Id(NodeId),
    /// By name.
    Name(String),
}

/// A distributed container.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DcConfig {
    /// DC id, unique in the cluster.
    pub id: DcId,
    /// DC name, unique in the cluster.
    pub name: String,
    /// The nodes the DC spans.
    pub nodes: Vec<NodeRef>,
    /// Endpoints are numbered `0..max_endpoints`.
    #[serde(default = "default_max_endpoints")]
    pub max_endpoints: u32,
    /// Most messages queued for one endpoint before senders get `QueueFull`.
    #[serde(default = "default_max_queue")]
    pub max_queue: u32,
    /// Uids allowed to bind endpoints of this DC from processes the node did not launch.
    #[serde(default = "default_bind_uids")]
    pub bind_uids: Vec<u32>,
}

fn default_bind_uids() -> Vec<u32> {
    vec![0]
}

/// Membership: while it runs, each node holds a lease in the directory (`nodes/{id}`,
/// deleted when the lease ends), renewed every quarter of `lease_ms`. A node that cannot
/// renew it within `lease_ms` has lost it: it fences itself (stops its endpoints' processes
/// and closes its links) until it holds a new one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MembershipConfig {
    /// Time to live of a node's lease, in milliseconds (etcd rounds it up to whole seconds).
    /// Longer than an etcd leader election (about 1 to 3 s), which must fence nobody; node
    /// failures are noticed by the links, not by leases.
    pub lease_ms: u64,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        MembershipConfig { lease_ms: 5000 }
    }
}

/// Who may use a node's local sockets, and whether other nodes may relay operator requests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessConfig {
    /// Group (name) that may use the sockets besides root; `None`: root only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_group: Option<String>,
    /// Whether this node serves operator requests (status, ps, run, migrate, ...) relayed by
    /// another node of the cluster for an operator on that node's host. Only over links
    /// authenticated with the cluster's certificates: never with `[link] tls = false`.
    pub remote_control: bool,
}

impl Default for AccessConfig {
    fn default() -> Self {
        AccessConfig {
            admin_group: None,
            remote_control: true,
        }
    }
}

/// Longest node name, DC name or cluster id.
pub const MAX_NAME_LEN: usize = 64;

/// Why a string is not a safe name (it would not be one path component), or `None` if it is.
///
/// Allowed: 1 to [`MAX_NAME_LEN`] bytes of ASCII letters, digits, `-`, `_` and `.`, not
/// starting with a dot (which also excludes `.` and `..`).
pub fn check_name(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("must not be empty")
    } else if name.len() > MAX_NAME_LEN {
        Some("longer than 64 bytes")
    } else if name.starts_with('.') {
        Some("must not start with a dot")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        Some("only ASCII letters, digits, '-', '_' and '.' are allowed")
    } else {
        None
    }
}

fn default_max_endpoints() -> u32 {
    1024
}
fn default_max_queue() -> u32 {
    4096
}

/// The whole cluster configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Cluster id; peer links between different clusters are refused.
    pub cluster_id: String,
    /// The directory service.
    pub directory: DirectoryConfig,
    /// Peer-link settings.
    #[serde(default)]
    pub link: LinkConfig,
    /// TLS material of the peer links.
    #[serde(default)]
    pub tls: TlsConfig,
    /// Who may use the nodes' local sockets.
    #[serde(default)]
    pub access: AccessConfig,
    /// How nodes prove to the directory that they are alive.
    #[serde(default)]
    pub membership: MembershipConfig,
    /// The nodes.
    #[serde(rename = "node")]
    pub nodes: Vec<NodeConfig>,
    /// The DCs.
    #[serde(rename = "dc", default)]
    pub dcs: Vec<DcConfig>,
}

impl ClusterConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.into(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates config text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut cfg: ClusterConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: e.to_string().trim_end().replace('\n', " | "),
        })?;
        if let DirectoryConfig::Etcd { prefix, .. } = &mut cfg.directory {
            if prefix.is_empty() {
                *prefix = default_etcd_prefix(&cfg.cluster_id);
            }
        }
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// The config as TOML text.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a config always serializes")
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: String, message: String| ConfigError::Invalid {
            path: path.into(),
            key,
            message,
        };
        let bad_name = |key: String, name: &str, why: &str| {
            bad(key, format!("{name:?} is not a valid name: {why}"))
        };
        if let Some(why) = check_name(&self.cluster_id) {
            return Err(bad_name("cluster_id".into(), &self.cluster_id, why));
        }
        if let Some(g) = &self.access.admin_group {
            // A group name, not a path or a number: the node looks it up by name.
            if g.parse::<u64>().is_ok() || check_name(g).is_some() {
                return Err(bad(
                    "access.admin_group".into(),
                    format!("{g:?} is not a valid group name"),
                ));
            }
        }
        if let DirectoryConfig::Etcd {
            endpoints,
            prefix,
            dial_timeout_ms,
            request_timeout_ms,
            tls,
        } = &self.directory
        {
            if endpoints.is_empty() {
                return Err(bad(
                    "directory.endpoints".into(),
                    "at least one etcd client URL is required".into(),
                ));
            }
            let mut seen = HashSet::new();
            for (i, url) in endpoints.iter().enumerate() {
                let key = format!("directory.endpoints[{i}]");
                if let Some(why) = check_etcd_endpoint(url) {
                    return Err(bad(
                        key,
                        format!("{url:?} is not an etcd client URL: {why}"),
                    ));
                }
                if !seen.insert(url.as_str()) {
                    return Err(bad(key, format!("{url:?} is listed twice")));
                }
                if tls.is_some() && url.starts_with("http://") {
                    return Err(bad(
                        key,
                        format!("{url:?} is plaintext but [directory.tls] is set: use https://"),
                    ));
                }
                if tls.is_none() && url.starts_with("https://") {
                    return Err(bad(
                        key,
                        format!("{url:?} needs [directory.tls] (ca, cert, key) to talk TLS"),
                    ));
                }
            }
            if let Some(why) = check_etcd_prefix(prefix) {
                return Err(bad(
                    "directory.prefix".into(),
                    format!("{prefix:?} is not a valid key prefix: {why}"),
                ));
            }
            for (key, ms) in [
                ("directory.dial_timeout_ms", dial_timeout_ms),
                ("directory.request_timeout_ms", request_timeout_ms),
            ] {
                if *ms == 0 || *ms > MAX_ETCD_TIMEOUT_MS {
                    return Err(bad(
                        key.into(),
                        format!("must be between 1 and {MAX_ETCD_TIMEOUT_MS} (ms)"),
                    ));
                }
            }
            if let Some(t) = tls {
                for (key, p) in [
                    ("directory.tls.ca", &t.ca),
                    ("directory.tls.cert", &t.cert),
                    ("directory.tls.key", &t.key),
                ] {
                    if !p.is_absolute() {
                        return Err(bad(key.into(), "must be an absolute path".into()));
                    }
                }
            }
        }
        if self.nodes.is_empty() {
            return Err(bad(
                "node".into(),
                "at least one [[node]] is required".into(),
            ));
        }
        let (mut ids, mut names, mut addrs) = (HashSet::new(), HashSet::new(), HashSet::new());
        for (i, n) in self.nodes.iter().enumerate() {
            if !ids.insert(n.id) {
                return Err(bad(
                    format!("node[{i}].id"),
                    format!("node id {} is used twice", n.id),
                ));
            }
            if let Some(why) = check_name(&n.name) {
                return Err(bad_name(format!("node[{i}].name"), &n.name, why));
            }
            if n.name.parse::<u64>().is_ok() {
                return Err(bad_name(
                    format!("node[{i}].name"),
                    &n.name,
                    "a number would read as a node id",
                ));
            }
            if !names.insert(n.name.as_str()) {
                return Err(bad(
                    format!("node[{i}].name"),
                    format!("node name {:?} is used twice", n.name),
                ));
            }
            if !addrs.insert(n.peer_addr) {
                return Err(bad(
                    format!("node[{i}].peer_addr"),
                    format!("address {} is used twice", n.peer_addr),
                ));
            }
            if !n.runtime_dir.is_absolute() {
                return Err(bad(
                    format!("node[{i}].runtime_dir"),
                    "must be an absolute path".into(),
                ));
            }
            // sockaddr_un holds 108 bytes; the socket paths must fit.
            if n.ctl_socket().as_os_str().len() >= 100 {
                return Err(bad(
                    format!("node[{i}].runtime_dir"),
                    "path too long for a Unix socket (keep it under 90 bytes)".into(),
                ));
            }
        }
        let (mut dc_ids, mut dc_names) = (HashSet::new(), HashSet::new());
        for (i, dc) in self.dcs.iter().enumerate() {
            if !dc_ids.insert(dc.id) {
                return Err(bad(
                    format!("dc[{i}].id"),
                    format!("DC id {} is used twice", dc.id),
                ));
            }
            if let Some(why) = check_name(&dc.name) {
                return Err(bad_name(format!("dc[{i}].name"), &dc.name, why));
            }
            if dc.name.parse::<u64>().is_ok() {
                return Err(bad_name(
                    format!("dc[{i}].name"),
                    &dc.name,
                    "a number would read as a DC id",
                ));
            }
            if !dc_names.insert(dc.name.as_str()) {
                return Err(bad(
                    format!("dc[{i}].name"),
                    format!("DC name {:?} is used twice", dc.name),
                ));
            }
            if dc.nodes.is_empty() {
                return Err(bad(
                    format!("dc[{i}].nodes"),
                    "a DC must span at least one node".into(),
                ));
            }
            let mut seen = BTreeSet::new();
            for (j, r) in dc.nodes.iter().enumerate() {
                let Some(n) = self.node(r) else {
                    return Err(bad(
                        format!("dc[{i}].nodes[{j}]"),
                        format!("no node {} is defined", r),
                    ));
                };
                if !seen.insert(n.id) {
                    return Err(bad(
                        format!("dc[{i}].nodes[{j}]"),
                        format!("node {} is listed twice", r),
                    ));
                }
            }
            if dc.max_endpoints == 0 || dc.max_endpoints > i32::MAX as u32 {
                return Err(bad(
                    format!("dc[{i}].max_endpoints"),
                    "must be between 1 and 2147483647".into(),
                ));
            }
            if dc.max_queue == 0 {
                return Err(bad(
                    format!("dc[{i}].max_queue"),
                    "must be at least 1".into(),
                ));
            }
        }
        if !self.tls.dir.is_absolute() {
            return Err(bad("tls.dir".into(), "must be an absolute path".into()));
        }
        for (i, r) in self.tls.revoked.iter().enumerate() {
            if r.is_empty() || !r.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad(
                    format!("tls.revoked[{i}]"),
                    format!("{r:?} is not a certificate serial number in hex"),
                ));
            }
        }
        if self.membership.lease_ms < 500 {
            return Err(bad(
                "membership.lease_ms".into(),
                format!(
                    "{} ms is too short to renew a lease over a network (at least 500)",
                    self.membership.lease_ms
                ),
            ));
        }
        if self.link.heartbeat_ms == 0 || self.link.dead_after_ms <= self.link.heartbeat_ms {
            return Err(bad(
                "link.dead_after_ms".into(),
                "must be larger than link.heartbeat_ms, which must be > 0".into(),
            ));
        }
        Ok(())
    }

    /// The node an id or name refers to.
    pub fn node(&self, r: &NodeRef) -> Option<&NodeConfig> {
        match r {
            NodeRef::Id(id) => self.nodes.iter().find(|n| n.id == *id),
            NodeRef::Name(name) => self.nodes.iter().find(|n| &n.name == name),
        }
    }

    /// The node named by `s`, an id or a name (as typed on a command line).
    pub fn find_node(&self, s: &str) -> Option<&NodeConfig> {
        match s.parse::<NodeId>() {
            Ok(id) => self.nodes.iter().find(|n| n.id == id),
            Err(_) => self.nodes.iter().find(|n| n.name == s),
        }
    }

    /// The node with this id.
    pub fn node_by_id(&self, id: NodeId) -> Option<&NodeConfig> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// The DC named by `s`, an id or a name.
    pub fn find_dc(&self, s: &str) -> Option<&DcConfig> {
        match s.parse::<DcId>() {
            Ok(id) => self.dcs.iter().find(|d| d.id == id),
            Err(_) => self.dcs.iter().find(|d| d.name == s),
        }
    }

    /// The DC with this id.
    pub fn dc_by_id(&self, id: DcId) -> Option<&DcConfig> {
        self.dcs.iter().find(|d| d.id == id)
    }

    /// Ids of the nodes DC `dc` spans (validated configs only).
    pub fn dc_nodes(&self, dc: &DcConfig) -> Vec<NodeId> {
        dc.nodes
            .iter()
            .filter_map(|r| self.node(r).map(|n| n.id))
            .collect()
    }

    /// Whether `ep` is a valid endpoint number of `dc`.
    pub fn ep_in_range(dc: &DcConfig, ep: Ep) -> bool {
        ep >= 0 && (ep as u32) < dc.max_endpoints
    }

    /// A local cluster of `n` nodes on loopback under `dir`, with one DC spanning all of them.
    pub fn local(dir: &Path, n: u16, base_port: u16) -> Self {
        let nodes: Vec<NodeConfig> = (0..n)
            .map(|i| NodeConfig {
                id: i,
                name: format!("node{i}"),
                peer_addr: SocketAddr::from(([127, 0, 0, 1], base_port + i)),
                runtime_dir: dir.join(format!("node{i}")),
            })
            .collect();
        ClusterConfig {
            cluster_id: format!("local-{base_port}"),
            directory: DirectoryConfig::Embedded {
                path: dir.join("directory"),
            },
            link: LinkConfig::default(),
            tls: TlsConfig {
                dir: dir.join("tls"),
                revoked: Vec::new(),
            },
            access: AccessConfig::default(),
            membership: MembershipConfig::default(),
            dcs: vec![DcConfig {
                id: 0,
                name: "dc0".into(),
                nodes: nodes.iter().map(|n| NodeRef::Id(n.id)).collect(),
                max_endpoints: default_max_endpoints(),
                max_queue: default_max_queue(),
                bind_uids: default_bind_uids(),
            }],
            nodes,
        }
    }
}

impl std::fmt::Display for NodeRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodeRef::Id(id) => write!(f, "{id}"),
            NodeRef::Name(n) => write!(f, "{n:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
cluster_id = "t"
[directory]
kind = "embedded"
path = "/tmp/d"
[[node]]
id = 0
name = "a"
peer_addr = "127.0.0.1:7000"
runtime_dir = "/tmp/a"
[[node]]
id = 1
name = "b"
peer_addr = "127.0.0.1:7001"
runtime_dir = "/tmp/b"
[[dc]]
id = 3
name = "web"
nodes = [0, "b"]
"#;

    fn err(text: &str) -> String {
        ClusterConfig::parse(text, Path::new("/etc/x.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn parses_a_good_config_and_resolves_refs() {
        let c = ClusterConfig::parse(GOOD, Path::new("x")).unwrap();
        assert_eq!(c.nodes.len(), 2);
        let dc = c.find_dc("web").unwrap();
        assert_eq!(c.dc_nodes(dc), vec![0, 1]);
        assert_eq!(c.find_node("b").unwrap().id, 1);
        assert_eq!(c.find_node("0").unwrap().name, "a");
        assert_eq!(dc.max_endpoints, 1024);
        assert_eq!(c.link, LinkConfig::default());
    }

    #[test]
    fn round_trips_through_toml() {
        let c = ClusterConfig::local(Path::new("/tmp/x"), 3, 7400);
        let back = ClusterConfig::parse(&c.to_toml(), Path::new("x")).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn unknown_dc_node_names_the_key() {
        let e = err(&GOOD.replace(r#"nodes = [0, "b"]"#, r#"nodes = [0, "zz"]"#));
        assert!(
            e.contains("/etc/x.toml") && e.contains("dc[0].nodes[1]") && e.contains("zz"),
            "{e}"
        );
    }

    #[test]
    fn duplicate_node_id_names_the_key() {
        let e = err(&GOOD.replace("id = 1\nname = \"b\"", "id = 0\nname = \"b\""));
        assert!(e.contains("node[1].id"), "{e}");
    }

    #[test]
    fn bad_address_names_the_key() {
        let e = err(&GOOD.replace("127.0.0.1:7001", "not-an-address"));
        assert!(e.contains("/etc/x.toml") && e.contains("peer_addr"), "{e}");
    }

    #[test]
    fn missing_and_unknown_keys_are_named() {
        let e = err(&GOOD.replace("cluster_id = \"t\"\n", ""));
        assert!(e.contains("cluster_id"), "{e}");
        let e = err(&GOOD.replace("name = \"web\"", "name = \"web\"\nmax_endpointz = 3"));
        assert!(e.contains("max_endpointz"), "{e}");
    }

    #[test]
    fn relative_runtime_dir_is_refused() {
        let e = err(&GOOD.replace("/tmp/b", "tmp/b"));
        assert!(e.contains("node[1].runtime_dir"), "{e}");
    }

    #[test]
    fn unsafe_names_are_refused_with_the_key_named() {
        for (bad, why) in [
            ("/tmp/x", "only ASCII"),
            ("..", "dot"),
            (".hidden", "dot"),
            ("a/../b", "only ASCII"),
            ("caf\u{e9}", "only ASCII"),
            ("", "empty"),
        ] {
            let e = err(&GOOD.replace("name = \"b\"", &format!("name = {bad:?}")));
            assert!(
                e.contains("/etc/x.toml") && e.contains("`node[1].name`") && e.contains(why),
                "{bad:?}: {e}"
            );
            let e = err(&GOOD.replace("name = \"web\"", &format!("name = {bad:?}")));
            assert!(
                e.contains("`dc[0].name`") && e.contains(why),
                "{bad:?}: {e}"
            );
            let e = err(&GOOD.replace("cluster_id = \"t\"", &format!("cluster_id = {bad:?}")));
            assert!(
                e.contains("`cluster_id`") && e.contains(why),
                "{bad:?}: {e}"
            );
        }
        let long = "n".repeat(MAX_NAME_LEN + 1);
        let e = err(&GOOD.replace("name = \"b\"", &format!("name = {long:?}")));
        assert!(e.contains("node[1].name") && e.contains("64"), "{e}");
    }

    #[test]
    fn safe_names_pass() {
        for good in ["node-1", "a_b.c", "N0", &"n".repeat(MAX_NAME_LEN)] {
            assert_eq!(check_name(good), None, "{good}");
        }
        let text = GOOD
            .replace("name = \"b\"", "name = \"b-1.x\"")
            .replace("[0, \"b\"]", "[0, \"b-1.x\"]");
        let c = ClusterConfig::parse(&text, Path::new("x"));
        assert!(c.is_ok(), "{c:?}");
    }

    #[test]
    fn access_and_bind_uids_default_to_root_only() {
        let c = ClusterConfig::parse(GOOD, Path::new("x")).unwrap();
        assert_eq!(c.access.admin_group, None);
        assert_eq!(c.dcs[0].bind_uids, vec![0]);
        let text = format!("{GOOD}bind_uids = [0, 1000]\n[access]\nadmin_group = \"dvs\"\n");
        let c = ClusterConfig::parse(&text, Path::new("x")).unwrap();
        assert_eq!(c.access.admin_group.as_deref(), Some("dvs"));
        assert_eq!(c.dcs[0].bind_uids, vec![0, 1000]);
        let back = ClusterConfig::parse(&c.to_toml(), Path::new("x")).unwrap();
        assert_eq!(back, c);
        let e = err(&format!("{GOOD}[access]\nadmin_group = \"../etc\"\n"));
        assert!(e.contains("access.admin_group"), "{e}");
    }

    fn with_etcd(directory: &str) -> String {
        GOOD.replace(
            "[directory]\nkind = \"embedded\"\npath = \"/tmp/d\"\n",
            &format!("[directory]\nkind = \"etcd\"\n{directory}"),
        )
    }

    #[test]
    fn etcd_directory_parses_with_defaults_and_round_trips() {
        let c = ClusterConfig::parse(
            &with_etcd("endpoints = [\"http://127.0.0.1:2379\", \"10.0.0.2:2379\"]\n"),
            Path::new("x"),
        )
        .unwrap();
        let DirectoryConfig::Etcd {
            endpoints,
            prefix,
            dial_timeout_ms,
            request_timeout_ms,
            tls,
        } = &c.directory
        else {
            panic!("{:?}", c.directory)
        };
        assert_eq!(endpoints.len(), 2);
        // The cluster id keeps clusters that share one etcd apart.
        assert_eq!(prefix, "/dvs/t/");
        assert_eq!(*dial_timeout_ms, DEFAULT_ETCD_DIAL_TIMEOUT_MS);
        assert_eq!(*request_timeout_ms, DEFAULT_ETCD_REQUEST_TIMEOUT_MS);
        assert_eq!(tls, &None);
        let back = ClusterConfig::parse(&c.to_toml(), Path::new("x")).unwrap();
        assert_eq!(back, c);

        let text = with_etcd(
            "endpoints = [\"https://etcd0:2379\"]\nprefix = \"/other/\"\n\
             dial_timeout_ms = 100\nrequest_timeout_ms = 300\n\
             [directory.tls]\nca = \"/t/ca.crt\"\ncert = \"/t/n.crt\"\nkey = \"/t/n.key\"\n",
        );
        let c = ClusterConfig::parse(&text, Path::new("x")).unwrap();
        let DirectoryConfig::Etcd { prefix, tls, .. } = &c.directory else {
            panic!()
        };
        assert_eq!(prefix, "/other/");
        assert_eq!(tls.as_ref().unwrap().key, PathBuf::from("/t/n.key"));
        assert_eq!(
            ClusterConfig::parse(&c.to_toml(), Path::new("x")).unwrap(),
            c
        );
    }

    #[test]
    fn bad_etcd_settings_name_the_key() {
        let tls = "[directory.tls]\nca = \"/c\"\ncert = \"/d\"\nkey = \"/e\"\n";
        for (directory, key, says) in [
            (
                "endpoints = []\n".to_string(),
                "`directory.endpoints`",
                "at least one",
            ),
            (
                "endpoints = [\"http://a:1\", \"a:bc\"]\n".into(),
                "`directory.endpoints[1]`",
                "port",
            ),
            (
                "endpoints = [\"a\"]\n".into(),
                "`directory.endpoints[0]`",
                "HOST:PORT",
            ),
            (
                "endpoints = [\"ftp://a:1\"]\n".into(),
                "`directory.endpoints[0]`",
                "scheme",
            ),
            (
                "endpoints = [\"http://a:1/v3\"]\n".into(),
                "`directory.endpoints[0]`",
                "port",
            ),
            (
                "endpoints = [\"a:1\", \"a:1\"]\n".into(),
                "`directory.endpoints[1]`",
                "twice",
            ),
            (
                "endpoints = [\"https://a:1\"]\n".into(),
                "`directory.endpoints[0]`",
                "[directory.tls]",
            ),
            (
                format!("endpoints = [\"http://a:1\"]\n{tls}"),
                "`directory.endpoints[0]`",
                "https://",
            ),
            (
                "endpoints = [\"a:1\"]\nprefix = \"dvs\"\n".into(),
                "`directory.prefix`",
                "start and end with '/'",
            ),
            (
                "endpoints = [\"a:1\"]\nprefix = \"/dvs\"\n".into(),
                "`directory.prefix`",
                "start and end with '/'",
            ),
            (
                "endpoints = [\"a:1\"]\nprefix = \"/\"\n".into(),
                "`directory.prefix`",
                "below the root",
            ),
            (
                "endpoints = [\"a:1\"]\nprefix = \"/a b/\"\n".into(),
                "`directory.prefix`",
                "spaces",
            ),
            (
                "endpoints = [\"a:1\"]\ndial_timeout_ms = 0\n".into(),
                "`directory.dial_timeout_ms`",
                "between 1 and",
            ),
            (
                "endpoints = [\"a:1\"]\nrequest_timeout_ms = 3600000\n".into(),
                "`directory.request_timeout_ms`",
                "between 1 and",
            ),
            (
                format!(
                    "endpoints = [\"https://a:1\"]\n{}",
                    tls.replace("\"/d\"", "\"d\"")
                ),
                "`directory.tls.cert`",
                "absolute",
            ),
        ] {
            let e = err(&with_etcd(&directory));
            assert!(
                e.contains("/etc/x.toml") && e.contains(key) && e.contains(says),
                "{directory:?}: {e}"
            );
        }
        // Unknown keys and a TLS table missing a file are refused by the parser, by name.
        let e = err(&with_etcd("endpoints = [\"a:1\"]\nendpoint = \"a:2\"\n"));
        assert!(e.contains("endpoint"), "{e}");
        let e = err(&with_etcd(
            "endpoints = [\"https://a:1\"]\n[directory.tls]\nca = \"/c\"\ncert = \"/d\"\n",
        ));
        assert!(e.contains("key"), "{e}");
    }

    #[test]
    fn missing_file_names_the_file() {
        let e = ClusterConfig::load(Path::new("/nonexistent/c.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/c.toml"), "{e}");
    }
}
