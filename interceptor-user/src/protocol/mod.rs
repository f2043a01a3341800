//! The PostgreSQL wire protocol as the proxy sees it. No IO happens here.
//!
//! The relay never copies a message to look at it: [`next_frame`] finds the
//! boundaries of complete messages in a read buffer, and the typed views in
//! [`frontend`] and [`backend`] borrow from that buffer. The original bytes are
//! what gets forwarded, unless a message is deliberately replaced.

pub mod backend;
pub mod build;
pub mod frontend;
pub mod startup;

/// A message that breaks the protocol. The session answers with SQLSTATE
/// 08P01 and closes; other sessions are unaffected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("message '{tag}' declares length {len}, below the minimum of 4", tag = printable(*tag))]
    BadLength { tag: u8, len: i32 },
    #[error("message '{tag}' of {len} bytes exceeds the limit of {max} bytes", tag = printable(*tag))]
    TooLarge { tag: u8, len: usize, max: usize },
    #[error("malformed '{tag}' message: {what}", tag = printable(*tag))]
    Malformed { tag: u8, what: &'static str },
    #[error("malformed startup packet: {0}")]
    Startup(&'static str),
}

fn printable(tag: u8) -> char {
    if tag.is_ascii_graphic() {
        tag as char
    } else {
        '?'
    }
}

/// A complete message at the start of a buffer: its type byte and its total
/// size on the wire (type byte + length word + body).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub tag: u8,
    pub wire_len: usize,
}

/// Looks for one complete tagged message at the start of `buf`.
///
/// `Ok(None)` means more bytes are needed. The length is checked against
/// `max` as soon as the header arrives, so an oversized message is refused
/// before it is buffered.
pub fn next_frame(buf: &[u8], max: usize) -> Result<Option<FrameHeader>, ProtocolError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(ProtocolError::BadLength { tag, len });
    }
    let wire_len = len as usize + 1;
    if wire_len > max {
        return Err(ProtocolError::TooLarge {
            tag,
            len: wire_len,
            max,
        });
    }
    if buf.len() < wire_len {
        return Ok(None);
    }
    Ok(Some(FrameHeader { tag, wire_len }))
}

/// A cursor over a message body with bounds-checked reads. Every read that
/// would run past the end yields `None`, which callers turn into
/// [`ProtocolError::Malformed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub(crate) fn remaining(&self) -> &'a [u8] {
        self.buf
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub(crate) fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.buf.split_first()?;
        self.buf = rest;
        Some(b)
    }

    pub(crate) fn i16(&mut self) -> Option<i16> {
        self.bytes(2).map(|b| i16::from_be_bytes([b[0], b[1]]))
    }

    pub(crate) fn i32(&mut self) -> Option<i32> {
        self.bytes(4)
            .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Some(head)
    }

    /// A NUL-terminated string, without its terminator.
    pub(crate) fn cstr(&mut self) -> Option<&'a [u8]> {
        let end = self.buf.iter().position(|&b| b == 0)?;
        let s = &self.buf[..end];
        self.buf = &self.buf[end + 1..];
        Some(s)
    }

    /// A length-prefixed value as in Bind and DataRow: -1 is NULL.
    pub(crate) fn value(&mut self) -> Option<Option<&'a [u8]>> {
        match self.i32()? {
            -1 => Some(None),
            n if n >= 0 => self.bytes(n as usize).map(Some),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needs_more_bytes() {
        assert_eq!(next_frame(b"Q\0\0", 100), Ok(None));
        assert_eq!(next_frame(b"Q\0\0\0\x09SEL", 100), Ok(None));
    }

    #[test]
    fn complete_frame() {
        let f = next_frame(b"Q\0\0\0\x09SELECTxx", 100).unwrap().unwrap();
        assert_eq!(
            f,
            FrameHeader {
                tag: b'Q',
                wire_len: 10
            }
        );
    }

    #[test]
    fn negative_and_short_lengths() {
        assert!(matches!(
            next_frame(b"Q\xff\xff\xff\xff", 100),
            Err(ProtocolError::BadLength { len: -1, .. })
        ));
        assert!(matches!(
            next_frame(b"Q\0\0\0\x03", 100),
            Err(ProtocolError::BadLength { len: 3, .. })
        ));
    }

    #[test]
    fn oversized_refused_from_header_alone() {
        let err = next_frame(b"d\x7f\xff\xff\xff", 1 << 20).unwrap_err();
        assert!(matches!(err, ProtocolError::TooLarge { tag: b'd', .. }));
        assert!(err.to_string().contains("exceeds the limit"));
    }
}
