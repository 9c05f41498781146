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
//! - leases are etcd's leases, and [`Directory::cas_leased`] puts with the lease in the `Txn`
//!   (see `lease.rs`);
//! - [`Directory::watch`] is a range read, then a watch starting at the read's revision + 1, so
//!   nothing that happens between the two is lost. After a lost connection the watch resumes
//!   from the revision after the last one it saw; if etcd has compacted that revision away, the
//!   prefix is read again and the differences are sent as events.
//!
//! The client runs on a runtime of its own (one thread): callers may come from any runtime,
//! or open the directory outside of one, and a watch keeps running whatever the caller's
//! runtime does. Every operation has a deadline (`request_timeout`); past it, or when etcd
//! refuses, the error names the endpoints.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use dvs_config::{check_etcd_endpoint, check_etcd_prefix, DirectoryConfig, EtcdTlsConfig};
use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::{check_key, CasOutcome, DirError, DirEvent, Directory, LeaseId, Versioned};

mod call;
mod lease;
mod watch;

use watch::Follower;

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
        self.on_client_runtime(&key.clone(), async move {
            shared.cas(key, expect, value, None).await
        })
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
            let rx = Follower::start(shared, full, &snapshot, revision);
            Ok((snapshot, rx))
        })
        .await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, DirError> {
        let shared = self.shared.clone();
        self.on_client_runtime("lease", async move { shared.grant_lease(ttl).await })
            .await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), DirError> {
        let shared = self.shared.clone();
        self.on_client_runtime(&format!("lease {lease}"), async move {
            shared.keep_alive(lease).await
        })
        .await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), DirError> {
        let shared = self.shared.clone();
        self.on_client_runtime(&format!("lease {lease}"), async move {
            shared.revoke_lease(lease).await
        })
        .await
    }

    async fn cas_leased(
        &self,
        key: &str,
        expect: Option<u64>,
        value: String,
        lease: LeaseId,
    ) -> Result<CasOutcome, DirError> {
        check_key(key)?;
        let shared = self.shared.clone();
        let key = key.to_owned();
        self.on_client_runtime(&key.clone(), async move {
            shared.cas(key, expect, Some(value), Some(lease)).await
        })
        .await
    }
}
