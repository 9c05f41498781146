//! Many seeds of a random workload under random faults (link delays and reordering across
//! links, links cut and healed, migrations under way), each checked against the invariants
//! after the faults heal:
//! - every call is answered exactly once, with its own reply or an error (nothing hangs);
//! - every migration that started ends (committed or rolled back);
//! - each endpoint runs (is RUNNING) on at most one node, and every server runs somewhere.
//!
//! `DVS_SIM_SEEDS=N` runs N seeds (default 1000, as CI does; `DVS_SIM_SEEDS=100000` for a long
//! run), `DVS_SIM_SEED=S` only seed S. A failing seed prints the command that replays it;
//! `DVS_SIM_TRACE=FILE` also writes the run's trace (every input and action) to FILE.
//!
//! Found this way: a notification relayed by the node its destination had migrated from made
//! the destination take the relaying node for the place its *source* runs, after which it
//! dropped every message from the source's real node (calls hung); and a `Bound` sent by an
//! endpoint's old node before a migration, landing after the directory's newer word while the
//! link to the new node was down, made the node refuse the new owner (1 seed in ~650).

mod workload;

use std::collections::BTreeMap;
use std::time::Duration;

use dvs_core::Registration;
use dvs_sim::LinkConfig;
use workload::{World, DC, NODES};

/// Runs one seed; `Err` says which invariant broke.
fn run(seed: u64) -> Result<(), String> {
    let mut w = World::new(seed, 3, 6);
    w.sim.reorder = true;
    // As the node kernel does: it watches both `ep/` and `migr/`.
    w.sim.directory_mut().watch_migr_records = true;
    w.sim.directory_mut().watch_endpoints = true;
    for (i, &a) in NODES.iter().enumerate() {
        for &b in &NODES[i + 1..] {
            let cfg = LinkConfig {
                delay: Duration::from_micros(w.rng.u64(100..3_000)),
                jitter: Duration::from_micros(w.rng.u64(0..3_000)),
                drop: 0.0,
            };
            w.sim.set_link(a, b, cfg);
        }
    }
    let mut migrations = 0;
    for _ in 0..150 {
        match w.rng.u8(0..20) {
            0..=9 => {
                w.call();
            }
            10..=11 => w.notify(),
            12 => {
                let (a, b) = (NODES[w.rng.usize(..3)], NODES[w.rng.usize(..3)]);
                if a != b && w.sim.is_up(a, b) {
                    w.sim.link_down(a, b);
                }
            }
            13..=14 => {
                let (a, b) = (NODES[w.rng.usize(..3)], NODES[w.rng.usize(..3)]);
                if a != b && !w.sim.is_up(a, b) {
                    w.sim.link_up(a, b);
                }
            }
            15 if w.try_migrate() => migrations += 1,
            _ => {}
        }
        w.serve();
        let ms = w.rng.u64(0..4);
        w.run_for(ms);
    }
    // The faults heal; every timeout (calls, participants' 10 s) has its time.
    for (i, &a) in NODES.iter().enumerate() {
        for &b in &NODES[i + 1..] {
            if !w.sim.is_up(a, b) {
                w.sim.link_up(a, b);
            }
        }
    }
    w.run_for(15_000);

    if let Ok(path) = std::env::var("DVS_SIM_TRACE") {
        let text: Vec<String> = w.sim.trace().iter().map(|e| format!("{e:?}")).collect();
        std::fs::write(path, text.join("\n")).unwrap();
    }
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.check_answers()))
        .map_err(|e| panic_text(&e))?;
    let reports = w.sim.outcomes().reports.len();
    if reports != migrations {
        return Err(format!("{migrations} migrations started, {reports} ended"));
    }
    let mut running: BTreeMap<i32, Vec<u16>> = BTreeMap::new();
    for n in w.sim.nodes() {
        for (dc, ep, r) in w.sim.core(n).registrations() {
            if dc == DC && matches!(r, Registration::Local { .. }) {
                running.entry(ep).or_default().push(n);
            }
        }
    }
    for (ep, nodes) in &running {
        if nodes.len() > 1 {
            return Err(format!("endpoint {ep} runs on nodes {nodes:?}"));
        }
    }
    for ep in w.servers.keys() {
        if !running.contains_key(ep) {
            return Err(format!("server {ep} runs nowhere"));
        }
    }
    Ok(())
}

fn panic_text(e: &Box<dyn std::any::Any + Send>) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

#[test]
fn invariants_hold_for_many_seeds() {
    let seeds: Vec<u64> = match std::env::var("DVS_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("DVS_SIM_SEED is a number")],
        Err(_) => {
            let n = std::env::var("DVS_SIM_SEEDS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(1000u64);
            (0..n).collect()
        }
    };
    let mut failed = Vec::new();
    for &seed in &seeds {
        let r = std::panic::catch_unwind(|| run(seed))
            .unwrap_or_else(|e| Err(format!("panicked: {}", panic_text(&e))));
        if let Err(why) = r {
            eprintln!(
                "seed {seed} failed: {why}\n  replay: DVS_SIM_SEED={seed} cargo test -p dvs-sim --test fault_seeds -- --nocapture"
            );
            failed.push(seed);
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} seeds broke an invariant: {failed:?} (replay commands above)",
        failed.len(),
        seeds.len()
    );
}
