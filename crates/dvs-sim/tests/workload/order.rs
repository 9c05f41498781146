//! Per-pair order: what one endpoint sends another is received in the order it was sent,
//! and at most once.
//!
//! The links are TCP streams, so order holds as long as no link is cut and no node crashes
//! while messages are under way (a cut loses what was in flight, and a caller that got
//! `NodeUnreachable` may call again while its first message is still held somewhere).
//! Migrations do not excuse disorder: held calls and notifications are replayed in their
//! order. So a message received after a later one of the same pair is a violation unless a
//! link went down or a node crashed since it was sent ([`Order::sync`] gives the count).
//!
//! Two notifications whose receiver migrated between them are no exception: the source
//! sends the ones it held with the process (in its captured state), so a later one, sent
//! to the destination directly, cannot overtake them (seed 16948 of 100,000 found that it
//! could). Calls have one under way per caller at a time.
//!
//! Notifications carry one bit each (M3-IPC merges pending notifications of one source into
//! one bitmap): the k-th notification of a pair is `1 << k`, which also makes a duplicate
//! visible.

use std::collections::BTreeMap;

use dvs_wire::Ep;

/// Notifications of one pair beyond this many are not sent (one bit each in a word).
const MAX_NOTIFIES: u32 = 64;

/// What was sent and received per pair `(sender, receiver)`.
#[derive(Default)]
pub struct Order {
    /// Link cuts and crashes so far.
    disruptions: u64,
    /// Disruptions before each call was sent.
    call_epoch: BTreeMap<u64, u64>,
    /// The latest call taken per pair.
    last_call: BTreeMap<(Ep, Ep), u64>,
    /// Notifications sent per pair, with the disruptions before each.
    notify_epoch: BTreeMap<(Ep, Ep), Vec<u64>>,
    /// Bits received per pair.
    notify_seen: BTreeMap<(Ep, Ep), u64>,
}

impl Order {
    /// How many times a link went down so far ([`dvs_sim::Sim::disruptions`]): what was
    /// under way before may be lost or overtaken.
    pub fn sync(&mut self, disruptions: u64) {
        self.disruptions = disruptions;
    }

    /// Call `id` was sent now.
    pub fn sent_call(&mut self, id: u64) {
        self.call_epoch.insert(id, self.disruptions);
    }

    /// Server `to` took call `id` from `from`.
    pub fn took_call(&mut self, from: Ep, to: Ep, id: u64) -> Result<(), String> {
        let last = self.last_call.entry((from, to)).or_default();
        let late = *last > id;
        let overtaken = *last;
        *last = (*last).max(id);
        if late && self.call_epoch[&id] == self.disruptions {
            return Err(format!(
                "{to} took call {id} of {from} after its later call {overtaken}, with no link \
                 cut or crash since it was sent"
            ));
        }
        Ok(())
    }

    /// The value of the next notification from `from` to `to`, if the pair has bits left.
    pub fn next_notify(&mut self, from: Ep, to: Ep) -> Option<u64> {
        let sent = self.notify_epoch.entry((from, to)).or_default();
        if sent.len() as u32 >= MAX_NOTIFIES {
            return None;
        }
        let value = 1u64 << sent.len();
        sent.push(self.disruptions);
        Some(value)
    }

    /// `to` received notification bits `value` from `from`.
    pub fn took_notify(&mut self, from: Ep, to: Ep, value: u64) -> Result<(), String> {
        let sent = self.notify_epoch.get(&(from, to)).map_or(0, Vec::len) as u32;
        let seen = self.notify_seen.entry((from, to)).or_default();
        if value == 0 || (sent < MAX_NOTIFIES && value >> sent != 0) {
            return Err(format!(
                "{to} got notification bits {value:#x} from {from}, which sent {sent}"
            ));
        }
        if *seen & value != 0 {
            return Err(format!(
                "{to} got notification bits {:#x} of {from} twice",
                *seen & value
            ));
        }
        let highest_before = 63 - seen.leading_zeros().min(63);
        let lowest_now = value.trailing_zeros();
        let earlier = *seen != 0 && lowest_now < highest_before;
        *seen |= value;
        let cuts = self.notify_epoch[&(from, to)][lowest_now as usize];
        if earlier && cuts == self.disruptions {
            return Err(format!(
                "{to} got notification {lowest_now} of {from} after its notification \
                 {highest_before}, with no link cut or crash since it was sent"
            ));
        }
        Ok(())
    }
}
