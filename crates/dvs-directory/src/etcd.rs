//! [`EtcdDirectory`]: the directory kept in an etcd cluster, for clusters across machines.
//!
//! Mapping onto etcd (v3 API, through the `etcd-client` crate):
//! - every key lives under the configured prefix (`/dvs/CLUSTER/` by default), which callers
//!   never see;
//! - a [`Versioned::version`] is the key's `mod_revision`, a store-wide revision as the trait
//!   wants;
//! - [`Directory::cas`] is one `Txn`: compare `mod_revision == expected` (or
//!   `create_revision == 0` for "absent"), then put or delete, else read the key back so a
//!   conflict reports what is there now;
//! - [`Directory::watch`] is a range read, then a watch starting at the read's revision + 1, so
//!   nothing that happens between the two is lost. After a lost connection the watch resumes
//!   from the revision after the last one it saw; if etcd has compacted that revision away, the
//!   prefix is read again and the differences are sent as events.
//!
//! The client runs on a runtime of its own (one thread): callers may come from any runtime,
//! or open the directory outside of one, and a watch keeps running whatever the caller's
//! runtime does. Every operation has a deadline (`request_timeout`); past it, or when etcd
//! refuses, the error names the endpoints.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use dvs_config::{check_etcd_endpoint, check_etcd_prefix, DirectoryConfig, EtcdTlsConfig};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    KeyValue, TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::{check_key, CasOutcome, DirError, DirEvent, Directory, Versioned};

/// First pause before retrying an operation that did not reach etcd; doubles up to
/// [`MAX_RETRY_PAUSE`]. Short, because with several members another one is usually there.
const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(10);
/// Longest pause between two retries of one operation, and between two attempts of a watch
/// to reconnect.
const MAX_RETRY_PAUSE: Duration = Duration::from_millis(500);
/// HTTP/2 keep-alive pings on connections with open streams (watches), so that a member that
/// vanished without closing its connections is noticed. Not shorter: etcd's default
/// `--grpc-keepalive-min-time` is 5 s and it closes connections that ping more often.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// How an [`EtcdDirectory`] reaches etcd: what `[directory] kind = "etcd"` configures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdSettings {
    /// Client URLs of the etcd members (`http://HOST:PORT`, `https://HOST:PORT`, or
    /// `HOST:PORT`, which means https with `tls` and http without).
    pub endpoints: Vec<String>,
    /// Prefix of every key (starts and ends with `/`).
    pub prefix: String,
    /// Longest wait for a connection to one member.
    pub dial_timeout: Duration,
    /// Longest wait for one operation, retries on other members included.
    pub request_timeout: Duration,
    /// Client TLS: the CA that etcd's certificate must chain to, and the client certificate.
    pub tls: Option<EtcdTlsConfig>,
}

impl EtcdSettings {
    /// Settings for `endpoints` and `prefix`, with the default timeouts and no TLS.
    pub fn new(endpoints: Vec<String>, prefix: impl Into<String>) -> Self {
        EtcdSettings {
            endpoints,
            prefix: prefix.into(),
            dial_timeout: Duration::from_millis(dvs_config::DEFAULT_ETCD_DIAL_TIMEOUT_MS),
            request_timeout: Duration::from_millis(dvs_config::DEFAULT_ETCD_REQUEST_TIMEOUT_MS),
            tls: None,
        }
    }

    /// The settings of an etcd `[directory]`; `None` for another kind.
    pub fn from_config(config: &DirectoryConfig) -> Option<Self> {
        match config {
            DirectoryConfig::Etcd {
                endpoints,
                prefix,
                dial_timeout_ms,
                request_timeout_ms,
                tls,
            } => Some(EtcdSettings {
                endpoints: endpoints.clone(),
                prefix: prefix.clone(),
                dial_timeout: Duration::from_millis(*dial_timeout_ms),
                request_timeout: Duration::from_millis(*request_timeout_ms),
                tls: tls.clone(),
            }),
            _ => None,
        }
    }

    /// The endpoints with their scheme, as the client dials them.
    fn urls(&self) -> Vec<String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        self.endpoints
            .iter()
            .map(|e| {
                if e.starts_with("http://") || e.starts_with("https://") {
                    e.clone()
                } else {
                    format!("{scheme}://{e}")
                }
            })
            .collect()
    }

    /// The same checks as the config file's (a config built in code skips those).
    fn check(&self) -> Result<(), DirError> {
        let bad = |message: String| Err(DirError::BadConfig { message });
        if self.endpoints.is_empty() {
            return bad("etcd directory: no endpoints".into());
        }
        for e in &self.endpoints {
            if let Some(why) = check_etcd_endpoint(e) {
                return bad(format!("etcd endpoint {e:?}: {why}"));
            }
        }
        for url in self.urls() {
            if self.tls.is_some() != url.starts_with("https://") {
                return bad(format!(
                    "etcd endpoint {url:?}: https:// and TLS settings go together"
                ));
            }
        }
        if let Some(why) = check_etcd_prefix(&self.prefix) {
            return bad(format!("etcd key prefix {:?}: {why}", self.prefix));
        }
        if self.dial_timeout.is_zero() || self.request_timeout.is_zero() {
            return bad("etcd directory: timeouts must be longer than zero".into());
        }
        Ok(())
    }
}

/// A [`Directory`] kept in etcd under a key prefix, shared by every node of a cluster,
/// wherever they run.
///
/// Cloning is cheap; clones share one connection and one client thread, which stops when the
/// last clone and the last watch are gone.
#[derive(Clone)]
pub struct EtcdDirectory {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for EtcdDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdDirectory")
            .field("endpoints", &self.shared.endpoints)
            .field("prefix", &self.shared.settings.prefix)
            .finish_non_exhaustive()
    }
}

/// What every operation and watch of one [`EtcdDirectory`] (and its clones) shares.
struct Shared {
    client: Client,
    settings: EtcdSettings,
    /// The endpoints as errors name them.
    endpoints: String,
    /// The client's runtime; it runs until this is dropped.
    runtime: tokio::runtime::Handle,
    /// Dropping it ends the runtime thread.
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl EtcdDirectory {
    /// Checks the settings, reads the TLS files and starts the client. Does not wait for
    /// etcd: an etcd that is down makes the operations fail (naming the endpoints), not this.
    pub fn connect(settings: EtcdSettings) -> Result<Self, DirError> {
        settings.check()?;
        let urls = settings.urls();
        let mut options = ConnectOptions::new()
            .with_connect_timeout(settings.dial_timeout)
            .with_keep_alive(KEEP_ALIVE_INTERVAL, settings.request_timeout)
            // A member cut off from its leader refuses requests and ends watches, so the
            // client turns to another member instead of reading stale data.
            .with_require_leader(true);
        if let Some(tls) = &settings.tls {
            let read = |op: &'static str, path: &Path| {
                std::fs::read(path).map_err(|source| DirError::Io {
                    op,
                    path: path.to_owned(),
                    source,
                })
            };
            let ca = read("read the etcd CA certificate", &tls.ca)?;
            let cert = read("read the etcd client certificate", &tls.cert)?;
            let key = read("read the etcd client key", &tls.key)?;
            // tonic would take unparsable files silently (no CA) or with a bare "transport
            // error": check them here, naming the file.
            check_pem(&tls.ca, &ca, false)?;
            check_pem(&tls.cert, &cert, false)?;
            check_pem(&tls.key, &key, true)?;
            options = options.with_tls(
                TlsOptions::new()
                    .ca_certificate(Certificate::from_pem(ca))
                    .identity(Identity::from_pem(cert, key)),
            );
        }
        let endpoints = urls.join(",");

        // The client's own runtime thread. The client is made there because tonic spawns its
        // connection tasks on the runtime that creates the channel.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| DirError::Io {
                op: "start the etcd client runtime for",
                path: endpoints.clone().into(),
                source,
            })?;
        let runtime = rt.handle().clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread_urls = urls.clone();
        std::thread::Builder::new()
            .name("dvs-etcd".into())
            .spawn(move || {
                rt.block_on(async move {
                    // Lazy: nothing is dialed until the first request.
                    let client = Client::connect(thread_urls, Some(options)).await;
                    let _ = ready_tx.send(client);
                    let _ = stop_rx.await;
                });
            })
            .map_err(|source| DirError::Io {
                op: "start the etcd client thread for",
                path: endpoints.clone().into(),
                source,
            })?;
        let client = match ready_rx.recv() {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => {
                return Err(DirError::BadConfig {
                    message: format!("etcd client for {endpoints}: {e}"),
                })
            }
            Err(_) => {
                return Err(DirError::BadConfig {
                    message: format!("etcd client for {endpoints}: its thread ended at start"),
                })
            }
        };
        Ok(EtcdDirectory {
            shared: Arc::new(Shared {
                client,
                settings,
                endpoints,
                runtime,
                _stop: stop,
            }),
        })
    }

    /// The prefix under which this directory keeps its keys.
    pub fn prefix(&self) -> &str {
        &self.shared.settings.prefix
    }

    /// Runs `job` on the client's runtime and waits for it from whatever runtime calls.
    async fn on_client_runtime<T, F>(&self, key: &str, job: F) -> Result<T, DirError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, DirError>> + Send + 'static,
    {
        match self.shared.runtime.spawn(job).await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(DirError::Cancelled {
                key: key.to_owned(),
            }),
        }
    }
}

/// Checks that a PEM file holds at least one certificate (or, with `key`, a private key).
fn check_pem(path: &Path, pem: &[u8], key: bool) -> Result<(), DirError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let problem = if key {
        PrivateKeyDer::from_pem_slice(pem)
            .err()
            .map(|e| format!("no private key in it ({e})"))
    } else {
        match CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>() {
            Ok(certs) if certs.is_empty() => Some("no certificate in it".to_owned()),
            Ok(_) => None,
            Err(e) => Some(format!("bad PEM: {e}")),
        }
    };
    match problem {
        None => Ok(()),
        Some(why) => Err(DirError::BadConfig {
            message: format!("etcd TLS file {}: {why}", path.display()),
        }),
    }
}

/// How an etcd-client error bears on retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// The request never left (no connection could be made): safe to retry, even a write.
    NotSent,
    /// The request may or may not have been carried out (connection lost, leader changed,
    /// etcd's own timeout): a read is retried, a write is reported.
    Unknown,
    /// etcd answered with an error that a retry would not change.
    Refused,
}

fn classify(e: &etcd_client::Error) -> Failure {
    use tonic::Code;
    match e {
        etcd_client::Error::TransportError(_) => Failure::NotSent,
        etcd_client::Error::IoError(_) => Failure::Unknown,
        etcd_client::Error::GRpcStatus(status) => {
            let mut source = std::error::Error::source(status);
            while let Some(s) = source {
                if s.downcast_ref::<tonic::ConnectError>().is_some() {
                    return Failure::NotSent;
                }
                source = s.source();
            }
            // With `require_leader`, a member without a leader refuses a request before it
            // does anything with it (etcd's own client matches this message too).
            if status.code() == Code::Unavailable && status.message() == "etcdserver: no leader" {
                return Failure::NotSent;
            }
            match status.code() {
                Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Cancelled
                | Code::Unknown
                | Code::Internal
                | Code::Aborted => Failure::Unknown,
                _ => Failure::Refused,
            }
        }
        _ => Failure::Refused,
    }
}

/// An etcd-client error in one line: for a gRPC status its message and the innermost cause
/// ("tcp connect error: Connection refused (os error 111)"), not tonic's nested debug output.
fn describe(e: &etcd_client::Error) -> String {
    let etcd_client::Error::GRpcStatus(status) = e else {
        return e.to_string();
    };
    let mut root: Option<&(dyn std::error::Error + 'static)> = None;
    let mut source = std::error::Error::source(status);
    while let Some(s) = source {
        root = Some(s);
        source = s.source();
    }
    match root {
        Some(root) if root.to_string() != status.message() => {
            format!("{}: {root}", status.message())
        }
        _ => status.message().to_owned(),
    }
}

/// One etcd entry as the trait shows it: the key without the prefix, the value as text.
/// `Err` names the whole etcd key, which is what someone cleaning up by hand needs.
fn entry(prefix: &str, kv: &KeyValue) -> Result<(String, Versioned), DirError> {
    let bad = |reason: &'static str| DirError::BadEntry {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        reason,
    };
    let key = std::str::from_utf8(kv.key()).map_err(|_| bad("the key is not UTF-8 text"))?;
    let key = key
        .strip_prefix(prefix)
        .ok_or_else(|| bad("the key is outside the directory's prefix"))?;
    let value = std::str::from_utf8(kv.value())
        .map_err(|_| bad("its value is not UTF-8 text (written by something other than dvs?)"))?;
    let version = u64::try_from(kv.mod_revision())
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| bad("etcd reports no valid revision for it"))?;
    Ok((
        key.to_owned(),
        Versioned {
            value: value.to_owned(),
            version,
        },
    ))
}

impl Shared {
    fn full_key(&self, key: &str) -> String {
        format!("{}{key}", self.settings.prefix)
    }

    fn unavailable(&self, op: &'static str, key: &str, reason: String) -> DirError {
        DirError::Unavailable {
            endpoints: self.endpoints.clone(),
            op,
            key: key.to_owned(),
            reason,
        }
    }

    /// Runs `attempt` until it succeeds, fails for good, or the request timeout is over.
    ///
    /// A request that never left is retried (another member may answer). One whose fate is
    /// unknown is retried only if `idempotent`; a write reports it, since trying again could
    /// apply it twice or report a conflict with itself.
    async fn call<T, F, Fut>(
        &self,
        op: &'static str,
        key: &str,
        idempotent: bool,
        mut attempt: F,
    ) -> Result<T, DirError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let timeout = self.settings.request_timeout;
        let deadline = Instant::now() + timeout;
        let mut pause = FIRST_RETRY_PAUSE;
        let mut last_error: Option<String> = None;
        let gave_up = |last_error: Option<String>| {
            self.unavailable(
                op,
                key,
                format!(
                    "no answer within {timeout:?}{}{}",
                    last_error.map_or(String::new(), |e| format!(" (last error: {e})")),
                    if idempotent {
                        ""
                    } else {
                        "; the change may or may not have been applied"
                    }
                ),
            )
        };
        loop {
            let err = match tokio::time::timeout_at(deadline, attempt(self.client.clone())).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => e,
                Err(_) => return Err(gave_up(last_error)),
            };
            match classify(&err) {
                Failure::NotSent => {}
                Failure::Unknown if idempotent => {}
                Failure::Unknown => {
                    return Err(self.unavailable(
                        op,
                        key,
                        format!(
                            "{}; the change may or may not have been applied",
                            describe(&err)
                        ),
                    ))
                }
                Failure::Refused => {
                    return Err(DirError::Refused {
                        endpoints: self.endpoints.clone(),
                        op,
                        key: key.to_owned(),
                        message: describe(&err),
                    })
                }
            }
            last_error = Some(describe(&err));
            let now = Instant::now();
            if now >= deadline {
                return Err(gave_up(last_error));
            }
            // The last try comes at the deadline, so a member that returns in time is used.
            tokio::time::sleep_until((now + pause).min(deadline)).await;
            pause = (pause * 2).min(MAX_RETRY_PAUSE);
        }
    }

    /// The entries under `full_prefix` and the revision they were read at.
    async fn read_prefix(
        &self,
        op: &'static str,
        full_prefix: &str,
    ) -> Result<(Vec<(String, Versioned)>, i64), DirError> {
        let shown = full_prefix
            .strip_prefix(&self.settings.prefix)
            .unwrap_or(full_prefix);
        let resp = self
            .call(op, shown, true, |mut c| {
                let k = full_prefix.to_owned();
                async move { c.get(k, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let entries = resp
            .kvs()
            .iter()
            .map(|kv| entry(&self.settings.prefix, kv))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((entries, revision))
    }

    async fn get(&self, key: String) -> Result<Option<Versioned>, DirError> {
        let full = self.full_key(&key);
        let resp = self
            .call("get", &key, true, |mut c| {
                let k = full.clone();
                async move { c.get(k, None).await }
            })
            .await?;
        match resp.kvs().first() {
            None => Ok(None),
            Some(kv) => Ok(Some(entry(&self.settings.prefix, kv)?.1)),
        }
    }

    async fn cas(
        &self,
        key: String,
        expect: Option<u64>,
        value: Option<String>,
    ) -> Result<CasOutcome, DirError> {
        let full = self.full_key(&key);
        let compare = match expect {
            None => Compare::create_revision(full.clone(), CompareOp::Equal, 0),
            // Versions are > 0, and an absent key's mod_revision compares as 0: an expected
            // version of 0 (or one etcd cannot hold) never matches, as in the embedded store.
            Some(v) => match i64::try_from(v) {
                Ok(v) if v > 0 => Compare::mod_revision(full.clone(), CompareOp::Equal, v),
                _ => {
                    return Ok(CasOutcome::Conflict {
                        current: self.get(key).await?,
                    })
                }
            },
        };
        let change = match &value {
            Some(v) => TxnOp::put(full.clone(), v.clone(), None),
            None => TxnOp::delete(full.clone(), None),
        };
        let txn = Txn::new()
            .when([compare])
            .and_then([change])
            .or_else([TxnOp::get(full.clone(), None)]);
        let resp = self
            .call("compare-and-set", &key, false, |mut c| {
                let t = txn.clone();
                async move { c.txn(t).await }
            })
            .await?;
        if resp.succeeded() {
            // The txn's revision: the put's new mod_revision, the delete's revision, or for a
            // delete of an absent key (no change) the store's current revision.
            let version = resp.header().map_or(0, |h| h.revision());
            return Ok(CasOutcome::Done {
                version: u64::try_from(version).unwrap_or(0),
            });
        }
        let current = resp
            .op_responses()
            .into_iter()
            .find_map(|r| match r {
                TxnOpResponse::Get(g) => g.kvs().first().cloned(),
                _ => None,
            })
            .map(|kv| entry(&self.settings.prefix, &kv).map(|(_, v)| v))
            .transpose()?;
        Ok(CasOutcome::Conflict { current })
    }
}

#[async_trait::async_trait]
impl Directory for EtcdDirectory {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, DirError> {
        check_key(key)?;
        let shared = self.shared.clone();
        let key = key.to_owned();
        self.on_client_runtime(&key.clone(), async move { shared.get(key).await })
            .await
    }

    async fn get_prefix(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, DirError> {
        let shared = self.shared.clone();
        let full = self.shared.full_key(prefix);
        self.on_client_runtime(prefix, async move {
            Ok(shared.read_prefix("get_prefix", &full).await?.0)
        })
        .await
    }

    async fn cas(
        &self,
        key: &str,
        expect: Option<u64>,
        value: Option<String>,
    ) -> Result<CasOutcome, DirError> {
        check_key(key)?;
        let shared = self.shared.clone();
        let key = key.to_owned();
        self.on_client_runtime(
            &key.clone(),
            async move { shared.cas(key, expect, value).await },
        )
        .await
    }

    async fn watch(
        &self,
        prefix: &str,
    ) -> Result<(Vec<(String, Versioned)>, UnboundedReceiver<DirEvent>), DirError> {
        let shared = self.shared.clone();
        let full = self.shared.full_key(prefix);
        self.on_client_runtime(prefix, async move {
            let (snapshot, revision) = shared.read_prefix("watch", &full).await?;
            let (tx, rx) = mpsc::unbounded_channel();
            let follower = Follower {
                view: snapshot.iter().cloned().collect(),
                next_revision: revision + 1,
                shared,
                full_prefix: full,
                tx,
            };
            tokio::spawn(follower.run());
            Ok((snapshot, rx))
        })
        .await
    }
}

/// A running watch: what it has reported so far, and where to resume.
struct Follower {
    /// Holding it keeps the client (and its runtime) alive as long as the watch.
    shared: Arc<Shared>,
    full_prefix: String,
    /// The entries under the prefix as the receiver knows them, for the re-read after a
    /// compaction.
    view: BTreeMap<String, Versioned>,
    /// The first revision not yet reported.
    next_revision: i64,
    tx: UnboundedSender<DirEvent>,
}

/// Why a watch stream ended.
enum StreamEnd {
    /// The receiver was dropped, or an entry could not be reported: the watch is over.
    Stop,
    /// The connection was lost or etcd ended the stream: watch again from `next_revision`.
    /// `was_up`: the stream had been established, so this is a new outage.
    Reconnect { why: String, was_up: bool },
    /// The revision to resume from is gone (compacted), or the store went back in time: read
    /// the prefix again.
    Resync(String),
}

impl Follower {
    fn shown_prefix(&self) -> &str {
        self.full_prefix
            .strip_prefix(&self.shared.settings.prefix)
            .unwrap_or(&self.full_prefix)
    }

    async fn run(mut self) {
        let mut pause = FIRST_RETRY_PAUSE;
        // Whether an outage was logged and not yet its end: one line each, not one a retry.
        let mut down = false;
        loop {
            match self.stream(&mut down).await {
                StreamEnd::Stop => return,
                StreamEnd::Reconnect { why, was_up } => {
                    if was_up {
                        pause = FIRST_RETRY_PAUSE;
                    }
                    if !down {
                        warn!(
                            "directory watch of {:?}: lost etcd at {} ({why}); will resume from revision {}",
                            self.shown_prefix(),
                            self.shared.endpoints,
                            self.next_revision
                        );
                        down = true;
                    }
                }
                StreamEnd::Resync(why) => {
                    info!(
                        "directory watch of {:?}: {why}; reading the prefix again",
                        self.shown_prefix()
                    );
                    match self.resync().await {
                        Ok(()) => {
                            pause = FIRST_RETRY_PAUSE;
                            continue;
                        }
                        Err(DirError::BadEntry { key, reason }) => {
                            error!("directory watch ends: etcd key {key:?}: {reason}");
                            return;
                        }
                        Err(e) if !down => {
                            warn!("directory watch of {:?}: {e}", self.shown_prefix());
                            down = true;
                        }
                        Err(_) => {}
                    }
                }
            }
            tokio::select! {
                _ = self.tx.closed() => return,
                _ = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(MAX_RETRY_PAUSE);
        }
    }

    /// Opens a watch from `next_revision` and reports its events until it ends.
    async fn stream(&mut self, down: &mut bool) -> StreamEnd {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(self.next_revision);
        let mut client = self.shared.client.clone();
        let opened = tokio::select! {
            _ = self.tx.closed() => return StreamEnd::Stop,
            opened = tokio::time::timeout(
                self.shared.settings.request_timeout,
                client.watch(self.full_prefix.clone(), Some(options)),
            ) => opened,
        };
        let mut stream = match opened {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return StreamEnd::Reconnect {
                    why: e.to_string(),
                    was_up: false,
                }
            }
            Err(_) => {
                return StreamEnd::Reconnect {
                    why: "no answer to the watch request".into(),
                    was_up: false,
                }
            }
        };
        let mut was_up = false;
        loop {
            let message = tokio::select! {
                _ = self.tx.closed() => return StreamEnd::Stop,
                message = stream.message() => message,
            };
            let resp = match message {
                Ok(Some(resp)) => resp,
                Ok(None) => {
                    return StreamEnd::Reconnect {
                        why: "etcd ended the watch stream".into(),
                        was_up,
                    }
                }
                Err(e) => {
                    return StreamEnd::Reconnect {
                        why: e.to_string(),
                        was_up,
                    }
                }
            };
            if resp.compact_revision() > 0 {
                return StreamEnd::Resync(format!(
                    "revision {} is compacted (etcd keeps from {})",
                    self.next_revision,
                    resp.compact_revision()
                ));
            }
            if resp.canceled() {
                return StreamEnd::Reconnect {
                    why: format!("etcd cancelled the watch: {}", resp.cancel_reason()),
                    was_up,
                };
            }
            if resp.created() {
                let now = resp.header().map_or(0, |h| h.revision());
                // A store whose revision is behind what was already reported was restored or
                // replaced: the revisions to resume from mean nothing there.
                if now + 1 < self.next_revision {
                    return StreamEnd::Resync(format!(
                        "etcd's revision {now} is behind the {} already seen",
                        self.next_revision - 1
                    ));
                }
                was_up = true;
                if std::mem::take(down) {
                    info!(
                        "directory watch of {:?}: etcd is back; resumed from revision {}",
                        self.shown_prefix(),
                        self.next_revision
                    );
                }
            }
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                let revision = kv.mod_revision();
                let dir_event = match event.event_type() {
                    EventType::Put => match entry(&self.shared.settings.prefix, kv) {
                        Ok((key, v)) => {
                            self.view.insert(key.clone(), v.clone());
                            DirEvent::Put {
                                key,
                                value: v.value,
                                version: v.version,
                            }
                        }
                        Err(e) => {
                            // The trait cannot carry this event: end the watch, as documented;
                            // watching again reports the same error until the key is fixed.
                            error!("directory watch of {:?} ends: {e}", self.shown_prefix());
                            return StreamEnd::Stop;
                        }
                    },
                    EventType::Delete => {
                        let key = match std::str::from_utf8(kv.key())
                            .ok()
                            .and_then(|k| k.strip_prefix(&self.shared.settings.prefix))
                        {
                            Some(k) => k.to_owned(),
                            None => {
                                error!(
                                    "directory watch of {:?} ends: etcd key {:?} is not UTF-8 text",
                                    self.shown_prefix(),
                                    String::from_utf8_lossy(kv.key())
                                );
                                return StreamEnd::Stop;
                            }
                        };
                        self.view.remove(&key);
                        DirEvent::Delete { key }
                    }
                };
                if self.tx.send(dir_event).is_err() {
                    return StreamEnd::Stop;
                }
                self.next_revision = self.next_revision.max(revision + 1);
            }
        }
    }

    /// Reads the prefix again and reports the differences from what the receiver knows:
    /// deletes first, then puts in the order they were made (as the embedded backend does
    /// when its watcher falls behind its log).
    async fn resync(&mut self) -> Result<(), DirError> {
        let (entries, revision) = self
            .shared
            .read_prefix("watch (re-read)", &self.full_prefix)
            .await?;
        let now: BTreeMap<String, Versioned> = entries.into_iter().collect();
        for event in crate::net_difference(&self.view, &now) {
            if self.tx.send(event).is_err() {
                break;
            }
        }
        self.view = now;
        self.next_revision = revision + 1;
        Ok(())
    }
}
