//! What a masked value becomes. The output is always valid for the value's
//! type and format, so drivers decode it as they would the real value:
//! text stays text, JSON stays JSON, bytea stays bytea, and other types
//! become NULL (unless their digits can be replaced in place).

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::Detector;

/// The key behind `hmac` and `format-preserving` masking: the same value
/// masks the same way under one key.
#[derive(Clone)]
pub struct MaskKey(Hmac<Sha256>);

impl std::fmt::Debug for MaskKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MaskKey(..)")
    }
}

impl MaskKey {
    pub fn from_bytes(key: &[u8]) -> MaskKey {
        MaskKey(Hmac::new_from_slice(key).expect("HMAC takes keys of any length"))
    }

    fn digest(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut mac = self.0.clone();
        for p in parts {
            mac.update(p);
        }
        mac.finalize().into_bytes().into()
    }

    /// At least `n` keyed pseudo-random bytes derived from `value`.
    fn stream(&self, value: &[u8], n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 32);
        let mut block = 0u32;
        while out.len() < n {
            out.extend_from_slice(&self.digest(&[value, &block.to_be_bytes()]));
            block += 1;
        }
        out
    }
}

/// The type of a value, as far as masking cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    /// text, varchar, bpchar, name, xml, unknown: the binary format is
    /// the text itself.
    Text,
    Json,
    /// jsonb: its binary format is a version byte and the JSON text.
    Jsonb,
    Bytea,
    /// Anything else: numbers, dates, arrays, records...
    Other,
}

impl ValueType {
    /// From a PostgreSQL type OID.
    pub fn from_oid(oid: u32) -> ValueType {
        match oid {
            25 | 1043 | 1042 | 19 | 142 | 705 => ValueType::Text,
            114 => ValueType::Json,
            3802 => ValueType::Jsonb,
            17 => ValueType::Bytea,
            _ => ValueType::Other,
        }
    }

    /// Whether values of the type with this OID can hold what a detector
    /// finds. Booleans, small integers, floats, dates and times, UUIDs and
    /// network addresses cannot (a card number needs 13 digits, an email an
    /// `@`), so they are not scanned; everything else is, arrays and records
    /// included.
    pub fn may_hold_findings(oid: u32) -> bool {
        !matches!(
            oid,
            16 | 18
                | 21
                | 23
                | 26
                | 700
                | 701
                | 1082
                | 1083
                | 1114
                | 1184
                | 1186
                | 1266
                | 2950
                | 869
                | 650
                | 829
                | 774
        )
    }

    /// Whether content detectors can read the value in this format.
    pub fn is_textual(self, binary: bool) -> bool {
        match self {
            ValueType::Text | ValueType::Json | ValueType::Jsonb | ValueType::Bytea => true,
            // The text form of numbers, arrays and records is text.
            ValueType::Other => !binary,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    Redact,
    Partial { keep_last: usize },
    Hmac,
    Null,
    FormatPreserving,
}

const REDACTED: &[u8] = b"[redacted]";

impl Strategy {
    /// The masked form of a whole text value.
    fn text(&self, key: &MaskKey, value: &[u8]) -> Option<Vec<u8>> {
        Some(match self {
            Strategy::Redact => REDACTED.to_vec(),
            Strategy::Partial { keep_last } => {
                let s = String::from_utf8_lossy(value);
                let n = s.chars().count();
                let tail: String = s.chars().skip(n.saturating_sub(*keep_last)).collect();
                // A value no longer than what is kept shows nothing.
                let tail = if n <= *keep_last { String::new() } else { tail };
                format!("****{tail}").into_bytes()
            }
            Strategy::Hmac => hex(&key.digest(&[value])[..8]).into_bytes(),
            Strategy::Null => return None,
            Strategy::FormatPreserving => format_preserving(key, value),
        })
    }

    /// The bytes to send in place of `value` (in `binary` or text format);
    /// `None`: NULL.
    pub fn apply(
        &self,
        key: &MaskKey,
        ty: ValueType,
        binary: bool,
        value: &[u8],
    ) -> Option<Vec<u8>> {
        match ty {
            ValueType::Text => self.text(key, value),
            ValueType::Json | ValueType::Jsonb => {
                let inner = if binary && ty == ValueType::Jsonb {
                    value.get(1..).unwrap_or_default()
                } else {
                    value
                };
                let masked = self.text(key, inner)?;
                let json = serde_json::Value::String(String::from_utf8_lossy(&masked).into_owned())
                    .to_string()
                    .into_bytes();
                Some(if binary && ty == ValueType::Jsonb {
                    let mut v = vec![1u8];
                    v.extend_from_slice(&json);
                    v
                } else {
                    json
                })
            }
            ValueType::Bytea => {
                let raw = if binary {
                    value.to_vec()
                } else {
                    unhex_bytea(value).unwrap_or_default()
                };
                let masked = match self {
                    Strategy::Redact => Vec::new(),
                    Strategy::Partial { keep_last } if raw.len() > *keep_last => {
                        raw[raw.len() - keep_last..].to_vec()
                    }
                    Strategy::Partial { .. } => Vec::new(),
                    Strategy::Hmac => key.digest(&[&raw])[..8].to_vec(),
                    Strategy::Null => return None,
                    Strategy::FormatPreserving => key.stream(&raw, raw.len())[..raw.len()].to_vec(),
                };
                Some(if binary {
                    masked
                } else {
                    format!("\\x{}", hex(&masked)).into_bytes()
                })
            }
            ValueType::Other => match self {
                // Digits for digits keeps a number a number.
                Strategy::FormatPreserving
                    if !binary
                        && !value.is_empty()
                        && value
                            .iter()
                            .all(|b| b.is_ascii_digit() || matches!(b, b'-' | b'.')) =>
                {
                    Some(format_preserving(key, value))
                }
                _ => None,
            },
        }
    }

    /// The replacement when it does not depend on the value: `Some(None)`
    /// is NULL. Lets the data path mask without allocating.
    pub fn constant(&self, ty: ValueType, binary: bool) -> Option<Option<&'static [u8]>> {
        match (self, ty) {
            (Strategy::Null, _) => Some(None),
            (Strategy::FormatPreserving, ValueType::Other) => None,
            (_, ValueType::Other) => Some(None),
            (Strategy::Redact, ValueType::Text) => Some(Some(REDACTED)),
            (Strategy::Redact, ValueType::Json) => Some(Some(b"\"[redacted]\"")),
            (Strategy::Redact, ValueType::Jsonb) if binary => Some(Some(b"\x01\"[redacted]\"")),
            (Strategy::Redact, ValueType::Jsonb) => Some(Some(b"\"[redacted]\"")),
            (Strategy::Redact, ValueType::Bytea) if binary => Some(Some(b"")),
            (Strategy::Redact, ValueType::Bytea) => Some(Some(b"\\x")),
            _ => None,
        }
    }

    /// The replacement for a detected value inside a longer text.
    pub fn apply_span(&self, key: &MaskKey, detector: Detector, span: &[u8]) -> Vec<u8> {
        match self {
            Strategy::Redact | Strategy::Null => {
                format!("[redacted:{}]", detector.name()).into_bytes()
            }
            other => other.text(key, span).unwrap_or_else(|| REDACTED.to_vec()),
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// bytea's text format, `\x` and hex digits.
fn unhex_bytea(v: &[u8]) -> Option<Vec<u8>> {
    let h = v.strip_prefix(b"\\x")?;
    let d = |c: u8| (c as char).to_digit(16).map(|x| x as u8);
    h.chunks(2)
        .map(|p| Some(d(*p.first()?)? << 4 | d(*p.get(1)?)?))
        .collect()
}

fn format_preserving(key: &MaskKey, value: &[u8]) -> Vec<u8> {
    let stream = key.stream(value, value.len());
    value
        .iter()
        .zip(stream)
        .map(|(&b, r)| match b {
            b'0'..=b'9' => b'0' + r % 10,
            b'a'..=b'z' => b'a' + r % 26,
            b'A'..=b'Z' => b'A' + r % 26,
            other => other,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> MaskKey {
        MaskKey::from_bytes(b"k")
    }

    fn text(s: Strategy, v: &str) -> Option<String> {
        s.apply(&key(), ValueType::Text, false, v.as_bytes())
            .map(|b| String::from_utf8(b).unwrap())
    }

    #[test]
    fn strategies_on_text() {
        assert_eq!(text(Strategy::Redact, "secret").unwrap(), "[redacted]");
        assert_eq!(
            text(Strategy::Partial { keep_last: 4 }, "4111111111111111").unwrap(),
            "****1111"
        );
        assert_eq!(
            text(Strategy::Partial { keep_last: 4 }, "abc").unwrap(),
            "****"
        );
        let h = text(Strategy::Hmac, "alice@example.com").unwrap();
        assert_eq!(h.len(), 16);
        assert_eq!(text(Strategy::Hmac, "alice@example.com").unwrap(), h);
        assert_ne!(text(Strategy::Hmac, "bob@example.com").unwrap(), h);
        assert_eq!(text(Strategy::Null, "x"), None);
        let f = text(Strategy::FormatPreserving, "4111-1111 Ab").unwrap();
        assert_ne!(f, "4111-1111 Ab");
        assert!(f.chars().zip("4111-1111 Ab".chars()).all(|(a, b)| {
            a.is_ascii_digit() == b.is_ascii_digit()
                && a.is_ascii_uppercase() == b.is_ascii_uppercase()
                && (a.is_ascii_alphanumeric() || a == b)
        }));
    }

    #[test]
    fn constants_are_what_apply_gives() {
        let k = key();
        for s in [
            Strategy::Redact,
            Strategy::Null,
            Strategy::Hmac,
            Strategy::Partial { keep_last: 2 },
            Strategy::FormatPreserving,
        ] {
            for ty in [
                ValueType::Text,
                ValueType::Json,
                ValueType::Jsonb,
                ValueType::Bytea,
                ValueType::Other,
            ] {
                for binary in [false, true] {
                    if let Some(c) = s.constant(ty, binary) {
                        let v: &[u8] = if binary && ty == ValueType::Jsonb {
                            b"\x01{}"
                        } else {
                            b"42"
                        };
                        assert_eq!(
                            c.map(<[u8]>::to_vec),
                            s.apply(&k, ty, binary, v),
                            "{s:?} {ty:?} {binary}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn outputs_stay_valid_for_their_type() {
        let k = key();
        let j = Strategy::Redact
            .apply(&k, ValueType::Json, false, br#"{"api_key":"x"}"#)
            .unwrap();
        assert_eq!(j, br#""[redacted]""#);
        let jb = Strategy::Redact
            .apply(&k, ValueType::Jsonb, true, b"\x01{}")
            .unwrap();
        assert_eq!(jb, b"\x01\"[redacted]\"");
        let b = Strategy::Partial { keep_last: 1 }
            .apply(&k, ValueType::Bytea, false, b"\\x616263")
            .unwrap();
        assert_eq!(b, b"\\x63");
        assert_eq!(
            Strategy::Redact.apply(&k, ValueType::Other, false, b"42"),
            None
        );
        let n = Strategy::FormatPreserving
            .apply(&k, ValueType::Other, false, b"-12.5")
            .unwrap();
        assert_eq!(n.len(), 5);
        assert_eq!((n[0], n[3]), (b'-', b'.'));
        assert_eq!(
            Strategy::FormatPreserving.apply(&k, ValueType::Other, false, b"2024-01-01 10:00"),
            None
        );
    }
}
