//! The embedded backend's own internals: the change log and its fallback, the watcher thread,
//! a corrupt state file, folder creation. What every backend must do is in
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
    let mut w = Watcher {
        path: PathBuf::from("unused"),
        prefix: "p/".into(),
        last_bytes: None,
        revision: 10,
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
