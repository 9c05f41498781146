//! Leases on etcd: etcd's own (`LeaseGrant`, one `LeaseKeepAlive` request and its response
//! per [`Directory::keep_alive`](crate::Directory::keep_alive), `LeaseRevoke`); a leased put
//! is a put with the lease in the compare-and-set `Txn` (see `call.rs`). Each call has the
//! request timeout as its deadline, like every other operation.
//!
//! TTLs are whole seconds in etcd: a TTL is rounded up, to at least 1 s (etcd may raise it
//! further to its minimum, 1.5 election timeouts).

use std::time::Duration;

use tonic::Code;

use super::Shared;
use crate::{DirError, LeaseId};

/// A TTL in whole seconds, as etcd takes it: rounded up, at least 1.
pub(super) fn ttl_seconds(ttl: Duration) -> i64 {
    let secs = ttl
        .as_secs()
        .saturating_add(u64::from(ttl.subsec_nanos() > 0));
    i64::try_from(secs.max(1)).unwrap_or(i64::MAX)
}

/// Whether etcd refused a request because the lease it names does not exist (any more).
pub(super) fn lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(status) => {
            status.code() == Code::NotFound && status.message().contains("lease not found")
        }
        // etcd-client's keep-alive reports a lease etcd no longer has (TTL <= 0) so.
        etcd_client::Error::LeaseKeepAliveError(message) => message == "lease not found",
        _ => false,
    }
}

/// How errors name a lease (they have a key field; a lease has no key).
fn shown(lease: LeaseId) -> String {
    format!("lease {lease}")
}

impl Shared {
    /// A new lease of `ttl` (rounded up to whole seconds). A grant whose fate is unknown is
    /// retried: a lease granted twice leaves one unused, which expires on its own.
    pub(super) async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, DirError> {
        let secs = ttl_seconds(ttl);
        let resp = self
            .call("lease grant", "lease", true, |mut c| async move {
                c.lease_grant(secs, None).await
            })
            .await?;
        Ok(LeaseId(resp.id()))
    }

    /// One keep-alive request and its response. Retried like a read: renewing twice is
    /// renewing.
    pub(super) async fn keep_alive(&self, lease: LeaseId) -> Result<(), DirError> {
        let alive = self
            .call(
                "lease keep-alive",
                &shown(lease),
                true,
                |mut c| async move {
                    match c.lease_keep_alive(lease.0).await {
                        Ok(_) => Ok(true),
                        Err(e) if lease_not_found(&e) => Ok(false),
                        // etcd-client's name for a stream that ended before its answer: the fate
                        // of the request is unknown, so let `call` retry it.
                        Err(etcd_client::Error::WatchError(message)) => {
                            Err(etcd_client::Error::IoError(std::io::Error::other(format!(
                                "keep-alive stream ended: {message}"
                            ))))
                        }
                        Err(e) => Err(e),
                    }
                },
            )
            .await?;
        if alive {
            Ok(())
        } else {
            Err(DirError::LeaseExpired { lease })
        }
    }

    /// Revokes `lease`; one that is already gone is fine (its keys are gone too).
    pub(super) async fn revoke_lease(&self, lease: LeaseId) -> Result<(), DirError> {
        self.call("lease revoke", &shown(lease), true, |mut c| async move {
            match c.lease_revoke(lease.0).await {
                Ok(_) => Ok(()),
                Err(e) if lease_not_found(&e) => Ok(()),
                Err(e) => Err(e),
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_round_up_to_whole_seconds_at_least_one() {
        assert_eq!(ttl_seconds(Duration::ZERO), 1);
        assert_eq!(ttl_seconds(Duration::from_millis(1)), 1);
        assert_eq!(ttl_seconds(Duration::from_secs(1)), 1);
        assert_eq!(ttl_seconds(Duration::from_millis(1001)), 2);
        assert_eq!(ttl_seconds(Duration::from_secs(30)), 30);
        assert_eq!(ttl_seconds(Duration::MAX), i64::MAX);
    }
}
