//! The daemon: listeners, the accept loops, and signals.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::BytesMut;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::protocol::build::ProxyError;
use crate::runtime::{Phase, Runtime, Shared};
use crate::session;
use crate::workers::SessionThreads;

/// A large backlog: CI jobs open connection bursts, and a full backlog
/// costs clients a 1 s SYN retransmit.
const BACKLOG: i32 = 4096;

pub fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        // So that 0.0.0.0:P and [::]:P can both be listened on.
        socket.set_only_v6(true)?;
    }
    // SO_REUSEADDR lets a restart bind while old connections sit in
    // TIME_WAIT; it does not allow two live listeners on one port.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into()).with_context(|| {
        format!("cannot listen on {addr}: is another process (or interceptor) already using it?")
    })?;
    socket.listen(BACKLOG)?;
    Ok(TcpListener::from_std(socket.into())?)
}

/// Runs the daemon until SIGTERM/SIGINT. `threads` session threads serve
/// the connections; this (current-thread) runtime accepts and handles
/// signals.
pub async fn run(config_path: PathBuf, config: Config, threads: usize) -> anyhow::Result<()> {
    let listen = config.listen_addrs();
    let runtime = Runtime::build(config).context("cannot prepare the configuration")?;
    let listeners = listen
        .iter()
        .map(|a| bind(*a))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (phase_tx, phase_rx) = watch::channel(Phase::Serving);
    let shared = Arc::new(Shared::new(runtime, phase_rx));
    let sessions =
        Arc::new(SessionThreads::start(threads).context("cannot start session threads")?);
    info!(threads = sessions.len(), "session threads started");

    for listener in listeners {
        let addr = listener.local_addr()?;
        info!(%addr, "listening");
        tokio::spawn(accept_loop(listener, shared.clone(), sessions.clone()));
    }
    // Tests and scripts wait for this line on stderr.
    eprintln!("interceptor: ready");

    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = hup.recv() => reload(&config_path, &shared, &listen),
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }

    // Stop accepting first, so that anything that sees the log line also
    // sees the listeners closing.
    let _ = phase_tx.send(Phase::Draining);
    let grace = shared.runtime.load().config.limits.shutdown_grace;
    info!(
        active = shared.active(),
        ?grace,
        "shutting down: no new connections"
    );
    if tokio::time::timeout(grace, shared.all_idle())
        .await
        .is_err()
    {
        warn!(
            active = shared.active(),
            "grace period over: closing remaining sessions"
        );
        let _ = phase_tx.send(Phase::Closing);
        let _ = tokio::time::timeout(Duration::from_secs(5), shared.all_idle()).await;
    }
    info!("stopped");
    Ok(())
}

fn reload(path: &Path, shared: &Shared, listening: &[SocketAddr]) {
    let result = Config::load(path)
        .map_err(anyhow::Error::from)
        .and_then(|c| {
            if c.listen_addrs() != listening {
                warn!(
                    "listen addresses changed in {}; that takes a restart",
                    path.display()
                );
            }
            Runtime::build(c)
        });
    match result {
        Ok(rt) => {
            shared.runtime.store(Arc::new(rt));
            info!(path = %path.display(), "configuration reloaded");
        }
        Err(e) => error!("configuration reload failed, keeping the previous one: {e:#}"),
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, sessions: Arc<SessionThreads>) {
    let mut phase = shared.phase.clone();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = crate::runtime::reached(&mut phase, Phase::Draining) => return,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let local = match tcp.local_addr() {
            Ok(l) => l,
            Err(_) => continue,
        };
        let max = shared.runtime.load().config.limits.max_connections;
        match shared.admit(max) {
            Some(slot) => {
                // The socket moves to the session thread's IO driver.
                let Ok(std) = tcp.into_std() else { continue };
                let shared = shared.clone();
                sessions.spawn(async move {
                    match TcpStream::from_std(std) {
                        Ok(tcp) => session::serve(shared, tcp, peer, local, slot).await,
                        Err(e) => warn!("cannot hand the connection to a session thread: {e}"),
                    }
                });
            }
            None => {
                tokio::spawn(too_many(tcp, max));
            }
        }
    }
}

async fn too_many(mut tcp: TcpStream, max: usize) {
    let mut buf = BytesMut::new();
    ProxyError::fatal(
        "53300",
        format!("sorry, too many clients already (interceptor max_connections = {max})"),
    )
    .encode(&mut buf);
    let _ = tcp.write_all(&buf).await;
}
