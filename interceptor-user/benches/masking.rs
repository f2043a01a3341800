//! Masking's hot functions, per core (criterion; `cargo xtask bench
//! masking` runs this and reads its estimates):
//!
//! - `column_rules`: DataRows of 7 columns, two masked by column rules, the
//!   rest sent as they are;
//! - `passthrough`: the same rows with no column masked and no detectors
//!   (what reading a row costs);
//! - `detectors`: the reference policy's detectors over log-like text with
//!   an email every 50 lines.

use bytes::BufMut;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use interceptor::masking::rewrite::{Action, Column, Counts, data_row};
use policies::masking::{Detector, MaskKey, MaskSpec, Masks, ValueType};

fn spec(id: &str, columns: &[&str], detectors: &[Detector]) -> MaskSpec {
    MaskSpec {
        id: id.into(),
        columns: columns.iter().map(|c| c.to_string()).collect(),
        detectors: detectors.to_vec(),
        ..Default::default()
    }
}

const REFERENCE_DETECTORS: [Detector; 8] = [
    Detector::Card,
    Detector::Ssn,
    Detector::Email,
    Detector::Iban,
    Detector::AwsKeyId,
    Detector::Jwt,
    Detector::PemPrivateKey,
    Detector::ApiKey,
];

/// 1000 DataRow frames, back to back.
fn rows() -> Vec<Vec<u8>> {
    (0..1000)
        .map(|i| {
            let values: Vec<String> = vec![
                i.to_string(),
                format!("Customer number {i}"),
                format!("customer{i}@example.com"),
                format!("4111 1111 1111 {:04}", i % 10000),
                format!("{}.{:02}", i * 7, i % 100),
                "a note about this customer that is of ordinary length for a text column".into(),
                "2026-11-22 07:33:51.123456+00".into(),
            ];
            let mut f = vec![b'D', 0, 0, 0, 0];
            f.put_i16(values.len() as i16);
            for v in &values {
                f.put_i32(v.len() as i32);
                f.put_slice(v.as_bytes());
            }
            let len = (f.len() - 1) as i32;
            f[1..5].copy_from_slice(&len.to_be_bytes());
            f
        })
        .collect()
}

fn log_text() -> Vec<u8> {
    let mut t = String::new();
    let mut i = 0u64;
    while t.len() < 1 << 20 {
        if i.is_multiple_of(50) {
            t.push_str(&format!(
                "2026-11-22 07:33:51 WARN mail to user{i}@example.com bounced\n"
            ));
        } else {
            t.push_str(&format!(
                "2026-11-22 07:33:51 INFO request id={i} user={} path=/api/v1/orders/{i} took {}ms status=200\n",
                i % 977,
                i % 83
            ));
        }
        i += 1;
    }
    t.into_bytes()
}

fn bench(c: &mut Criterion) {
    let key = MaskKey::from_bytes(b"bench");
    let masks = Masks::from_specs(
        &[spec("cols", &["people.email", "people.card"], &[])],
        key.clone(),
    )
    .expect("specs");
    let none = Masks::from_specs(&[spec("cols", &["x.y"], &[])], key.clone()).expect("specs");
    let detectors =
        Masks::from_specs(&[spec("detect", &[], &REFERENCE_DETECTORS)], key).expect("specs");
    let rows = rows();
    let bytes: usize = rows.iter().map(Vec::len).sum();
    let col = |action| Column {
        action,
        ty: ValueType::Text,
        binary: false,
    };
    let masked: Vec<Column> = (0..7)
        .map(|i| {
            col(if i == 2 || i == 3 {
                Action::Mask(0)
            } else {
                Action::Clear
            })
        })
        .collect();
    let clear: Vec<Column> = (0..7).map(|_| col(Action::Clear)).collect();

    let mut g = c.benchmark_group("masking");
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function("column_rules", |b| {
        let mut counts = Counts::default();
        let mut out = bytes::BytesMut::new();
        b.iter(|| {
            for r in &rows {
                std::hint::black_box(
                    data_row(r, &masked, &masks, &mut counts, &mut out).expect("valid"),
                );
            }
        })
    });
    g.bench_function("passthrough", |b| {
        let mut counts = Counts::default();
        let mut out = bytes::BytesMut::new();
        b.iter(|| {
            for r in &rows {
                std::hint::black_box(
                    data_row(r, &clear, &none, &mut counts, &mut out).expect("valid"),
                );
            }
        })
    });
    let text = log_text();
    g.throughput(Throughput::Bytes(text.len() as u64));
    g.bench_function("detectors", |b| {
        let mut found = Vec::new();
        b.iter(|| {
            found.clear();
            std::hint::black_box(detectors.scan_text(&text, &mut found))
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
