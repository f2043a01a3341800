//! Content detectors: sensitive values found by what they look like, in
//! any text the client would receive.
//!
//! One combined regular expression finds candidates in a single pass (the
//! regex crate's lazy DFA skips ordinary text at memory speed); each
//! candidate is then confirmed by its own check (Luhn, mod-97, entropy,
//! boundaries), so a lookalike that fails its checksum is left alone.

use regex::bytes::Regex;
use schemars::JsonSchema;
use serde::Deserialize;

/// What a detector finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Detector {
    /// Payment card numbers: 13 to 19 digits (spaces or dashes between
    /// groups allowed) that pass the Luhn check.
    Card,
    /// US social security numbers written `123-45-6789` (area not 000, 666
    /// or 9xx; group and serial not zero).
    Ssn,
    /// Email addresses.
    Email,
    /// Phone numbers: `+` and 8 to 15 digits, or North American
    /// `(555) 123-4567`, `555-123-4567`, `555.123.4567`.
    Phone,
    /// IBANs that pass the mod-97 check.
    Iban,
    /// AWS access key ids (`AKIA...`, `ASIA...`).
    AwsKeyId,
    /// AWS secret access keys: 40 characters of base64 with upper and lower
    /// case letters and digits.
    AwsSecret,
    /// JSON Web Tokens (`eyJ...` header and payload).
    Jwt,
    /// PEM private keys, from BEGIN to END.
    PemPrivateKey,
    /// API keys with well-known prefixes: `sk_live_`, `sk_test_`, `rk_live_`,
    /// `ghp_`, `gho_`, `ghs_`, `github_pat_`, `xoxb-`, `xoxp-`, `glpat-`,
    /// `AIza`, `npm_`, `hf_`...
    ApiKey,
    /// Tokens of 24 or more letters, digits and `+/=_-` with letters and
    /// digits mixed and over 4 bits of entropy per character.
    HighEntropy,
}

impl Detector {
    pub const ALL: [Detector; 11] = [
        Detector::Card,
        Detector::Ssn,
        Detector::Email,
        Detector::Phone,
        Detector::Iban,
        Detector::AwsKeyId,
        Detector::AwsSecret,
        Detector::Jwt,
        Detector::PemPrivateKey,
        Detector::ApiKey,
        Detector::HighEntropy,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Detector::Card => "card",
            Detector::Ssn => "ssn",
            Detector::Email => "email",
            Detector::Phone => "phone",
            Detector::Iban => "iban",
            Detector::AwsKeyId => "aws-key-id",
            Detector::AwsSecret => "aws-secret",
            Detector::Jwt => "jwt",
            Detector::PemPrivateKey => "pem-private-key",
            Detector::ApiKey => "api-key",
            Detector::HighEntropy => "high-entropy",
        }
    }

    /// The candidate pattern (ASCII classes; confirmed by [`Self::confirm`]).
    fn pattern(self) -> &'static str {
        match self {
            Detector::Card => r"\b(?:\d[ -]?){12,18}\d\b",
            Detector::Ssn => r"\b\d{3}-\d{2}-\d{4}\b",
            Detector::Email => {
                r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"
            }
            Detector::Phone => {
                r"(?:\+\d{8,15}\b|(?:\+1[ .-]?)?(?:\(\d{3}\) ?|\b\d{3}[.-])\d{3}[.-]\d{4}\b)"
            }
            Detector::Iban => r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b",
            Detector::AwsKeyId => {
                r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA|ABIA|ACCA)[A-Z0-9]{16}\b"
            }
            Detector::AwsSecret => r"[A-Za-z0-9/+]{40}",
            Detector::Jwt => r"\beyJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*",
            Detector::PemPrivateKey => {
                r"-----BEGIN [A-Z ]*PRIVATE KEY-----(?s:.*?)(?:-----END [A-Z ]*PRIVATE KEY-----|\z)"
            }
            Detector::ApiKey => {
                r"\b(?:sk_live_|sk_test_|pk_live_|rk_live_|rk_test_|whsec_|ghp_|gho_|ghu_|ghs_|ghr_|github_pat_|xox[abprs]-|glpat-|AIza|npm_|hf_|SG\.)[A-Za-z0-9_.\-]{8,}"
            }
            Detector::HighEntropy => r"[A-Za-z0-9+/_-]{24,}={0,2}",
        }
    }

    /// Whether the candidate `m` at `start..end` of `text` is one.
    fn confirm(self, text: &[u8], start: usize, end: usize) -> bool {
        let m = &text[start..end];
        match self {
            Detector::Card => luhn(m),
            Detector::Ssn => ssn(m),
            Detector::Iban => iban(m),
            Detector::AwsSecret => {
                let alphabet = |b: u8| b.is_ascii_alphanumeric() || b == b'/' || b == b'+';
                let before = start.checked_sub(1).map(|i| text[i]);
                let after = text.get(end).copied();
                !before.is_some_and(|b| alphabet(b) || b == b'=')
                    && !after.is_some_and(|b| alphabet(b) || b == b'=')
                    && m.iter().any(u8::is_ascii_uppercase)
                    && m.iter().any(u8::is_ascii_lowercase)
                    && m.iter().any(u8::is_ascii_digit)
                    && entropy(m) > 4.0
            }
            Detector::HighEntropy => {
                m.iter().any(u8::is_ascii_digit)
                    && m.iter().any(u8::is_ascii_alphabetic)
                    && entropy(m) > 4.0
            }
            _ => true,
        }
    }
}

/// What one pass over a text learns, enough to rule detectors out: most
/// values (names, numbers, dates, notes) can hold none of them, and the
/// regex is then never run.
#[derive(Default)]
struct Shape {
    digits: usize,
    upper: usize,
    at: bool,
    dash: bool,
    underscore: bool,
    dot: bool,
}

impl Shape {
    fn of(text: &[u8]) -> Shape {
        let mut s = Shape::default();
        for &b in text {
            match b {
                b'0'..=b'9' => s.digits += 1,
                b'A'..=b'Z' => s.upper += 1,
                b'@' => s.at = true,
                b'-' => s.dash = true,
                b'_' => s.underscore = true,
                b'.' => s.dot = true,
                _ => {}
            }
        }
        s
    }
}

impl Detector {
    /// Whether a text of this shape and length could hold one.
    fn possible(self, s: &Shape, text: &[u8]) -> bool {
        let len = text.len();
        match self {
            Detector::Card => s.digits >= 13,
            Detector::Ssn => s.digits >= 9 && s.dash,
            Detector::Email => s.at && s.dot,
            Detector::Phone => s.digits >= 8,
            Detector::Iban => s.digits >= 2 && s.upper >= 2 && len >= 15,
            Detector::AwsKeyId => s.upper >= 4 && len >= 20,
            Detector::AwsSecret => len >= 40,
            Detector::Jwt => s.dot && len >= 16,
            Detector::PemPrivateKey => s.dash && len >= 30,
            Detector::ApiKey => {
                s.underscore || s.dash || (s.upper > 0 && (s.dot || contains(text, b"AIza")))
            }
            Detector::HighEntropy => len >= 24,
        }
    }
}

fn contains(text: &[u8], needle: &[u8]) -> bool {
    text.iter()
        .enumerate()
        .filter(|(_, b)| **b == needle[0])
        .any(|(i, _)| text[i..].starts_with(needle))
}

fn luhn(m: &[u8]) -> bool {
    let digits: Vec<u8> = m
        .iter()
        .filter(|b| b.is_ascii_digit())
        .map(|b| b - b'0')
        .collect();
    if !(13..=19).contains(&digits.len()) || digits.iter().all(|&d| d == digits[0]) {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

fn ssn(m: &[u8]) -> bool {
    let n = |r: std::ops::Range<usize>| {
        m[r].iter()
            .fold(0u32, |acc, b| acc * 10 + u32::from(b - b'0'))
    };
    let (area, group, serial) = (n(0..3), n(4..6), n(7..11));
    area != 0 && area != 666 && area < 900 && group != 0 && serial != 0
}

fn iban(m: &[u8]) -> bool {
    let s: Vec<u8> = m.iter().copied().filter(|b| *b != b' ').collect();
    if !(15..=34).contains(&s.len()) {
        return false;
    }
    // Move the country code and check digits to the end, read letters as
    // 10..35, and take the number mod 97 a digit at a time.
    let mut rem: u32 = 0;
    for &b in s[4..].iter().chain(&s[..4]) {
        let v = match b {
            b'0'..=b'9' => u32::from(b - b'0'),
            b'A'..=b'Z' => u32::from(b - b'A') + 10,
            _ => return false,
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

/// Shannon entropy in bits per byte.
fn entropy(m: &[u8]) -> f64 {
    let mut counts = [0u32; 256];
    for &b in m {
        counts[b as usize] += 1;
    }
    let n = m.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum()
}

/// One sensitive value found in a text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finding {
    pub detector: Detector,
    pub start: usize,
    pub end: usize,
}

/// A set of detectors compiled into one scanner.
#[derive(Debug, Clone)]
pub struct Scanner {
    regex: Regex,
    /// The detector behind each capture group, in group order.
    detectors: Vec<Detector>,
    /// No detector matches fewer bytes than this.
    shortest: usize,
}

impl Scanner {
    /// `None` for an empty set: nothing to scan for.
    pub fn new(detectors: &[Detector]) -> Option<Scanner> {
        let mut ds: Vec<Detector> = Vec::new();
        for d in Detector::ALL {
            if detectors.contains(&d) {
                ds.push(d);
            }
        }
        if ds.is_empty() {
            return None;
        }
        let alternation: Vec<String> = ds.iter().map(|d| format!("({})", d.pattern())).collect();
        // ASCII classes and boundaries: much faster than Unicode ones, and
        // every detected format is ASCII.
        let regex = Regex::new(&format!("(?-u){}", alternation.join("|")))
            .expect("the detector patterns are valid");
        Some(Scanner {
            regex,
            shortest: ds.iter().map(|d| min_len(*d)).min().unwrap_or(1),
            detectors: ds,
        })
    }

    pub fn detectors(&self) -> &[Detector] {
        &self.detectors
    }

    /// Every finding in `text`, in order, not overlapping.
    pub fn scan(&self, text: &[u8], out: &mut Vec<Finding>) {
        if text.len() < self.shortest {
            return;
        }
        // Short values are most values: rule every detector out first.
        if text.len() < 256 {
            let shape = Shape::of(text);
            if !self.detectors.iter().any(|d| d.possible(&shape, text)) {
                return;
            }
        }
        let mut at = 0;
        while at < text.len() {
            let Some(caps) = self.regex.captures_at(text, at) else {
                return;
            };
            let Some(whole) = caps.get(0) else { return };
            let group = (1..caps.len()).find(|&i| caps.get(i).is_some());
            let found = group
                .map(|g| self.detectors[g - 1])
                .filter(|d| d.confirm(text, whole.start(), whole.end()));
            match found {
                Some(detector) => {
                    out.push(Finding {
                        detector,
                        start: whole.start(),
                        end: whole.end(),
                    });
                    at = whole.end().max(whole.start() + 1);
                }
                // A long token that fails its checks holds no shorter
                // one: skip it whole (else a long run is quadratic).
                None if matches!(
                    group.map(|g| self.detectors[g - 1]),
                    Some(Detector::HighEntropy | Detector::AwsSecret)
                ) =>
                {
                    at = whole.end()
                }
                // A lookalike: look again one byte further on, where
                // another detector may match.
                None => at = whole.start() + 1,
            }
        }
    }

    /// Whether `text` holds anything this scanner detects.
    pub fn finds(&self, text: &[u8]) -> bool {
        let mut v = Vec::new();
        self.scan(text, &mut v);
        !v.is_empty()
    }
}

fn min_len(d: Detector) -> usize {
    match d {
        Detector::Card => 13,
        Detector::Ssn => 11,
        Detector::Email => 6,
        Detector::Phone => 9,
        Detector::Iban => 15,
        Detector::AwsKeyId => 20,
        Detector::AwsSecret => 40,
        Detector::Jwt => 16,
        Detector::PemPrivateKey => 30,
        Detector::ApiKey => 11,
        Detector::HighEntropy => 24,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(d: Detector, text: &str) -> Vec<String> {
        let s = Scanner::new(&[d]).unwrap();
        let mut v = Vec::new();
        s.scan(text.as_bytes(), &mut v);
        v.iter().map(|f| text[f.start..f.end].to_owned()).collect()
    }

    #[test]
    fn cards_need_luhn() {
        assert_eq!(
            found(Detector::Card, "pay 4111 1111 1111 1111 now"),
            ["4111 1111 1111 1111"]
        );
        assert_eq!(
            found(Detector::Card, "4242-4242-4242-4242"),
            ["4242-4242-4242-4242"]
        );
        assert!(found(Detector::Card, "order 4111111111111112").is_empty());
        assert!(found(Detector::Card, "0000000000000000").is_empty());
    }

    #[test]
    fn ssn_rules() {
        assert_eq!(found(Detector::Ssn, "ssn 123-45-6789."), ["123-45-6789"]);
        assert!(found(Detector::Ssn, "666-12-3456 000-12-3456 123-00-4567").is_empty());
    }

    #[test]
    fn emails_phones() {
        assert_eq!(
            found(Detector::Email, "mail alice.b+x@mail.example.com, ok"),
            ["alice.b+x@mail.example.com"]
        );
        assert!(found(Detector::Email, "a@b").is_empty());
        assert_eq!(
            found(Detector::Phone, "call (555) 123-4567 or +442071838750"),
            ["(555) 123-4567", "+442071838750"]
        );
        assert!(found(Detector::Phone, "on 2024-01-15 at 12:30").is_empty());
    }

    #[test]
    fn ibans_need_mod97() {
        assert_eq!(
            found(Detector::Iban, "to GB82 WEST 1234 5698 7654 32 today"),
            ["GB82 WEST 1234 5698 7654 32"]
        );
        assert_eq!(
            found(Detector::Iban, "DE89370400440532013000"),
            ["DE89370400440532013000"]
        );
        assert!(found(Detector::Iban, "GB83WEST12345698765432").is_empty());
    }

    #[test]
    fn keys_and_tokens() {
        assert_eq!(
            found(Detector::AwsKeyId, "id=AKIAIOSFODNN7EXAMPLE"),
            ["AKIAIOSFODNN7EXAMPLE"]
        );
        assert_eq!(
            found(
                Detector::AwsSecret,
                "secret wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY end"
            ),
            ["wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"]
        );
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.abc_DEF-123";
        assert_eq!(found(Detector::Jwt, &format!("Bearer {jwt}")), [jwt]);
        assert_eq!(
            found(Detector::ApiKey, "key: sk_live_0123456789abcdef"),
            ["sk_live_0123456789abcdef"]
        );
        assert_eq!(
            found(Detector::ApiKey, "ghp_abcdefghijklmnopqrstuvwxyz0123456789"),
            ["ghp_abcdefghijklmnopqrstuvwxyz0123456789"]
        );
        let pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----";
        assert_eq!(found(Detector::PemPrivateKey, &format!("x{pem}y")), [pem]);
        assert_eq!(
            found(Detector::HighEntropy, "t=Zx81Qm2vP0aLr7Ys4Kd9Wn3Tb6Hc"),
            ["Zx81Qm2vP0aLr7Ys4Kd9Wn3Tb6Hc"]
        );
        assert!(found(Detector::HighEntropy, "aaaaaaaaaaaaaaaaaaaaaaaaaaaaa1").is_empty());
    }

    #[test]
    fn one_pass_finds_each_kind() {
        let s = Scanner::new(&Detector::ALL).unwrap();
        let text = b"alice@example.com paid with 4111111111111111, ssn 123-45-6789";
        let mut v = Vec::new();
        s.scan(text, &mut v);
        let kinds: Vec<_> = v.iter().map(|f| f.detector).collect();
        assert_eq!(kinds, [Detector::Email, Detector::Card, Detector::Ssn]);
        assert!(!s.finds(b"nothing to see here, 42 rows"));
    }
}
