//! Typed, borrowed views of frontend (client to server) messages after login.
//!
//! Policy code works on these. Each view is validated once when it is made:
//! a view that exists is well-formed, so later code need not re-check.

use super::{ProtocolError, Reader};

/// One frontend message, borrowing its fields from the read buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrontendMessage<'a> {
    Query {
        sql: &'a [u8],
    },
    Parse(Parse<'a>),
    Bind(Bind<'a>),
    Describe {
        target: Target,
        name: &'a [u8],
    },
    Execute {
        portal: &'a [u8],
        max_rows: i32,
    },
    Sync,
    Flush,
    Close {
        target: Target,
        name: &'a [u8],
    },
    CopyData(&'a [u8]),
    CopyDone,
    CopyFail {
        message: &'a [u8],
    },
    FunctionCall(FunctionCall<'a>),
    Terminate,
    /// A type this proxy does not know; relayed by its length.
    Unknown {
        tag: u8,
        body: &'a [u8],
    },
}

/// Whether Describe and Close name a prepared statement or a portal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Statement,
    Portal,
}

/// Lists inside Bind, Parse and FunctionCall stay as validated raw bytes
/// and are decoded on demand: the relay parses every message, and most of
/// them are never looked into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parse<'a> {
    pub name: &'a [u8],
    pub sql: &'a [u8],
    param_types: &'a [u8],
}

impl<'a> Parse<'a> {
    /// Parameter type OIDs; 0 leaves the type to the server.
    pub fn param_types(&self) -> impl Iterator<Item = u32> + 'a {
        self.param_types
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind<'a> {
    pub portal: &'a [u8],
    pub statement: &'a [u8],
    param_formats: &'a [u8],
    params: Values<'a>,
    result_formats: &'a [u8],
}

impl<'a> Bind<'a> {
    pub fn param_formats(&self) -> impl Iterator<Item = i16> + 'a {
        i16s(self.param_formats)
    }

    /// Parameter values; `None` is SQL NULL.
    pub fn params(&self) -> Values<'a> {
        self.params.clone()
    }

    pub fn result_formats(&self) -> impl Iterator<Item = i16> + 'a {
        i16s(self.result_formats)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionCall<'a> {
    pub function_oid: u32,
    arg_formats: &'a [u8],
    args: Values<'a>,
    pub result_format: i16,
}

impl<'a> FunctionCall<'a> {
    pub fn arg_formats(&self) -> impl Iterator<Item = i16> + 'a {
        i16s(self.arg_formats)
    }

    pub fn args(&self) -> Values<'a> {
        self.args.clone()
    }
}

fn i16s(raw: &[u8]) -> impl Iterator<Item = i16> + '_ {
    raw.chunks_exact(2)
        .map(|c| i16::from_be_bytes([c[0], c[1]]))
}

/// Length-prefixed values (Bind parameters, FunctionCall arguments),
/// already checked to lie within the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Values<'a> {
    reader: Reader<'a>,
    left: u16,
}

impl<'a> Values<'a> {
    pub fn len(&self) -> usize {
        self.left as usize
    }

    pub fn is_empty(&self) -> bool {
        self.left == 0
    }

    /// Reads a count and that many values, checking every length.
    fn take(r: &mut Reader<'a>) -> Option<Values<'a>> {
        let n = r.i16().filter(|n| *n >= 0)? as u16;
        let start = r.clone();
        for _ in 0..n {
            r.value()?;
        }
        Some(Values {
            reader: start,
            left: n,
        })
    }
}

impl<'a> Iterator for Values<'a> {
    type Item = Option<&'a [u8]>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        self.reader.value()
    }
}

impl<'a> FrontendMessage<'a> {
    /// Decodes the view of one complete message (`frame` starts with the type
    /// byte and holds exactly the declared length).
    pub fn parse(frame: &'a [u8]) -> Result<Self, ProtocolError> {
        let tag = frame[0];
        let body = &frame[5..];
        let bad = |what| ProtocolError::Malformed { tag, what };
        let mut r = Reader::new(body);
        let msg = match tag {
            b'Q' => FrontendMessage::Query {
                sql: r.cstr().ok_or(bad("query string is not NUL-terminated"))?,
            },
            b'P' => {
                let name = r.cstr().ok_or(bad("statement name"))?;
                let sql = r.cstr().ok_or(bad("query string is not NUL-terminated"))?;
                let n = r
                    .i16()
                    .filter(|n| *n >= 0)
                    .ok_or(bad("parameter type count"))?;
                let param_types = r
                    .bytes(n as usize * 4)
                    .ok_or(bad("parameter types run past the end"))?;
                FrontendMessage::Parse(Parse {
                    name,
                    sql,
                    param_types,
                })
            }
            b'B' => {
                let portal = r.cstr().ok_or(bad("portal name"))?;
                let statement = r.cstr().ok_or(bad("statement name"))?;
                let param_formats = i16_list(&mut r).ok_or(bad("parameter formats"))?;
                let params =
                    Values::take(&mut r).ok_or(bad("parameter values run past the end"))?;
                let result_formats = i16_list(&mut r).ok_or(bad("result formats"))?;
                if param_formats.len() > 2 && param_formats.len() != params.len() * 2 {
                    return Err(bad("parameter format count differs from parameter count"));
                }
                FrontendMessage::Bind(Bind {
                    portal,
                    statement,
                    param_formats,
                    params,
                    result_formats,
                })
            }
            b'D' | b'C' => {
                let target = match r.u8() {
                    Some(b'S') => Target::Statement,
                    Some(b'P') => Target::Portal,
                    _ => return Err(bad("target must be 'S' or 'P'")),
                };
                let name = r.cstr().ok_or(bad("name is not NUL-terminated"))?;
                if tag == b'D' {
                    FrontendMessage::Describe { target, name }
                } else {
                    FrontendMessage::Close { target, name }
                }
            }
            b'E' => FrontendMessage::Execute {
                portal: r.cstr().ok_or(bad("portal name"))?,
                max_rows: r.i32().ok_or(bad("row limit"))?,
            },
            b'S' => FrontendMessage::Sync,
            b'H' => FrontendMessage::Flush,
            b'X' => FrontendMessage::Terminate,
            b'd' => return Ok(FrontendMessage::CopyData(body)),
            b'c' => FrontendMessage::CopyDone,
            b'f' => FrontendMessage::CopyFail {
                message: r.cstr().ok_or(bad("message is not NUL-terminated"))?,
            },
            b'F' => {
                let function_oid = r.i32().ok_or(bad("function oid"))? as u32;
                let arg_formats = i16_list(&mut r).ok_or(bad("argument formats"))?;
                let args = Values::take(&mut r).ok_or(bad("arguments run past the end"))?;
                let result_format = r.i16().ok_or(bad("result format"))?;
                FrontendMessage::FunctionCall(FunctionCall {
                    function_oid,
                    arg_formats,
                    args,
                    result_format,
                })
            }
            _ => return Ok(FrontendMessage::Unknown { tag, body }),
        };
        if !r.is_empty() {
            return Err(bad("trailing bytes after the last field"));
        }
        Ok(msg)
    }
}

/// A count and that many int16s, as raw bytes.
fn i16_list<'a>(r: &mut Reader<'a>) -> Option<&'a [u8]> {
    let n = r.i16().filter(|n| *n >= 0)?;
    r.bytes(n as usize * 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn query() {
        let f = frame(b'Q', b"select 1\0");
        assert_eq!(
            FrontendMessage::parse(&f),
            Ok(FrontendMessage::Query { sql: b"select 1" })
        );
    }

    #[test]
    fn query_without_nul_is_malformed() {
        let f = frame(b'Q', b"select 1");
        assert!(matches!(
            FrontendMessage::parse(&f),
            Err(ProtocolError::Malformed { tag: b'Q', .. })
        ));
    }

    #[test]
    fn bind_with_params() {
        let mut body = b"p1\0s1\0".to_vec();
        body.extend_from_slice(&1i16.to_be_bytes());
        body.extend_from_slice(&1i16.to_be_bytes());
        body.extend_from_slice(&2i16.to_be_bytes());
        body.extend_from_slice(&3i32.to_be_bytes());
        body.extend_from_slice(b"abc");
        body.extend_from_slice(&(-1i32).to_be_bytes());
        body.extend_from_slice(&0i16.to_be_bytes());
        let f = frame(b'B', &body);
        let FrontendMessage::Bind(b) = FrontendMessage::parse(&f).unwrap() else {
            panic!()
        };
        assert_eq!(b.portal, b"p1");
        assert_eq!(
            b.params().collect::<Vec<_>>(),
            vec![Some(&b"abc"[..]), None]
        );
        assert_eq!(b.param_formats().collect::<Vec<_>>(), vec![1]);
        assert_eq!(b.result_formats().count(), 0);
    }

    #[test]
    fn bind_with_lying_value_length() {
        let mut body = b"\0\0".to_vec();
        body.extend_from_slice(&0i16.to_be_bytes());
        body.extend_from_slice(&1i16.to_be_bytes());
        body.extend_from_slice(&100i32.to_be_bytes());
        body.extend_from_slice(b"abc");
        let f = frame(b'B', &body);
        assert!(FrontendMessage::parse(&f).is_err());
    }

    #[test]
    fn unknown_type_is_kept() {
        let f = frame(b'z', b"\x01\x02");
        assert_eq!(
            FrontendMessage::parse(&f),
            Ok(FrontendMessage::Unknown {
                tag: b'z',
                body: b"\x01\x02"
            })
        );
    }

    #[test]
    fn trailing_bytes_are_malformed() {
        let f = frame(b'S', b"x");
        assert!(FrontendMessage::parse(&f).is_err());
    }
}
