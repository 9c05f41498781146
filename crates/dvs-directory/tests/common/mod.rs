//! Shared harness of the directory tests: real etcd servers (and 3-member clusters) on free
//! loopback ports, each with its own data dir, killed and removed when their handle drops,
//! also when a test panics; and the backend-independent test cases (`conformance`).
//!
//! etcd comes from `scripts/install-etcd.sh` (Debian's `etcd-server`). Without it the etcd
//! tests fail, saying how to install it, unless `DVS_SKIP_ETCD=1` is set (and `CI` is not):
//! then they print why and pass without running.

#![allow(dead_code)] // Each test binary uses a different part of the harness.

pub mod conformance;

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use dvs_config::EtcdTlsConfig;
use dvs_directory::{Directory, EtcdDirectory, EtcdSettings};

/// Upper bound for anything the tests wait for (an etcd to answer, an event to arrive). Never
/// reached when things work: it only turns a hang into a failure. Generous, because the
/// machine is small and shared with concurrent builds.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// The etcd binary: `$DVS_ETCD_BIN`, or `etcd` on `PATH`.
fn etcd_bin() -> String {
    std::env::var("DVS_ETCD_BIN").unwrap_or_else(|_| "etcd".into())
}

/// Whether the etcd tests can run. If etcd is missing this fails the test with the way to
/// install it, unless `DVS_SKIP_ETCD=1` is set outside CI: then it prints why and returns
/// `false` (the caller returns, skipping the test).
pub fn etcd_available(test: &str) -> bool {
    static PROBE: OnceLock<Result<String, String>> = OnceLock::new();
    let probe = PROBE.get_or_init(|| {
        match Command::new(etcd_bin())
            .arg("--version")
            .stdin(Stdio::null())
            .output()
        {
            Ok(out) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned()),
            Ok(out) => Err(format!(
                "`{} --version` failed: {}",
                etcd_bin(),
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e) => Err(format!("cannot run `{}`: {e}", etcd_bin())),
        }
    });
    match probe {
        Ok(_) => true,
        Err(why)
            if std::env::var("DVS_SKIP_ETCD").is_ok_and(|v| v == "1")
                && !std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false") =>
        {
            // Straight to stderr: libtest would swallow a println of a passing test.
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                format!("skipping {test}: etcd is not usable here (DVS_SKIP_ETCD=1): {why}\n")
                    .as_bytes(),
            );
            false
        }
        Err(why) => panic!(
            "etcd is not usable here ({why}): run scripts/install-etcd.sh (as root), or set \
             DVS_SKIP_ETCD=1 to skip the etcd tests locally"
        ),
    }
}

/// A free loopback port: bound, then released for etcd to take. Another process could take
/// it in between; [`EtcdServer::start`] retries with new ports when etcd cannot bind.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// Where data dirs go: memory if possible (etcd fsyncs every write; the tests need no
/// durability beyond a process restart).
fn scratch_root() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() && tempfile::tempdir_in(shm).is_ok() {
        shm.to_owned()
    } else {
        std::env::temp_dir()
    }
}

/// A unique token per cluster, so members of two test clusters can never join each other.
fn cluster_token() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "dvs-test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The files of a TLS-only etcd: its server certificate and the cluster CA's client
/// certificate for the tests.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// The CA (`dvs tls init`), which signed everything here.
    pub ca: PathBuf,
    /// etcd's server certificate, for 127.0.0.1.
    pub server_cert: PathBuf,
    /// Its key.
    pub server_key: PathBuf,
    /// A node certificate of the cluster (`dvs tls issue`), used as the client certificate.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
}

impl TlsFiles {
    /// The client side of these files, as `[directory.tls]` names them.
    pub fn client(&self) -> EtcdTlsConfig {
        EtcdTlsConfig {
            ca: self.ca.clone(),
            cert: self.client_cert.clone(),
            key: self.client_key.clone(),
        }
    }
}

/// One etcd member: its process, ports and data dir.
pub struct Member {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    /// The whole `--initial-cluster` value.
    initial_cluster: String,
    token: String,
    data_dir: PathBuf,
    log: PathBuf,
    tls: Option<TlsFiles>,
    heartbeat_ms: u32,
    election_ms: u32,
    child: Option<Child>,
}

impl Member {
    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// The member's client URL.
    pub fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme(), self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    /// Starts the process (again, on the same data dir and ports after [`Member::kill`]).
    fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("etcd log file");
        let client = self.url();
        let mut cmd = Command::new(etcd_bin());
        cmd.arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(self.peer_url())
            .arg("--initial-advertise-peer-urls")
            .arg(self.peer_url())
            .arg("--initial-cluster")
            .arg(&self.initial_cluster)
            .arg("--initial-cluster-token")
            .arg(&self.token)
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--heartbeat-interval")
            .arg(self.heartbeat_ms.to_string())
            .arg("--election-timeout")
            .arg(self.election_ms.to_string())
            .arg("--logger")
            .arg("zap")
            .arg("--log-level")
            .arg("warn");
        if let Some(tls) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&tls.server_cert)
                .arg("--key-file")
                .arg(&tls.server_key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth");
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("etcd log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", etcd_bin()));
        self.child = Some(child);
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Whether the process has exited on its own.
    fn exited(&mut self) -> bool {
        match &mut self.child {
            Some(c) => !matches!(c.try_wait(), Ok(None)),
            None => true,
        }
    }

    /// Kills the process (SIGKILL, as a crash) and reaps it; the data dir stays.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops (SIGSTOP) or resumes (SIGCONT) the process: an etcd that accepts connections
    /// but answers nothing, i.e. a slow one.
    pub fn freeze(&self, frozen: bool) {
        let pid = self.pid().expect("a running member") as libc::pid_t;
        let sig = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
        // SAFETY: a signal to a child process this handle owns.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "signal to etcd {pid}");
        if frozen {
            // The signal reaches a thread running on another CPU a moment later: wait until
            // every thread is stopped, or a request sent right now may still be answered.
            let all_stopped = || {
                std::fs::read_dir(format!("/proc/{pid}/task"))
                    .into_iter()
                    .flatten()
                    .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("stat")).ok())
                    .all(|stat| {
                        // The state follows the command name, which is in parentheses.
                        stat.rsplit_once(") ")
                            .is_some_and(|(_, rest)| rest.starts_with('T'))
                    })
            };
            let deadline = Instant::now() + PATIENCE;
            while !all_stopped() {
                assert!(Instant::now() < deadline, "etcd {pid} does not stop");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// The end of the member's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        // Resume first, or a frozen process would never act on the kill... (SIGKILL works on
        // stopped processes, but a SIGCONT is harmless and keeps the reaping prompt).
        if let Some(pid) = self.pid() {
            // SAFETY: a signal to a child process this handle owns.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGCONT) };
        }
        self.kill();
    }
}

/// An etcd cluster of one or more members on loopback, in a temporary folder that is removed
/// (after every member is killed) when this drops.
pub struct Etcd {
    pub members: Vec<Member>,
    /// Last field: dropped after the members, so their files go only once they are dead.
    dir: tempfile::TempDir,
}

impl Etcd {
    /// One member, plaintext, tuned to be ready quickly (a lone member elects itself after
    /// one election timeout).
    pub fn start() -> Etcd {
        Etcd::start_with(1, None)
    }

    /// One member that serves only TLS and requires a client certificate of the cluster CA.
    pub fn start_tls() -> Etcd {
        let dir = tempfile::Builder::new()
            .prefix("dvs-etcd-tls-")
            .tempdir_in(scratch_root())
            .expect("temp dir");
        let tls = make_tls_files(&dir.path().join("tls"));
        let mut etcd = Etcd::start_in(dir, 1, Some(tls));
        etcd.wait_ready();
        etcd
    }

    /// `n` members; with several, heartbeats and elections are slower so that a busy machine
    /// does not make the members lose their leader.
    pub fn start_with(n: usize, tls: Option<TlsFiles>) -> Etcd {
        let dir = tempfile::Builder::new()
            .prefix("dvs-etcd-")
            .tempdir_in(scratch_root())
            .expect("temp dir");
        let mut etcd = Etcd::start_in(dir, n, tls);
        etcd.wait_ready();
        etcd
    }

    /// Starts the members; retries with new ports if one could not bind its own.
    fn start_in(dir: tempfile::TempDir, n: usize, tls: Option<TlsFiles>) -> Etcd {
        let (heartbeat_ms, election_ms) = if n == 1 { (10, 100) } else { (50, 1000) };
        for attempt in 0.. {
            let token = cluster_token();
            let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
            let initial_cluster = ports
                .iter()
                .enumerate()
                .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
                .collect::<Vec<_>>()
                .join(",");
            let mut members: Vec<Member> = ports
                .iter()
                .enumerate()
                .map(|(i, (client, peer))| Member {
                    name: format!("m{i}"),
                    client_port: *client,
                    peer_port: *peer,
                    initial_cluster: initial_cluster.clone(),
                    token: token.clone(),
                    data_dir: dir.path().join(format!("m{i}.{attempt}")),
                    log: dir.path().join(format!("m{i}.{attempt}.log")),
                    tls: tls.clone(),
                    heartbeat_ms,
                    election_ms,
                    child: None,
                })
                .collect();
            for m in &mut members {
                m.spawn();
            }
            // A member that cannot bind exits at once; give it the time to.
            std::thread::sleep(Duration::from_millis(100));
            let failed = members.iter_mut().any(|m| m.exited());
            if !failed {
                return Etcd { members, dir };
            }
            let logs: Vec<String> = members.iter().map(|m| m.log_tail()).collect();
            drop(members);
            let port_taken = logs.iter().any(|l| l.contains("address already in use"));
            assert!(
                port_taken && attempt < 5,
                "etcd exited at start:\n{}",
                logs.join("\n---\n")
            );
        }
        unreachable!()
    }

    /// The client URLs of every member.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::url).collect()
    }

    /// Directory settings for this etcd under `prefix`, with short timeouts (the tests want
    /// failures fast) and the client certificate when the server wants TLS.
    pub fn settings(&self, prefix: &str) -> EtcdSettings {
        let mut s = EtcdSettings::new(self.endpoints(), prefix);
        s.dial_timeout = Duration::from_millis(1000);
        s.request_timeout = Duration::from_millis(2000);
        s.tls = self.members[0].tls.as_ref().map(TlsFiles::client);
        s
    }

    /// A directory handle on this etcd under `prefix`.
    pub fn directory(&self, prefix: &str) -> EtcdDirectory {
        EtcdDirectory::connect(self.settings(prefix)).expect("connect to the test etcd")
    }

    /// A raw etcd client of the members that run now, for what dvs never does itself
    /// (compaction, garbage written by hand).
    pub async fn raw_client(&self) -> etcd_client::Client {
        let urls: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.child.is_some())
            .map(Member::url)
            .collect();
        raw_client(urls, self.members[0].tls.as_ref(), Duration::from_secs(5))
            .await
            .expect("raw etcd client")
    }

    /// Waits until every running member answers a linearizable read (so a leader exists).
    pub fn wait_ready(&mut self) {
        let started = Instant::now();
        let running: Vec<usize> = (0..self.members.len())
            .filter(|i| self.members[*i].child.is_some())
            .collect();
        for i in running {
            while !answers(&self.members[i].url(), self.members[i].tls.as_ref()) {
                let m = &mut self.members[i];
                assert!(
                    !m.exited(),
                    "etcd {} exited while starting:\n{}",
                    m.name,
                    m.log_tail()
                );
                assert!(
                    started.elapsed() < PATIENCE,
                    "etcd {} not ready after {PATIENCE:?}:\n{}",
                    m.name,
                    m.log_tail()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        eprintln!(
            "etcd: {} member(s) ready in {} ms",
            self.members.len(),
            started.elapsed().as_millis()
        );
    }

    /// Kills member `i` (SIGKILL); its data dir stays for [`Etcd::restart`].
    pub fn kill(&mut self, i: usize) {
        self.members[i].kill();
    }

    /// Starts member `i` again on its data dir and ports, and waits until it answers.
    pub fn restart(&mut self, i: usize) {
        self.members[i].spawn();
        self.wait_ready();
    }

    /// Starts member `i` again on its data dir, but listening for clients on another port,
    /// so that clients of the old port cannot reach it until [`Etcd::move_back`]. Returns the
    /// URL it listens at meanwhile.
    pub fn restart_elsewhere(&mut self, i: usize) -> String {
        let old = self.members[i].client_port;
        self.members[i].client_port = free_port();
        self.members[i].spawn();
        self.wait_ready();
        let url = self.members[i].url();
        self.members[i].client_port = old;
        url
    }

    /// Settings like [`Etcd::settings`] for the given endpoints only.
    pub fn settings_for(&self, urls: &[String], prefix: &str) -> EtcdSettings {
        let mut s = self.settings(prefix);
        s.endpoints = urls.to_vec();
        s
    }

    /// Kills member `i` and starts it again on its original client port (after
    /// [`Etcd::restart_elsewhere`]).
    pub fn move_back(&mut self, i: usize) {
        self.members[i].kill();
        self.members[i].spawn();
        self.wait_ready();
    }

    /// Kills member `i`, deletes its data dir and starts it again on the same ports: a
    /// single-member etcd replaced by an empty one, whose revisions start over.
    pub fn wipe(&mut self, i: usize) {
        self.members[i].kill();
        std::fs::remove_dir_all(&self.members[i].data_dir).expect("remove the data dir");
        self.members[i].spawn();
        self.wait_ready();
    }

    /// The temporary folder (data dirs, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        // Kill every member before the folder goes (fields drop in order, but make it plain).
        for m in &mut self.members {
            m.kill();
        }
    }
}

/// An etcd client of `urls`, with the test client certificate if `tls`.
async fn raw_client(
    urls: Vec<String>,
    tls: Option<&TlsFiles>,
    timeout: Duration,
) -> Result<etcd_client::Client, etcd_client::Error> {
    let mut options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(timeout)
        .with_timeout(timeout);
    if let Some(tls) = tls {
        let read = |p: &Path| std::fs::read(p).expect("test TLS file");
        options = options.with_tls(
            etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(read(&tls.ca)))
                .identity(etcd_client::Identity::from_pem(
                    read(&tls.client_cert),
                    read(&tls.client_key),
                )),
        );
    }
    etcd_client::Client::connect(urls, Some(options)).await
}

/// Whether the member at `url` answers a linearizable read now. On a thread of its own, so
/// that tests may call it from inside their runtime.
fn answers(url: &str, tls: Option<&TlsFiles>) -> bool {
    let url = url.to_owned();
    let tls = tls.cloned();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            match raw_client(vec![url], tls.as_ref(), Duration::from_millis(500)).await {
                Ok(mut c) => c.get("/ready-check", None).await.is_ok(),
                Err(_) => false,
            }
        })
    })
    .join()
    .unwrap_or(false)
}

/// A CA made the way `dvs tls init` makes it, a node certificate from it (`dvs tls issue`)
/// for the client, and a server certificate for etcd on 127.0.0.1 signed by the same CA.
pub fn make_tls_files(dir: &Path) -> TlsFiles {
    let ca = dvs_tls::authority::init_ca(dir, "etcdtest", false).expect("CA");
    let client = dvs_tls::authority::issue_node_cert(
        dir,
        "etcdtest",
        0,
        "node0",
        dvs_tls::authority::NODE_VALIDITY,
    )
    .expect("client certificate");
    // etcd's own certificate needs an IP address as its name, which node certificates do not
    // carry: sign one here with the CA's key.
    let ca_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(&ca.key).unwrap()).unwrap();
    let issuer =
        rcgen::Issuer::from_ca_cert_pem(&std::fs::read_to_string(&ca.cert).unwrap(), ca_key)
            .unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let server_cert = dir.join("etcd-server.crt");
    let server_key = dir.join("etcd-server.key");
    std::fs::write(&server_cert, cert.pem()).unwrap();
    std::fs::write(&server_key, key.serialize_pem()).unwrap();
    TlsFiles {
        ca: ca.cert,
        server_cert,
        server_key,
        client_cert: client.cert,
        client_key: client.key,
    }
}

/// A directory handle as `Arc<dyn Directory>`, as node kernels hold it.
pub fn shared(d: EtcdDirectory) -> Arc<dyn Directory> {
    Arc::new(d)
}
