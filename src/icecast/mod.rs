//! Icecast source push (`--icecast URL`): every stream, or the newest one,
//! is also sent to an Icecast 2.4 server as a source, so that Icecast and
//! its relays carry the MP3 (or Ogg/Opus) listeners a single relay cannot.
//! Owns following the registry's streams for each target: one push per
//! stream for a mount with `{id}` in it, or, for a fixed mount, one push of
//! the newest stream, switched when a newer stream starts or the pushed one
//! ends. The connection itself is `source.rs` (with its retry schedule, a
//! [`crate::backoff::Backoff`]), the URL `target.rs`. Imports go one way:
//! mod → source → target; the pushes read the registry and are listeners of a stream's
//! fan-out, like HTTP listeners.

mod source;
mod target;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinHandle;

pub use target::{IcecastUrl, Password, UrlError};

use crate::registry::{Registry, StreamEvent};
pub use source::Destination;

/// Why the Icecast targets cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("--icecast {0}: no password (put it in the URL, or give --icecast-password or --icecast-password-file)")]
    NoPassword(String),
    #[error("--icecast-password-file {0}: {1}")]
    PasswordFile(String, std::io::Error),
}

/// The targets with their passwords: the URL's own, else `password` (from
/// `--icecast-password`), else the first line of `password_file`. MP3
/// pushes announce `mp3_kbps`.
pub fn destinations(
    urls: &[IcecastUrl],
    password: Option<&Password>,
    password_file: Option<&Path>,
    mp3_kbps: u32,
) -> Result<Vec<Destination>, SetupError> {
    let from_file = match password_file {
        Some(path) if urls.iter().any(|u| u.password.is_none()) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| SetupError::PasswordFile(path.display().to_string(), e))?;
            text.lines()
                .next()
                .map(|line| Password::new(line.trim_end_matches('\r')))
        }
        _ => None,
    };
    let fallback = password.cloned().or(from_file).filter(|p| !p.is_empty());
    urls.iter()
        .map(|url| {
            let password = url
                .password
                .clone()
                .or_else(|| fallback.clone())
                .ok_or_else(|| SetupError::NoPassword(url.to_string()))?;
            Ok(Destination {
                url: Arc::new(url.clone()),
                password,
                mp3_kbps,
            })
        })
        .collect()
}

/// Starts following the registry's streams for every target; the pushes
/// run until the runtime stops.
pub fn start(registry: Arc<Registry>, destinations: Vec<Destination>) {
    for dest in destinations {
        tracing::info!(target = %dest.url, format = dest.url.format().name(), "icecast push configured");
        let events = registry.subscribe();
        tokio::spawn(follow(registry.clone(), dest, events));
    }
}

/// One running push, stopped when dropped: its retries end at once, and
/// with `abort`, its connection too.
struct Push {
    task: JoinHandle<()>,
    /// Dropping it tells the push that its stream is over.
    _stop: oneshot::Sender<()>,
}

impl Push {
    fn start(registry: &Registry, dest: &Destination, stream: &Arc<str>) -> Option<Push> {
        let (_, fanout) = registry.fanout(Some(stream), dest.url.format())?;
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(source::push(dest.clone(), stream.clone(), fanout, stopped));
        Some(Push { task, _stop: stop })
    }

    /// Cuts the connection now (another stream takes the mount).
    fn abort(self) {
        self.task.abort();
    }
}

/// The pushes of one target, kept in step with the registry's events.
async fn follow(
    registry: Arc<Registry>,
    dest: Destination,
    mut events: broadcast::Receiver<StreamEvent>,
) {
    let mut pushes = Pushes::new(dest);
    pushes.resync(&registry);
    loop {
        match events.recv().await {
            Ok(StreamEvent::Available(stream)) => pushes.started(&registry, &stream),
            Ok(StreamEvent::Ended(stream)) => pushes.ended(&registry, &stream),
            Ok(StreamEvent::Shutdown) | Err(broadcast::error::RecvError::Closed) => return,
            Err(broadcast::error::RecvError::Lagged(_)) => pushes.resync(&registry),
        }
    }
}

/// Which streams a target pushes now.
struct Pushes {
    dest: Destination,
    running: HashMap<Arc<str>, Push>,
}

impl Pushes {
    fn new(dest: Destination) -> Self {
        Self {
            dest,
            running: HashMap::new(),
        }
    }

    fn started(&mut self, registry: &Registry, stream: &Arc<str>) {
        if self.dest.url.follows_newest() {
            // The newest stream takes the mount: cut the old source first.
            for (_, old) in self.running.drain() {
                old.abort();
            }
        }
        if let Some(push) = Push::start(registry, &self.dest, stream) {
            self.running.insert(stream.clone(), push);
        }
    }

    fn ended(&mut self, registry: &Registry, stream: &Arc<str>) {
        // Dropping the push stops its retries; a live connection ends by
        // itself, after the stream's last bytes.
        let Some(push) = self.running.remove(stream) else {
            return;
        };
        if !self.dest.url.follows_newest() {
            return;
        }
        if let Some(newest) = registry.newest() {
            // An older stream takes the mount over now.
            push.abort();
            self.started(registry, &newest);
        }
    }

    /// After missed events: push exactly what the registry lists now.
    fn resync(&mut self, registry: &Registry) {
        let live = registry.list();
        self.running.retain(|stream, _| live.contains(stream));
        let wanted: Vec<Arc<str>> = if self.dest.url.follows_newest() {
            live.last().cloned().into_iter().collect()
        } else {
            live
        };
        for stream in wanted {
            if !self.running.contains_key(&stream) {
                self.started(registry, &stream);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(list: &[&str]) -> Vec<IcecastUrl> {
        list.iter().map(|u| u.parse().expect("url")).collect()
    }

    fn passwords(dests: &[Destination]) -> Vec<&str> {
        dests.iter().map(|d| d.password.expose()).collect()
    }

    #[test]
    fn the_urls_password_wins_then_the_flag_then_the_file() {
        let dir = std::env::temp_dir().join(format!("icecast-pw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("pw");
        std::fs::write(&file, "from file\r\nsecond line\n").expect("write");
        let list = urls(&["icecast://source:inurl@h/a.mp3", "icecast://h/b.mp3"]);
        let flag = Password::new("from flag");
        let d = destinations(&list, Some(&flag), None, 128).expect("ok");
        assert_eq!(passwords(&d), ["inurl", "from flag"]);
        let shown = format!("{d:?}");
        assert!(
            !shown.contains("inurl") && !shown.contains("from flag"),
            "{shown}"
        );
        let d = destinations(&list, None, Some(&file), 128).expect("ok");
        assert_eq!(passwords(&d), ["inurl", "from file"]);
        let err = destinations(&list, None, None, 128).expect_err("no password");
        assert!(
            err.to_string().contains("icecast://source@h:8000/b.mp3"),
            "{err}"
        );
        let err = destinations(&list, None, Some(&dir.join("missing")), 128).expect_err("no file");
        assert!(err.to_string().contains("--icecast-password-file"), "{err}");
        // The file is not read when every URL has its password.
        let own = urls(&["icecast://source:x@h/a.mp3"]);
        assert!(destinations(&own, None, Some(&dir.join("missing")), 128).is_ok());
        let _ = std::fs::remove_dir_all(dir);
    }
}
