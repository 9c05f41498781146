//! A real etcd for the tests of node clusters on the etcd directory: one member, or a cluster
//! of several, on free loopback ports with data folders of their own, killed and removed when
//! the handle drops. etcd comes from `scripts/install-etcd.sh` (the test command runs it).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dvs_config::DirectoryConfig;
use dvs_directory::{Directory, EtcdDirectory, EtcdSettings};

use super::PATIENCE;

/// An etcd cluster of one or more members; see the module documentation.
pub struct Etcd {
    members: Vec<Option<Child>>,
    /// The members' client URLs.
    pub urls: Vec<String>,
    /// Kept last: removed once the members are dead.
    dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl Etcd {
    /// Starts one member and waits until it answers reads.
    pub fn start() -> Etcd {
        Etcd::start_members(1)
    }

    /// Starts `n` members as one cluster and waits until it answers reads.
    pub fn start_members(n: usize) -> Etcd {
        let dir = tempfile::Builder::new()
            .prefix("dvs-it-etcd-")
            .tempdir()
            .expect("temp dir");
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect();
        // A lone member elects itself at once; several get time to agree on a busy machine.
        let (heartbeat, election) = if n == 1 {
            ("10", "100")
        } else {
            ("50", "1000")
        };
        let bin = std::env::var("DVS_ETCD_BIN").unwrap_or_else(|_| "etcd".into());
        let mut members = Vec::new();
        let mut urls = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let log = std::fs::File::create(dir.path().join(format!("m{i}.log"))).expect("log");
            let child = Command::new(&bin)
                .arg("--name")
                .arg(format!("m{i}"))
                .arg("--data-dir")
                .arg(dir.path().join(format!("m{i}")))
                .args([
                    "--listen-client-urls",
                    &url,
                    "--advertise-client-urls",
                    &url,
                ])
                .args(["--listen-peer-urls", &peer_url])
                .args(["--initial-advertise-peer-urls", &peer_url])
                .arg(format!("--initial-cluster={}", initial.join(",")))
                .args(["--initial-cluster-state", "new"])
                .args([
                    "--heartbeat-interval",
                    heartbeat,
                    "--election-timeout",
                    election,
                ])
                .args(["--logger", "zap", "--log-level", "warn"])
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("cannot start {bin} ({e}): install it with scripts/install-etcd.sh")
                });
            members.push(Some(child));
            urls.push(url);
        }
        let etcd = Etcd { members, urls, dir };
        etcd.wait_ready();
        etcd
    }

    /// The client URL of the first member (of the only one, for a single member).
    pub fn url(&self) -> &str {
        &self.urls[0]
    }

    /// Which member leads now, asked of a running member over etcd's JSON gateway
    /// (`/v3/maintenance/status`): `None` while there is none or nobody answers.
    pub fn leader(&self) -> Option<usize> {
        for (i, url) in self.urls.iter().enumerate() {
            if self.members[i].is_none() {
                continue;
            }
            let Some(status) = post_json(url, "/v3/maintenance/status", "{}") else {
                continue;
            };
            let me = status["header"]["member_id"].as_str()?.to_owned();
            let leader = status["leader"].as_str()?.to_owned();
            if me == leader {
                return Some(i);
            }
            // Ask the others which of them is `leader`.
            for (j, other) in self.urls.iter().enumerate() {
                if self.members[j].is_none() {
                    continue;
                }
                let s = post_json(other, "/v3/maintenance/status", "{}")?;
                if s["header"]["member_id"].as_str() == Some(&leader) {
                    return Some(j);
                }
            }
        }
        None
    }

    /// Kills member `i` (SIGKILL) and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The `[directory]` of a cluster on this etcd (prefix: the cluster's default).
    pub fn directory_config(&self) -> DirectoryConfig {
        DirectoryConfig::Etcd {
            endpoints: self.urls.clone(),
            prefix: String::new(),
            dial_timeout_ms: 1000,
            request_timeout_ms: 2000,
            tls: None,
        }
    }

    /// A client of this etcd under `prefix`, for what the tests read or write by hand.
    pub fn client(&self, prefix: &str) -> EtcdDirectory {
        let mut s = EtcdSettings::new(self.urls.clone(), prefix);
        s.request_timeout = Duration::from_secs(2);
        EtcdDirectory::connect(s).expect("etcd client")
    }

    fn wait_ready(&self) {
        let client = self.client("/probe/");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let deadline = Instant::now() + PATIENCE;
        while rt.block_on(client.get("ready")).is_err() {
            assert!(
                Instant::now() < deadline,
                "etcd did not answer within {PATIENCE:?}; the first member's log: {}",
                std::fs::read_to_string(self.dir.path().join("m0.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops (`true`) or continues the server, as a brief outage that loses nothing.
    pub fn freeze(&self, frozen: bool) {
        let sig = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
        for c in self.members.iter().flatten() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.freeze(false);
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// POSTs `body` to `path` of the etcd at `url` (loopback, plain HTTP/1.0) and parses the
/// JSON answer; `None` on any failure.
fn post_json(url: &str, path: &str, body: &str) -> Option<serde_json::Value> {
    use std::io::{Read, Write};
    let addr = url.strip_prefix("http://")?;
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (_, json) = text.split_once("\r\n\r\n")?;
    serde_json::from_str(json).ok()
}
