//! Whether the server's long-lived threads still run. The media relay thread
//! must run for the life of the process, and an MP3 thread must not die by
//! panic; when either happens the server is broken for good, so `/health`
//! answers 503 and `main` exits non-zero (Docker's restart policy or Home
//! Assistant's watchdog then restarts it) instead of looking healthy.
//!
//! A thread holds a [`Watch`]; dropping it without [`Watch::finish`] (the
//! thread returned early, or is unwinding from a panic) records the failure.

use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::Notify;

/// Shared record of the first failure, if any; cheap to clone.
#[derive(Clone, Default)]
pub struct Liveness {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    failure: Mutex<Option<String>>,
    notify: Notify,
}

impl Liveness {
    /// The process's own record, read by `/health` and `main`.
    pub fn process() -> &'static Liveness {
        static PROCESS: OnceLock<Liveness> = OnceLock::new();
        PROCESS.get_or_init(Liveness::default)
    }

    /// A watch for a thread that must not end: it fails when dropped unless
    /// [`Watch::finish`]ed.
    pub fn watch(&self, thread: &'static str) -> Watch {
        Watch {
            liveness: self.clone(),
            thread,
            may_end: false,
        }
    }

    /// A watch for a thread that may end, but not by panic.
    pub fn watch_for_panic(&self, thread: &'static str) -> Watch {
        Watch {
            liveness: self.clone(),
            thread,
            may_end: true,
        }
    }

    /// Records a failure (the first one is kept).
    pub fn fail(&self, reason: String) {
        let mut failure = self
            .inner
            .failure
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if failure.is_none() {
            tracing::error!(reason, "the server is no longer healthy");
            *failure = Some(reason);
        }
        drop(failure);
        self.inner.notify.notify_waiters();
    }

    /// The first failure, if any.
    pub fn failure(&self) -> Option<String> {
        self.inner
            .failure
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Waits for a failure and returns it.
    pub async fn failed(&self) -> String {
        loop {
            let notified = self.inner.notify.notified();
            if let Some(reason) = self.failure() {
                return reason;
            }
            notified.await;
        }
    }
}

/// Held by a watched thread for as long as it runs.
pub struct Watch {
    liveness: Liveness,
    thread: &'static str,
    may_end: bool,
}

impl Watch {
    /// The thread ends as it should (a shutdown): no failure.
    pub fn finish(mut self) {
        self.may_end = true;
    }

    /// The thread ends because of `reason`.
    pub fn fail(self, reason: String) {
        self.liveness.fail(reason);
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.liveness.fail(format!("{} panicked", self.thread));
        } else if !self.may_end {
            self.liveness.fail(format!("{} stopped", self.thread));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_thread(f: impl FnOnce() + Send + 'static) {
        let _ = std::thread::spawn(f).join();
    }

    #[test]
    fn a_thread_that_panics_or_stops_is_a_failure() {
        let live = Liveness::default();
        let l = live.clone();
        run_thread(move || {
            let _watch = l.watch("worker");
            panic!("boom");
        });
        assert_eq!(live.failure().as_deref(), Some("worker panicked"));

        let live = Liveness::default();
        let l = live.clone();
        run_thread(move || drop(l.watch("worker")));
        assert_eq!(live.failure().as_deref(), Some("worker stopped"));

        let live = Liveness::default();
        let l = live.clone();
        run_thread(move || l.watch("worker").fail("worker: poll failed".into()));
        assert_eq!(live.failure().as_deref(), Some("worker: poll failed"));
    }

    #[test]
    fn finishing_or_ending_a_may_end_thread_is_not() {
        let live = Liveness::default();
        let (a, b) = (live.clone(), live.clone());
        run_thread(move || a.watch("relay").finish());
        run_thread(move || drop(b.watch_for_panic("mp3")));
        assert_eq!(live.failure(), None);
        let c = live.clone();
        run_thread(move || {
            let _watch = c.watch_for_panic("mp3");
            panic!("boom");
        });
        assert_eq!(live.failure().as_deref(), Some("mp3 panicked"));
    }

    #[tokio::test]
    async fn failed_wakes_a_waiter() {
        let live = Liveness::default();
        let waiter = tokio::spawn({
            let live = live.clone();
            async move { live.failed().await }
        });
        tokio::task::yield_now().await;
        let l = live.clone();
        run_thread(move || drop(l.watch("relay")));
        assert_eq!(waiter.await.unwrap(), "relay stopped");
    }
}
