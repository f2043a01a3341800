//! The proxy's own login to a target's server, with the vaulted credentials.

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use tokio::net::TcpStream;

use crate::auth::SCRAM_SHA_256;
use crate::config::Secret;
use crate::protocol::backend::{BackendMessage, TransactionStatus};
use crate::protocol::build::ProxyError;
use crate::protocol::startup::SSL_REQUEST_CODE;
use crate::runtime::TargetRuntime;
use crate::stream::{Conn, MaybeTls, ReadError};

/// PostgreSQL's own ceiling for one message.
pub const BACKEND_MAX_MESSAGE: usize = 1 << 30;

/// A logged-in upstream connection, ready for queries.
pub struct Upstream {
    pub conn: Conn,
    /// The proxy's own port on the upstream connection: what the server
    /// reports as the client port (pg_stat_activity.client_port).
    pub local_port: u16,
    pub pid: i32,
    pub secret: Vec<u8>,
    /// ParameterStatus and NoticeResponse messages to replay to the client.
    pub greeting: BytesMut,
    pub status: TransactionStatus,
    /// A reported setting with which the server reads statement text
    /// differently from the policy's parser (name, value), if any.
    pub misreads: Option<(String, String)>,
}

/// Why the upstream login failed, split into what the client may see and
/// what only the daemon log gets.
#[derive(Debug)]
pub enum UpstreamError {
    /// Shown to the client as is.
    Client(ProxyError),
    /// A FATAL ErrorResponse from the server after authentication (for
    /// example "database does not exist"), relayed verbatim.
    Relayed(BytesMut),
}

fn unavailable(target: &str, why: impl std::fmt::Display) -> UpstreamError {
    UpstreamError::Client(
        ProxyError::fatal(
            "08006",
            format!("interceptor cannot reach the server of target `{target}`: {why}"),
        )
        .with_hint("The database or the network to it is down; retry later or ask the operator."),
    )
}

fn rejected(target: &str, log_detail: &str) -> UpstreamError {
    // The server's message may name the upstream role; keep it in the log.
    tracing::error!(
        target_name = target,
        detail = log_detail,
        "upstream login failed"
    );
    UpstreamError::Client(
        ProxyError::fatal(
            "08004",
            format!("the server of target `{target}` refused interceptor's login"),
        )
        .with_hint(
            "The operator must check the target's upstream_auth credentials; see the daemon log.",
        ),
    )
}

/// Opens the TCP connection upstream. With a mark, the socket carries
/// SO_MARK before it connects, so interception's connect programs let it
/// through even if the daemon itself runs in a tagged cgroup.
async fn connect_tcp(host: &str, port: u16, mark: u32) -> std::io::Result<TcpStream> {
    if mark == 0 {
        return TcpStream::connect((host, port)).await;
    }
    let mut last = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_mark(mark)?;
        socket.set_nonblocking(true)?;
        let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
        match socket.connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("the host name resolved to no address")))
}

pub async fn connect(
    target: &TargetRuntime,
    params: &[(String, String)],
    connect_timeout: Duration,
    mark: u32,
) -> Result<Upstream, UpstreamError> {
    let name = target.config.name.as_str();
    let up = &target.config.upstream;
    let tcp = tokio::time::timeout(
        connect_timeout,
        connect_tcp(up.host.as_str(), up.port, mark),
    )
    .await
    .map_err(|_| {
        unavailable(
            name,
            format!(
                "no connection to {}:{} within {connect_timeout:?}",
                up.host, up.port
            ),
        )
    })?
    .map_err(|e| unavailable(name, format!("{}:{}: {e}", up.host, up.port)))?;
    let _ = tcp.set_nodelay(true);
    let local_port = tcp.local_addr().map_or(0, |a| a.port());
    let mut conn = Conn::new(MaybeTls::Plain(tcp));

    if let Some(tls) = &target.upstream_tls {
        let mut req = BytesMut::with_capacity(8);
        req.put_i32(8);
        req.put_i32(SSL_REQUEST_CODE);
        conn.send(&req).await.map_err(|e| unavailable(name, e))?;
        let answer = tokio::time::timeout(connect_timeout, async {
            while conn.buf.is_empty() {
                conn.fill().await?;
            }
            Ok::<u8, ReadError>(conn.buf.split_to(1)[0])
        })
        .await
        .map_err(|_| unavailable(name, "no answer to SSLRequest"))?
        .map_err(|e| unavailable(name, e))?;
        if answer != b'S' {
            return Err(unavailable(
                name,
                "the server does not accept TLS, but upstream_tls requires it",
            ));
        }
        if !conn.buf.is_empty() {
            return Err(unavailable(
                name,
                "the server sent unencrypted data after accepting TLS",
            ));
        }
        let MaybeTls::Plain(tcp) = conn.io else {
            unreachable!("fresh connection")
        };
        let tls_stream = tokio::time::timeout(
            connect_timeout,
            tls.connector.connect(tls.server_name.clone(), tcp),
        )
        .await
        .map_err(|_| unavailable(name, "TLS handshake timed out"))?
        .map_err(|e| unavailable(name, format!("TLS handshake: {e}")))?;
        conn = Conn::new(MaybeTls::Client(Box::new(tls_stream)));
    }

    let user = &target.config.upstream_auth.user;
    let mut startup = BytesMut::new();
    startup.put_i32(0);
    startup.put_i32(196608);
    for (k, v) in std::iter::once(("user", user.as_str()))
        .chain(params.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    {
        startup.put_slice(k.as_bytes());
        startup.put_u8(0);
        startup.put_slice(v.as_bytes());
        startup.put_u8(0);
    }
    startup.put_u8(0);
    let len = startup.len() as i32;
    startup[..4].copy_from_slice(&len.to_be_bytes());
    conn.send(&startup)
        .await
        .map_err(|e| unavailable(name, e))?;

    let password = || -> Result<Secret, UpstreamError> {
        target
            .config
            .upstream_auth
            .password()
            .ok_or_else(|| {
                rejected(
                    name,
                    "the server asked for a password and none is configured",
                )
            })?
            .load()
            .map_err(|e| rejected(name, &e))
    };
    let mut scram: Option<ScramSha256> = None;
    let mut authenticated = false;
    let mut key = None;
    let mut greeting = BytesMut::new();
    let mut misreads = None;
    loop {
        let msg = conn
            .read_message(BACKEND_MAX_MESSAGE)
            .await
            .map_err(|e| match e {
                ReadError::Closed => {
                    unavailable(name, "the server closed the connection during login")
                }
                e => unavailable(name, e),
            })?;
        let parsed = BackendMessage::parse(&msg).map_err(|e| unavailable(name, e))?;
        match parsed {
            BackendMessage::Authentication { code, data } => {
                let reply = match code {
                    0 => {
                        authenticated = true;
                        continue;
                    }
                    3 => password_message(&[password()?.expose().as_bytes(), b"\0"]),
                    5 => {
                        let salt: [u8; 4] = data
                            .try_into()
                            .map_err(|_| unavailable(name, "bad MD5 salt"))?;
                        let hash = md5_hash(user.as_bytes(), password()?.expose().as_bytes(), salt);
                        password_message(&[hash.as_bytes(), b"\0"])
                    }
                    10 => {
                        let offers_scram = data
                            .split(|b| *b == 0)
                            .any(|m| m == SCRAM_SHA_256.as_bytes());
                        if !offers_scram {
                            return Err(rejected(
                                name,
                                "the server offers no SASL mechanism interceptor supports",
                            ));
                        }
                        // "n,,": we do not use channel binding, so a server
                        // offering -PLUS does not see a downgrade.
                        let s = ScramSha256::new(
                            password()?.expose().as_bytes(),
                            ChannelBinding::unsupported(),
                        );
                        let len = (s.message().len() as i32).to_be_bytes();
                        let m =
                            password_message(&[SCRAM_SHA_256.as_bytes(), b"\0", &len, s.message()]);
                        scram = Some(s);
                        m
                    }
                    11 => {
                        let s = scram
                            .as_mut()
                            .ok_or_else(|| unavailable(name, "SASL continue without SASL start"))?;
                        s.update(data).map_err(|e| rejected(name, &e.to_string()))?;
                        password_message(&[s.message()])
                    }
                    12 => {
                        let s = scram
                            .as_mut()
                            .ok_or_else(|| unavailable(name, "SASL final without SASL start"))?;
                        s.finish(data)
                            .map_err(|e| rejected(name, &format!("server signature: {e}")))?;
                        continue;
                    }
                    other => {
                        return Err(rejected(
                            name,
                            &format!("unsupported authentication request code {other}"),
                        ));
                    }
                };
                conn.send(&reply).await.map_err(|e| unavailable(name, e))?;
            }
            BackendMessage::ErrorResponse(fields) if !authenticated => {
                return Err(rejected(
                    name,
                    &format!(
                        "{} ({})",
                        fields.message(),
                        fields.sqlstate().unwrap_or("?")
                    ),
                ));
            }
            BackendMessage::ErrorResponse(_) => return Err(UpstreamError::Relayed(msg)),
            BackendMessage::BackendKeyData { pid, secret } => key = Some((pid, secret.to_vec())),
            BackendMessage::ParameterStatus { name, value } => {
                let name = String::from_utf8_lossy(name);
                let value = String::from_utf8_lossy(value);
                if !policies::analysis::catalog::keeps_parsing(&name, &value) {
                    misreads = Some((name.into_owned(), value.into_owned()));
                }
                greeting.extend_from_slice(&msg);
            }
            BackendMessage::NoticeResponse(_) => greeting.extend_from_slice(&msg),
            BackendMessage::NegotiateProtocolVersion => {}
            BackendMessage::ReadyForQuery(status) if authenticated => {
                let (pid, secret) = key.unwrap_or((0, vec![0; 4]));
                return Ok(Upstream {
                    conn,
                    local_port,
                    pid,
                    secret,
                    greeting,
                    status,
                    misreads,
                });
            }
            other => {
                return Err(unavailable(
                    name,
                    format!("unexpected message during login: {other:?}"),
                ));
            }
        }
    }
}

/// A PasswordMessage-family ('p') message whose body is `parts` joined:
/// a cleartext or MD5 password, SASLInitialResponse or SASLResponse.
fn password_message(parts: &[&[u8]]) -> BytesMut {
    let body: usize = parts.iter().map(|p| p.len()).sum();
    let mut m = BytesMut::with_capacity(5 + body);
    m.put_u8(b'p');
    m.put_i32((4 + body) as i32);
    for part in parts {
        m.put_slice(part);
    }
    m
}
