//! Entry point: parse the configuration, start the media relay and the HTTP
//! server, and shut both down cleanly on SIGTERM or Ctrl-C.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::CommandFactory;
use tracing_subscriber::EnvFilter;

use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};
use voice_relay::config::{Action, Config};
use voice_relay::http::{self, AppState, IceTcpDemux, Mp3Acceptor, TuneSocket};
use voice_relay::ice_servers::IceServers;
use voice_relay::icecast;
use voice_relay::liveness::Liveness;
use voice_relay::mp3::Mp3Config;
use voice_relay::options;
use voice_relay::probe::Probe;
use voice_relay::registry::Registry;
use voice_relay::relay::{self, Command, RelayConfig, RelayHandle};
use voice_relay::signalling::Signalling;
use voice_relay::tls;
use voice_relay::whip_push::Pushes;

fn main() -> anyhow::Result<()> {
    let configured = match options::configure(&Config::command().get_matches()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("voice-relay: {e:#}");
            std::process::exit(2);
        }
    };
    let config = configured.config;
    if let Some(Action::Health { timeout_secs }) = config.action {
        health(&config, Duration::from_secs(timeout_secs.max(1)));
    }
    let ice_servers = match config.ice_servers() {
        Ok(servers) => servers,
        Err(e) => {
            eprintln!("voice-relay: {e}");
            std::process::exit(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            let str0m = if config.log_level == "error" {
                "error"
            } else {
                "warn"
            };
            EnvFilter::new(format!("voice_relay={},str0m={str0m}", config.log_level))
        }))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    if let Some(path) = &configured.options_file {
        tracing::info!(file = %path.display(), "options file applied (flags and environment variables win)");
    }
    for key in &configured.unknown_keys {
        tracing::warn!("options file: unknown option {key:?} ignored (from a newer version?)");
    }
    if !ice_servers.is_empty() {
        tracing::info!(servers = ?ice_servers.uris(), "STUN/TURN servers handed to clients");
    }
    raise_fd_limit();
    // A panic is logged like any other event; tokio contains one in a
    // connection's task, the relay contains one to its peer.
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        tracing::error!(thread = thread.name().unwrap_or("?"), "panic: {info}");
    }));
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(run(config, ice_servers));
    runtime.shutdown_timeout(Duration::from_millis(500));
    result
}

async fn run(config: Config, ice_servers: IceServers) -> anyhow::Result<()> {
    let mp3 = Mp3Config {
        bitrate_kbps: config.mp3_bitrate,
        burst_ms: config.mp3_burst_ms,
        burst_bytes: config.mp3_burst_bytes,
        listener_queue_batches: 16,
    };
    mp3.validate().context("invalid MP3 settings")?;
    let icecast = icecast::destinations(
        &config.icecast,
        config.icecast_password.as_ref(),
        config.icecast_password_file.as_deref(),
        config.mp3_bitrate,
    )?;
    let rtc_bind = config.rtc_bind();
    let announce: Vec<SocketAddr> = config
        .announce_ips()
        .into_iter()
        .map(|ip| SocketAddr::new(ip, rtc_bind.port()))
        .collect();
    // ICE-TCP shares the main listener's port: its acceptor hands those
    // connections to the relay.
    let announce_tcp: Vec<SocketAddr> = config
        .announce_ips()
        .into_iter()
        .map(|ip| SocketAddr::new(ip, config.listen.port()))
        .collect();
    let (relay, relay_thread) = relay::start(RelayConfig {
        bind: rtc_bind,
        announce,
        announce_tcp,
        sender_idle: config.sender_idle(),
        handshake_timeout: config.handshake_timeout(),
        forward_threads: config.forward_threads,
        liveness: Liveness::process().clone(),
    })
    .with_context(|| format!("binding the media socket udp/{rtc_bind}"))?;

    let registry = Arc::new(Registry::new());
    let signalling = Arc::new(Signalling {
        registry: registry.clone(),
        relay: relay.clone(),
        mp3,
        limits: config.limits(),
        handshake_timeout: config.handshake_timeout(),
        ice_servers,
        pushes: Pushes::new(
            relay.clone(),
            config.whip_push.clone(),
            config
                .whip_push_token()
                .context("reading --whip-push-token-file")?,
        ),
    });
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(tls::load(cert, key)?),
        _ if config.tls_self_signed => Some(tls::self_signed(
            &config.data_dir,
            &config.announce_ips(),
            &config.tls_hostname,
        )?),
        _ => None,
    };
    let state = AppState {
        signalling: signalling.clone(),
        max_message_bytes: config.max_message_bytes,
        mp3_wait: Duration::from_millis(config.mp3_wait_ms),
        ca_pem: tls.as_ref().map(|t| Arc::new(t.ca_pem.clone())),
        access: Arc::new(config.access().context("reading --token-file")?),
        trusted_proxies: Arc::new(config.trusted_proxies()),
        whip: voice_relay::whip::Sessions::new(signalling),
    };

    let handle = axum_server::Handle::<SocketAddr>::new();
    let mut servers = tokio::task::JoinSet::new();
    let main_app = http::router(state.clone()).into_make_service_with_connect_info::<SocketAddr>();
    let main_std = bind_tcp(config.listen)?;
    match &tls {
        Some(t) => {
            let rustls = RustlsConfig::from_pem(t.cert_pem.clone(), t.key_pem.clone())
                .await
                .context("loading the TLS certificate and key")?;
            let server = axum_server::from_tcp(main_std)?
                .acceptor(
                    RustlsAcceptor::new(rustls)
                        .acceptor(IceTcpDemux::new(TuneSocket, relay.clone())),
                )
                .handle(handle.clone());
            servers.spawn(async move { server.serve(main_app).await });
            tracing::info!(listen = %config.listen, "voice relay ready (HTTPS + WSS)");
        }
        None => {
            let server = axum_server::from_tcp(main_std)?
                .acceptor(IceTcpDemux::new(
                    Mp3Acceptor::new(state.clone()),
                    relay.clone(),
                ))
                .handle(handle.clone());
            servers.spawn(async move { server.serve(main_app).await });
            tracing::info!(listen = %config.listen, "voice relay ready (HTTP + WebSocket)");
        }
    }
    if let Some(addr) = config.audio_listen {
        let audio_app =
            http::audio_router(state.clone()).into_make_service_with_connect_info::<SocketAddr>();
        let server = axum_server::from_tcp(bind_tcp(addr)?)?
            .acceptor(Mp3Acceptor::new(state.clone()))
            .handle(handle.clone());
        servers.spawn(async move { server.serve(audio_app).await });
        tracing::info!(listen = %addr, "plain-HTTP audio listener ready (MP3, status, health)");
    }

    icecast::start(registry.clone(), icecast);

    // A thread the server needs died: shut down as on a signal, then exit
    // non-zero so that a supervisor restarts the server.
    let mut failure = None;
    tokio::select! {
        _ = shutdown_signal() => {}
        reason = Liveness::process().failed() => failure = Some(reason),
        res = servers.join_next() => {
            // A server stopped on its own: that is an error.
            let _ = relay.send(Command::Shutdown);
            if let Some(res) = res {
                res.context("HTTP server task")?.context("HTTP server")?;
            }
            anyhow::bail!("an HTTP listener stopped unexpectedly");
        }
    }
    shut_down(&registry, &relay, &handle, servers, relay_thread).await;
    if let Some(reason) = failure {
        anyhow::bail!("{reason}");
    }
    tracing::info!("bye");
    Ok(())
}

/// Tells every WebSocket client, closes every peer (their tracks end) and
/// ends every MP3 body, then gives connections a bounded time to finish.
async fn shut_down(
    registry: &Registry,
    relay: &RelayHandle,
    handle: &axum_server::Handle<SocketAddr>,
    mut servers: tokio::task::JoinSet<std::io::Result<()>>,
    relay_thread: std::thread::JoinHandle<()>,
) {
    tracing::info!("shutting down");
    registry.shutdown();
    let _ = relay.send(Command::Shutdown);
    handle.graceful_shutdown(Some(SHUTDOWN_GRACE));
    let all_done = async { while servers.join_next().await.is_some() {} };
    if tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_millis(500), all_done)
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the grace period; closing them");
        servers.abort_all();
    }
    let join = tokio::task::spawn_blocking(move || relay_thread.join());
    let _ = tokio::time::timeout(Duration::from_secs(1), join).await;
    // Let MP3 writers send their listeners the end of the stream.
    let _ = tokio::task::spawn_blocking(|| voice_relay::mp3::wait_writers(Duration::from_secs(1)))
        .await;
}

/// `voice-relay health`: probes the configured listener and exits 0 when
/// healthy, 1 otherwise.
fn health(config: &Config, timeout: Duration) -> ! {
    let probe = Probe::new(config.listen, config.serves_tls(), timeout);
    match probe.check() {
        Ok(()) => {
            println!("healthy: {}", probe.url());
            std::process::exit(0)
        }
        Err(e) => {
            eprintln!("unhealthy: {}: {e}", probe.url());
            std::process::exit(1)
        }
    }
}

/// Binds a TCP listener with a deep accept queue: thousands of MP3 listeners
/// may connect at once (a speaker group, a restart), and the default of 128
/// overflows.
fn bind_tcp(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let bind = || -> std::io::Result<std::net::TcpListener> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_reuse_address(true)?;
        if addr.is_ipv6() {
            socket.set_only_v6(false)?;
        }
        socket.bind(&addr.into())?;
        socket.listen(LISTEN_BACKLOG)?;
        socket.set_nonblocking(true)?;
        Ok(socket.into())
    };
    bind().with_context(|| format!("binding tcp/{addr}"))
}

/// Accept queue length (the kernel caps it at `net.core.somaxconn`).
const LISTEN_BACKLOG: i32 = 4096;

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
