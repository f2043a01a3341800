//! Typed, borrowed views of backend (server to client) messages.
//!
//! The relay tracks these to know the session's state (transaction status,
//! COPY mode, result shape). DataRow and CopyData are not opened here: their
//! contents are only read when something (masking) needs them.

use super::{ProtocolError, Reader};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransactionStatus {
    Idle,
    InBlock,
    Failed,
}

impl TransactionStatus {
    pub fn byte(self) -> u8 {
        match self {
            TransactionStatus::Idle => b'I',
            TransactionStatus::InBlock => b'T',
            TransactionStatus::Failed => b'E',
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendMessage<'a> {
    Authentication {
        code: i32,
        data: &'a [u8],
    },
    ParameterStatus {
        name: &'a [u8],
        value: &'a [u8],
    },
    BackendKeyData {
        pid: i32,
        secret: &'a [u8],
    },
    NegotiateProtocolVersion,
    ReadyForQuery(TransactionStatus),
    RowDescription {
        fields: u16,
    },
    DataRow {
        columns: u16,
    },
    CommandComplete {
        tag: &'a [u8],
    },
    EmptyQueryResponse,
    ErrorResponse(Fields<'a>),
    NoticeResponse(Fields<'a>),
    NotificationResponse {
        pid: i32,
        channel: &'a [u8],
        payload: &'a [u8],
    },
    CopyInResponse,
    CopyOutResponse,
    CopyBothResponse,
    CopyData,
    CopyDone,
    ParseComplete,
    BindComplete,
    CloseComplete,
    NoData,
    PortalSuspended,
    ParameterDescription {
        params: u16,
    },
    FunctionCallResponse,
    Other {
        tag: u8,
    },
}

/// The typed fields of ErrorResponse and NoticeResponse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fields<'a> {
    body: &'a [u8],
}

impl<'a> Fields<'a> {
    /// The value of field `code` (`b'C'` SQLSTATE, `b'M'` message, ...).
    pub fn get(&self, code: u8) -> Option<&'a [u8]> {
        let mut r = Reader::new(self.body);
        loop {
            match r.u8()? {
                0 => return None,
                c => {
                    let v = r.cstr()?;
                    if c == code {
                        return Some(v);
                    }
                }
            }
        }
    }

    pub fn sqlstate(&self) -> Option<&'a str> {
        self.get(b'C').and_then(|c| std::str::from_utf8(c).ok())
    }

    pub fn message(&self) -> String {
        String::from_utf8_lossy(self.get(b'M').unwrap_or_default()).into_owned()
    }
}

impl<'a> BackendMessage<'a> {
    pub fn parse(frame: &'a [u8]) -> Result<Self, ProtocolError> {
        let tag = frame[0];
        let body = &frame[5..];
        let bad = |what| ProtocolError::Malformed { tag, what };
        let mut r = Reader::new(body);
        Ok(match tag {
            b'R' => BackendMessage::Authentication {
                code: r.i32().ok_or(bad("authentication code"))?,
                data: r.remaining(),
            },
            b'S' => BackendMessage::ParameterStatus {
                name: r.cstr().ok_or(bad("parameter name"))?,
                value: r.cstr().ok_or(bad("parameter value"))?,
            },
            b'K' => BackendMessage::BackendKeyData {
                pid: r.i32().ok_or(bad("process id"))?,
                secret: r.remaining(),
            },
            b'v' => BackendMessage::NegotiateProtocolVersion,
            b'Z' => BackendMessage::ReadyForQuery(match r.u8() {
                Some(b'I') => TransactionStatus::Idle,
                Some(b'T') => TransactionStatus::InBlock,
                Some(b'E') => TransactionStatus::Failed,
                _ => return Err(bad("transaction status")),
            }),
            b'T' => BackendMessage::RowDescription {
                fields: r.i16().ok_or(bad("field count"))? as u16,
            },
            b'D' => BackendMessage::DataRow {
                columns: r.i16().ok_or(bad("column count"))? as u16,
            },
            b'C' => BackendMessage::CommandComplete {
                tag: r.cstr().ok_or(bad("command tag"))?,
            },
            b'I' => BackendMessage::EmptyQueryResponse,
            b'E' => BackendMessage::ErrorResponse(Fields { body }),
            b'N' => BackendMessage::NoticeResponse(Fields { body }),
            b'A' => BackendMessage::NotificationResponse {
                pid: r.i32().ok_or(bad("process id"))?,
                channel: r.cstr().ok_or(bad("channel"))?,
                payload: r.cstr().ok_or(bad("payload"))?,
            },
            b'G' => BackendMessage::CopyInResponse,
            b'H' => BackendMessage::CopyOutResponse,
            b'W' => BackendMessage::CopyBothResponse,
            b'd' => BackendMessage::CopyData,
            b'c' => BackendMessage::CopyDone,
            b'1' => BackendMessage::ParseComplete,
            b'2' => BackendMessage::BindComplete,
            b'3' => BackendMessage::CloseComplete,
            b'n' => BackendMessage::NoData,
            b's' => BackendMessage::PortalSuspended,
            b't' => BackendMessage::ParameterDescription {
                params: r.i16().ok_or(bad("parameter count"))? as u16,
            },
            b'V' => BackendMessage::FunctionCallResponse,
            tag => BackendMessage::Other { tag },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_fields() {
        let mut f = vec![b'E', 0, 0, 0, 0];
        f.extend_from_slice(b"SERROR\0C42P01\0Mrelation \"x\" does not exist\0\0");
        let len = (f.len() - 1) as i32;
        f[1..5].copy_from_slice(&len.to_be_bytes());
        let BackendMessage::ErrorResponse(fields) = BackendMessage::parse(&f).unwrap() else {
            panic!()
        };
        assert_eq!(fields.sqlstate(), Some("42P01"));
        assert_eq!(fields.message(), "relation \"x\" does not exist");
        assert_eq!(fields.get(b'H'), None);
    }

    #[test]
    fn ready_for_query() {
        assert_eq!(
            BackendMessage::parse(b"Z\0\0\0\x05T"),
            Ok(BackendMessage::ReadyForQuery(TransactionStatus::InBlock))
        );
        assert!(BackendMessage::parse(b"Z\0\0\0\x05?").is_err());
    }
}
