//! One async HTTP listener of a stream (used where the socket cannot be
//! handed to the writer thread, e.g. behind TLS): the burst, then live
//! batches from the [`Ring`], as an HTTP body stream that ends with the
//! stream or with one error if the listener lags too far.

use std::io;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use tokio::sync::watch;

use super::ring::{Join, Ring, Shared};

/// Counts the listener in its ring while it lives.
struct ListenerGuard(Arc<Ring>);

impl Drop for ListenerGuard {
    fn drop(&mut self) {
        self.0.listener_left();
    }
}

/// Counts in the stream's `listener_count` until dropped (or until the
/// stream from [`into_stream`](Self::into_stream) is dropped).
pub struct Listener {
    burst: Bytes,
    /// Its format has a preamble that it has not had yet (its burst was
    /// empty): it goes before the first live batch.
    needs_preamble: bool,
    /// It joined before the pipeline's first publish: its burst comes then.
    pending: bool,
    /// Sequence number of the next live batch.
    next: u64,
    rx: watch::Receiver<u64>,
    guard: ListenerGuard,
}

/// What an async listener does next.
enum Step {
    Send(Bytes),
    Wait,
    End,
    Lagged(u64),
}

/// A listener's burst: batches `start..end` (its preamble first, if its
/// format has one), and whether the preamble is still owed.
fn burst_from(ring: &Ring, s: &Shared, start: u64, end: u64) -> (Bytes, bool) {
    let (from, to) = ((start - s.first_seq) as usize, (end - s.first_seq) as usize);
    let mut burst = BytesMut::new();
    let first = s.ring.get(from).filter(|_| from < to);
    if let Some(preamble) = first.and_then(|b| ring.preamble_for(b)) {
        burst.extend_from_slice(&preamble);
    }
    for b in s.ring.range(from..to) {
        burst.extend_from_slice(&b.data);
    }
    (burst.freeze(), first.is_none() && ring.preamble.is_some())
}

impl Listener {
    /// Joins `ring`: the burst and the place after it, taken atomically (or,
    /// before the pipeline's first publish, then). The `bool` says that this
    /// listener must start the ring's pipeline.
    pub(super) fn join(ring: &Arc<Ring>) -> (Self, bool) {
        let mut s = ring.lock();
        let rx = ring.watch();
        let join = ring.join(&mut s);
        let (burst, needs_preamble, pending, start) = match join {
            Join::At(at) => {
                let (burst, owed) = burst_from(ring, &s, at, s.end_seq());
                (burst, owed, false, false)
            }
            Join::Pending { start } => (Bytes::new(), false, true, start),
        };
        let next = s.end_seq();
        drop(s);
        let listener = Listener {
            burst,
            needs_preamble,
            pending,
            next,
            rx,
            guard: ListenerGuard(Arc::clone(ring)),
        };
        (listener, start)
    }

    /// The burst (its preamble and whole frames, possibly empty) this
    /// listener starts with.
    pub fn burst(&self) -> &Bytes {
        &self.burst
    }

    fn step(&mut self) -> Step {
        let ring = &self.guard.0;
        let s = ring.lock();
        let end = s.end_seq();
        if self.pending {
            let Some((start, warm_end)) = s.pending_start() else {
                return Step::Wait;
            };
            self.pending = false;
            if start < s.first_seq {
                return Step::Lagged(end - start);
            }
            let (burst, owed) = burst_from(ring, &s, start, warm_end);
            self.needs_preamble = owed;
            self.next = warm_end;
            if !burst.is_empty() {
                return Step::Send(burst);
            }
        }
        if self.next < s.first_seq || end - self.next > ring.queue_batches as u64 {
            return Step::Lagged(end.saturating_sub(self.next));
        }
        if self.next < end {
            let batch = &s.ring[(self.next - s.first_seq) as usize];
            self.next += 1;
            if std::mem::take(&mut self.needs_preamble) {
                if let Some(preamble) = ring.preamble_for(batch) {
                    let mut data = BytesMut::from(&preamble[..]);
                    data.extend_from_slice(&batch.data);
                    return Step::Send(data.freeze());
                }
            }
            return Step::Send(batch.data.clone());
        }
        if s.closed {
            Step::End
        } else {
            Step::Wait
        }
    }

    /// The HTTP body: burst, then live batches; ends after the stream ends;
    /// yields one `Err` (ending the response) if this listener lags by more
    /// than `listener_queue_batches`.
    pub fn into_stream(mut self) -> impl Stream<Item = Result<Bytes, io::Error>> + Send + 'static {
        let burst = std::mem::take(&mut self.burst);
        let first = (!burst.is_empty()).then_some(Ok(burst));
        let live = futures_util::stream::unfold(Some(self), |state| async move {
            let mut me = state?;
            loop {
                // Mark the current value seen before looking, so a publish
                // in between wakes `changed` below.
                me.rx.borrow_and_update();
                match me.step() {
                    Step::Send(data) => return Some((Ok(data), Some(me))),
                    Step::End => return None,
                    Step::Lagged(n) => {
                        me.guard.0.dropped_slow(n);
                        let err = io::Error::other("listener too slow");
                        return Some((Err(err), None));
                    }
                    Step::Wait => {
                        if me.rx.changed().await.is_err() {
                            return None;
                        }
                    }
                }
            }
        });
        futures_util::stream::iter(first).chain(live)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mp3::batch::tests::batch;
    use crate::mp3::{Fanout, Mp3Config};

    fn config(queue: usize, burst_ms: u32) -> Mp3Config {
        Mp3Config {
            burst_ms,
            burst_bytes: 0,
            listener_queue_batches: queue,
            ..Mp3Config::default()
        }
    }

    #[test]
    fn burst_covers_last_burst_ms_and_subscribe_is_gapless() {
        let fan = Fanout::new("t", &config(64, 100), Arc::default());
        for n in 0..10 {
            fan.publish(batch(n));
        }
        let l = fan.subscribe();
        // 24 ms batches, burst 100 ms → the last 5 (120 ms ≥ 100 ms, 96 ms < 100).
        let ids: Vec<u8> = l.burst().chunks(384).map(|c| c[4]).collect();
        assert_eq!(ids, vec![5, 6, 7, 8, 9]);
        assert_eq!(fan.listener_count(), 1);
        fan.publish(batch(10));
        fan.close();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("rt");
        let items: Vec<_> = rt.block_on(l.into_stream().collect::<Vec<_>>());
        let bytes: Vec<u8> = items
            .into_iter()
            .flat_map(|r| r.expect("ok").to_vec())
            .collect();
        let ids: Vec<u8> = bytes.chunks(384).map(|c| c[4]).collect();
        assert_eq!(ids, vec![5, 6, 7, 8, 9, 10]);
        assert_eq!(fan.listener_count(), 0, "dropped stream decrements");
        assert!(fan.is_closed());
        assert_eq!(fan.frames_published(), 11);
    }

    #[tokio::test]
    async fn slow_listener_is_dropped_fast_one_gets_everything() {
        let queue = 4;
        let fan = Fanout::new("t", &config(queue, 0), Arc::default());
        let slow = fan.subscribe().into_stream();
        let mut fast = Box::pin(fan.subscribe().into_stream());
        assert_eq!(fan.listener_count(), 2);
        let total = 3 * queue as u8 + 5;
        let mut got = Vec::new();
        for n in 0..total {
            fan.publish(batch(n));
            let item = fast.next().await.expect("item").expect("ok");
            got.push(item[4]);
        }
        fan.close();
        assert!(fast.next().await.is_none(), "fast listener ends cleanly");
        assert_eq!(got, (0..total).collect::<Vec<_>>());

        let items: Vec<_> = slow.collect().await;
        assert_eq!(items.len(), 1, "slow listener gets exactly one error");
        let err = items.into_iter().next().expect("one").expect_err("error");
        assert_eq!(err.kind(), io::ErrorKind::Other);
        assert_eq!(fan.counters().listeners_dropped_slow, 1);
        assert_eq!(fan.listener_count(), 0);
    }

    #[tokio::test]
    async fn backlog_over_limit_errors_even_below_channel_capacity() {
        // The listener is cut at its limit of 5 unread batches exactly.
        let fan = Fanout::new("t", &config(5, 0), Arc::default());
        let mut l = Box::pin(fan.subscribe().into_stream());
        for n in 0..5 {
            fan.publish(batch(n));
        }
        assert_eq!(l.next().await.expect("item").expect("ok")[4], 0);
        for n in 5..7 {
            fan.publish(batch(n));
        }
        // 6 unread > 5: cut.
        assert!(l.next().await.expect("item").is_err());
        assert!(l.next().await.is_none());
    }

    #[tokio::test]
    async fn subscribe_after_close_gets_burst_then_end() {
        let fan = Fanout::new("t", &config(8, 1000), Arc::default());
        fan.publish(batch(1));
        fan.close();
        fan.publish(batch(2)); // ignored after close
        let items: Vec<_> = fan.subscribe().into_stream().collect().await;
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].as_ref().expect("ok")[4], 1);
    }
}
