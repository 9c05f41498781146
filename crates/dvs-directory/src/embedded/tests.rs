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

async fn next_event(rx: &mut UnboundedReceiver<DirEvent>) -> DirEvent {
    timeout(WAIT, rx.recv())
        .await
        .expect("no event in time")
        .expect("watch ended")
}

#[tokio::test]
async fn put_get_delete_via_cas() {
    let tmp = tempfile::tempdir().unwrap();
    let d = open(&tmp);
    assert_eq!(d.get("ep/1").await.unwrap(), None);

    let v1 = put_new(&d, "ep/1", "node-a").await;
    assert!(v1 > 0);
    assert_eq!(
        d.get("ep/1").await.unwrap(),
        Some(Versioned {
            value: "node-a".into(),
            version: v1
        })
    );

    let v2 = match d.cas("ep/1", Some(v1), s("node-b")).await.unwrap() {
        CasOutcome::Done { version } => version,
        other => panic!("{other:?}"),
    };
    assert!(v2 > v1);
    assert_eq!(d.get("ep/1").await.unwrap().unwrap().value, "node-b");

    assert!(matches!(
        d.cas("ep/1", Some(v2), None).await.unwrap(),
        CasOutcome::Done { version } if version > v2
    ));
    assert_eq!(d.get("ep/1").await.unwrap(), None);

    // A fresh handle (as another process would) sees the persisted state.
    let other = open(&tmp);
    put_new(&d, "ep/2", "x").await;
    assert_eq!(other.get("ep/2").await.unwrap().unwrap().value, "x");
}

#[tokio::test]
async fn cas_conflict_returns_current() {
    let tmp = tempfile::tempdir().unwrap();
    let d = open(&tmp);
    let v = put_new(&d, "k", "one").await;
    let current = Some(Versioned {
        value: "one".into(),
        version: v,
    });

    // Expected absent, but present.
    assert_eq!(
        d.cas("k", None, s("two")).await.unwrap(),
        CasOutcome::Conflict {
            current: current.clone()
        }
    );
    // Stale version, for a put and for a delete.
    assert_eq!(
        d.cas("k", Some(v + 100), s("two")).await.unwrap(),
        CasOutcome::Conflict {
            current: current.clone()
        }
    );
    assert_eq!(
        d.cas("k", Some(v + 100), None).await.unwrap(),
        CasOutcome::Conflict {
            current: current.clone()
        }
    );
    // Expected present, but absent.
    assert_eq!(
        d.cas("missing", Some(v), s("x")).await.unwrap(),
        CasOutcome::Conflict { current: None }
    );
    // Nothing changed.
    assert_eq!(d.get("k").await.unwrap(), current);
    assert_eq!(d.get("missing").await.unwrap(), None);
}

#[tokio::test]
async fn delete_of_absent_key_is_a_no_op() {
    let tmp = tempfile::tempdir().unwrap();
    let d = open(&tmp);
    let v = put_new(&d, "other", "x").await;
    assert_eq!(
        d.cas("k", None, None).await.unwrap(),
        CasOutcome::Done { version: v }
    );
    // No revision was consumed.
    assert_eq!(put_new(&d, "k", "y").await, v + 1);
}

#[tokio::test]
async fn versions_only_grow_also_across_delete_and_recreate() {
    let tmp = tempfile::tempdir().unwrap();
    let d = open(&tmp);
    let mut last = 0;
    for round in 0..5 {
        let v = put_new(&d, "k", &format!("r{round}")).await;
        assert!(v > last, "version {v} after {last}");
        let v2 = match d.cas("k", Some(v), s("again")).await.unwrap() {
            CasOutcome::Done { version } => version,
            other => panic!("{other:?}"),
        };
        assert!(v2 > v);
        let vd = match d.cas("k", Some(v2), None).await.unwrap() {
            CasOutcome::Done { version } => version,
            other => panic!("{other:?}"),
        };
        assert!(vd > v2);
        last = vd;
        // Writes to other keys advance the revision too.
        put_new(&d, &format!("other/{round}"), "x").await;
    }
}

#[tokio::test]
async fn prefix_listing_is_sorted_and_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let d = open(&tmp);
    for k in ["ep/2", "ep/10", "ep/1", "epx", "node/1", "e"] {
        put_new(&d, k, &format!("v-{k}")).await;
    }
    let keys = |l: Vec<(String, Versioned)>| l.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
    assert_eq!(
        keys(d.get_prefix("ep/").await.unwrap()),
        ["ep/1", "ep/10", "ep/2"]
    );
    assert_eq!(
        keys(d.get_prefix("ep").await.unwrap()),
        ["ep/1", "ep/10", "ep/2", "epx"]
    );
    assert_eq!(d.get_prefix("").await.unwrap().len(), 6);
    assert!(d.get_prefix("zzz").await.unwrap().is_empty());
    let listed = d.get_prefix("node/").await.unwrap();
    assert_eq!(listed[0].1, d.get("node/1").await.unwrap().unwrap());
}

#[tokio::test]
async fn empty_key_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let d = open(&tmp);
    assert!(matches!(
        d.cas("", None, s("x")).await,
        Err(DirError::InvalidKey { .. })
    ));
    assert!(matches!(d.get("").await, Err(DirError::InvalidKey { .. })));
}

#[tokio::test]
async fn watch_sees_changes_from_another_handle_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let watcher = open(&tmp);
    let writer = open(&tmp);
    let v0 = put_new(&writer, "ep/0", "before").await;
    put_new(&writer, "node/1", "outside the prefix").await;

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
    // before the watcher polls: every change must still be reported, in order.
    let v1 = put_new(&writer, "ep/1", "a").await;
    let v2 = match writer.cas("ep/1", Some(v1), s("b")).await.unwrap() {
        CasOutcome::Done { version } => version,
        other => panic!("{other:?}"),
    };
    put_new(&writer, "node/2", "ignored").await;
    writer.cas("ep/0", Some(v0), None).await.unwrap();
    writer.cas("ep/1", Some(v2), None).await.unwrap();
    let v3 = put_new(&writer, "ep/1", "c").await;

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
    let mut seen = Vec::new();
    for _ in 0..expected.len() {
        seen.push(next_event(&mut rx).await);
    }
    assert_eq!(seen, expected);

    // And later changes keep coming.
    put_new(&writer, "ep/9", "late").await;
    assert_eq!(next_event(&mut rx).await.key(), "ep/9");
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

#[test]
fn concurrent_cas_from_several_handles_loses_no_update() {
    const THREADS: usize = 4;
    const INCREMENTS: usize = 40;
    let tmp = tempfile::tempdir().unwrap();
    let workers: Vec<_> = (0..THREADS)
        .map(|_| {
            // Each thread has its own handle and runtime, like a separate node process.
            let d = open(&tmp);
            thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let mut conflicts = 0;
                    for _ in 0..INCREMENTS {
                        let mut seen = d.get("counter").await.unwrap();
                        loop {
                            let next =
                                seen.as_ref().map_or(0, |v| v.value.parse::<u64>().unwrap()) + 1;
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
    let conflicts: usize = workers.into_iter().map(|w| w.join().unwrap()).sum();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let final_value = rt
        .block_on(open(&tmp).get("counter"))
        .unwrap()
        .expect("counter exists");
    assert_eq!(final_value.value, (THREADS * INCREMENTS).to_string());
    // Every successful CAS consumed exactly one revision.
    assert_eq!(final_value.version, (THREADS * INCREMENTS) as u64);
    eprintln!("conflicts retried: {conflicts}");
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
