//! Rewriting backend messages that carry values: DataRow, CopyData (text,
//! CSV and binary COPY), ErrorResponse and NoticeResponse fields,
//! NotificationResponse payloads and FunctionCallResponse results.
//!
//! No IO here. Each function returns `None` when nothing changed, so the
//! relay forwards the original bytes; a rewrite builds one new message.

use bytes::{BufMut, BytesMut};
use policies::masking::{Detector, Masks, ValueType};

use crate::protocol::Reader;
use crate::protocol::build::frame;

/// One column of a RowDescription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub table_oid: u32,
    pub attnum: i16,
    pub type_oid: u32,
    pub format: i16,
}

/// The fields of a RowDescription frame.
pub fn row_description(frame: &[u8]) -> Option<Vec<Field>> {
    let mut r = Reader::new(frame.get(5..)?);
    let n = r.i16()?;
    let mut fields = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let name = String::from_utf8_lossy(r.cstr()?).into_owned();
        let table_oid = r.i32()? as u32;
        let attnum = r.i16()?;
        let type_oid = r.i32()? as u32;
        let _size = r.i16()?;
        let _modifier = r.i32()?;
        let format = r.i16()?;
        fields.push(Field {
            name,
            table_oid,
            attnum,
            type_oid,
            format,
        });
    }
    Some(fields)
}

/// What happens to one column's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Sent as is.
    Clear,
    /// Content detectors look for sensitive values in it.
    Scan,
    /// Masked whole by this rule.
    Mask(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Column {
    pub action: Action,
    pub ty: ValueType,
    pub binary: bool,
}

impl Column {
    /// `value`'s replacement in column `index` (`None`: unchanged), without
    /// allocating when it does not depend on the value.
    fn replace(
        &self,
        masks: &Masks,
        value: &[u8],
        count: &mut Counts,
        index: usize,
    ) -> Option<New> {
        let index = Some(u16::try_from(index).unwrap_or(u16::MAX));
        match self.action {
            Action::Clear => None,
            Action::Mask(rule) => {
                count.add(rule, index, None);
                Some(match masks.constant(rule, self.ty, self.binary) {
                    Some(Some(c)) => New::Static(c),
                    Some(None) => New::Null,
                    None => match masks.mask(rule, self.ty, self.binary, value) {
                        Some(v) => New::Owned(v),
                        None => New::Null,
                    },
                })
            }
            Action::Scan if self.ty.is_textual(self.binary) => {
                let (prefix, text) = match (self.ty, self.binary) {
                    (ValueType::Jsonb, true) => value.split_at(value.len().min(1)),
                    _ => (&value[..0], value),
                };
                let out = count.scan(masks, text, index)?;
                Some(New::Owned(if prefix.is_empty() {
                    out
                } else {
                    [prefix, &out].concat()
                }))
            }
            Action::Scan => None,
        }
    }
}

/// A column's new value.
enum New {
    Null,
    Static(&'static [u8]),
    Owned(Vec<u8>),
}

impl New {
    /// The bytes to send; `None`: NULL.
    fn bytes(&self) -> Option<&[u8]> {
        match self {
            New::Null => None,
            New::Static(s) => Some(s),
            New::Owned(v) => Some(v),
        }
    }
}

/// A masked or withheld message text, counted under no rule.
pub const WITHHELD: usize = usize::MAX;

/// One count: rule, result column (by position), detector.
pub type CountKey = (usize, Option<u16>, Option<Detector>);

/// Masked values by rule, column and detector.
#[derive(Debug, Default)]
pub struct Counts {
    pub entries: Vec<(CountKey, u64)>,
    found: Vec<(usize, Detector)>,
}

impl Counts {
    /// How many values in all (since the entries were last taken).
    pub fn total(&self) -> u64 {
        self.entries.iter().map(|(_, n)| n).sum()
    }

    fn add(&mut self, rule: usize, column: Option<u16>, detector: Option<Detector>) {
        let key = (rule, column, detector);
        match self.entries.iter_mut().find(|(k, _)| *k == key) {
            Some((_, n)) => *n += 1,
            None => self.entries.push((key, 1)),
        }
    }

    fn scan(&mut self, masks: &Masks, text: &[u8], column: Option<u16>) -> Option<Vec<u8>> {
        let out = masks.scan_text(text, &mut self.found)?;
        for (rule, d) in std::mem::take(&mut self.found) {
            self.add(rule, column, Some(d));
        }
        Some(out)
    }
}

/// A malformed message from the server: fail closed, never forward it.
#[derive(Debug)]
pub struct Malformed(pub &'static str);

/// A DataRow with `columns` applied; `None`: unchanged.
/// A DataRow with `columns` applied, written to `out` (cleared first);
/// `false`: unchanged, and `out` is to be ignored.
pub fn data_row(
    frame_bytes: &[u8],
    columns: &[Column],
    masks: &Masks,
    count: &mut Counts,
    out: &mut BytesMut,
) -> Result<bool, Malformed> {
    let body = &frame_bytes[5..];
    let mut r = Reader::new(body);
    let n = r.i16().ok_or(Malformed("DataRow column count"))?;
    out.clear();
    let mut changed = false;
    let mut copied = 0usize;
    for i in 0..n.max(0) as usize {
        let start = body.len() - r.remaining().len();
        let value = r.value().ok_or(Malformed("DataRow value"))?;
        let end = body.len() - r.remaining().len();
        let Some(col) = columns.get(i) else {
            return Err(Malformed(
                "DataRow has more columns than its RowDescription",
            ));
        };
        let Some(v) = value else { continue };
        let Some(new) = col.replace(masks, v, count, i) else {
            continue;
        };
        if !changed {
            changed = true;
            out.reserve(frame_bytes.len() + 32);
            out.put_u8(b'D');
            out.put_i32(0);
        }
        out.put_slice(&body[copied..start]);
        match new.bytes() {
            Some(bytes) => {
                out.put_i32(bytes.len() as i32);
                out.put_slice(bytes);
            }
            None => out.put_i32(-1),
        }
        copied = end;
    }
    if changed {
        out.put_slice(&body[copied..]);
        let len = (out.len() - 1) as i32;
        out[1..5].copy_from_slice(&len.to_be_bytes());
    }
    Ok(changed)
}

/// How COPY TO writes rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyFormat {
    Text {
        delimiter: u8,
        null: Vec<u8>,
    },
    Csv {
        delimiter: u8,
        quote: u8,
        escape: u8,
        null: Vec<u8>,
    },
    Binary,
}

impl CopyFormat {
    /// From COPY's options as written (`format`, `delimiter`, `null`,
    /// `quote`, `escape`); `binary` from CopyOutResponse.
    pub fn from_options(options: &[(String, String)], binary: bool) -> CopyFormat {
        if binary {
            return CopyFormat::Binary;
        }
        let get = |k: &str| {
            options
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.as_bytes().to_vec())
        };
        let byte = |k: &str, d: u8| get(k).and_then(|v| v.first().copied()).unwrap_or(d);
        let csv = get("format").is_some_and(|f| f.eq_ignore_ascii_case(b"csv"));
        if csv {
            let quote = byte("quote", b'"');
            CopyFormat::Csv {
                delimiter: byte("delimiter", b','),
                quote,
                escape: byte("escape", quote),
                null: get("null").unwrap_or_default(),
            }
        } else {
            CopyFormat::Text {
                delimiter: byte("delimiter", b'\t'),
                null: get("null").unwrap_or_else(|| b"\\N".to_vec()),
            }
        }
    }
}

/// COPY TO's rows, one CopyData each, masked column by column.
#[derive(Debug)]
pub struct CopyRows {
    pub format: CopyFormat,
    pub columns: Vec<Column>,
    /// The first row is a header of column names.
    pub header: bool,
    /// Binary COPY's file header is still to come.
    pub binary_header: bool,
}

impl CopyRows {
    /// A CopyData frame rewritten; `None`: unchanged.
    pub fn copy_data(
        &mut self,
        frame_bytes: &[u8],
        masks: &Masks,
        count: &mut Counts,
    ) -> Result<Option<BytesMut>, Malformed> {
        let data = &frame_bytes[5..];
        let out = match self.format.clone() {
            CopyFormat::Binary => self.binary(data, masks, count)?,
            _ if self.header => {
                self.header = false;
                return Ok(None);
            }
            CopyFormat::Text { delimiter, null } => {
                text_row(data, delimiter, &null, &self.columns, masks, count)
            }
            CopyFormat::Csv {
                delimiter,
                quote,
                escape,
                null,
            } => csv_row(
                data,
                delimiter,
                quote,
                escape,
                &null,
                &self.columns,
                masks,
                count,
            ),
        };
        Ok(out.map(|body| frame(b'd', |b| b.put_slice(&body))))
    }

    fn binary(
        &mut self,
        data: &[u8],
        masks: &Masks,
        count: &mut Counts,
    ) -> Result<Option<Vec<u8>>, Malformed> {
        const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";
        let mut r = Reader::new(data);
        if self.binary_header && data.starts_with(SIGNATURE) {
            r.bytes(SIGNATURE.len());
            r.i32().ok_or(Malformed("binary COPY flags"))?;
            let ext = r.i32().ok_or(Malformed("binary COPY header"))?;
            r.bytes(ext.max(0) as usize)
                .ok_or(Malformed("binary COPY header extension"))?;
            self.binary_header = false;
        }
        let mut out: Option<Vec<u8>> = None;
        let mut copied = 0;
        while !r.is_empty() {
            let n = r.i16().ok_or(Malformed("binary COPY tuple"))?;
            if n < 0 {
                break;
            }
            for i in 0..n as usize {
                let start = data.len() - r.remaining().len();
                let value = r.value().ok_or(Malformed("binary COPY field"))?;
                let end = data.len() - r.remaining().len();
                let (Some(v), Some(col)) = (value, self.columns.get(i)) else {
                    continue;
                };
                // COPY names no types: a masked or detected value becomes NULL.
                let index = Some(u16::try_from(i).unwrap_or(u16::MAX));
                let hide = match col.action {
                    Action::Clear => false,
                    Action::Mask(rule) => {
                        count.add(rule, index, None);
                        true
                    }
                    Action::Scan => count.scan(masks, v, index).is_some(),
                };
                if hide {
                    let o = out.get_or_insert_with(|| Vec::with_capacity(data.len()));
                    o.extend_from_slice(&data[copied..start]);
                    o.extend_from_slice(&(-1i32).to_be_bytes());
                    copied = end;
                }
            }
        }
        Ok(out.map(|mut o| {
            o.extend_from_slice(&data[copied..]);
            o
        }))
    }
}

/// A COPY column beyond those planned: scanned as text.
const UNLISTED: Column = Column {
    action: Action::Scan,
    ty: ValueType::Text,
    binary: false,
};

/// Splits a text-format COPY line into raw (still escaped) fields.
fn text_fields(line: &[u8], delimiter: u8) -> Vec<&[u8]> {
    let mut fields = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < line.len() {
        match line[i] {
            b'\\' => i += 2,
            b if b == delimiter => {
                fields.push(&line[start..i]);
                i += 1;
                start = i;
            }
            _ => i += 1,
        }
    }
    fields.push(&line[start.min(line.len())..]);
    fields
}

fn text_unescape(f: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(f.len());
    let mut i = 0;
    while i < f.len() {
        if f[i] == b'\\' && i + 1 < f.len() {
            let c = f[i + 1];
            i += 2;
            out.push(match c {
                b'b' => 8,
                b'f' => 12,
                b'n' => b'\n',
                b'r' => b'\r',
                b't' => b'\t',
                b'v' => 11,
                b'0'..=b'7' => {
                    let mut v = u32::from(c - b'0');
                    for _ in 0..2 {
                        match f.get(i) {
                            Some(d @ b'0'..=b'7') => {
                                v = v * 8 + u32::from(d - b'0');
                                i += 1;
                            }
                            _ => break,
                        }
                    }
                    v as u8
                }
                other => other,
            });
        } else {
            out.push(f[i]);
            i += 1;
        }
    }
    out
}

fn text_escape(v: &[u8], delimiter: u8, out: &mut Vec<u8>) {
    for &b in v {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b if b == delimiter => {
                out.push(b'\\');
                out.push(b);
            }
            b => out.push(b),
        }
    }
}

fn text_row(
    data: &[u8],
    delimiter: u8,
    null: &[u8],
    columns: &[Column],
    masks: &Masks,
    count: &mut Counts,
) -> Option<Vec<u8>> {
    let (line, eol) = match data.strip_suffix(b"\n") {
        Some(l) => (l, &b"\n"[..]),
        None => (data, &b""[..]),
    };
    let fields = text_fields(line, delimiter);
    let mut changed = false;
    let mut out = Vec::with_capacity(data.len() + 16);
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            out.push(delimiter);
        }
        let col = columns.get(i).copied().unwrap_or(UNLISTED);
        let replaced = if *f == null || col.action == Action::Clear {
            None
        } else {
            col.replace(masks, &text_unescape(f), count, i)
        };
        match replaced.as_ref().map(New::bytes) {
            None => out.extend_from_slice(f),
            Some(None) => {
                changed = true;
                out.extend_from_slice(null);
            }
            Some(Some(v)) => {
                changed = true;
                text_escape(v, delimiter, &mut out);
            }
        }
    }
    out.extend_from_slice(eol);
    changed.then_some(out)
}

/// Splits a CSV line into (raw field, was quoted).
fn csv_fields(line: &[u8], delimiter: u8, quote: u8, escape: u8) -> Vec<(Vec<u8>, bool)> {
    let mut fields = Vec::new();
    let mut i = 0;
    loop {
        let mut v = Vec::new();
        let quoted = line.get(i) == Some(&quote);
        if quoted {
            i += 1;
            while i < line.len() {
                let b = line[i];
                if b == escape && line.get(i + 1) == Some(&quote) {
                    v.push(quote);
                    i += 2;
                } else if escape != quote && b == escape && line.get(i + 1) == Some(&escape) {
                    v.push(escape);
                    i += 2;
                } else if b == quote {
                    i += 1;
                    break;
                } else {
                    v.push(b);
                    i += 1;
                }
            }
            while i < line.len() && line[i] != delimiter {
                v.push(line[i]);
                i += 1;
            }
        } else {
            while i < line.len() && line[i] != delimiter {
                v.push(line[i]);
                i += 1;
            }
        }
        fields.push((v, quoted));
        if i >= line.len() {
            return fields;
        }
        i += 1;
    }
}

#[allow(clippy::too_many_arguments)]
fn csv_row(
    data: &[u8],
    delimiter: u8,
    quote: u8,
    escape: u8,
    null: &[u8],
    columns: &[Column],
    masks: &Masks,
    count: &mut Counts,
) -> Option<Vec<u8>> {
    let line = data
        .strip_suffix(b"\n")
        .map_or(data, |l| l.strip_suffix(b"\r").unwrap_or(l));
    let eol = &data[line.len()..];
    let fields = csv_fields(line, delimiter, quote, escape);
    let mut changed = false;
    let mut out = Vec::with_capacity(data.len() + 16);
    for (i, (f, quoted)) in fields.iter().enumerate() {
        if i > 0 {
            out.push(delimiter);
        }
        let col = columns.get(i).copied().unwrap_or(UNLISTED);
        let is_null = !quoted && f.as_slice() == null;
        let replaced = if is_null {
            None
        } else {
            col.replace(masks, f, count, i)
        };
        match replaced.as_ref().map(New::bytes) {
            None => csv_write(f, *quoted, quote, escape, &mut out),
            Some(None) => {
                changed = true;
                out.extend_from_slice(null);
            }
            Some(Some(v)) => {
                changed = true;
                let must_quote = v == null
                    || v.iter()
                        .any(|&b| b == delimiter || b == quote || b == b'\n' || b == b'\r');
                csv_write(v, must_quote, quote, escape, &mut out);
            }
        }
    }
    out.extend_from_slice(eol);
    changed.then_some(out)
}

fn csv_write(v: &[u8], quoted: bool, quote: u8, escape: u8, out: &mut Vec<u8>) {
    if !quoted {
        out.extend_from_slice(v);
        return;
    }
    out.push(quote);
    for &b in v {
        if b == quote || (b == escape && escape != quote) {
            out.push(escape);
        }
        out.push(b);
    }
    out.push(quote);
}

/// ErrorResponse or NoticeResponse with detectors run over its text fields
/// and, when `withhold` (the statement reads masked data and the error is
/// of a kind that quotes values), its message, detail and context replaced.
pub fn error_fields(
    frame_bytes: &[u8],
    masks: &Masks,
    withhold: bool,
    count: &mut Counts,
) -> Result<Option<BytesMut>, Malformed> {
    let tag = frame_bytes[0];
    let mut r = Reader::new(&frame_bytes[5..]);
    let mut fields: Vec<(u8, Vec<u8>)> = Vec::new();
    let mut changed = false;
    loop {
        let code = r.u8().ok_or(Malformed("error field code"))?;
        if code == 0 {
            break;
        }
        let v = r.cstr().ok_or(Malformed("error field value"))?;
        fields.push((code, v.to_vec()));
    }
    let sqlstate = fields
        .iter()
        .find(|(c, _)| *c == b'C')
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    // Classes 42, 3D and 3F mostly name the statement's own objects, but
    // a value turned into a name quotes it: `api_key::regclass`,
    // `has_table_privilege(api_key, ...)`, `current_setting(api_key)`,
    // `pg_database_size(api_key)`. Their SQLSTATE and position still go.
    // 42501 names objects and privileges only, and is how interceptor's
    // own refusals arrive.
    let quotes_values = sqlstate != b"42501"
        && !matches!(
            sqlstate.get(..2),
            Some(b"08" | b"0A" | b"25" | b"28" | b"40" | b"53" | b"54" | b"55" | b"57" | b"58")
        );
    for (code, v) in &mut fields {
        // Severity, SQLSTATE, position, file, line and routine carry no data.
        if matches!(*code, b'S' | b'V' | b'C' | b'P' | b'p' | b'F' | b'L' | b'R') {
            continue;
        }
        if withhold && quotes_values && matches!(*code, b'M' | b'D' | b'W') {
            *v = match *code {
                b'M' => {
                    b"[message withheld by interceptor: the statement reads masked data]".to_vec()
                }
                _ => b"[withheld]".to_vec(),
            };
            count.add(WITHHELD, None, None);
            changed = true;
            continue;
        }
        if let Some(out) = count.scan(masks, v, None) {
            *v = out;
            changed = true;
        }
    }
    if !changed {
        return Ok(None);
    }
    Ok(Some(frame(tag, |b| {
        for (code, v) in &fields {
            b.put_u8(*code);
            b.put_slice(&strip_nul(v));
            b.put_u8(0);
        }
        b.put_u8(0);
    })))
}

fn strip_nul(v: &[u8]) -> Vec<u8> {
    v.iter().copied().filter(|&b| b != 0).collect()
}

/// NotificationResponse with detectors run over its payload.
pub fn notification(
    frame_bytes: &[u8],
    masks: &Masks,
    count: &mut Counts,
) -> Result<Option<BytesMut>, Malformed> {
    let mut r = Reader::new(&frame_bytes[5..]);
    let pid = r.i32().ok_or(Malformed("notification pid"))?;
    let channel = r.cstr().ok_or(Malformed("notification channel"))?;
    let payload = r.cstr().ok_or(Malformed("notification payload"))?;
    let Some(masked) = count.scan(masks, payload, None) else {
        return Ok(None);
    };
    Ok(Some(frame(b'A', |b| {
        b.put_i32(pid);
        b.put_slice(channel);
        b.put_u8(0);
        b.put_slice(&strip_nul(&masked));
        b.put_u8(0);
    })))
}

/// FunctionCallResponse with detectors run over its result.
pub fn function_result(
    frame_bytes: &[u8],
    masks: &Masks,
    count: &mut Counts,
) -> Result<Option<BytesMut>, Malformed> {
    let mut r = Reader::new(&frame_bytes[5..]);
    let Some(value) = r.value().ok_or(Malformed("function result"))? else {
        return Ok(None);
    };
    let Some(masked) = count.scan(masks, value, None) else {
        return Ok(None);
    };
    Ok(Some(frame(b'V', |b| {
        b.put_i32(masked.len() as i32);
        b.put_slice(&masked);
    })))
}

/// The rewriter's properties on arbitrary input, for the fuzz target
/// (`cargo xtask fuzz rewrite`) and the unit test that runs it on every
/// build: `data[0]` picks the column plan, the rest is a DataRow or CopyData
/// body. Nothing panics; every rewrite is one well-formed frame of the same
/// type; a DataRow keeps its column count, and a column masked by `redact`
/// holds `[redacted]` or NULL. Not in the daemon: it asserts.
#[cfg(any(test, fuzzing))]
pub fn check_rewrite(data: &[u8]) {
    use policies::masking::{Detector, MaskKey, MaskSpec};
    static MASKS: std::sync::OnceLock<Masks> = std::sync::OnceLock::new();
    let masks = MASKS.get_or_init(|| {
        Masks::from_specs(
            &[
                MaskSpec {
                    id: "cols".into(),
                    columns: vec!["t.c".into()],
                    ..Default::default()
                },
                MaskSpec {
                    id: "detect".into(),
                    detectors: Detector::ALL.to_vec(),
                    ..Default::default()
                },
            ],
            MaskKey::from_bytes(b"fuzz"),
        )
        .expect("valid specs")
    });
    let Some((&plan, body)) = data.split_first() else {
        return;
    };
    let types = [
        ValueType::Text,
        ValueType::Json,
        ValueType::Jsonb,
        ValueType::Bytea,
        ValueType::Other,
    ];
    let columns: Vec<Column> = (0..usize::from(plan % 5))
        .map(|i| {
            let b = plan.rotate_left(i as u32 + 1);
            Column {
                action: match b % 3 {
                    0 => Action::Clear,
                    1 => Action::Scan,
                    _ => Action::Mask(0),
                },
                ty: types[usize::from(b / 3) % types.len()],
                binary: b & 0x80 != 0,
            }
        })
        .collect();
    let well_formed = |out: &[u8], tag: u8| {
        assert_eq!(out[0], tag);
        let len = i32::from_be_bytes([out[1], out[2], out[3], out[4]]);
        assert_eq!(len as usize, out.len() - 1);
    };
    let mut count = Counts::default();
    let row = frame(b'D', |b| b.put_slice(body));
    let mut out = BytesMut::new();
    if let Ok(true) = data_row(&row, &columns, masks, &mut count, &mut out) {
        well_formed(&out, b'D');
        let mut r = Reader::new(&out[5..]);
        let n = r.i16().expect("a column count");
        assert_eq!(Some(n), Reader::new(body).i16());
        for col in columns.iter().take(n.max(0) as usize) {
            let v = r.value().expect("a well-formed value");
            if col.action == Action::Mask(0) && col.ty == ValueType::Text {
                assert!(v.is_none_or(|v| v == REDACTED_TEXT), "{v:?}");
            }
        }
    }
    let copy = frame(b'd', |b| b.put_slice(body));
    for format in [
        CopyFormat::from_options(&[], false),
        CopyFormat::from_options(&[("format".into(), "csv".into())], false),
        CopyFormat::Binary,
    ] {
        let mut rows = CopyRows {
            format,
            columns: columns.clone(),
            header: false,
            binary_header: true,
        };
        if let Ok(Some(out)) = rows.copy_data(&copy, masks, &mut count) {
            well_formed(&out, b'd');
        }
    }
}

#[cfg(any(test, fuzzing))]
const REDACTED_TEXT: &[u8] = b"[redacted]";

#[cfg(test)]
mod tests {
    use super::*;
    use policies::masking::{MaskKey, MaskSpec};

    fn masks() -> Masks {
        let specs: Vec<MaskSpec> = toml::from_str::<toml::Table>(
            r#"
[[mask]]
id = "cols"
columns = ["secrets.api_key"]
[[mask]]
id = "detect"
detectors = ["email", "api-key"]
strategy = "partial"
keep_last = 3
"#,
        )
        .unwrap()["mask"]
            .clone()
            .try_into()
            .unwrap();
        Masks::from_specs(&specs, MaskKey::from_bytes(b"k")).unwrap()
    }

    fn row(values: &[Option<&[u8]>]) -> Vec<u8> {
        frame(b'D', |b| {
            b.put_i16(values.len() as i16);
            for v in values {
                match v {
                    Some(v) => {
                        b.put_i32(v.len() as i32);
                        b.put_slice(v);
                    }
                    None => b.put_i32(-1),
                }
            }
        })
        .to_vec()
    }

    fn col(action: Action, ty: ValueType, binary: bool) -> Column {
        Column { action, ty, binary }
    }

    #[test]
    fn data_rows_mask_columns_and_scan_others() {
        let m = masks();
        let cols = [
            col(Action::Clear, ValueType::Other, false),
            col(Action::Mask(0), ValueType::Text, false),
            col(Action::Scan, ValueType::Text, false),
            col(Action::Mask(0), ValueType::Other, true),
        ];
        let mut count = Counts::default();
        let f = row(&[
            Some(b"1"),
            Some(b"sk_live_0123456789abcdef"),
            Some(b"mail bob@example.com"),
            Some(b"\0\0\0\x07"),
        ]);
        let mut out = BytesMut::new();
        assert!(data_row(&f, &cols, &m, &mut count, &mut out).unwrap());
        assert_eq!(
            out.to_vec(),
            row(&[Some(b"1"), Some(b"[redacted]"), Some(b"mail ****com"), None])
        );
        assert_eq!(count.total(), 3);
        let clean = row(&[Some(b"2"), None, Some(b"nothing"), None]);
        assert!(!data_row(&clean, &cols, &m, &mut count, &mut out).unwrap());
        let short = row(&[Some(b"1")]);
        assert!(!data_row(&short, &cols, &m, &mut count, &mut out).unwrap());
        let long = row(&[None, None, None, None, None]);
        assert!(data_row(&long, &cols, &m, &mut count, &mut out).is_err());
    }

    #[test]
    fn copy_text_csv_and_binary() {
        let m = masks();
        let cols = vec![
            col(Action::Clear, ValueType::Text, false),
            col(Action::Mask(0), ValueType::Text, false),
        ];
        let mut count = Counts::default();
        let mut text = CopyRows {
            format: CopyFormat::from_options(&[], false),
            columns: cols.clone(),
            header: false,
            binary_header: false,
        };
        let f = frame(b'd', |b| b.put_slice(b"1\tsk_live_0123456789abcdef\n"));
        let out = text.copy_data(&f, &m, &mut count).unwrap().unwrap();
        assert_eq!(&out[5..], b"1\t[redacted]\n");
        let f = frame(b'd', |b| b.put_slice(b"2\t\\N\n"));
        assert!(text.copy_data(&f, &m, &mut count).unwrap().is_none());

        let mut csv = CopyRows {
            format: CopyFormat::from_options(&[("format".into(), "csv".into())], false),
            columns: cols.clone(),
            header: true,
            binary_header: false,
        };
        let h = frame(b'd', |b| b.put_slice(b"id,api_key\n"));
        assert!(csv.copy_data(&h, &m, &mut count).unwrap().is_none());
        let f = frame(b'd', |b| b.put_slice(b"\"a,\"\"b\",secret\n"));
        let out = csv.copy_data(&f, &m, &mut count).unwrap().unwrap();
        assert_eq!(&out[5..], b"\"a,\"\"b\",[redacted]\n");

        let mut bin = CopyRows {
            format: CopyFormat::Binary,
            columns: cols,
            header: false,
            binary_header: true,
        };
        let mut data = b"PGCOPY\n\xff\r\n\0".to_vec();
        data.extend_from_slice(&0i32.to_be_bytes());
        data.extend_from_slice(&0i32.to_be_bytes());
        data.extend_from_slice(&2i16.to_be_bytes());
        data.extend_from_slice(&1i32.to_be_bytes());
        data.push(b'7');
        data.extend_from_slice(&3i32.to_be_bytes());
        data.extend_from_slice(b"key");
        let f = frame(b'd', |b| b.put_slice(&data));
        let out = bin.copy_data(&f, &m, &mut count).unwrap().unwrap();
        assert!(out.ends_with(&[0, 0, 0, 1, b'7', 0xff, 0xff, 0xff, 0xff]));
    }

    /// The fuzz target's properties on mutations of real rows, every build.
    #[test]
    fn rewriter_survives_mutated_rows() {
        let seeds: Vec<Vec<u8>> = vec![
            row(&[Some(b"1"), Some(b"sk_live_0123456789abcdef"), None])[5..].to_vec(),
            row(&[Some(b"a@b.example.com"), Some(b"4111111111111111")])[5..].to_vec(),
            b"1\tsecret\\t\\N\n".to_vec(),
            b"\"a,\"\"b\",x\n".to_vec(),
            b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0\0\x02\0\0\0\x01x\xff\xff\xff\xff".to_vec(),
        ];
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for seed in &seeds {
            for plan in 0..=255u8 {
                let mut data = vec![plan];
                data.extend_from_slice(seed);
                check_rewrite(&data);
                for _ in 0..8 {
                    let mut m = data.clone();
                    let at = (1 + (next() as usize) % (m.len() - 1).max(1)).min(m.len() - 1);
                    let byte = next() as u8;
                    match next() % 3 {
                        0 => m[at] = byte,
                        1 => m.truncate(at),
                        _ => m.insert(at, byte),
                    }
                    check_rewrite(&m);
                }
            }
        }
    }

    #[test]
    fn errors_lose_values() {
        let m = masks();
        let mut count = Counts::default();
        let e = frame(b'E', |b| {
            b.put_slice(b"SERROR\0C22P02\0Minvalid input syntax for type integer: \"sk_live_0123456789abcdef\"\0\0")
        });
        let out = error_fields(&e, &m, false, &mut count).unwrap().unwrap();
        assert!(!String::from_utf8_lossy(&out).contains("0123456789abcdef"));
        let out = error_fields(&e, &m, true, &mut count).unwrap().unwrap();
        assert!(String::from_utf8_lossy(&out).contains("withheld"));
        assert!(String::from_utf8_lossy(&out).contains("22P02"));
        // A value made into a name comes back in a class 42 error.
        let name = frame(b'E', |b| {
            b.put_slice(
                b"SERROR\0C42P01\0Mrelation \"fedcba9876543210_evil_ks\" does not exist\0\0",
            )
        });
        let out = error_fields(&name, &m, true, &mut count).unwrap().unwrap();
        assert!(!String::from_utf8_lossy(&out).contains("fedcba"));
        assert!(String::from_utf8_lossy(&out).contains("42P01"));
        // interceptor's own refusals (42501) go as they are.
        let refusal = frame(b'E', |b| {
            b.put_slice(b"SERROR\0C42501\0Minterceptor: statement denied: no\0\0")
        });
        assert!(
            error_fields(&refusal, &m, true, &mut count)
                .unwrap()
                .is_none()
        );
    }
}
