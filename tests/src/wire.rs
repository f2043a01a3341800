//! A deliberately minimal raw protocol client, for sending what real
//! drivers never would (truncated frames, lying lengths, garbage).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{Result, bail};

pub struct RawClient {
    pub stream: TcpStream,
}

/// One backend message: type byte and body.
pub type Message = (u8, Vec<u8>);

pub fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

pub fn startup_packet(user: &str, db: &str) -> Vec<u8> {
    let mut body = 196608i32.to_be_bytes().to_vec();
    for (k, v) in [("user", user), ("database", db)] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut p = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    p.extend_from_slice(&body);
    p
}

/// A field (`b'C'` SQLSTATE, `b'M'` message) of an ErrorResponse body.
pub fn error_field(body: &[u8], code: u8) -> Option<String> {
    let mut i = 0;
    while i < body.len() && body[i] != 0 {
        let end = body[i + 1..].iter().position(|&b| b == 0)? + i + 1;
        if body[i] == code {
            return Some(String::from_utf8_lossy(&body[i + 1..end]).into_owned());
        }
        i = end + 1;
    }
    None
}

impl RawClient {
    pub fn connect(port: u16) -> Result<RawClient> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(15)))?;
        Ok(RawClient { stream })
    }

    pub fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.write_all(bytes)?;
        Ok(())
    }

    /// The next message, or `None` at end of stream.
    pub fn read_message(&mut self) -> Result<Option<Message>> {
        let mut head = [0u8; 5];
        match self.stream.read_exact(&mut head) {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        }
        let len = i32::from_be_bytes([head[1], head[2], head[3], head[4]]);
        if len < 4 {
            bail!("server sent length {len}");
        }
        let mut body = vec![0u8; len as usize - 4];
        self.stream.read_exact(&mut body)?;
        Ok(Some((head[0], body)))
    }

    /// Trust login; returns the messages up to and including ReadyForQuery.
    pub fn login(port: u16, user: &str, db: &str) -> Result<(RawClient, Vec<Message>)> {
        let mut c = RawClient::connect(port)?;
        c.send(&startup_packet(user, db))?;
        let msgs = c.read_until_ready()?;
        Ok((c, msgs))
    }

    /// Reads until ReadyForQuery (included), an end of stream, or a FATAL.
    pub fn read_until_ready(&mut self) -> Result<Vec<Message>> {
        let mut out = Vec::new();
        while let Some(m) = self.read_message()? {
            let done = m.0 == b'Z';
            out.push(m);
            if done {
                break;
            }
        }
        Ok(out)
    }

    /// Reads everything until the server closes the connection.
    pub fn read_to_end(&mut self) -> Result<Vec<Message>> {
        let mut out = Vec::new();
        while let Some(m) = self.read_message()? {
            out.push(m);
        }
        Ok(out)
    }

    pub fn query(&mut self, sql: &str) -> Result<Vec<Message>> {
        let mut body = sql.as_bytes().to_vec();
        body.push(0);
        self.send(&frame(b'Q', &body))?;
        self.read_until_ready()
    }
}

/// The SQLSTATE of the first ErrorResponse among `msgs`.
pub fn first_error(msgs: &[Message]) -> Option<(String, String)> {
    msgs.iter().find(|(t, _)| *t == b'E').map(|(_, b)| {
        (
            error_field(b, b'C').unwrap_or_default(),
            error_field(b, b'M').unwrap_or_default(),
        )
    })
}

/// Logs in as `user` and sends Parse, Bind (every result column in
/// `result_format`: 0 text, 1 binary), Execute and Sync of `sql`, with no
/// Describe; returns the replies up to ReadyForQuery.
pub fn parse_bind_execute(
    port: u16,
    user: &str,
    db: &str,
    sql: &str,
    result_format: i16,
) -> Result<Vec<Message>> {
    let (mut c, _) = RawClient::login(port, user, db)?;
    let mut parse = b"\0".to_vec();
    parse.extend_from_slice(sql.as_bytes());
    parse.extend_from_slice(b"\0\0\0");
    let mut bind = b"\0\0".to_vec();
    bind.extend_from_slice(&0i16.to_be_bytes());
    bind.extend_from_slice(&0i16.to_be_bytes());
    bind.extend_from_slice(&1i16.to_be_bytes());
    bind.extend_from_slice(&result_format.to_be_bytes());
    let mut out = frame(b'P', &parse);
    out.extend(frame(b'B', &bind));
    out.extend(frame(b'E', b"\0\0\0\0\0"));
    out.extend(frame(b'S', b""));
    c.send(&out)?;
    c.read_until_ready()
}
