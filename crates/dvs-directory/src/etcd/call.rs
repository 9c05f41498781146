//! Running one request against etcd: retries within the request timeout, and what an
//! etcd-client error means for the caller; the key/value operations built on it.

use std::future::Future;

use etcd_client::{
    Client, Compare, CompareOp, GetOptions, KeyValue, PutOptions, Txn, TxnOp, TxnOpResponse,
};
use tokio::time::Instant;

use super::lease::lease_not_found;
use super::{Shared, FIRST_RETRY_PAUSE, MAX_RETRY_PAUSE};
use crate::{CasOutcome, DirError, LeaseId, Versioned};

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
pub(super) fn entry(prefix: &str, kv: &KeyValue) -> Result<(String, Versioned), DirError> {
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
    pub(super) fn full_key(&self, key: &str) -> String {
        format!("{}{key}", self.settings.prefix)
    }

    pub(super) fn unavailable(&self, op: &'static str, key: &str, reason: String) -> DirError {
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
    pub(super) async fn call<T, F, Fut>(
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
    pub(super) async fn read_prefix(
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

    pub(super) async fn get(&self, key: String) -> Result<Option<Versioned>, DirError> {
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

    /// A compare-and-set; a put is attached to `lease` if one is given (a put without one
    /// detaches the key from any lease it had, as etcd does).
    pub(super) async fn cas(
        &self,
        key: String,
        expect: Option<u64>,
        value: Option<String>,
        lease: Option<LeaseId>,
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
            Some(v) => TxnOp::put(
                full.clone(),
                v.clone(),
                // etcd reads lease 0 as "no lease"; -1, which no lease has (etcd's ids are
                // positive), makes it report the lease not found, as for any unknown id.
                lease.map(|l| PutOptions::new().with_lease(if l.0 == 0 { -1 } else { l.0 })),
            ),
            None => TxnOp::delete(full.clone(), None),
        };
        let txn = Txn::new()
            .when([compare])
            .and_then([change])
            .or_else([TxnOp::get(full.clone(), None)]);
        let resp = self
            .call("compare-and-set", &key, false, |mut c| {
                let t = txn.clone();
                async move {
                    match c.txn(t).await {
                        // The comparison held but the put's lease is gone: nothing written.
                        Err(e) if lease_not_found(&e) => Ok(None),
                        r => r.map(Some),
                    }
                }
            })
            .await?;
        let Some(resp) = resp else {
            return Err(DirError::LeaseExpired {
                lease: lease.expect("only a leased put fails for its lease"),
            });
        };
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
