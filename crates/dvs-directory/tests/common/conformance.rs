//! What every [`Directory`] backend must do, written against the trait only, so that the
//! embedded store and etcd are held to the same semantics (versions, CAS outcomes, prefix
//! listings, watch order, leases). `conformance_tests!` instantiates every case for one
//! backend.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use dvs_directory::{CasOutcome, DirError, DirEvent, Directory, LeaseId, Versioned};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::timeout;

use super::PATIENCE;

/// A store under test, fresh for each case (nobody else writes to it).
pub trait Store: Send + Sync {
    /// A new handle on the store, as another process would open it.
    fn handle(&self) -> Arc<dyn Directory>;

    /// The TTL of the short leases the lease cases grant: as short as the backend allows,
    /// to keep the tests quick.
    fn short_ttl(&self) -> Duration {
        Duration::from_secs(1)
    }
}

/// One test function per case, for the store that `$make` returns (`None`: skip).
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr) => {
        mod conformance {
            use super::*;
            use $crate::common::conformance as c;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn put_get_delete_via_cas() {
                let Some(s) = ($make)("put_get_delete_via_cas") else {
                    return;
                };
                c::put_get_delete_via_cas(&s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn cas_conflict_returns_current() {
                let Some(s) = ($make)("cas_conflict_returns_current") else {
                    return;
                };
                c::cas_conflict_returns_current(&s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn delete_of_absent_key_is_a_no_op() {
                let Some(s) = ($make)("delete_of_absent_key_is_a_no_op") else {
                    return;
                };
                c::delete_of_absent_key_is_a_no_op(&s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn versions_only_grow_also_across_delete_and_recreate() {
                let Some(s) = ($make)("versions_only_grow") else {
                    return;
                };
                c::versions_only_grow_also_across_delete_and_recreate(&s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn prefix_listing_is_sorted_and_bounded() {
                let Some(s) = ($make)("prefix_listing_is_sorted_and_bounded") else {
                    return;
                };
                c::prefix_listing_is_sorted_and_bounded(&s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn empty_key_is_rejected() {
                let Some(s) = ($make)("empty_key_is_rejected") else {
                    return;
                };
                c::empty_key_is_rejected(&s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn values_are_opaque_text() {
                let Some(s) = ($make)("values_are_opaque_text") else {
                    return;
                };
                c::values_are_opaque_text(&s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn watch_sees_changes_from_another_handle_in_order() {
                let Some(s) = ($make)("watch_sees_changes_in_order") else {
                    return;
                };
                c::watch_sees_changes_from_another_handle_in_order(&s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn watch_started_during_writes_loses_and_repeats_nothing() {
                let Some(s) = ($make)("watch_started_during_writes") else {
                    return;
                };
                c::watch_started_during_writes_loses_and_repeats_nothing(&s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn lease_kept_alive_outlives_its_ttl() {
                let Some(s) = ($make)("lease_kept_alive_outlives_its_ttl") else {
                    return;
                };
                c::lease_kept_alive_outlives_its_ttl(&s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn expired_lease_deletes_only_its_keys_and_watchers_see_it() {
                let Some(s) = ($make)("expired_lease_deletes_only_its_keys") else {
                    return;
                };
                c::expired_lease_deletes_only_its_keys_and_watchers_see_it(&s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn revoked_lease_deletes_its_keys_at_once() {
                let Some(s) = ($make)("revoked_lease_deletes_its_keys_at_once") else {
                    return;
                };
                c::revoked_lease_deletes_its_keys_at_once(&s).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn leased_cas_respects_versions() {
                let Some(s) = ($make)("leased_cas_respects_versions") else {
                    return;
                };
                c::leased_cas_respects_versions(&s).await;
            }
            #[test]
            fn concurrent_cas_from_several_handles_loses_no_update() {
                let Some(s) = ($make)("concurrent_cas") else {
                    return;
                };
                c::concurrent_cas_from_several_handles_loses_no_update(&s);
            }
        }
    };
}

fn s(v: &str) -> Option<String> {
    Some(v.to_owned())
}

/// Creates `key` (which must be absent) and returns its version.
pub async fn put_new(d: &dyn Directory, key: &str, value: &str) -> u64 {
    match d.cas(key, None, s(value)).await.unwrap() {
        CasOutcome::Done { version } => version,
        other => panic!("put of new key {key} failed: {other:?}"),
    }
}

/// Replaces version `v` of `key`; returns the new version.
pub async fn replace(d: &dyn Directory, key: &str, v: u64, value: Option<&str>) -> u64 {
    match d.cas(key, Some(v), value.map(str::to_owned)).await.unwrap() {
        CasOutcome::Done { version } => version,
        other => panic!("change of {key}@{v} failed: {other:?}"),
    }
}

/// The next event, failing the test if none comes in time or the watch ends.
pub async fn next_event(rx: &mut UnboundedReceiver<DirEvent>) -> DirEvent {
    timeout(PATIENCE, rx.recv())
        .await
        .expect("no event in time")
        .expect("watch ended")
}

/// `n` events, in the order they come.
pub async fn events(rx: &mut UnboundedReceiver<DirEvent>, n: usize) -> Vec<DirEvent> {
    let mut seen = Vec::with_capacity(n);
    for _ in 0..n {
        seen.push(next_event(rx).await);
    }
    seen
}

/// Asserts that nothing more arrives for a moment.
pub async fn no_more_events(rx: &mut UnboundedReceiver<DirEvent>) {
    if let Ok(Some(ev)) = timeout(Duration::from_millis(300), rx.recv()).await {
        panic!("unexpected event {ev:?}");
    }
}

pub async fn put_get_delete_via_cas(store: &dyn Store) {
    let d = store.handle();
    assert_eq!(d.get("ep/1").await.unwrap(), None);

    let v1 = put_new(d.as_ref(), "ep/1", "node-a").await;
    assert!(v1 > 0);
    assert_eq!(
        d.get("ep/1").await.unwrap(),
        Some(Versioned {
            value: "node-a".into(),
            version: v1
        })
    );

    let v2 = replace(d.as_ref(), "ep/1", v1, Some("node-b")).await;
    assert!(v2 > v1);
    assert_eq!(d.get("ep/1").await.unwrap().unwrap().value, "node-b");

    let vd = replace(d.as_ref(), "ep/1", v2, None).await;
    assert!(vd > v2);
    assert_eq!(d.get("ep/1").await.unwrap(), None);

    // A fresh handle (as another process would) sees the same state.
    let other = store.handle();
    put_new(d.as_ref(), "ep/2", "x").await;
    assert_eq!(other.get("ep/2").await.unwrap().unwrap().value, "x");
    assert_eq!(other.get("ep/1").await.unwrap(), None);
}

pub async fn cas_conflict_returns_current(store: &dyn Store) {
    let d = store.handle();
    let v = put_new(d.as_ref(), "k", "one").await;
    let current = Some(Versioned {
        value: "one".into(),
        version: v,
    });
    let conflict = CasOutcome::Conflict {
        current: current.clone(),
    };

    // Expected absent, but present.
    assert_eq!(d.cas("k", None, s("two")).await.unwrap(), conflict);
    // Stale version, for a put and for a delete.
    assert_eq!(d.cas("k", Some(v + 100), s("two")).await.unwrap(), conflict);
    assert_eq!(d.cas("k", Some(v + 100), None).await.unwrap(), conflict);
    // An older version of the key (the one before the last write) does not match either.
    let v_new = replace(d.as_ref(), "k", v, Some("one")).await;
    assert_eq!(
        d.cas("k", Some(v), s("stale")).await.unwrap(),
        CasOutcome::Conflict {
            current: Some(Versioned {
                value: "one".into(),
                version: v_new
            })
        }
    );
    // Expected present, but absent; also with version 0, which no key ever has.
    assert_eq!(
        d.cas("missing", Some(v), s("x")).await.unwrap(),
        CasOutcome::Conflict { current: None }
    );
    assert_eq!(
        d.cas("missing", Some(0), s("x")).await.unwrap(),
        CasOutcome::Conflict { current: None }
    );
    assert_eq!(
        d.cas("missing", Some(0), None).await.unwrap(),
        CasOutcome::Conflict { current: None }
    );
    // Nothing changed.
    assert_eq!(d.get("k").await.unwrap().unwrap().version, v_new);
    assert_eq!(d.get("missing").await.unwrap(), None);
}

pub async fn delete_of_absent_key_is_a_no_op(store: &dyn Store) {
    let d = store.handle();
    let v = put_new(d.as_ref(), "other", "x").await;
    assert_eq!(
        d.cas("k", None, None).await.unwrap(),
        CasOutcome::Done { version: v }
    );
    // No revision was consumed.
    assert_eq!(put_new(d.as_ref(), "k", "y").await, v + 1);
}

pub async fn versions_only_grow_also_across_delete_and_recreate(store: &dyn Store) {
    let d = store.handle();
    let mut last = 0;
    for round in 0..5 {
        let v = put_new(d.as_ref(), "k", &format!("r{round}")).await;
        assert!(v > last, "version {v} after {last}");
        let v2 = replace(d.as_ref(), "k", v, Some("again")).await;
        assert!(v2 > v);
        let vd = replace(d.as_ref(), "k", v2, None).await;
        assert!(vd > v2);
        last = vd;
        // Writes to other keys advance the revision too.
        let vo = put_new(d.as_ref(), &format!("other/{round}"), "x").await;
        assert_eq!(vo, vd + 1);
        last = last.max(vo);
    }
}

pub async fn prefix_listing_is_sorted_and_bounded(store: &dyn Store) {
    let d = store.handle();
    for k in ["ep/2", "ep/10", "ep/1", "epx", "node/1", "e", "ep0"] {
        put_new(d.as_ref(), k, &format!("v-{k}")).await;
    }
    let keys = |l: Vec<(String, Versioned)>| l.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
    assert_eq!(
        keys(d.get_prefix("ep/").await.unwrap()),
        ["ep/1", "ep/10", "ep/2"]
    );
    assert_eq!(
        keys(d.get_prefix("ep").await.unwrap()),
        ["ep/1", "ep/10", "ep/2", "ep0", "epx"]
    );
    assert_eq!(d.get_prefix("").await.unwrap().len(), 7);
    assert!(d.get_prefix("zzz").await.unwrap().is_empty());
    let listed = d.get_prefix("node/").await.unwrap();
    assert_eq!(listed[0].1, d.get("node/1").await.unwrap().unwrap());
    // A watch's snapshot is the same listing.
    let (snapshot, _rx) = d.watch("ep/").await.unwrap();
    assert_eq!(snapshot, d.get_prefix("ep/").await.unwrap());
}

pub async fn empty_key_is_rejected(store: &dyn Store) {
    let d = store.handle();
    assert!(matches!(
        d.cas("", None, s("x")).await,
        Err(DirError::InvalidKey { .. })
    ));
    assert!(matches!(d.get("").await, Err(DirError::InvalidKey { .. })));
    assert!(d.get_prefix("").await.unwrap().is_empty());
}

pub async fn values_are_opaque_text(store: &dyn Store) {
    let d = store.handle();
    let big = "x".repeat(100_000);
    for (k, v) in [
        ("launch/0/1", r#"["/bin/sh","-c","echo \"hi\"\n"]"#),
        ("unicode/é", "ünïcødé ✓ \u{1F600}"),
        ("empty", ""),
        ("big", big.as_str()),
    ] {
        let version = put_new(d.as_ref(), k, v).await;
        assert_eq!(
            d.get(k).await.unwrap(),
            Some(Versioned {
                value: v.to_owned(),
                version
            }),
            "{k}"
        );
    }
}

pub async fn watch_sees_changes_from_another_handle_in_order(store: &dyn Store) {
    let watcher = store.handle();
    let writer = store.handle();
    let w = writer.as_ref();
    let v0 = put_new(w, "ep/0", "before").await;
    put_new(w, "node/1", "outside the prefix").await;

    let (snapshot, mut rx) = watcher.watch("ep/").await.unwrap();
    assert_eq!(
        snapshot,
        vec![(
            "ep/0".to_owned(),
            Versioned {
                value: "before".into(),
                version: v0
            }
        )]
    );

    // Several changes in quick succession, including one to a key that disappears again
    // before the watcher could look: every change must still be reported, in order.
    let v1 = put_new(w, "ep/1", "a").await;
    let v2 = replace(w, "ep/1", v1, Some("b")).await;
    put_new(w, "node/2", "ignored").await;
    put_new(w, "ep", "not under ep/ either").await;
    replace(w, "ep/0", v0, None).await;
    replace(w, "ep/1", v2, None).await;
    let v3 = put_new(w, "ep/1", "c").await;

    let expected = vec![
        DirEvent::Put {
            key: "ep/1".into(),
            value: "a".into(),
            version: v1,
        },
        DirEvent::Put {
            key: "ep/1".into(),
            value: "b".into(),
            version: v2,
        },
        DirEvent::Delete { key: "ep/0".into() },
        DirEvent::Delete { key: "ep/1".into() },
        DirEvent::Put {
            key: "ep/1".into(),
            value: "c".into(),
            version: v3,
        },
    ];
    assert_eq!(events(&mut rx, expected.len()).await, expected);

    // And later changes keep coming.
    put_new(w, "ep/9", "late").await;
    assert_eq!(next_event(&mut rx).await.key(), "ep/9");
    no_more_events(&mut rx).await;
}

/// A watch opened while another handle writes: the snapshot plus the events must be exactly
/// the history, each write once, whatever instant the watch's read happened at.
pub async fn watch_started_during_writes_loses_and_repeats_nothing(store: &dyn Store) {
    const WRITES: u64 = 60;
    let writer = store.handle();
    let watcher = store.handle();
    let first = put_new(writer.as_ref(), "c/n", "0").await;
    let writing = tokio::spawn(async move {
        let mut v = first;
        for i in 1..=WRITES {
            v = replace(writer.as_ref(), "c/n", v, Some(&i.to_string())).await;
        }
        v
    });
    // Let some writes happen first, so the watch starts in the middle.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (snapshot, mut rx) = watcher.watch("c/").await.unwrap();
    let last_version = writing.await.unwrap();
    let (_, start) = snapshot.first().cloned().expect("c/n exists");
    let mut expect_value: u64 = start.value.parse().unwrap();
    let mut last_seen = start.version;
    while expect_value < WRITES {
        match next_event(&mut rx).await {
            DirEvent::Put { value, version, .. } => {
                expect_value += 1;
                assert_eq!(value, expect_value.to_string(), "a write lost or repeated");
                assert!(version > last_seen, "versions out of order");
                last_seen = version;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(last_seen, last_version);
    no_more_events(&mut rx).await;
}

pub fn concurrent_cas_from_several_handles_loses_no_update(store: &dyn Store) {
    const THREADS: usize = 4;
    const INCREMENTS: usize = 40;
    let rt = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let base = rt().block_on(put_new(store.handle().as_ref(), "marker", "x"));
    let conflicts: usize = thread::scope(|scope| {
        let workers: Vec<_> = (0..THREADS)
            .map(|_| {
                // Each thread has its own handle and runtime, like a separate node process.
                let d = store.handle();
                scope.spawn(move || {
                    rt().block_on(async {
                        let mut conflicts = 0;
                        for _ in 0..INCREMENTS {
                            let mut seen = d.get("counter").await.unwrap();
                            loop {
                                let next =
                                    seen.as_ref().map_or(0, |v| v.value.parse::<u64>().unwrap())
                                        + 1;
                                match d
                                    .cas(
                                        "counter",
                                        seen.as_ref().map(|v| v.version),
                                        Some(next.to_string()),
                                    )
                                    .await
                                    .unwrap()
                                {
                                    CasOutcome::Done { .. } => break,
                                    CasOutcome::Conflict { current } => {
                                        conflicts += 1;
                                        seen = current;
                                    }
                                }
                            }
                        }
                        conflicts
                    })
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    });
    let final_value = rt()
        .block_on(store.handle().get("counter"))
        .unwrap()
        .expect("counter exists");
    assert_eq!(final_value.value, (THREADS * INCREMENTS).to_string());
    // Every successful CAS consumed exactly one revision, and no failed one did.
    assert_eq!(final_value.version, base + (THREADS * INCREMENTS) as u64);
    eprintln!("conflicts retried: {conflicts}");
}

/// A lease that outlives every test.
const LONG_TTL: Duration = Duration::from_secs(120);

/// Creates `key` (which must be absent) attached to `lease`; returns its version.
pub async fn put_new_leased(d: &dyn Directory, key: &str, value: &str, lease: LeaseId) -> u64 {
    match d.cas_leased(key, None, value.into(), lease).await.unwrap() {
        CasOutcome::Done { version } => version,
        other => panic!("leased put of new key {key} failed: {other:?}"),
    }
}

/// Asserts that `result` is the error of a lease that is gone, naming `lease`.
#[track_caller]
pub fn assert_lease_gone<T: std::fmt::Debug>(result: Result<T, DirError>, lease: LeaseId) {
    match result {
        Err(DirError::LeaseExpired { lease: gone }) => assert_eq!(gone, lease),
        other => panic!("expected LeaseExpired for lease {lease}, got {other:?}"),
    }
}

/// `n` events, sorted by key (for changes that one operation makes at once, whose order
/// among themselves the trait does not promise).
async fn events_sorted(rx: &mut UnboundedReceiver<DirEvent>, n: usize) -> Vec<DirEvent> {
    let mut seen = events(rx, n).await;
    seen.sort_by(|a, b| a.key().cmp(b.key()));
    seen
}

fn delete(key: &str) -> DirEvent {
    DirEvent::Delete { key: key.into() }
}

pub async fn lease_kept_alive_outlives_its_ttl(store: &dyn Store) {
    let d = store.handle();
    let ttl = store.short_ttl();
    let lease = d.grant_lease(ttl).await.unwrap();
    let v = put_new_leased(d.as_ref(), "nodes/1", "me", lease).await;
    // Renewed five times per TTL, for three TTLs: the key stays, unchanged (a keep-alive is
    // no write).
    let until = Instant::now() + ttl * 3;
    while Instant::now() < until {
        tokio::time::sleep(ttl / 5).await;
        d.keep_alive(lease).await.unwrap();
        assert_eq!(
            d.get("nodes/1").await.unwrap().map(|e| e.version),
            Some(v),
            "the key of a lease kept alive went away"
        );
    }
    d.revoke_lease(lease).await.unwrap();
    assert_eq!(d.get("nodes/1").await.unwrap(), None);
}

pub async fn expired_lease_deletes_only_its_keys_and_watchers_see_it(store: &dyn Store) {
    let d = store.handle();
    let (_, mut rx) = store.handle().watch("nodes/").await.unwrap();
    let short = d.grant_lease(store.short_ttl()).await.unwrap();
    let long = d.grant_lease(LONG_TTL).await.unwrap();
    assert_ne!(short, long);
    put_new_leased(d.as_ref(), "nodes/a", "short 1", short).await;
    put_new_leased(d.as_ref(), "nodes/b", "short 2", short).await;
    let vc = put_new_leased(d.as_ref(), "nodes/c", "long", long).await;
    let vd = put_new(d.as_ref(), "nodes/d", "no lease").await;
    let keys: Vec<String> = events(&mut rx, 4)
        .await
        .iter()
        .map(|e| e.key().to_owned())
        .collect();
    assert_eq!(keys, ["nodes/a", "nodes/b", "nodes/c", "nodes/d"]);

    // Nobody renews `short`: its keys are deleted, and only they; the watcher sees ordinary
    // deletes (waited for with the harness's patience, not timed).
    assert_eq!(
        events_sorted(&mut rx, 2).await,
        [delete("nodes/a"), delete("nodes/b")]
    );
    no_more_events(&mut rx).await;
    let other = store.handle();
    assert_eq!(other.get("nodes/a").await.unwrap(), None);
    assert_eq!(other.get("nodes/b").await.unwrap(), None);
    assert_eq!(other.get("nodes/c").await.unwrap().unwrap().version, vc);
    assert_eq!(other.get("nodes/d").await.unwrap().unwrap().version, vd);

    // Its holder learns that it is gone, and cannot write with it any more.
    assert_lease_gone(d.keep_alive(short).await, short);
    assert_lease_gone(
        d.cas_leased("nodes/a", None, "again".into(), short).await,
        short,
    );
    assert_eq!(d.get("nodes/a").await.unwrap(), None);
    d.keep_alive(long).await.unwrap();
    d.revoke_lease(long).await.unwrap();
    assert_eq!(next_event(&mut rx).await, delete("nodes/c"));
    assert_eq!(other.get("nodes/d").await.unwrap().unwrap().version, vd);
}

pub async fn revoked_lease_deletes_its_keys_at_once(store: &dyn Store) {
    let d = store.handle();
    let lease = d.grant_lease(LONG_TTL).await.unwrap();
    put_new_leased(d.as_ref(), "nodes/1", "x", lease).await;
    put_new_leased(d.as_ref(), "ep/0/1", "1", lease).await;
    let kept = put_new(d.as_ref(), "ep/0/2", "1").await;
    let (snapshot, mut rx) = store.handle().watch("").await.unwrap();
    assert_eq!(snapshot.len(), 3);

    d.revoke_lease(lease).await.unwrap();
    // Gone when the revoke returns, no waiting.
    assert_eq!(d.get("nodes/1").await.unwrap(), None);
    assert_eq!(d.get("ep/0/1").await.unwrap(), None);
    assert_eq!(d.get("ep/0/2").await.unwrap().unwrap().version, kept);
    assert_eq!(
        events_sorted(&mut rx, 2).await,
        [delete("ep/0/1"), delete("nodes/1")]
    );
    no_more_events(&mut rx).await;

    assert_lease_gone(d.keep_alive(lease).await, lease);
    // Revoking again is fine: a clean leave may follow a lost lease.
    d.revoke_lease(lease).await.unwrap();
}

pub async fn leased_cas_respects_versions(store: &dyn Store) {
    let d = store.handle();
    let old = d.grant_lease(LONG_TTL).await.unwrap();
    let v1 = put_new_leased(d.as_ref(), "nodes/1", "old", old).await;
    let entry = |value: &str, version| {
        Some(Versioned {
            value: value.into(),
            version,
        })
    };
    let conflict = |value: &str, version| CasOutcome::Conflict {
        current: entry(value, version),
    };

    // Create-if-absent fails on an existing key; a stale version fails.
    assert_eq!(
        d.cas_leased("nodes/1", None, "x".into(), old)
            .await
            .unwrap(),
        conflict("old", v1)
    );
    assert_eq!(
        d.cas_leased("nodes/1", Some(v1 + 100), "x".into(), old)
            .await
            .unwrap(),
        conflict("old", v1)
    );
    assert_eq!(
        d.cas_leased("absent", Some(v1), "x".into(), old)
            .await
            .unwrap(),
        CasOutcome::Conflict { current: None }
    );

    // A node replaces its own stale entry, moving it to its new lease: ending the old lease
    // no longer touches it.
    let new = d.grant_lease(LONG_TTL).await.unwrap();
    let v2 = match d
        .cas_leased("nodes/1", Some(v1), "new".into(), new)
        .await
        .unwrap()
    {
        CasOutcome::Done { version } => version,
        other => panic!("replace of nodes/1@{v1} failed: {other:?}"),
    };
    assert!(v2 > v1);
    d.revoke_lease(old).await.unwrap();
    assert_eq!(d.get("nodes/1").await.unwrap(), entry("new", v2));

    // With a lease that is gone, the expectation is checked first; if it holds, nothing is
    // written.
    assert_eq!(
        d.cas_leased("nodes/1", Some(v1), "x".into(), old)
            .await
            .unwrap(),
        conflict("new", v2)
    );
    assert_lease_gone(
        d.cas_leased("nodes/1", Some(v2), "x".into(), old).await,
        old,
    );
    // So is an id that no grant returned.
    assert_lease_gone(
        d.cas_leased("nodes/1", Some(v2), "x".into(), LeaseId(0))
            .await,
        LeaseId(0),
    );
    assert_lease_gone(d.keep_alive(LeaseId(0)).await, LeaseId(0));
    assert_eq!(d.get("nodes/1").await.unwrap(), entry("new", v2));

    // A plain put detaches the key from its lease.
    let v3 = replace(d.as_ref(), "nodes/1", v2, Some("plain")).await;
    d.revoke_lease(new).await.unwrap();
    assert_eq!(d.get("nodes/1").await.unwrap(), entry("plain", v3));
}
