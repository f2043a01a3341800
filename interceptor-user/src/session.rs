//! One client connection, from the first byte to the end: encryption
//! negotiation, startup, client authentication, the upstream login, then
//! the relay.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::BytesMut;
use pgwire::messages::startup::Authentication;
use tokio::net::TcpStream;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::audit::session::SessionAudit;
use crate::audit::{Event, SessionEnd, SessionStart, now_us};
use crate::auth::SCRAM_SHA_256;
use crate::cancel::{UpstreamKey, send_cancel};
use crate::config::ClientAuthMethod;
use crate::enforce::Enforcer;
use crate::intercept::origin::Origin;
use crate::oidc::TokenError;
use crate::protocol::build::{self, ProxyError};
use crate::protocol::startup::{StartupMessage, StartupPacket, next_startup_packet};
use crate::protocol::{ProtocolError, Reader};
use crate::relay::{self, RelayEnd};
use crate::runtime::{Runtime, SessionSlot, Shared, TargetRuntime};
use crate::stream::{Conn, MaybeTls, ReadError};
use crate::upstream::{self, UpstreamError};

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

/// How a connection reached the proxy.
pub enum Arrival {
    /// On a configured listener (this local address): the client chose the proxy.
    Listener(SocketAddr),
    /// Redirected by the kernel; the workload is known.
    Intercepted(Box<Origin>),
}

/// Serves one accepted connection. Never panics on client input; every
/// failure ends this session only.
pub async fn serve(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    arrival: Arrival,
    slot: SessionSlot,
) {
    let _slot = slot;
    let arrived = std::time::Instant::now();
    let id = NEXT_SESSION.fetch_add(1, Ordering::Relaxed);
    let span = info_span!("session", session_id = id, %peer);
    let runtime = shared.runtime.load_full();
    let Some((client, session)) = start(&shared, &runtime, tcp, &arrival)
        .instrument(span.clone())
        .await
    else {
        return;
    };
    let (_cancel_guard, pid, secret) = shared.cancels.register(UpstreamKey {
        host: session.target.config.upstream.host.clone(),
        port: session.target.config.upstream.port,
        pid: session.upstream.pid,
        secret: session.upstream.secret.clone(),
    });
    let Some(client) = greet(client, &session, pid, secret, &arrival)
        .instrument(span.clone())
        .await
    else {
        return;
    };
    // The relay runs outside the span: entering a span on every poll costs
    // more than the relay's own work per message. Its outcome is logged in it.
    let mut session_uuid = uuid::Uuid::now_v7();
    let audit = match &shared.audit {
        Some(auditor) => {
            let start = session_start(&session, &client, peer, &arrival, arrived);
            session_uuid = start.session;
            let audit = Arc::new(SessionAudit::new(start.session, start.principal.clone()));
            span.in_scope(|| info!(audit_session = %start.session, "audited"));
            auditor.record(Event::SessionStart(Box::new(start))).await;
            Some(audit)
        }
        None => None,
    };
    // Masks are fixed at login, as the result cap is.
    let masking = session.policy.as_ref().and_then(|p| {
        let masks = p.policy.masks_for(&p.subject, shared.mask_key.clone());
        (!masks.is_empty()).then(|| {
            let catalog = shared.catalogs.get(
                &session.target,
                &session.database,
                runtime.config.limits.connect_timeout,
                runtime.upstream_mark,
            );
            crate::masking::session(Arc::new(masks), shared.lineages.clone(), catalog)
        })
    });
    let (masking, guard) = match masking {
        Some((front, back, guard)) => (Some((front, back)), Some(guard)),
        None => (None, None),
    };
    let enforcer = session.policy.map(|p| {
        let mut e = Enforcer::new(shared.clone(), p.policy, p.principal, p.subject, id);
        if let Some(g) = guard {
            e.guard_masked(g);
        }
        if shared.approvals.is_some() {
            e.enable_holds(crate::enforce::HoldContext {
                session: session_uuid,
                target: session.target.config.name.clone(),
                database: session.database.clone(),
                user: session.user.clone(),
            });
        }
        e
    });
    let end = relay::run(
        client,
        session.upstream.conn,
        &shared,
        &runtime.config.limits,
        enforcer,
        audit.clone(),
        masking,
    )
    .await;
    span.in_scope(|| match &end {
        RelayEnd::Error(e) => warn!("session ended: {e}"),
        end => info!(outcome = ?end, "session ended"),
    });
    if let (Some(auditor), Some(audit)) = (&shared.audit, audit) {
        let (outcome, stats) = match &end {
            RelayEnd::Terminated(s) => ("terminated".to_owned(), s.clone()),
            RelayEnd::ClientClosed(s) => ("client closed".to_owned(), s.clone()),
            RelayEnd::UpstreamClosed(s) => ("server closed".to_owned(), s.clone()),
            RelayEnd::Fatal(e, s) => (format!("ended by interceptor: {e}"), s.clone()),
            RelayEnd::Error(e) => (format!("error: {e}"), Default::default()),
        };
        auditor
            .record(Event::SessionEnd(SessionEnd {
                session: audit.session(),
                ts_us: now_us(),
                outcome,
                duration_us: arrived.elapsed().as_micros() as u64,
                bytes_from_client: stats.bytes_from_client,
                bytes_to_client: stats.bytes_to_client,
                statements: stats.queries,
            }))
            .await;
    }
}

/// The audit trail's record of who a session is.
fn session_start(
    session: &LoggedIn,
    client: &Conn,
    peer: SocketAddr,
    arrival: &Arrival,
    arrived: std::time::Instant,
) -> SessionStart {
    let built;
    let p = match &session.policy {
        Some(p) => &p.principal,
        None => {
            built = principal(&session.user, arrival);
            &built
        }
    };
    let token = p.token.as_ref();
    SessionStart {
        session: uuid::Uuid::now_v7(),
        ts_us: now_us(),
        principal: p.display_name(),
        user: session.user.clone(),
        database: session.database.clone(),
        target: session.target.config.name.clone(),
        client_addr: peer.to_string(),
        tls: client.io.is_tls(),
        intercepted: p.intercepted,
        pid: p.pid,
        uid: p.uid,
        exe: p.exe.clone().unwrap_or_default(),
        comm: p.comm.clone().unwrap_or_default(),
        cgroup: p.cgroup.clone().unwrap_or_default(),
        job: p.job.clone().unwrap_or_default(),
        token_issuer: token.map(|t| t.issuer.clone()).unwrap_or_default(),
        token_subject: token.map(|t| t.subject.clone()).unwrap_or_default(),
        claims: token
            .map(|t| t.claims.clone().into_iter().collect())
            .unwrap_or_default(),
        login_us: arrived.elapsed().as_micros() as u64,
    }
}

/// Login up to (not including) AuthenticationOk to the client.
async fn start(
    shared: &Shared,
    runtime: &Runtime,
    tcp: TcpStream,
    arrival: &Arrival,
) -> Option<(Conn, LoggedIn)> {
    let _ = tcp.set_nodelay(true);
    let mut client = Conn::new(MaybeTls::Plain(tcp));
    let startup_timeout = runtime.config.limits.startup_timeout;
    let login = tokio::time::timeout(
        startup_timeout,
        login(shared, runtime, &mut client, arrival),
    )
    .await;
    match login {
        Ok(Ok(Some(s))) => Some((client, s)),
        Ok(Ok(None)) => None,
        Ok(Err(e)) => {
            refuse(&mut client, e).await;
            None
        }
        Err(_) => {
            let e = ProxyError::fatal(
                "08006",
                format!("login did not finish within {startup_timeout:?}"),
            );
            refuse(&mut client, LoginError::Client(e)).await;
            None
        }
    }
}

/// Tells the client it is in: AuthenticationOk, the server's parameters,
/// the proxy's cancel key, ReadyForQuery.
async fn greet(
    mut client: Conn,
    session: &LoggedIn,
    pid: i32,
    secret: i32,
    arrival: &Arrival,
) -> Option<Conn> {
    let mut hello = BytesMut::new();
    build::authentication(Authentication::Ok, &mut hello);
    hello.extend_from_slice(&session.upstream.greeting);
    build::backend_key_data(pid, secret, &mut hello);
    build::ready_for_query(session.upstream.status, &mut hello);
    client.send(&hello).await.ok()?;
    info!(
        user = %session.user,
        database = %session.database,
        target = %session.target.config.name,
        tls = client.io.is_tls(),
        upstream_port = session.upstream.local_port,
        origin = %OriginDisplay(arrival),
        "session started"
    );
    Some(client)
}

struct LoggedIn {
    user: String,
    database: String,
    target: Arc<TargetRuntime>,
    upstream: upstream::Upstream,
    /// `None` when no policy is set.
    policy: Option<SessionPolicyStart>,
}

/// The policy a session starts under and who it is applied to.
struct SessionPolicyStart {
    policy: Arc<policies::Policy>,
    principal: policies::Principal,
    subject: policies::Subject,
}

/// The identity statements are decided for, from what the kernel saw (for
/// intercepted connections) and the user name the client gave.
fn principal(user: &str, arrival: &Arrival) -> policies::Principal {
    let mut p = policies::Principal {
        user: user.to_owned(),
        ..Default::default()
    };
    if let Arrival::Intercepted(o) = arrival {
        p.intercepted = true;
        p.uid = Some(o.uid);
        p.pid = Some(o.tgid);
        p.comm = Some(o.comm.clone());
        p.exe = o.exe.as_ref().map(|e| e.display().to_string());
        p.cgroup = o.cgroup.clone();
        if let Some(j) = &o.job {
            p.job = Some(j.job.clone());
            p.ci = j.ci.clone();
        }
    }
    p
}

/// With a policy, the client may not set guarded settings at startup
/// (`options=-c role=...` would undo the policy before the first
/// statement); interceptor sets application_name and, for read-only
/// principals, default_transaction_read_only itself.
fn policy_startup(
    policy: &policies::Policy,
    principal: &policies::Principal,
    target: &str,
    database: &str,
    forwarded: &mut Vec<(String, String)>,
) -> Result<policies::Subject, ProxyError> {
    for (k, v) in forwarded.iter() {
        let guarded = match k.as_str() {
            "options" => !v.trim().is_empty(),
            "database" | "application_name" => false,
            // A client-only encoding (SJIS, GBK...) or non-standard
            // strings would make the server read statements differently
            // from the policy's parser.
            k if policies::analysis::catalog::affects_parsing(k) => {
                !policies::analysis::catalog::keeps_parsing(k, v)
            }
            k => policies::analysis::catalog::setting_is_guarded(k),
        };
        if guarded {
            return Err(ProxyError::fatal(
                "42501",
                format!("interceptor: startup parameter \"{k}\" is not allowed under the statement policy"),
            )
            .with_hint("Connect without it; interceptor decides roles and guarded settings."));
        }
    }
    forwarded.retain(|(k, _)| k != "application_name");
    forwarded.push(("application_name".into(), principal.display_name()));
    let subject = policy.subject(principal, target, database);
    if policy.read_only_for(&subject) {
        forwarded.push(("default_transaction_read_only".into(), "on".into()));
    }
    Ok(subject)
}

enum LoginError {
    /// Sent to the client as a FATAL error, then the connection closes.
    Client(ProxyError),
    /// The upstream's own FATAL ErrorResponse, relayed as is.
    Relayed(BytesMut),
    /// Nothing useful can be said (the client went away).
    Silent,
}

impl From<ProxyError> for LoginError {
    fn from(e: ProxyError) -> Self {
        LoginError::Client(e)
    }
}

fn protocol_violation(e: impl std::fmt::Display) -> LoginError {
    LoginError::Client(ProxyError::fatal(
        "08P01",
        format!("protocol violation: {e}"),
    ))
}

impl From<ReadError> for LoginError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Closed | ReadError::Io(_) => LoginError::Silent,
            ReadError::Protocol(p) => protocol_violation(p),
        }
    }
}

async fn refuse(client: &mut Conn, e: LoginError) {
    let mut buf = BytesMut::new();
    match e {
        LoginError::Client(e) => {
            info!("login refused: {e}");
            e.encode(&mut buf);
        }
        LoginError::Relayed(msg) => buf = msg,
        LoginError::Silent => return,
    }
    let _ = client.send(&buf).await;
}

/// Startup-phase packets; `None` when the connection was only a cancel.
async fn read_startup(client: &mut Conn) -> Result<StartupPacket, LoginError> {
    loop {
        match next_startup_packet(&client.buf) {
            Ok(Some((packet, used))) => {
                let _ = client.buf.split_to(used);
                return Ok(packet);
            }
            Ok(None) => client.fill().await?,
            Err(e) => return Err(protocol_violation(e)),
        }
    }
}

async fn login(
    shared: &Shared,
    runtime: &Runtime,
    client: &mut Conn,
    arrival: &Arrival,
) -> Result<Option<LoggedIn>, LoginError> {
    let mut negotiated_ssl = false;
    let mut negotiated_gss = false;
    let startup = loop {
        match read_startup(client).await? {
            StartupPacket::SslRequest if !negotiated_ssl && !client.io.is_tls() => {
                negotiated_ssl = true;
                // Bytes after SSLRequest but before the handshake would be
                // treated as encrypted by a careless proxy (CVE-2021-23214).
                if !client.buf.is_empty() {
                    return Err(protocol_violation("unencrypted data after SSLRequest"));
                }
                let Some(acceptor) = &runtime.client_tls else {
                    client.send(b"N").await.map_err(|_| LoginError::Silent)?;
                    continue;
                };
                client.send(b"S").await.map_err(|_| LoginError::Silent)?;
                let MaybeTls::Plain(tcp) = std::mem::replace(&mut client.io, MaybeTls::Detached)
                else {
                    return Err(protocol_violation("SSLRequest on an encrypted connection"));
                };
                let tls = acceptor.accept(tcp).await.map_err(|e| {
                    debug!("TLS handshake failed: {e}");
                    LoginError::Silent
                })?;
                client.io = MaybeTls::Server(Box::new(tls));
            }
            StartupPacket::GssEncRequest if !negotiated_gss && !client.io.is_tls() => {
                negotiated_gss = true;
                client.send(b"N").await.map_err(|_| LoginError::Silent)?;
            }
            StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
                return Err(protocol_violation("repeated encryption request"));
            }
            StartupPacket::Cancel { pid, secret } => {
                match shared.cancels.lookup(pid, &secret) {
                    Some(key) => {
                        info!(pid, "forwarding cancel request");
                        if let Err(e) =
                            send_cancel(&key, runtime.config.limits.connect_timeout).await
                        {
                            warn!("cancel request to upstream failed: {e}");
                        }
                    }
                    None => debug!(pid, "cancel request with an unknown key dropped"),
                }
                return Ok(None);
            }
            StartupPacket::Startup(s) => break s,
        }
    };
    let StartupMessage {
        major,
        minor,
        params,
    } = &startup;
    if *major != 3 {
        return Err(ProxyError::fatal(
            "0A000",
            format!(
                "unsupported frontend protocol {major}.{minor}: interceptor speaks protocol 3.0"
            ),
        )
        .into());
    }
    let mut forwarded = Vec::with_capacity(params.len());
    let mut unknown_options = Vec::new();
    let mut user = None;
    let mut database = None;
    for (k, v) in params {
        match k.as_str() {
            "user" => user = Some(v.clone()),
            "database" => database = Some(v.clone()),
            "replication" if !matches!(v.as_str(), "false" | "off" | "no" | "0") => {
                return Err(ProxyError::fatal(
                    "0A000",
                    "replication connections are not allowed through interceptor",
                )
                .with_hint("Connect without `replication=`; interceptor only relays SQL sessions.")
                .into());
            }
            k if k.starts_with("_pq_.") => unknown_options.push(k.to_owned()),
            _ => forwarded.push((k.clone(), v.clone())),
        }
    }
    if *minor > 0 || !unknown_options.is_empty() {
        let mut buf = BytesMut::new();
        build::negotiate_protocol_version(unknown_options, &mut buf);
        client.send(&buf).await.map_err(|_| LoginError::Silent)?;
    }
    let user = user.filter(|u| !u.is_empty()).ok_or_else(|| {
        ProxyError::fatal(
            "28000",
            "no PostgreSQL user name specified in startup packet",
        )
    })?;
    // PostgreSQL's default database is the user name; the upstream role
    // differs, so say it explicitly.
    let database = database
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| user.clone());
    forwarded.insert(0, ("database".to_owned(), database.clone()));

    let (target, addr) = match arrival {
        Arrival::Listener(local) => (runtime.target_for(*local), *local),
        Arrival::Intercepted(o) => (runtime.target_for_origin(o.destination), o.destination),
    };
    let target = target.ok_or_else(|| {
        ProxyError::fatal("08004", format!("no target is configured for {addr}"))
            .with_hint("Add the address to a target's `destinations` in the interceptor config.")
    })?;
    if !target.config.allows_database(&database) {
        return Err(ProxyError::fatal(
            "42501",
            format!(
                "database \"{database}\" is not allowed through target `{}`",
                target.config.name
            ),
        )
        .with_hint(format!(
            "Allowed databases: {}.",
            target.config.databases.join(", ")
        ))
        .into());
    }

    let client_token = authenticate_client(client, &target, &user).await?;
    let token_required = target.config.client_auth.method == ClientAuthMethod::Oidc
        || runtime.policy.as_ref().is_some_and(|p| p.require_token());
    let token = match verify_token(runtime, client_token, arrival).await {
        Ok(t) => {
            info!(issuer = %t.issuer, subject = %t.subject, "OIDC token verified");
            Some(t)
        }
        Err(e) if token_required => return Err(token_refused(&e)),
        Err(TokenError::Missing) => None,
        Err(e) => {
            warn!("OIDC token ignored: {e}");
            None
        }
    };

    let policy = match &runtime.policy {
        Some(policy) => {
            let mut principal = principal(&user, arrival);
            principal.token = token;
            let subject = policy_startup(
                policy,
                &principal,
                &target.config.name,
                &database,
                &mut forwarded,
            )?;
            Some(SessionPolicyStart {
                policy: policy.clone(),
                principal,
                subject,
            })
        }
        None => None,
    };

    let upstream = upstream::connect(
        &target,
        &forwarded,
        runtime.config.limits.connect_timeout,
        runtime.upstream_mark,
    )
    .await
    .map_err(|e| match e {
        UpstreamError::Client(e) => LoginError::Client(e),
        UpstreamError::Relayed(m) => LoginError::Relayed(m),
    })?;
    // Set on the server, its database or role: the policy would decide
    // statements the server reads differently. Fail closed.
    if let (Some(_), Some((name, value))) = (&policy, &upstream.misreads) {
        return Err(ProxyError::fatal(
            "42501",
            format!(
                "interceptor: the server reads statements with {name} = {value}, which the statement policy cannot follow"
            ),
        )
        .with_hint("Ask an operator to set it to UTF8 / on for this database and role.")
        .into());
    }
    Ok(Some(LoggedIn {
        user,
        database,
        target,
        upstream,
        policy,
    }))
}

fn auth_failed(user: &str) -> LoginError {
    ProxyError::fatal(
        "28P01",
        format!("password authentication failed for user \"{user}\""),
    )
    .into()
}

const AUTH_MAX: usize = 16 * 1024;

/// Asks for a cleartext password, which only ever travels inside TLS.
async fn cleartext_password(client: &mut Conn, what: &str) -> Result<Vec<u8>, LoginError> {
    if !client.io.is_tls() {
        return Err(ProxyError::fatal(
            "28000",
            format!("this target accepts {what} only over TLS"),
        )
        .with_hint("Connect with sslmode=require or stronger.")
        .into());
    }
    let mut buf = BytesMut::new();
    build::authentication(Authentication::CleartextPassword, &mut buf);
    client.send(&buf).await.map_err(|_| LoginError::Silent)?;
    let msg = client.read_message(AUTH_MAX).await?;
    Reader::new(password_body(&msg)?)
        .cstr()
        .map(<[u8]>::to_vec)
        .ok_or_else(|| protocol_violation("password is not NUL-terminated"))
}

/// Checks the client's credentials. With the `oidc` method, returns the
/// token the client gave as its password (verified by the caller).
async fn authenticate_client(
    client: &mut Conn,
    target: &TargetRuntime,
    user: &str,
) -> Result<Option<String>, LoginError> {
    let mut buf = BytesMut::new();
    match target.config.client_auth.method {
        ClientAuthMethod::Trust => Ok(None),
        ClientAuthMethod::Oidc => {
            let given = cleartext_password(client, "OIDC tokens").await?;
            String::from_utf8(given)
                .map(Some)
                .map_err(|_| token_refused(&TokenError::Malformed("not UTF-8".into())))
        }
        ClientAuthMethod::Password => {
            let given = cleartext_password(client, "passwords").await?;
            let expected = target
                .client_password
                .as_ref()
                .map(|s| s.expose().as_bytes())
                .unwrap_or_default();
            if constant_time_eq(&given, expected) {
                Ok(None)
            } else {
                Err(auth_failed(user))
            }
        }
        ClientAuthMethod::ScramSha256 => {
            let verifier = target
                .client_scram
                .as_ref()
                .ok_or_else(|| auth_failed(user))?;
            build::authentication(
                Authentication::SASL(vec![SCRAM_SHA_256.to_owned()]),
                &mut buf,
            );
            client.send(&buf).await.map_err(|_| LoginError::Silent)?;
            let msg = client.read_message(AUTH_MAX).await?;
            let mut r = Reader::new(password_body(&msg)?);
            let mechanism = r
                .cstr()
                .ok_or_else(|| protocol_violation("SASL mechanism"))?;
            if mechanism != SCRAM_SHA_256.as_bytes() {
                return Err(ProxyError::fatal(
                    "28000",
                    "client selected an invalid SASL authentication mechanism",
                )
                .into());
            }
            let len = r
                .i32()
                .ok_or_else(|| protocol_violation("SASL initial response length"))?;
            let first = r
                .bytes(
                    usize::try_from(len)
                        .map_err(|_| protocol_violation("SASL initial response length"))?,
                )
                .ok_or_else(|| protocol_violation("SASL initial response runs past the message"))?;
            let (exchange, server_first) = verifier
                .start(first)
                .map_err(|e| ProxyError::fatal("08P01", e.to_string()))?;
            buf.clear();
            build::authentication(
                Authentication::SASLContinue(server_first.into_bytes().into()),
                &mut buf,
            );
            client.send(&buf).await.map_err(|_| LoginError::Silent)?;
            let msg = client.read_message(AUTH_MAX).await?;
            let server_final = match exchange.finish(password_body(&msg)?) {
                Ok(f) => f,
                Err(crate::auth::ScramError::Failed) => return Err(auth_failed(user)),
                Err(e) => return Err(ProxyError::fatal("08P01", e.to_string()).into()),
            };
            buf.clear();
            build::authentication(
                Authentication::SASLFinal(server_final.into_bytes().into()),
                &mut buf,
            );
            client.send(&buf).await.map_err(|_| LoginError::Silent)?;
            Ok(None)
        }
    }
}

/// 28000 with the exact reason a token was not accepted.
fn token_refused(e: &TokenError) -> LoginError {
    let hint = match e {
        TokenError::Missing => {
            "Run the job under `interceptor run --token-env/--token-file/--token-github`, or give the token as the password."
        }
        TokenError::Expired(_) | TokenError::NotYetValid(_) => {
            "Fetch a fresh token from the issuer and reconnect."
        }
        TokenError::Unreachable { .. } => {
            "The proxy cannot reach the issuer; retry, or ask an operator."
        }
        _ => "Use a token from a trusted issuer, minted for this proxy's audience.",
    };
    ProxyError::fatal("28000", format!("interceptor: OIDC token rejected: {e}"))
        .with_hint(hint)
        .into()
}

/// Verifies the session's token, if it has one: the client's password with
/// the `oidc` method, else the token `interceptor run` recorded for the job.
async fn verify_token(
    runtime: &Runtime,
    from_client: Option<String>,
    arrival: &Arrival,
) -> Result<policies::TokenIdentity, TokenError> {
    let job_token = match arrival {
        Arrival::Intercepted(o) => o.job.as_ref().and_then(|j| j.token.clone()),
        Arrival::Listener(_) => None,
    };
    let token = from_client.or(job_token).ok_or(TokenError::Missing)?;
    let verifier = runtime.oidc.as_ref().ok_or(TokenError::NoIssuers)?;
    verifier.verify(&token).await
}

/// The body of a PasswordMessage-family ('p') message.
fn password_body(msg: &[u8]) -> Result<&[u8], LoginError> {
    if msg[0] != b'p' {
        return Err(protocol_violation(ProtocolError::Malformed {
            tag: msg[0],
            what: "expected a password message",
        }));
    }
    Ok(&msg[5..])
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The workload behind a session, for the session record.
struct OriginDisplay<'a>(&'a Arrival);

impl std::fmt::Display for OriginDisplay<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let o = match self.0 {
            Arrival::Listener(local) => return write!(f, "direct to {local}"),
            Arrival::Intercepted(o) => o,
        };
        write!(
            f,
            "intercepted dst={} pid={} tgid={} uid={} gid={} comm={:?} cgroup_id={}",
            o.destination, o.pid, o.tgid, o.uid, o.gid, o.comm, o.cgroup_id
        )?;
        if let Some(exe) = &o.exe {
            write!(f, " exe={}", exe.display())?;
        }
        if let Some(a) = &o.argv0 {
            write!(f, " argv0={a:?}")?;
        }
        if let Some(c) = &o.cgroup {
            write!(f, " cgroup={c}")?;
        }
        if let Some(j) = &o.job {
            write!(
                f,
                " job={:?} job_user={} token={}",
                j.job,
                j.user,
                j.token.is_some()
            )?;
            for (k, v) in &j.ci {
                write!(f, " {k}={v:?}")?;
            }
        }
        Ok(())
    }
}
