//! The loop's timer heap: every peer's next wake-up (its str0m timeout, or a
//! deadline of its life), earliest first. A peer keeps at most one live
//! entry ([`super::peer::Peer::schedule`]); superseded entries are skipped
//! when they come up.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

use super::handle::PeerId;

#[derive(Default)]
pub(super) struct Timers {
    heap: BinaryHeap<Reverse<(Instant, PeerId)>>,
}

impl Timers {
    pub fn push(&mut self, at: Instant, id: PeerId) {
        self.heap.push(Reverse((at, id)));
    }

    /// The earliest entry due at `now`, removed from the heap.
    pub fn pop_due(&mut self, now: Instant) -> Option<(Instant, PeerId)> {
        let Reverse((at, id)) = *self.heap.peek()?;
        if at > now {
            return None;
        }
        self.heap.pop();
        Some((at, id))
    }

    /// When the earliest entry is due.
    pub fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, _))| *at)
    }
}

impl Extend<(Instant, PeerId)> for Timers {
    fn extend<I: IntoIterator<Item = (Instant, PeerId)>>(&mut self, iter: I) {
        for (at, id) in iter {
            self.push(at, id);
        }
    }
}
