//! The embedded backend's own internals: the change log and its fallback, the watcher thread,
//! a corrupt state file, folder creation, leases in the state file. What every backend must do is in
//! `tests/common/conformance.rs` (run on this backend by `tests/embedded.rs`).

use std::time::Instant;

use tokio::time::timeout;

use super::*;

/// Generous: the test machine is small and shared with concurrent builds.
const WAIT: Duration = Duration::from_secs(10);

fn open(dir: &tempfile::TempDir) -> EmbeddedDirectory {
    EmbeddedDirectory::open(dir.path()).unwrap()
}

fn s(v: &str) -> Option<String> {
    Some(v.to_owned())
}

async fn put_new(d: &EmbeddedDirectory, key: &str, value: &str) -> u64 {
    match d.cas(key, None, s(value)).await.unwrap() {
        CasOutcome::Done { version } => version,
        other => panic!("put of new key {key} failed: {other:?}"),
    }
}

#[tokio::test]
async fn watcher_thread_stops_when_receiver_is_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let d = open(&tmp);
    let (_, rx, thread) = d.watch_inner("").unwrap();
    drop(rx);
    let deadline = Instant::now() + WAIT;
    while !thread.is_finished() {
        assert!(Instant::now() < deadline, "watcher thread still running");
        thread::sleep(Duration::from_millis(1));
    }
    thread.join().unwrap();
}

#[test]
fn watcher_that_fell_behind_the_log_reports_the_net_difference() {
    let entry = |value: &str, version| Versioned {
        value: value.into(),
        version,
    };
    let (tx, _rx) = mpsc::unbounded_channel();
    let unused = tempfile::tempdir().unwrap();
    let mut w = Watcher {
        dir: open(&unused),
        prefix: "p/".into(),
        last_bytes: None,
        revision: 10,
        next_expiry: None,
        view: BTreeMap::from([
            ("p/gone".into(), entry("x", 3)),
            ("p/same".into(), entry("y", 4)),
            ("p/changed".into(), entry("old", 5)),
        ]),
        tx,
    };
    let state = State {
        revision: 2000,
        entries: BTreeMap::from([
            ("p/same".into(), entry("y", 4)),
            ("p/changed".into(), entry("new", 1500)),
            ("p/added".into(), entry("z", 1200)),
            ("q/outside".into(), entry("w", 1999)),
        ]),
        // Only the tail of the history survives.
        log: VecDeque::from([Change {
            revision: 2000,
            key: "q/outside".into(),
            value: None,
        }]),
        ..State::default()
    };
    assert_eq!(
        w.advance(&state),
        vec![
            DirEvent::Delete {
                key: "p/gone".into()
            },
            DirEvent::Put {
                key: "p/added".into(),
                value: "z".into(),
                version: 1200
            },
            DirEvent::Put {
                key: "p/changed".into(),
                value: "new".into(),
                version: 1500
            },
        ]
    );
    assert_eq!(w.revision, 2000);
    assert_eq!(w.view, state.prefix("p/"));
}

#[tokio::test]
async fn corrupt_state_file_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let d = open(&tmp);
    put_new(&d, "k", "v").await;
    let state_path = tmp.path().join(STATE_FILE);
    fs::write(&state_path, b"{ not json").unwrap();

    for err in [
        d.get("k").await.unwrap_err(),
        d.cas("k", None, s("x")).await.unwrap_err(),
        d.watch("").await.unwrap_err(),
        EmbeddedDirectory::open(tmp.path()).unwrap_err(),
    ] {
        assert!(matches!(err, DirError::Corrupt { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains(&state_path.display().to_string()),
            "message does not name the file: {msg}"
        );
    }
    // The corrupt file was not overwritten by the failed CAS.
    assert_eq!(fs::read(&state_path).unwrap(), b"{ not json");
}

#[tokio::test]
async fn watch_ends_when_state_file_becomes_corrupt() {
    let tmp = tempfile::tempdir().unwrap();
    let d = open(&tmp);
    let (_, mut rx) = d.watch("").await.unwrap();
    fs::write(tmp.path().join(STATE_FILE), b"garbage").unwrap();
    assert_eq!(
        timeout(WAIT, rx.recv()).await.expect("watch still open"),
        None
    );
}

#[test]
fn open_creates_missing_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let nested = tmp.path().join("a/b/c");
    EmbeddedDirectory::open(&nested).unwrap();
    assert!(nested.join(LOCK_FILE).exists());
}

#[test]
fn open_reports_the_folder_it_cannot_create() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("plain-file");
    fs::write(&file, b"").unwrap();
    let err = EmbeddedDirectory::open(&file.join("sub")).unwrap_err();
    assert!(matches!(err, DirError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("plain-file"), "{err}");
}

#[tokio::test]
async fn state_file_of_before_leases_loads_and_gains_them() {
    let tmp = tempfile::tempdir().unwrap();
    // As written before leases existed: no `leases`, no `last_lease`.
    fs::write(
        tmp.path().join(STATE_FILE),
        br#"{"revision":3,"entries":{"k":{"value":"v","version":3}},"log":[{"revision":3,"key":"k","value":"v"}]}"#,
    )
    .unwrap();
    let d = open(&tmp);
    assert_eq!(d.get("k").await.unwrap().unwrap().version, 3);
    let lease = d.grant_lease(Duration::from_secs(60)).await.unwrap();
    assert_eq!(
        d.cas_leased("n", None, "x".into(), lease).await.unwrap(),
        CasOutcome::Done { version: 4 }
    );
    let state = d.load().unwrap();
    assert_eq!(
        state.leases[&lease.0].keys,
        BTreeSet::from(["n".to_owned()])
    );
}

#[tokio::test]
async fn expired_lease_is_reaped_by_a_read_when_nobody_writes_or_watches() {
    let tmp = tempfile::tempdir().unwrap();
    let d = open(&tmp);
    let lease = d.grant_lease(Duration::from_millis(1)).await.unwrap();
    let v = d
        .cas_leased("nodes/1", None, "x".into(), lease)
        .await
        .map(|o| match o {
            CasOutcome::Done { version } => version,
            other => panic!("{other:?}"),
        });
    // The lease may already be gone by the put (1 ms); then there is nothing to see.
    let Ok(v) = v else {
        assert!(matches!(v, Err(DirError::LeaseExpired { .. })), "{v:?}");
        return;
    };
    thread::sleep(Duration::from_millis(20));
    // Still in the file (nobody reaped), but no read shows it, and the first read reaps it
    // as a delete of its own revision.
    assert!(d.load().unwrap().entries.contains_key("nodes/1"));
    assert_eq!(d.get("nodes/1").await.unwrap(), None);
    let state = d.load().unwrap();
    assert!(state.entries.is_empty() && state.leases.is_empty());
    assert_eq!(state.revision, v + 1);
    assert!(matches!(
        d.keep_alive(lease).await,
        Err(DirError::LeaseExpired { .. })
    ));
}

#[tokio::test]
async fn ttls_are_whole_milliseconds_rounded_up_and_ids_are_not_reused() {
    assert_eq!(ttl_ms(Duration::ZERO), 1);
    assert_eq!(ttl_ms(Duration::from_micros(1500)), 2);
    assert_eq!(ttl_ms(Duration::from_secs(2)), 2000);
    assert_eq!(ttl_ms(Duration::MAX), u64::MAX);
    let tmp = tempfile::tempdir().unwrap();
    let d = open(&tmp);
    let a = d.grant_lease(Duration::from_secs(60)).await.unwrap();
    d.revoke_lease(a).await.unwrap();
    let b = d.grant_lease(Duration::from_secs(60)).await.unwrap();
    assert!(b > a);
    // Nor after the state file is removed (a reset directory).
    fs::remove_file(tmp.path().join(STATE_FILE)).unwrap();
    let c = d.grant_lease(Duration::from_secs(60)).await.unwrap();
    assert!(c > b, "{c} after {b}");
}

#[tokio::test]
async fn watcher_reaps_an_expired_lease_by_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let d = open(&tmp);
    let lease = d.grant_lease(Duration::from_millis(200)).await.unwrap();
    d.cas_leased("nodes/1", None, "x".into(), lease)
        .await
        .unwrap();
    let (snapshot, mut rx, _thread) = d.watch_inner("nodes/").unwrap();
    assert_eq!(snapshot.len(), 1);
    // Nobody else touches the directory: the delete comes from the watcher's own reaping.
    let event = timeout(WAIT, rx.recv()).await.expect("no delete in time");
    assert_eq!(
        event,
        Some(DirEvent::Delete {
            key: "nodes/1".into()
        })
    );
    assert!(d.load().unwrap().leases.is_empty());
}
