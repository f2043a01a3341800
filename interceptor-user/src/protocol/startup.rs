//! The untagged packets a client may send before login.

use super::{ProtocolError, Reader};

pub const SSL_REQUEST_CODE: i32 = 80877103;
pub const GSSENC_REQUEST_CODE: i32 = 80877104;
pub const CANCEL_REQUEST_CODE: i32 = 80877102;
/// PostgreSQL's own MAX_STARTUP_PACKET_LENGTH.
pub const MAX_STARTUP_PACKET: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel { pid: i32, secret: Vec<u8> },
    Startup(StartupMessage),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupMessage {
    pub major: u16,
    pub minor: u16,
    /// In the client's order; PostgreSQL applies them in order.
    pub params: Vec<(String, String)>,
}

impl StartupMessage {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Looks for one complete startup-phase packet at the start of `buf`.
/// Returns the packet and how many bytes it used.
pub fn next_startup_packet(buf: &[u8]) -> Result<Option<(StartupPacket, usize)>, ProtocolError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len < 8 {
        return Err(ProtocolError::Startup("length below 8"));
    }
    let len = len as usize;
    if len > MAX_STARTUP_PACKET {
        return Err(ProtocolError::Startup("length above 10000 bytes"));
    }
    if buf.len() < len {
        return Ok(None);
    }
    let mut r = Reader::new(&buf[4..len]);
    let code = r.i32().ok_or(ProtocolError::Startup("no protocol code"))?;
    let packet = match code {
        SSL_REQUEST_CODE if len == 8 => StartupPacket::SslRequest,
        GSSENC_REQUEST_CODE if len == 8 => StartupPacket::GssEncRequest,
        CANCEL_REQUEST_CODE => {
            let pid = r
                .i32()
                .ok_or(ProtocolError::Startup("cancel request without process id"))?;
            let secret = r.remaining();
            if !(4..=256).contains(&secret.len()) {
                return Err(ProtocolError::Startup("cancel key must be 4 to 256 bytes"));
            }
            StartupPacket::Cancel {
                pid,
                secret: secret.to_vec(),
            }
        }
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE => {
            return Err(ProtocolError::Startup("encryption request with a body"));
        }
        _ => {
            let major = (code >> 16) as u16;
            let minor = (code & 0xffff) as u16;
            let mut params = Vec::new();
            loop {
                let key = r
                    .cstr()
                    .ok_or(ProtocolError::Startup("parameter list is not terminated"))?;
                if key.is_empty() {
                    break;
                }
                let value = r
                    .cstr()
                    .ok_or(ProtocolError::Startup("parameter without a value"))?;
                let utf8 = |b: &[u8]| {
                    String::from_utf8(b.to_vec())
                        .map_err(|_| ProtocolError::Startup("parameter is not UTF-8"))
                };
                params.push((utf8(key)?, utf8(value)?));
            }
            if !r.is_empty() {
                return Err(ProtocolError::Startup("bytes after the parameter list"));
            }
            StartupPacket::Startup(StartupMessage {
                major,
                minor,
                params,
            })
        }
    };
    Ok(Some((packet, len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(body: &[u8]) -> Vec<u8> {
        let mut v = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn ssl_request() {
        let p = packet(&SSL_REQUEST_CODE.to_be_bytes());
        assert_eq!(
            next_startup_packet(&p).unwrap(),
            Some((StartupPacket::SslRequest, 8))
        );
    }

    #[test]
    fn startup_keeps_order() {
        let mut body = 196608i32.to_be_bytes().to_vec();
        body.extend_from_slice(b"user\0bob\0database\0app\0application_name\0x\0\0");
        let p = packet(&body);
        let (StartupPacket::Startup(s), n) = next_startup_packet(&p).unwrap().unwrap() else {
            panic!()
        };
        assert_eq!(n, p.len());
        assert_eq!((s.major, s.minor), (3, 0));
        assert_eq!(s.params[0], ("user".into(), "bob".into()));
        assert_eq!(s.param("database"), Some("app"));
    }

    #[test]
    fn garbage_is_refused() {
        assert!(next_startup_packet(b"GET / HTTP/1.1\r\n").is_err());
        assert!(next_startup_packet(&[0, 0, 0, 2]).is_err());
        assert!(next_startup_packet(&[0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn unterminated_params() {
        let mut body = 196608i32.to_be_bytes().to_vec();
        body.extend_from_slice(b"user\0bob");
        assert!(next_startup_packet(&packet(&body)).is_err());
    }
}
