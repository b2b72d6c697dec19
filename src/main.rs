//! Entry point: parse the configuration, start the media relay and the HTTP
//! server, and shut both down cleanly on SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::future::IntoFuture;

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;

use voice_relay::config::Config;
use voice_relay::http::{self, AppState};
use voice_relay::mp3::Mp3Config;
use voice_relay::registry::Registry;
use voice_relay::relay::{self, Command, RelayConfig};
use voice_relay::signalling::Signalling;

fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("voice_relay=info,str0m=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(run(config));
    runtime.shutdown_timeout(Duration::from_millis(500));
    result
}

async fn run(config: Config) -> anyhow::Result<()> {
    let mp3 = Mp3Config {
        bitrate_kbps: config.mp3_bitrate,
        burst_ms: config.mp3_burst_ms,
        listener_queue_batches: 32,
    };
    mp3.validate().context("invalid MP3 settings")?;
    let rtc_bind = config.rtc_bind();
    let announce: Vec<SocketAddr> = config
        .announce_ips()
        .into_iter()
        .map(|ip| SocketAddr::new(ip, rtc_bind.port()))
        .collect();
    let (relay, relay_thread) = relay::start(RelayConfig {
        bind: rtc_bind,
        announce,
        sender_idle: config.sender_idle(),
        handshake_timeout: config.handshake_timeout(),
    })
    .with_context(|| format!("binding the media socket udp/{rtc_bind}"))?;

    let registry = Arc::new(Registry::new());
    let signalling = Arc::new(Signalling {
        registry: registry.clone(),
        relay: relay.clone(),
        mp3,
    });
    let state = AppState {
        signalling,
        max_message_bytes: config.max_message_bytes,
        mp3_wait: Duration::from_millis(config.mp3_wait_ms),
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding tcp/{}", config.listen))?;
    tracing::info!(listen = %config.listen, "voice relay ready (HTTP + WebSocket)");

    let app = http::router(state);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        let _ = stop_rx.await;
    });
    let mut served = tokio::spawn(server.into_future());

    tokio::select! {
        _ = shutdown_signal() => {}
        res = &mut served => {
            // The server stopped on its own: that is an error.
            let _ = relay.send(Command::Shutdown);
            res.context("HTTP server task")?.context("HTTP server")?;
            return Ok(());
        }
    }
    tracing::info!("shutting down");
    // Tell every WebSocket client, close every peer (their tracks end) and
    // end every MP3 body, then give connections a bounded time to finish.
    registry.shutdown();
    let _ = relay.send(Command::Shutdown);
    let _ = stop_tx.send(());
    if tokio::time::timeout(SHUTDOWN_GRACE, &mut served)
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the grace period; closing them");
        served.abort();
    }
    let join = tokio::task::spawn_blocking(move || relay_thread.join());
    let _ = tokio::time::timeout(Duration::from_secs(1), join).await;
    tracing::info!("bye");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = ctrl_c.await;
            return;
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}

/// Raise the soft open-file limit to the hard limit: every listener is a socket.
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit with a valid, live struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// How long open connections may take to finish after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
