//! The etcd directory against a real etcd, started by the harness (`common/mod.rs`) on free
//! loopback ports with its own data dir: the backend-independent cases
//! (`common/conformance.rs`), then what only a remote store has: races between clients,
//! restarts, compaction, a 3-member cluster losing a member, unreachable and slow servers,
//! garbage written by hand, and TLS with a client certificate.
//!
//! Needs `etcd` (`scripts/install-etcd.sh`); without it every test fails, unless
//! `DVS_SKIP_ETCD=1` is set (see `common::etcd_available`).

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::conformance::{events, next_event, no_more_events, put_new, replace, Store};
use common::{etcd_available, Etcd, PATIENCE};
use dvs_config::{ClusterConfig, DirectoryConfig};
use dvs_directory::{CasOutcome, DirError, DirEvent, Directory, EtcdDirectory, Versioned};

/// A fresh single-member etcd; handles are separate clients under one prefix.
struct EtcdStore {
    etcd: Etcd,
}

impl Store for EtcdStore {
    fn handle(&self) -> Arc<dyn Directory> {
        Arc::new(self.etcd.directory("/dvs/conformance/"))
    }
}

fn etcd_store(test: &str) -> Option<EtcdStore> {
    etcd_available(test).then(|| EtcdStore {
        etcd: Etcd::start(),
    })
}

conformance_tests!(etcd_store);

fn s(v: &str) -> Option<String> {
    Some(v.to_owned())
}

/// Runs `f` and returns its result with how long it took.
async fn timed<T>(f: impl std::future::Future<Output = T>) -> (T, Duration) {
    let t = Instant::now();
    let r = f.await;
    (r, t.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_live_under_the_prefix_and_prefixes_do_not_mix() {
    if !etcd_available("keys_live_under_the_prefix") {
        return;
    }
    let etcd = Etcd::start();
    let a = etcd.directory("/dvs/a/");
    let ab = etcd.directory("/dvs/ab/");
    let v = put_new(&a, "ep/0/1", "0").await;
    put_new(&ab, "ep/0/1", "1").await;
    assert_eq!(a.get("ep/0/1").await.unwrap().unwrap().value, "0");
    assert_eq!(ab.get("ep/0/1").await.unwrap().unwrap().value, "1");
    assert_eq!(a.get_prefix("").await.unwrap().len(), 1);
    // In etcd the key is the prefix plus the directory's key, its version the mod_revision.
    let mut raw = etcd.raw_client().await;
    let resp = raw.get("/dvs/a/ep/0/1", None).await.unwrap();
    let kv = &resp.kvs()[0];
    assert_eq!(kv.value(), b"0");
    assert_eq!(kv.mod_revision() as u64, v);
    // A change by hand shows up with etcd's revision as the version.
    let put = raw.put("/dvs/a/ep/0/2", "by hand", None).await.unwrap();
    assert_eq!(
        a.get("ep/0/2").await.unwrap(),
        Some(Versioned {
            value: "by hand".into(),
            version: put.header().unwrap().revision() as u64
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cas_races_between_two_clients_have_one_winner() {
    if !etcd_available("cas_races_between_two_clients") {
        return;
    }
    let etcd = Etcd::start();
    // Two clients with connections of their own, as two nodes have.
    let a: Arc<dyn Directory> = Arc::new(etcd.directory("/dvs/race/"));
    let b: Arc<dyn Directory> = Arc::new(etcd.directory("/dvs/race/"));
    for round in 0..30 {
        let key = format!("migr/0/{round}");
        // Both create the key at once, then both try to replace the same version.
        let (ra, rb) = tokio::join!(
            a.cas(&key, None, s("from-a")),
            b.cas(&key, None, s("from-b"))
        );
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        let (winner, loser) = match (&ra, &rb) {
            (CasOutcome::Done { .. }, CasOutcome::Conflict { .. }) => (ra, rb),
            (CasOutcome::Conflict { .. }, CasOutcome::Done { .. }) => (rb, ra),
            _ => panic!("round {round}: not exactly one winner: {ra:?} / {rb:?}"),
        };
        let CasOutcome::Done { version } = winner else {
            unreachable!()
        };
        let now = a.get(&key).await.unwrap().unwrap();
        assert_eq!(now.version, version);
        // The loser learns what won, without another read.
        assert_eq!(loser, CasOutcome::Conflict { current: Some(now) });

        let (ra, rb) = tokio::join!(
            a.cas(&key, Some(version), s("second-a")),
            b.cas(&key, Some(version), None)
        );
        let done = [&ra, &rb]
            .iter()
            .filter(|r| matches!(r, Ok(CasOutcome::Done { .. })))
            .count();
        assert_eq!(done, 1, "round {round}: {ra:?} / {rb:?}");
    }
}

/// The watch of a client whose etcd went away and came back resumes from the revision after
/// the last one it reported: everything written meanwhile arrives once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_across_an_etcd_restart() {
    if !etcd_available("watch_resumes_across_an_etcd_restart") {
        return;
    }
    let mut etcd = Etcd::start();
    let watcher = etcd.directory("/dvs/w/");
    let (snapshot, mut rx) = watcher.watch("ep/").await.unwrap();
    assert!(snapshot.is_empty());
    let writer = etcd.directory("/dvs/w/");
    let v1 = put_new(&writer, "ep/1", "a").await;
    assert_eq!(next_event(&mut rx).await.key(), "ep/1");

    // A plain restart: kill, start on the same data dir and port.
    etcd.kill(0);
    let (r, took) = timed(writer.get("ep/1")).await;
    assert!(matches!(r, Err(DirError::Unavailable { .. })), "{r:?}");
    assert!(took < Duration::from_secs(4), "took {took:?}");
    let t = Instant::now();
    etcd.restart(0);
    eprintln!("etcd restarted in {} ms", t.elapsed().as_millis());
    let v2 = replace(&writer, "ep/1", v1, Some("b")).await;
    assert_eq!(
        next_event(&mut rx).await,
        DirEvent::Put {
            key: "ep/1".into(),
            value: "b".into(),
            version: v2
        }
    );

    // Now changes while the watcher cannot reach etcd: etcd comes back on another port for a
    // while, a second client writes there, then etcd returns to the watcher's port.
    etcd.kill(0);
    let url = etcd.restart_elsewhere(0);
    let elsewhere = EtcdDirectory::connect(etcd.settings_for(&[url], "/dvs/w/")).unwrap();
    let v3 = replace(&elsewhere, "ep/1", v2, Some("c")).await;
    let v4 = put_new(&elsewhere, "ep/2", "x").await;
    put_new(&elsewhere, "node/1", "outside the prefix").await;
    replace(&elsewhere, "ep/2", v4, None).await;
    etcd.move_back(0);
    let expected = vec![
        DirEvent::Put {
            key: "ep/1".into(),
            value: "c".into(),
            version: v3,
        },
        DirEvent::Put {
            key: "ep/2".into(),
            value: "x".into(),
            version: v4,
        },
        DirEvent::Delete { key: "ep/2".into() },
    ];
    assert_eq!(events(&mut rx, expected.len()).await, expected);
    no_more_events(&mut rx).await;
    // And it keeps following.
    put_new(&writer, "ep/3", "y").await;
    assert_eq!(next_event(&mut rx).await.key(), "ep/3");
}

/// A watcher that comes back after etcd compacted the revisions it missed reads the prefix
/// again and gets the differences as events: deletes, then puts in the order they were made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compacted_revision_is_handled_by_reading_again() {
    if !etcd_available("compacted_revision_is_handled_by_reading_again") {
        return;
    }
    let mut etcd = Etcd::start();
    let writer = etcd.directory("/dvs/c/");
    let v_same = put_new(&writer, "ep/same", "s").await;
    let v_gone = put_new(&writer, "ep/gone", "g").await;
    let v_changed = put_new(&writer, "ep/changed", "old").await;
    let watcher = etcd.directory("/dvs/c/");
    let (snapshot, mut rx) = watcher.watch("ep/").await.unwrap();
    assert_eq!(snapshot.len(), 3);

    etcd.kill(0);
    let url = etcd.restart_elsewhere(0);
    let elsewhere =
        EtcdDirectory::connect(etcd.settings_for(std::slice::from_ref(&url), "/dvs/c/")).unwrap();
    replace(&elsewhere, "ep/gone", v_gone, None).await;
    let v_changed2 = replace(&elsewhere, "ep/changed", v_changed, Some("new")).await;
    let v_added = put_new(&elsewhere, "ep/added", "a").await;
    // A key that came and went while the watcher was away leaves no trace.
    let v_brief = put_new(&elsewhere, "ep/brief", "b").await;
    replace(&elsewhere, "ep/brief", v_brief, None).await;
    let last = put_new(&elsewhere, "other", "x").await;
    let mut raw = etcd_client::Client::connect([url], None).await.unwrap();
    raw.compact(last as i64, None).await.unwrap();
    drop(raw);
    etcd.move_back(0);

    let expected = vec![
        DirEvent::Delete {
            key: "ep/gone".into(),
        },
        DirEvent::Put {
            key: "ep/changed".into(),
            value: "new".into(),
            version: v_changed2,
        },
        DirEvent::Put {
            key: "ep/added".into(),
            value: "a".into(),
            version: v_added,
        },
    ];
    assert_eq!(events(&mut rx, expected.len()).await, expected);
    no_more_events(&mut rx).await;
    // The watch goes on from the re-read's revision.
    let v = replace(&writer, "ep/same", v_same, Some("s2")).await;
    assert_eq!(
        next_event(&mut rx).await,
        DirEvent::Put {
            key: "ep/same".into(),
            value: "s2".into(),
            version: v
        }
    );
}

/// An etcd replaced by an empty one (its revisions start over): the watch notices that the
/// store is behind what it already reported, reads the prefix again and reports the
/// differences, instead of waiting for revisions that will mean something else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_reads_again_when_the_store_goes_back_in_time() {
    if !etcd_available("watch_reads_again_when_the_store_goes_back") {
        return;
    }
    let mut etcd = Etcd::start();
    let writer = etcd.directory("/dvs/b/");
    for k in ["ep/1", "ep/2", "ep/3"] {
        put_new(&writer, k, "old").await;
    }
    let (snapshot, mut rx) = etcd.directory("/dvs/b/").watch("ep/").await.unwrap();
    assert_eq!(snapshot.len(), 3);
    etcd.wipe(0);
    let v = put_new(&writer, "ep/9", "new").await;
    assert!(v <= 3, "a fresh store's revision: {v}");
    let expected = vec![
        DirEvent::Delete { key: "ep/1".into() },
        DirEvent::Delete { key: "ep/2".into() },
        DirEvent::Delete { key: "ep/3".into() },
        DirEvent::Put {
            key: "ep/9".into(),
            value: "new".into(),
            version: v,
        },
    ];
    assert_eq!(events(&mut rx, expected.len()).await, expected);
    no_more_events(&mut rx).await;
}

/// A 3-member cluster loses its leader in the middle of a run of compare-and-sets: the writer
/// goes on (an operation caught in the failover fails with a clear error, as a node would see
/// it, and is retried after a read), and a watcher on another client sees every value once,
/// in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_member_cluster_keeps_working_when_a_member_dies() {
    if !etcd_available("three_member_cluster") {
        return;
    }
    const WRITES: u64 = 120;
    let mut etcd = Etcd::start_with(3, None);
    let watcher = etcd.directory("/dvs/3/");
    // A write caught in the failover waits for the whole request timeout (etcd's own is
    // longer), 2 s here.
    let writer = etcd.directory("/dvs/3/");
    let (_, mut rx) = watcher.watch("c/").await.unwrap();

    // Kill the leader, the member whose loss costs the most (an election).
    let mut raw = etcd.raw_client().await;
    let status = raw.status().await.unwrap();
    let leader_id = status.leader();
    let members = raw.member_list().await.unwrap();
    let leader_name = members
        .members()
        .iter()
        .find(|m| m.id() == leader_id)
        .map(|m| m.name().to_owned())
        .expect("a leader");
    let leader = etcd
        .members
        .iter()
        .position(|m| m.name == leader_name)
        .unwrap();
    drop(raw);

    let mut current: Option<Versioned> = None;
    let mut value = 0u64;
    let mut errors = Vec::new();
    let mut slowest = Duration::ZERO;
    let started = Instant::now();
    while value < WRITES {
        if value == WRITES / 2 && etcd.members[leader].pid().is_some() {
            eprintln!("killing the leader {leader_name}");
            etcd.kill(leader);
        }
        assert!(started.elapsed() < PATIENCE * 2, "no progress: {errors:?}");
        let (r, took) = timed(writer.cas(
            "c/n",
            current.as_ref().map(|v| v.version),
            Some((value + 1).to_string()),
        ))
        .await;
        slowest = slowest.max(took);
        match r {
            Ok(CasOutcome::Done { version }) => {
                value += 1;
                current = Some(Versioned {
                    value: value.to_string(),
                    version,
                });
            }
            Ok(CasOutcome::Conflict { current: now }) => {
                // Only our own write can be there: one that failed yet was applied.
                let now = now.expect("the key exists");
                assert_eq!(now.value, (value + 1).to_string());
                value += 1;
                current = Some(now);
            }
            Err(e) => {
                let msg = e.to_string();
                assert!(matches!(e, DirError::Unavailable { .. }), "{msg}");
                assert!(msg.contains("127.0.0.1"), "names the endpoints: {msg}");
                errors.push(msg);
                let now = writer.get("c/n").await.unwrap();
                if let Some(now) = &now {
                    value = now.value.parse().unwrap();
                }
                current = now;
            }
        }
    }
    eprintln!(
        "{WRITES} writes in {} ms across the failover; slowest {} ms; errors: {errors:?}",
        started.elapsed().as_millis(),
        slowest.as_millis()
    );
    assert!(errors.len() <= 3, "too many failed writes: {errors:?}");
    for want in 1..=WRITES {
        match next_event(&mut rx).await {
            DirEvent::Put { value, .. } => assert_eq!(value, want.to_string()),
            other => panic!("{other:?}"),
        }
    }
    no_more_events(&mut rx).await;
    // Reads go on on the survivors.
    assert_eq!(
        watcher.get("c/n").await.unwrap().unwrap().value,
        WRITES.to_string()
    );
}

/// Nothing listens at the endpoint: every operation fails within the request timeout, with
/// an error that names the endpoint. Opening does not dial, so it succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_endpoint_fails_in_time_naming_it() {
    // Needs no etcd at all.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let text = format!(
        "cluster_id = \"t\"\n[directory]\nkind = \"etcd\"\n\
         endpoints = [\"127.0.0.1:{port}\"]\ndial_timeout_ms = 200\nrequest_timeout_ms = 600\n\
         [[node]]\nid = 0\nname = \"a\"\npeer_addr = \"127.0.0.1:7000\"\nruntime_dir = \"/tmp/a\"\n"
    );
    let cfg = ClusterConfig::parse(&text, Path::new("x.toml")).unwrap();
    let d = dvs_directory::open(&cfg.directory).unwrap();
    let endpoint = format!("http://127.0.0.1:{port}");
    let check = |r: Result<String, DirError>, took: Duration| {
        let e = r.expect_err("nothing listens there");
        assert!(matches!(e, DirError::Unavailable { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains(&endpoint), "does not name {endpoint}: {msg}");
        assert!(
            took >= Duration::from_millis(500) && took < Duration::from_millis(1500),
            "took {took:?}: {msg}"
        );
        eprintln!("{msg} (after {} ms)", took.as_millis());
    };
    let (r, took) = timed(d.get("ep/0/1")).await;
    check(r.map(|v| format!("{v:?}")), took);
    let (r, took) = timed(d.get_prefix("ep/")).await;
    check(r.map(|v| format!("{v:?}")), took);
    let (r, took) = timed(d.cas("ep/0/1", None, s("0"))).await;
    check(r.map(|v| format!("{v:?}")), took);
    let (r, took) = timed(d.watch("ep/")).await;
    check(r.map(|(v, _)| format!("{v:?}")), took);
}

/// An etcd that accepts connections but answers nothing (stopped with SIGSTOP): operations
/// give up at the request timeout with an error naming the endpoint, and work again once it
/// answers; a watch rides it out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_etcd_fails_in_time_naming_it_and_recovers() {
    if !etcd_available("slow_etcd") {
        return;
    }
    let etcd = Etcd::start();
    let mut settings = etcd.settings("/dvs/slow/");
    settings.request_timeout = Duration::from_millis(700);
    let d = EtcdDirectory::connect(settings).unwrap();
    let v = put_new(&d, "ep/1", "a").await;
    let (_, mut rx) = d.watch("ep/").await.unwrap();

    etcd.members[0].freeze(true);
    let (r, took) = timed(d.get("ep/1")).await;
    let (w, wtook) = timed(d.cas("ep/1", Some(v), s("b"))).await;
    etcd.members[0].freeze(false);
    for (r, took) in [(r.map(|_| ()), took), (w.map(|_| ()), wtook)] {
        let e = r.expect_err("a frozen etcd answers nothing");
        let msg = e.to_string();
        assert!(matches!(e, DirError::Unavailable { .. }), "{msg}");
        assert!(msg.contains(&etcd.members[0].url()), "{msg}");
        assert!(
            took >= Duration::from_millis(650) && took < Duration::from_millis(2000),
            "took {took:?}"
        );
    }
    // The write may or may not have been applied: it says so, and a read tells.
    assert!(wtook > Duration::ZERO);
    let now = d.get("ep/1").await.unwrap().unwrap();
    let next = replace(&d, "ep/1", now.version, Some("c")).await;
    // The watch missed nothing: the frozen write (if it was applied), then "c".
    let mut seen = Vec::new();
    loop {
        let ev = next_event(&mut rx).await;
        let done = matches!(&ev, DirEvent::Put { version, .. } if *version == next);
        seen.push(ev);
        if done {
            break;
        }
    }
    assert!(seen.len() <= 2, "{seen:?}");
}

/// Keys and values that dvs did not write (here: not UTF-8) give an error naming the whole
/// etcd key wherever the trait would show them; the rest of the directory still works, and
/// nothing panics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_written_by_hand_is_a_clear_error_naming_the_key() {
    if !etcd_available("garbage_written_by_hand") {
        return;
    }
    let etcd = Etcd::start();
    let d = etcd.directory("/dvs/g/");
    put_new(&d, "ep/0/2", "0").await;
    let (_, mut rx) = d.watch("ep/").await.unwrap();
    let mut raw = etcd.raw_client().await;
    raw.put("/dvs/g/ep/0/1", vec![0xff, 0xfe, 0x00, 0x80], None)
        .await
        .unwrap();

    let named = |e: DirError| {
        let msg = e.to_string();
        assert!(matches!(e, DirError::BadEntry { .. }), "{msg}");
        assert!(
            msg.contains("/dvs/g/ep/0/1"),
            "does not name the key: {msg}"
        );
        assert!(msg.contains("UTF-8"), "{msg}");
    };
    named(d.get("ep/0/1").await.unwrap_err());
    named(d.get_prefix("ep/").await.unwrap_err());
    named(d.get_prefix("").await.unwrap_err());
    named(d.watch("ep/").await.unwrap_err());
    // A compare-and-set that loses to the garbage would have to show it.
    named(d.cas("ep/0/1", None, s("0")).await.unwrap_err());
    // A watch that meets it ends (the trait's way to say it cannot follow).
    assert_eq!(
        tokio::time::timeout(PATIENCE, rx.recv())
            .await
            .expect("watch still open"),
        None
    );
    // The rest is untouched.
    assert_eq!(d.get("ep/0/2").await.unwrap().unwrap().value, "0");
    let v = d.get("ep/0/2").await.unwrap().unwrap().version;
    replace(&d, "ep/0/2", v, Some("1")).await;
    assert!(d.watch("node/").await.is_ok());
    // Overwriting the garbage with a CAS on its version (from etcd) repairs it.
    let garbage = raw.get("/dvs/g/ep/0/1", None).await.unwrap();
    let gv = garbage.kvs()[0].mod_revision() as u64;
    replace(&d, "ep/0/1", gv, Some("0")).await;
    assert_eq!(d.get_prefix("ep/").await.unwrap().len(), 2);

    // A key that is not UTF-8 is named too (lossily), and text that is not a number where
    // dvs expects one is just a value here: the node judges values, not the directory.
    raw.put(b"/dvs/g/node/\xff".to_vec(), "x", None)
        .await
        .unwrap();
    let e = d.get_prefix("node/").await.unwrap_err();
    assert!(e.to_string().contains("/dvs/g/node/"), "{e}");
    raw.put("/dvs/g/ep/0/3", "not a node id \u{0}", None)
        .await
        .unwrap();
    assert_eq!(
        d.get("ep/0/3").await.unwrap().unwrap().value,
        "not a node id \u{0}"
    );
}

/// With `[directory.tls]`, the client talks TLS and presents a certificate of the cluster CA;
/// an etcd that requires one refuses clients without it, and the error says where.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_client_certificate_of_the_cluster_ca() {
    if !etcd_available("tls_with_a_client_certificate") {
        return;
    }
    let etcd = Etcd::start_tls();
    let url = etcd.members[0].url();
    assert!(url.starts_with("https://"));

    // Through the config file, as a node opens it.
    let tls = etcd.settings("/").tls.unwrap();
    let text = format!(
        "cluster_id = \"secure\"\n[directory]\nkind = \"etcd\"\nendpoints = [\"{url}\"]\n\
         [directory.tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\
         [[node]]\nid = 0\nname = \"a\"\npeer_addr = \"127.0.0.1:7000\"\nruntime_dir = \"/tmp/a\"\n",
        tls.ca.display(),
        tls.cert.display(),
        tls.key.display()
    );
    let cfg = ClusterConfig::parse(&text, Path::new("x.toml")).unwrap();
    let d = dvs_directory::open(&cfg.directory).unwrap();
    let v = put_new(d.as_ref(), "ep/0/1", "0").await;
    let (snap, mut rx) = d.watch("ep/").await.unwrap();
    assert_eq!(snap.len(), 1);
    replace(d.as_ref(), "ep/0/1", v, None).await;
    assert_eq!(
        next_event(&mut rx).await,
        DirEvent::Delete {
            key: "ep/0/1".into()
        }
    );
    // The default prefix carries the cluster id.
    let mut raw = etcd.raw_client().await;
    put_new(d.as_ref(), "x", "1").await;
    assert_eq!(
        raw.get("/dvs/secure/x", None).await.unwrap().kvs()[0].value(),
        b"1"
    );

    let refused = |e: DirError| {
        let msg = e.to_string();
        assert!(
            matches!(e, DirError::Unavailable { .. } | DirError::Refused { .. }),
            "{msg}"
        );
        assert!(msg.contains(&format!("127.0.0.1:{}", etcd.members[0].client_port)));
        eprintln!("refused as it should: {msg}");
    };
    let quick = |mut s: dvs_directory::EtcdSettings| {
        s.request_timeout = Duration::from_millis(800);
        s
    };

    // Plaintext to a TLS-only etcd.
    let mut plain = quick(etcd.settings("/dvs/secure/"));
    plain.tls = None;
    plain.endpoints = vec![format!("http://127.0.0.1:{}", etcd.members[0].client_port)];
    refused(
        EtcdDirectory::connect(plain)
            .unwrap()
            .get("x")
            .await
            .unwrap_err(),
    );

    // A client certificate from another CA (same CA for the server, so only the client
    // side is wrong).
    let other = tempfile::tempdir().unwrap();
    let stranger = common::make_tls_files(other.path());
    let mut wrong_cert = quick(etcd.settings("/dvs/secure/"));
    let t = wrong_cert.tls.as_mut().unwrap();
    t.cert = stranger.client_cert.clone();
    t.key = stranger.client_key.clone();
    refused(
        EtcdDirectory::connect(wrong_cert)
            .unwrap()
            .get("x")
            .await
            .unwrap_err(),
    );

    // A server certificate that does not chain to the configured CA.
    let mut wrong_ca = quick(etcd.settings("/dvs/secure/"));
    wrong_ca.tls.as_mut().unwrap().ca = stranger.ca.clone();
    refused(
        EtcdDirectory::connect(wrong_ca)
            .unwrap()
            .get("x")
            .await
            .unwrap_err(),
    );

    // A certificate file that holds no certificate.
    let garbage = other.path().join("garbage.crt");
    std::fs::write(&garbage, "not a certificate").unwrap();
    let mut bad_pem = quick(etcd.settings("/dvs/secure/"));
    bad_pem.tls.as_mut().unwrap().cert = garbage.clone();
    let mut bad_ca = quick(etcd.settings("/dvs/secure/"));
    bad_ca.tls.as_mut().unwrap().ca = garbage.clone();
    let mut bad_key = quick(etcd.settings("/dvs/secure/"));
    bad_key.tls.as_mut().unwrap().key = garbage.clone();
    for settings in [bad_pem, bad_ca, bad_key] {
        let e = EtcdDirectory::connect(settings).unwrap_err();
        assert!(matches!(e, DirError::BadConfig { .. }), "{e:?}");
        assert!(e.to_string().contains("garbage.crt"), "{e}");
    }

    // Missing TLS files are named when opening.
    let mut missing = etcd.settings("/dvs/secure/");
    missing.tls.as_mut().unwrap().key = other.path().join("nope.key");
    let e = EtcdDirectory::connect(missing).unwrap_err();
    assert!(e.to_string().contains("nope.key"), "{e}");
}

/// Settings built in code get the config file's checks when connecting.
#[test]
fn bad_settings_are_refused_when_connecting() {
    let base = || dvs_directory::EtcdSettings::new(vec!["127.0.0.1:2379".into()], "/dvs/t/");
    let mut no_endpoints = base();
    no_endpoints.endpoints.clear();
    let mut bad_prefix = base();
    bad_prefix.prefix = "dvs".into();
    let mut https_without_tls = base();
    https_without_tls.endpoints = vec!["https://127.0.0.1:2379".into()];
    let mut zero = base();
    zero.request_timeout = Duration::ZERO;
    for (settings, says) in [
        (no_endpoints, "no endpoints"),
        (bad_prefix, "\"dvs\""),
        (https_without_tls, "https://127.0.0.1:2379"),
        (zero, "timeouts"),
    ] {
        let e = EtcdDirectory::connect(settings).unwrap_err();
        assert!(matches!(e, DirError::BadConfig { .. }), "{e:?}");
        assert!(e.to_string().contains(says), "{e}");
    }
    // The embedded default is untouched: a config without [directory] kind = "etcd" opens a
    // folder, as before.
    let t = tempfile::tempdir().unwrap();
    let d = dvs_directory::open(&DirectoryConfig::Embedded {
        path: t.path().join("d"),
    });
    assert!(d.is_ok());
}
