//! A statement's token shape: its tokens as PostgreSQL's scanner
//! (libpg_query) reads them, with literal values and comments left out.
//! Texts of one shape share an analysis (see [`super::Analyzer`]), so the
//! shape must never put two differently-read texts together.
//!
//! libpg_query's scanner hands its tokens over as protobuf, which costs
//! about 2 µs for a short SELECT: as much as the rest of a decision. Most
//! statements that clients inline values into are plain: words, numbers,
//! quoted strings, commas, brackets and comparisons. For those, [`quick`]
//! reads the same tokens in one pass over the bytes and builds the same
//! key, byte for byte. It gives up (and the scanner decides) at the first
//! byte whose reading depends on context it does not track: comments,
//! signs, casts, dollar quotes, escape and prefixed strings, parameters,
//! numbers that run into letters, and anything outside ASCII. The tests
//! and the `analysis` fuzz target hold the two readings equal.
//!
//! A word (a keyword or an unquoted identifier) is keyed by its text alone,
//! under one mark: which token the scanner makes of a word depends on the
//! word and nothing else, so its text says all its token number would.
//! That keeps the quick pass off any table shared between threads.

use pg_query::protobuf::{KeywordKind, Token as T};

/// The mark a word's text is keyed under: no token has number 0.
const WORD: i32 = 0;

/// `sql`'s shape, or `None` when the scanner rejects it (the full analysis
/// then says why) or it holds no tokens. Each token is its number (words:
/// the one [`WORD`] mark) and, unless a literal, its exact text: words
/// keep their case, quoted identifiers their quotes, operators their
/// spelling.
pub(super) fn shape(sql: &str) -> Option<Vec<u8>> {
    quick(sql).or_else(|| scanned(sql))
}

/// The shape as libpg_query's scanner reads it.
pub(super) fn scanned(sql: &str) -> Option<Vec<u8>> {
    // pg_query 18.1's scan_tokens builds a slice from the scanner's null
    // token array when there are no tokens, which is undefined behaviour.
    // Only PostgreSQL's whitespace (a subset of Rust's) yields no tokens.
    if sql.trim().is_empty() {
        return None;
    }
    let tokens = pg_query::scan_tokens(sql).ok()?;
    let mut key = Key::with_capacity(sql.len() + 2 * tokens.len());
    for t in &tokens {
        let kind = T::try_from(t.token).unwrap_or(T::Nul);
        if matches!(kind, T::SqlComment | T::CComment) {
            continue;
        }
        if matches!(
            kind,
            T::Sconst | T::Usconst | T::Bconst | T::Xconst | T::Iconst | T::Fconst
        ) {
            key.literal(t.token);
            continue;
        }
        let text = sql.get(usize::try_from(t.start).ok()?..usize::try_from(t.end).ok()?)?;
        let word = t.keyword_kind != KeywordKind::NoKeyword as i32
            || (kind == T::Ident && !text.starts_with('"'));
        key.token(if word { WORD } else { t.token }, text.as_bytes())?;
    }
    Some(key.0)
}

struct Key(Vec<u8>);

impl Key {
    fn with_capacity(n: usize) -> Self {
        Key(Vec::with_capacity(n))
    }

    fn literal(&mut self, token: i32) {
        self.0.extend_from_slice(&token.to_le_bytes()[..2]);
    }

    fn token(&mut self, token: i32, text: &[u8]) -> Option<()> {
        self.literal(token);
        // Length-prefixed, so no two token sequences share a key.
        self.0
            .extend_from_slice(&u32::try_from(text.len()).ok()?.to_le_bytes());
        self.0.extend_from_slice(text);
        Some(())
    }
}

/// The scanner's shape for plain statements, read without it: `None` when
/// `sql` holds anything whose reading this pass does not track, or no
/// tokens at all (the scanner then decides).
pub(super) fn quick(sql: &str) -> Option<Vec<u8>> {
    let b = sql.as_bytes();
    // Each token adds at most 6 bytes to its text.
    let mut key = Key::with_capacity(4 * b.len());
    let mut last_string = false;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let start = i;
        let mut string = false;
        match c {
            b' ' | b'\t' | b'\n' | b'\r' => {
                i += 1;
                continue;
            }
            b'a'..=b'z' | b'A'..=b'Z' | b'_' => {
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                    i += 1;
                }
                // A word that runs into a quote may be a string prefix
                // (E'', B'', X'', N'') or '$' may continue it.
                if matches!(b.get(i), Some(b'\'' | b'"' | b'$')) {
                    return None;
                }
                key.token(WORD, &b[start..i])?;
            }
            b'0'..=b'9' => {
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
                let mut token = T::Iconst;
                if b.get(i) == Some(&b'.') {
                    // "1." and "1.e5" and "1..2" read in ways not tracked here.
                    if !b.get(i + 1).is_some_and(u8::is_ascii_digit) {
                        return None;
                    }
                    i += 1;
                    while i < b.len() && b[i].is_ascii_digit() {
                        i += 1;
                    }
                    token = T::Fconst;
                } else if sql[start..i].parse::<i32>().is_err() {
                    // Out of int4's range: the scanner makes it a numeric.
                    token = T::Fconst;
                }
                // Exponents, underscores, 0x prefixes, trailing junk.
                if b.get(i)
                    .is_some_and(|n| n.is_ascii_alphanumeric() || b"_.$'\"".contains(n))
                {
                    return None;
                }
                key.literal(token as i32);
            }
            b'\'' => {
                // Adjacent strings split only by whitespace with a newline
                // are one literal to the scanner.
                if last_string {
                    return None;
                }
                i = close(b, i, b'\'')?;
                // With standard_conforming_strings off a backslash escapes;
                // libpg_query takes a C string, which a NUL would end.
                if b[start..i].iter().any(|&c| c == b'\\' || c == 0) {
                    return None;
                }
                key.literal(T::Sconst as i32);
                string = true;
            }
            b'"' => {
                i = close(b, i, b'"')?;
                // A zero-length quoted identifier is an error.
                if i - start == 2 || b[start..i].contains(&0) {
                    return None;
                }
                key.token(T::Ident as i32, &b[start..i])?;
            }
            b'.' => {
                // ".5" is a number and ".." a token of its own.
                if matches!(b.get(i + 1), Some(b'0'..=b'9' | b'.')) {
                    return None;
                }
                i += 1;
                key.token(i32::from(c), &b[start..i])?;
            }
            b',' | b'(' | b')' | b';' => {
                i += 1;
                key.token(i32::from(c), &b[start..i])?;
            }
            b'<' | b'>' | b'=' | b'*' => {
                // The scanner reads the longest run of operator characters;
                // every other one stops this pass, so the runs agree.
                while i < b.len() && matches!(b[i], b'<' | b'>' | b'=' | b'*') {
                    i += 1;
                }
                let op = &b[start..i];
                // Longer runs are rare, and past 63 bytes an error.
                if op.len() > 2 {
                    return None;
                }
                let token = match op {
                    [one] => i32::from(*one),
                    b"<=" => T::LessEquals as i32,
                    b">=" => T::GreaterEquals as i32,
                    b"<>" => T::NotEquals as i32,
                    b"=>" => T::EqualsGreater as i32,
                    _ => T::Op as i32,
                };
                key.token(token, op)?;
            }
            _ => return None,
        }
        last_string = string;
    }
    if key.0.is_empty() {
        return None;
    }
    Some(key.0)
}

/// The index just past the quote that closes the one at `open`, where a
/// doubled quote stands for itself.
fn close(b: &[u8], open: usize, quote: u8) -> Option<usize> {
    let mut i = open + 1;
    loop {
        i += b.get(i..)?.iter().position(|&c| c == quote)? + 1;
        if b.get(i) != Some(&quote) {
            return Some(i);
        }
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both readings, where the quick one gives an answer.
    fn agree(sql: &str) -> bool {
        match quick(sql) {
            Some(q) => {
                assert_eq!(Some(q), scanned(sql), "{sql:?}");
                true
            }
            None => false,
        }
    }

    #[test]
    fn plain_statements_take_the_quick_path_and_read_as_the_scanner_does() {
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = 85512;",
            "select * from users where id in (1, 2, 3) and name = 'O''Brien'",
            "SELECT a.b, \"Mixed\"\"Case\" FROM t1 AS x WHERE y >= 2.50 AND z <> 'q'",
            "UPDATE orders SET state = 'paid' WHERE id = 2147483647",
            "UPDATE orders SET state = 'paid' WHERE id = 2147483648",
            "SELECT count(*) FROM t WHERE a<=b OR a=>b OR a>=b OR a<>b OR a<b OR a>b",
            "SELECT 1 ; SELECT 2",
            "INSERT INTO audit_log(action) VALUES ('-- not a comment; DROP TABLE x $$')",
            "SELECT 'café ☕'",
            "SELECT 007, 0.5, 00.00",
            "SELECT a => b, c <> d, e *= f",
            "SELECT \"a\"\"\"",
            "SELECT abs(1)",
        ] {
            assert!(agree(sql), "{sql:?} should take the quick path");
        }
    }

    #[test]
    fn what_depends_on_context_is_left_to_the_scanner() {
        for sql in [
            "SELECT 1 -- c",
            "SELECT /* c */ 1",
            "SELECT -1",
            "SELECT 1::int",
            "SELECT $1",
            "SELECT $q$x$q$",
            "SELECT E'a\\'b'",
            "SELECT e'x'",
            "SELECT B'101'",
            "SELECT X'ff'",
            "SELECT N'x'",
            "SELECT U&'x'",
            "SELECT 'a\\'",
            "SELECT 'a'\n'b'",
            "SELECT 'a' 'b'",
            "SELECT 1e5",
            "SELECT 1.e5",
            "SELECT 1.",
            "SELECT .5",
            "SELECT 1_000",
            "SELECT 0x1F",
            "SELECT 12abc",
            "SELECT a..b",
            "SELECT \"\"",
            "SELECT 'open",
            "SELECT \"open",
            "SELECT 'a\0b'",
            "SELECT \"a\0b\"",
            "SELECT a$b",
            "SELECT é",
            "SELECT a\u{b}",
            "SELECT a[1]",
            "SELECT a + b",
            "SELECT a / b",
            "SELECT a % b",
            "SELECT a ==> b",
            "",
            "   \n",
        ] {
            assert!(
                quick(sql).is_none(),
                "{sql:?} should be left to the scanner"
            );
        }
    }

    /// Random texts over the characters the quick pass reads: wherever it
    /// answers, the scanner answers the same.
    #[test]
    fn random_texts_read_alike() {
        let pieces: &[&str] = &[
            " ",
            "\n",
            "\t",
            "select",
            "SELECT",
            "from",
            "t",
            "t1",
            "_x",
            "where",
            "a",
            "1",
            "2147483647",
            "2147483648",
            "99999999999",
            "0.5",
            "'s'",
            "''",
            "'it''s'",
            "'--'",
            "\"Q\"",
            "\"a\"\"b\"",
            ",",
            "(",
            ")",
            ";",
            ".",
            "<",
            ">",
            "=",
            "*",
            "<>",
            "'",
            "\"",
            "e",
            "x",
            "b",
            "n",
            "u",
            "null",
            "and",
            "or",
            "not",
            "in",
            "between",
            "like",
            "as",
            "drop",
            "table",
            "é",
            "'\0'",
            "\0",
        ];
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::SmallRng::seed_from_u64(17);
        let mut quick_ones = 0;
        for _ in 0..20000 {
            let n = rng.random_range(1..=12);
            let sql: String = (0..n)
                .map(|_| pieces[rng.random_range(..pieces.len())])
                .collect();
            if agree(&sql) {
                quick_ones += 1;
            }
        }
        // The comparison is only as good as the share the quick pass takes.
        assert!(quick_ones > 5000, "{quick_ones}");
    }
}
