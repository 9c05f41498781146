//! Under random link delays (and frames of different links overtaking each other) no call is
//! lost, taken twice or answered twice: every sendrec gets exactly the reply to its own
//! request.

mod workload;

use std::time::Duration;

use dvs_sim::LinkConfig;
use dvs_wire::local::LocalResponse;
use workload::{World, NODES};

/// Seeds tried; each run is a few hundred calls.
const SEEDS: u64 = 24;

fn run(seed: u64) {
    let mut w = World::new(seed, 4, 8);
    w.sim.reorder = true;
    // Every link its own delays, from the workload's PRNG.
    for (i, &a) in NODES.iter().enumerate() {
        for &b in &NODES[i + 1..] {
            let cfg = LinkConfig {
                delay: Duration::from_micros(w.rng.u64(0..5_000)),
                jitter: Duration::from_micros(w.rng.u64(0..10_000)),
                drop: 0.0,
            };
            w.sim.set_link(a, b, cfg);
        }
    }
    for _ in 0..300 {
        if w.rng.bool() {
            w.call();
        }
        if w.rng.u8(0..8) == 0 {
            w.notify();
        }
        w.serve();
        let ms = w.rng.u64(0..3);
        w.run_for(ms);
    }
    // Everything in flight arrives; every server answers.
    w.run_for(1_000);
    w.check_answers();
    for (id, c) in &w.calls {
        assert!(
            matches!(c.answers[..], [LocalResponse::Msg(_)]),
            "seed {seed}: call {id} failed with every link up: {c:?}"
        );
    }
    // The only other responses are the notifications' (to clients).
    for (p, r) in &w.stray {
        assert!(
            w.clients.iter().any(|(c, _)| c == p) && *r == LocalResponse::Done,
            "seed {seed}: stray {r:?} to {p:?}"
        );
    }
    assert_eq!(w.taken.len(), w.calls.len(), "seed {seed}: calls not taken");
}

#[test]
fn no_call_is_lost_or_answered_twice_under_random_delays() {
    for seed in 0..SEEDS {
        run(seed);
    }
}
