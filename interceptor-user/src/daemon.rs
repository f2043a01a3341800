//! The daemon: listeners, the accept loops, and signals.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use aya::maps::HashMap;
use bytes::BytesMut;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::audit::shipper::Shipper;
use crate::audit::{Auditor, Event, now_us};
use crate::config::{Config, Intercept};
use crate::intercept;
use crate::intercept::loader::{self, InstallSpec, Installed, Pins};
use crate::intercept::origin::{Origin, OriginMap};
use crate::protocol::build::ProxyError;
use crate::runtime::{Phase, Runtime, Shared};
use crate::session;
use crate::session::Arrival;
use crate::workers::{Sched, SessionThreads};

/// A large backlog: CI jobs open connection bursts, and a full backlog
/// costs clients a 1 s SYN retransmit.
const BACKLOG: i32 = 4096;

pub fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    listen(bind_socket(addr)?)
}

/// Binds without listening: the port is ours (a taken port fails here),
/// but no connection is queued until [`listen`].
fn bind_socket(addr: SocketAddr) -> anyhow::Result<Socket> {
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
    Ok(socket)
}

fn listen(socket: Socket) -> anyhow::Result<TcpListener> {
    socket.listen(BACKLOG)?;
    Ok(TcpListener::from_std(socket.into())?)
}

/// What the accept loop of an interception listener needs.
struct InterceptAccept {
    origins: Mutex<OriginMap>,
    cgroup_mount: PathBuf,
    runtime_dir: PathBuf,
}

/// Runs the daemon until SIGTERM/SIGINT. `threads` session threads serve
/// the connections; this (current-thread) runtime accepts and handles
/// signals.
pub async fn run(
    config_path: PathBuf,
    config: Config,
    threads: usize,
    sched: Sched,
) -> anyhow::Result<()> {
    let listen_addrs = config.listen_addrs();
    let intercept = config.intercept.as_ref().map(|i| i.get_ref().clone());
    let runtime = Runtime::build(config).context("cannot prepare the configuration")?;
    match &runtime.policy {
        Some(p) => info!(file = %p.source, "statement policy loaded"),
        None => warn!("no [policy] in the config: statements are relayed unchecked"),
    }
    let sockets = listen_addrs
        .iter()
        .map(|a| bind_socket(*a))
        .collect::<anyhow::Result<Vec<_>>>()?;
    // The interception port is bound before the kernel programs are
    // touched: if something else holds it, that process would receive the
    // redirected connections, so refuse to start.
    let mut intercept_sockets = Vec::new();
    if let Some(i) = &intercept {
        let [v4, v6] = intercept::listen_addrs(i);
        intercept_sockets.push(bind_socket(v4)?);
        match bind_socket(v6) {
            Ok(s) => intercept_sockets.push(s),
            // Redirected IPv6 connects are then refused, never direct.
            Err(e) => warn!("no IPv6 interception listener: {e:#}"),
        }
    }
    let mut installed = match &intercept {
        Some(i) => Some(install_interception(i, &runtime)?),
        None => None,
    };
    let intercept_accept = match (&intercept, installed.as_mut()) {
        (Some(i), Some(inst)) => {
            let origins = HashMap::try_from(
                inst.ebpf
                    .take_map(common::map_names::ORIGINS)
                    .context("ORIGINS map missing")?,
            )?;
            if i.bpf_log {
                spawn_bpf_logger(&mut inst.ebpf);
            }
            Some(Arc::new(InterceptAccept {
                origins: Mutex::new(OriginMap::new(origins)),
                cgroup_mount: inst.cgroup_mount.clone(),
                runtime_dir: i.runtime_dir.clone(),
            }))
        }
        _ => None,
    };
    let listeners = sockets
        .into_iter()
        .map(listen)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let intercept_listeners = intercept_sockets
        .into_iter()
        .map(listen)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (phase_tx, phase_rx) = watch::channel(Phase::Serving);
    let audit = if runtime.config.audit.enabled {
        let dir = runtime.config.audit_dir();
        let auditor = Auditor::start(&runtime.config.audit, &dir)
            .with_context(|| format!("cannot open the audit spool {}", dir.display()))?;
        auditor
            .record(Event::DaemonStart {
                ts_us: now_us(),
                version: env!("CARGO_PKG_VERSION").into(),
                pid: std::process::id(),
            })
            .await;
        Some(auditor)
    } else {
        warn!("audit is off ([audit] enabled = false): sessions and statements are not recorded");
        None
    };
    let shipper = match (&audit, &runtime.config.audit.clickhouse) {
        (Some(_), Some(ch)) => {
            let password = ch.load_password().map_err(anyhow::Error::msg)?;
            let shipper = Shipper::prepare(&runtime.config.audit_dir(), ch, password)
                .await
                .context("cannot ship the audit trail to ClickHouse")?;
            Some(shipper.spawn().context("cannot start the audit shipper")?)
        }
        _ => None,
    };
    let mask_key = crate::masking::load_key(&runtime.config.state_dir).with_context(|| {
        format!(
            "cannot read or make the masking key under {}",
            runtime.config.state_dir.display()
        )
    })?;
    let approvals = match runtime
        .config
        .approvals
        .as_ref()
        .map(|a| a.get_ref().clone())
    {
        Some(a) => {
            let dir = runtime.config.state_dir.join("approvals");
            let (store, lost) = crate::approvals::ApprovalStore::open(&dir, a.keep)
                .with_context(|| format!("cannot open the approval store {}", dir.display()))?;
            if let Some(auditor) = &audit {
                for r in &lost {
                    auditor
                        .record(crate::approvals::event(
                            r,
                            "session_lost",
                            "interceptor",
                            &r.decision_reason,
                        ))
                        .await;
                }
            }
            if !lost.is_empty() {
                warn!(
                    count = lost.len(),
                    "approval requests were pending when the daemon stopped; their sessions are gone (marked session_lost)"
                );
            }
            let tls = if a.tls {
                let tls = crate::config::ClientTls {
                    mode: crate::config::ClientTlsMode::Enabled,
                    ..runtime.config.client_tls.clone()
                };
                crate::tls::client_acceptor(&tls, &runtime.config.state_dir)?
            } else {
                None
            };
            let listener = crate::approvals::api::bind(a.listen).await?;
            info!(url = %a.base_url(), approvers = a.approvers.len(), "approvals API and console listening");
            Some((Arc::new(store), listener, tls))
        }
        None => None,
    };
    let mut shared = Shared::new(runtime, phase_rx, audit, mask_key);
    shared.approvals = approvals.as_ref().map(|(s, _, _)| s.clone());
    let shared = Arc::new(shared);
    if let Some((store, listener, tls)) = approvals {
        tokio::spawn(crate::approvals::api::serve(
            listener,
            tls,
            shared.clone(),
            store,
        ));
    }
    let sessions =
        Arc::new(SessionThreads::start(threads, sched).context("cannot start session threads")?);
    info!(
        threads = sessions.len(),
        bound_to_cpus = sessions.bound(),
        sched = ?sched,
        "session threads started"
    );

    for listener in listeners {
        let addr = listener.local_addr()?;
        info!(%addr, "listening");
        tokio::spawn(accept_loop(
            listener,
            shared.clone(),
            sessions.clone(),
            None,
        ));
    }
    for listener in intercept_listeners {
        let addr = listener.local_addr()?;
        info!(%addr, "listening for intercepted connections");
        tokio::spawn(accept_loop(
            listener,
            shared.clone(),
            sessions.clone(),
            intercept_accept.clone(),
        ));
    }
    // Tests and scripts wait for this line on stderr.
    eprintln!("interceptor: ready");

    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut policy_watch = PolicyWatch::new(&shared);
    let mut tick = tokio::time::interval(policy_watch.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stop_reason = loop {
        tokio::select! {
            _ = hup.recv() => {
                let event = reload(&config_path, &shared, &listen_addrs, installed.as_mut());
                if let Some(a) = &shared.audit {
                    a.record(event).await;
                }
                policy_watch = PolicyWatch::new(&shared);
            }
            _ = tick.tick(), if policy_watch.enabled() => {
                if let (Some(event), Some(a)) = (policy_watch.check(&shared), &shared.audit) {
                    a.record(event).await;
                }
            }
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
        }
    };

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
    if let Some(a) = &shared.audit {
        a.record(Event::DaemonStop {
            ts_us: now_us(),
            reason: stop_reason.into(),
        })
        .await;
        a.close().await;
    }
    // After the spool is closed, so its last pass ships everything.
    drop(shipper);
    info!("stopped");
    Ok(())
}

/// Reloads the policy when its file changes, as SIGHUP would but without
/// touching the rest of the configuration. Polls the file's metadata: a
/// stat per interval is nothing, and it sees every way a file is replaced
/// (in place, rename over, a new symlink target) without inotify's
/// per-editor corner cases.
struct PolicyWatch {
    file: Option<std::path::PathBuf>,
    stamp: Option<FileStamp>,
    interval: Duration,
}

#[derive(PartialEq, Eq)]
struct FileStamp {
    modified: Option<std::time::SystemTime>,
    len: u64,
    ino: u64,
}

fn stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        modified: m.modified().ok(),
        len: m.len(),
        ino: m.ino(),
    })
}

impl PolicyWatch {
    fn new(shared: &Shared) -> PolicyWatch {
        let runtime = shared.runtime.load();
        let p = runtime.config.policy.as_ref();
        let file = p
            .filter(|p| !p.watch_interval.is_zero())
            .map(|p| p.file.clone());
        PolicyWatch {
            stamp: file.as_deref().and_then(stamp),
            interval: p.map_or(Duration::from_secs(3600), |p| {
                p.watch_interval.max(Duration::from_millis(50))
            }),
            file,
        }
    }

    fn enabled(&self) -> bool {
        self.file.is_some()
    }

    /// The audit event for a reload, if the file changed.
    fn check(&mut self, shared: &Shared) -> Option<Event> {
        let file = self.file.as_ref()?;
        let now = stamp(file);
        if now == self.stamp {
            return None;
        }
        self.stamp = now;
        let (ok, detail) = match policies::Policy::load(file) {
            Ok(policy) => {
                let mut rt = Runtime::clone(&shared.runtime.load());
                rt.policy = Some(Arc::new(policy));
                shared.runtime.store(Arc::new(rt));
                info!(path = %file.display(), "policy file changed: statement policy reloaded");
                (true, "file changed".to_owned())
            }
            Err(e) => {
                error!("policy file changed but does not load, keeping the previous policy: {e}");
                (false, e.to_string())
            }
        };
        Some(Event::PolicyReload {
            ts_us: now_us(),
            file: file.display().to_string(),
            ok,
            detail,
        })
    }
}

/// Reloads the configuration; returns the audit event saying how it went.
fn reload(
    path: &Path,
    shared: &Shared,
    listening: &[SocketAddr],
    installed: Option<&mut Installed>,
) -> Event {
    let event = |ok: bool, detail: String| Event::PolicyReload {
        ts_us: now_us(),
        file: path.display().to_string(),
        ok,
        detail,
    };
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
            if let Some(inst) = installed
                && let Err(e) = loader::update_protected(&mut inst.ebpf, &rt.trie_entries())
            {
                error!("configuration reload failed, keeping the previous one: {e:#}");
                return event(false, format!("{e:#}"));
            }
            shared.runtime.store(Arc::new(rt));
            info!(path = %path.display(), "configuration reloaded");
            event(true, "SIGHUP: configuration and policy reloaded".into())
        }
        Err(e) => {
            error!("configuration reload failed, keeping the previous one: {e:#}");
            event(false, format!("{e:#}"))
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    sessions: Arc<SessionThreads>,
    intercept: Option<Arc<InterceptAccept>>,
) {
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
        // The kernel left a record for every connection it redirected. No
        // record: not redirected (someone dialled the port directly) or the
        // record is gone; either way, no identity, no session.
        let record = match &intercept {
            None => None,
            Some(ctx) => {
                let rec = ctx.origins.lock().ok().and_then(|mut m| m.take(peer));
                if rec.is_none() {
                    warn!(%peer, "no kernel origin record for this connection: closed");
                    tokio::spawn(no_origin(tcp));
                    continue;
                }
                rec
            }
        };
        let max = shared.runtime.load().config.limits.max_connections;
        match shared.admit(max) {
            Some(slot) => {
                // The socket moves to the session thread's IO driver.
                let Ok(std) = tcp.into_std() else { continue };
                let cpu = socket2::SockRef::from(&std).cpu_affinity().ok();
                let shared = shared.clone();
                let intercept = intercept.clone();
                sessions.spawn(cpu, async move {
                    let arrival =
                        match (record, intercept) {
                            (Some(rec), Some(ctx)) => Arrival::Intercepted(Box::new(
                                Origin::resolve(&rec, &ctx.cgroup_mount, &ctx.runtime_dir),
                            )),
                            _ => Arrival::Listener(local),
                        };
                    match TcpStream::from_std(std) {
                        Ok(tcp) => session::serve(shared, tcp, peer, arrival, slot).await,
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

async fn no_origin(mut tcp: TcpStream) {
    let mut buf = BytesMut::new();
    ProxyError::fatal(
        "08004",
        "interceptor: this connection was not redirected by the kernel (no origin record), so it has no verified identity",
    )
    .with_hint("Connect to the database's own address from a tagged cgroup (`interceptor run -- CMD`), not to the interception port.")
    .encode(&mut buf);
    let _ = tcp.write_all(&buf).await;
}

fn install_interception(i: &Intercept, runtime: &Runtime) -> anyhow::Result<Installed> {
    let protected = runtime.trie_entries();
    if protected.is_empty() {
        anyhow::bail!("[intercept] is set but no target has a destination to protect");
    }
    loader::install(InstallSpec {
        pins: Pins::new(&i.pin_dir),
        cgroup: &i.cgroup,
        runtime: intercept::runtime_config(i),
        protected,
        debug_log: i.bpf_log,
    })
    .context("cannot install interception (it needs root, bpffs and cgroup v2)")
}

/// Forwards the kernel programs' aya-log lines to the daemon log.
fn spawn_bpf_logger(ebpf: &mut aya::Ebpf) {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(l) => l,
        Err(e) => {
            warn!("eBPF debug log unavailable: {e}");
            return;
        }
    };
    tokio::spawn(async move {
        // SAFETY: the logger owns its perf/ring buffer fd for its whole
        // life, and the AsyncFd owns the logger.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        };
        let Ok(mut fd) = registered else {
            return;
        };
        while let Ok(mut guard) = fd.readable_mut().await {
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}
