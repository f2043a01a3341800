//! Messages the proxy writes itself, encoded by pgwire.

use bytes::{BufMut, BytesMut};
use pgwire::messages::Message;
use pgwire::messages::response::{
    ErrorResponse, NoticeResponse, ReadyForQuery, TransactionStatus as PgTs,
};
use pgwire::messages::startup::{
    Authentication, BackendKeyData, NegotiateProtocolVersion, ParameterStatus, SecretKey,
};

use super::backend::TransactionStatus;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

/// An error the proxy raises itself, with a SQLSTATE clients can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyError {
    pub severity: Severity,
    pub code: &'static str,
    pub message: String,
    pub hint: Option<String>,
}

impl ProxyError {
    pub fn fatal(code: &'static str, message: impl Into<String>) -> Self {
        ProxyError {
            severity: Severity::Fatal,
            code,
            message: message.into(),
            hint: None,
        }
    }

    pub fn error(code: &'static str, message: impl Into<String>) -> Self {
        ProxyError {
            severity: Severity::Error,
            code,
            message: message.into(),
            hint: None,
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn encode(&self, buf: &mut BytesMut) {
        let sev = match self.severity {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        };
        let mut fields = vec![
            (b'S', sev.to_owned()),
            (b'V', sev.to_owned()),
            (b'C', self.code.to_owned()),
            (b'M', self.message.clone()),
        ];
        if let Some(h) = &self.hint {
            fields.push((b'H', h.clone()));
        }
        encode(&ErrorResponse::new(fields), buf);
    }
}

impl std::fmt::Display for ProxyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

fn encode<M: Message>(m: &M, buf: &mut BytesMut) {
    // Every message built here is small and well-formed; pgwire only fails
    // on size limits these cannot reach.
    m.encode(buf).expect("encoding a proxy-built message");
}

pub fn notice(message: &str, buf: &mut BytesMut) {
    notice_with(message, None, None, buf)
}

pub fn notice_with(message: &str, detail: Option<&str>, hint: Option<&str>, buf: &mut BytesMut) {
    let mut fields = vec![
        (b'S', "NOTICE".to_owned()),
        (b'V', "NOTICE".to_owned()),
        (b'C', "00000".to_owned()),
        (b'M', message.to_owned()),
    ];
    if let Some(d) = detail {
        fields.push((b'D', d.to_owned()));
    }
    if let Some(h) = hint {
        fields.push((b'H', h.to_owned()));
    }
    encode(&NoticeResponse::new(fields), buf);
}

pub fn ready_for_query(status: TransactionStatus, buf: &mut BytesMut) {
    let s = match status {
        TransactionStatus::Idle => PgTs::Idle,
        TransactionStatus::InBlock => PgTs::Transaction,
        TransactionStatus::Failed => PgTs::Error,
    };
    encode(&ReadyForQuery::new(s), buf);
}

pub fn authentication(auth: Authentication, buf: &mut BytesMut) {
    encode(&auth, buf);
}

pub fn parameter_status(name: &str, value: &str, buf: &mut BytesMut) {
    encode(
        &ParameterStatus::new(name.to_owned(), value.to_owned()),
        buf,
    );
}

pub fn backend_key_data(pid: i32, secret: i32, buf: &mut BytesMut) {
    encode(&BackendKeyData::new(pid, SecretKey::I32(secret)), buf);
}

/// Tells a client that asked for protocol 3.x (x > 0) that 3.0 is spoken,
/// and which `_pq_.` options were not recognised.
pub fn negotiate_protocol_version(options: Vec<String>, buf: &mut BytesMut) {
    encode(&NegotiateProtocolVersion::new(0, options), buf);
}

// Frontend messages the proxy sends upstream in place of refused ones.
// Hand-built rather than through pgwire: names stay the client's exact
// bytes, which need not be UTF-8.

pub(crate) fn frame(tag: u8, body: impl FnOnce(&mut BytesMut)) -> BytesMut {
    let mut out = BytesMut::with_capacity(256);
    out.put_u8(tag);
    out.put_i32(0);
    body(&mut out);
    let len = (out.len() - 1) as i32;
    out[1..5].copy_from_slice(&len.to_be_bytes());
    out
}

/// Terminate: the session ends.
pub fn terminate() -> BytesMut {
    frame(b'X', |_| {})
}

pub fn query(sql: &str) -> BytesMut {
    frame(b'Q', |b| {
        b.put_slice(sql.as_bytes());
        b.put_u8(0);
    })
}

pub fn parse(name: &[u8], sql: &str) -> BytesMut {
    frame(b'P', |b| {
        b.put_slice(name);
        b.put_u8(0);
        b.put_slice(sql.as_bytes());
        b.put_u8(0);
        b.put_i16(0);
    })
}

/// Parse of `sql` under `name`, with the parameter types the client gave.
pub fn parse_typed(name: &[u8], sql: &str, types: &[u32]) -> BytesMut {
    frame(b'P', |b| {
        b.put_slice(name);
        b.put_u8(0);
        b.put_slice(sql.as_bytes());
        b.put_u8(0);
        b.put_i16(i16::try_from(types.len()).unwrap_or(i16::MAX));
        for t in types {
            b.put_u32(*t);
        }
    })
}

/// A Bind with no parameters: the substituted statement takes none.
pub fn empty_bind(portal: &[u8], statement: &[u8]) -> BytesMut {
    frame(b'B', |b| {
        b.put_slice(portal);
        b.put_u8(0);
        b.put_slice(statement);
        b.put_u8(0);
        b.put_i16(0);
        b.put_i16(0);
        b.put_i16(0);
    })
}

/// Bind, Execute (all rows) and Sync of the unnamed statement, with
/// parameters as (format, value) and text results.
pub fn bind_execute_sync(params: &[(i16, Option<&[u8]>)]) -> BytesMut {
    let mut out = frame(b'B', |b| {
        b.put_u8(0);
        b.put_u8(0);
        b.put_i16(params.len() as i16);
        for (format, _) in params {
            b.put_i16(*format);
        }
        b.put_i16(params.len() as i16);
        for (_, v) in params {
            match v {
                Some(v) => {
                    b.put_i32(v.len() as i32);
                    b.put_slice(v);
                }
                None => b.put_i32(-1),
            }
        }
        b.put_i16(0);
    });
    out.extend_from_slice(&frame(b'E', |b| {
        b.put_u8(0);
        b.put_i32(0);
    }));
    out.extend_from_slice(&frame(b'S', |_| {}));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::backend::BackendMessage;
    use crate::protocol::frontend::FrontendMessage;

    #[test]
    fn error_round_trips() {
        let mut buf = BytesMut::new();
        ProxyError::fatal("08P01", "bad")
            .with_hint("fix it")
            .encode(&mut buf);
        let BackendMessage::ErrorResponse(f) = BackendMessage::parse(&buf).unwrap() else {
            panic!()
        };
        assert_eq!(f.sqlstate(), Some("08P01"));
        assert_eq!(f.get(b'S'), Some(&b"FATAL"[..]));
        assert_eq!(f.get(b'H'), Some(&b"fix it"[..]));
    }

    #[test]
    fn replacement_frames_parse_back() {
        let q = query("SELECT 1");
        assert!(matches!(
            FrontendMessage::parse(&q),
            Ok(FrontendMessage::Query { sql: b"SELECT 1" })
        ));
        let p = parse(b"s1", "SELECT 1");
        let Ok(FrontendMessage::Parse(p)) = FrontendMessage::parse(&p) else {
            panic!()
        };
        assert_eq!(p.name, b"s1");
        let b = empty_bind(b"", b"s1");
        let Ok(FrontendMessage::Bind(b)) = FrontendMessage::parse(&b) else {
            panic!()
        };
        assert_eq!(b.statement, b"s1");
        assert!(b.params().is_empty());
    }
}
