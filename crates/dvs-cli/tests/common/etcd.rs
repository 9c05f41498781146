//! A real etcd server for the tests of node clusters on the etcd directory: one member on
//! free loopback ports with its own data folder, killed and removed when its handle drops.
//! etcd comes from `scripts/install-etcd.sh` (the test command runs it).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dvs_config::DirectoryConfig;
use dvs_directory::{Directory, EtcdDirectory, EtcdSettings};

use super::PATIENCE;

/// One etcd member; see the module documentation.
pub struct Etcd {
    child: Child,
    /// Its client URL.
    pub url: String,
    dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl Etcd {
    /// Starts a member and waits until it answers reads.
    pub fn start() -> Etcd {
        let dir = tempfile::Builder::new()
            .prefix("dvs-it-etcd-")
            .tempdir()
            .expect("temp dir");
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.path().join("etcd.log")).expect("etcd log");
        let bin = std::env::var("DVS_ETCD_BIN").unwrap_or_else(|_| "etcd".into());
        let child = Command::new(&bin)
            .args(["--name", "m0", "--data-dir"])
            .arg(dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .arg(format!("--initial-cluster=m0={peer_url}"))
            .args(["--heartbeat-interval", "10", "--election-timeout", "100"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("etcd log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {bin} ({e}): install it with scripts/install-etcd.sh")
            });
        let etcd = Etcd { child, url, dir };
        etcd.wait_ready();
        etcd
    }

    /// The `[directory]` of a cluster on this etcd (prefix: the cluster's default).
    pub fn directory_config(&self) -> DirectoryConfig {
        DirectoryConfig::Etcd {
            endpoints: vec![self.url.clone()],
            prefix: String::new(),
            dial_timeout_ms: 1000,
            request_timeout_ms: 2000,
            tls: None,
        }
    }

    /// A client of this etcd under `prefix`, for what the tests read or write by hand.
    pub fn client(&self, prefix: &str) -> EtcdDirectory {
        let mut s = EtcdSettings::new(vec![self.url.clone()], prefix);
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
                "etcd did not answer within {PATIENCE:?}; its log: {}",
                std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops (`true`) or continues the server, as a brief outage that loses nothing.
    pub fn freeze(&self, frozen: bool) {
        let sig = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.freeze(false);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
