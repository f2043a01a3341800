//! Hostile and broken input: each case gets its error, only its own
//! connection closes, and the daemon keeps serving everyone else.

use std::time::Duration;

use interceptor_tests::pg;
use interceptor_tests::proxy::{Proxy, ProxyOptions};
use interceptor_tests::wire::{RawClient, first_error, frame, startup_packet};

fn proxy() -> Proxy {
    Proxy::start(
        pg::shared(),
        ProxyOptions {
            limits: vec!["max_message_size = 1048576".into()],
            ..Default::default()
        },
    )
    .expect("start proxy")
}

/// The daemon still serves a normal session.
fn assert_serving(proxy: &mut Proxy) {
    assert!(proxy.is_running(), "daemon died:\n{}", proxy.log());
    let (mut c, _) = RawClient::login(proxy.port, "agent", "app").unwrap();
    let msgs = c.query("SELECT 'still here'").unwrap();
    assert!(
        msgs.iter()
            .any(|(t, b)| *t == b'D' && String::from_utf8_lossy(b).contains("still here")),
        "{msgs:?}"
    );
}

/// Logs in, sends `bytes`, and returns everything up to the close.
fn after_login(proxy: &Proxy, bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let (mut c, _) = RawClient::login(proxy.port, "agent", "app").unwrap();
    c.send(bytes).unwrap();
    c.read_to_end().unwrap()
}

fn sqlstate(msgs: &[(u8, Vec<u8>)]) -> String {
    first_error(msgs)
        .map(|e| e.0)
        .unwrap_or_else(|| format!("no error in {msgs:?}"))
}

#[test]
fn negative_length_after_login() {
    let mut p = proxy();
    let msgs = after_login(&p, b"Q\xff\xff\xff\xf0select 1\0");
    assert_eq!(sqlstate(&msgs), "08P01");
    assert!(
        first_error(&msgs).unwrap().1.contains("below the minimum"),
        "{msgs:?}"
    );
    assert_serving(&mut p);
}

#[test]
fn huge_length_is_refused_before_buffering() {
    let mut p = proxy();
    // Announces 1 GiB and sends a few bytes: the proxy must not wait for it.
    let msgs = after_login(&p, b"d\x40\x00\x00\x00abc");
    assert_eq!(sqlstate(&msgs), "08P01");
    assert!(
        first_error(&msgs)
            .unwrap()
            .1
            .contains("exceeds the limit of 1048576"),
        "{msgs:?}"
    );
    assert_serving(&mut p);
}

#[test]
fn truncated_frame_then_close() {
    let mut p = proxy();
    let (mut c, _) = RawClient::login(p.port, "agent", "app").unwrap();
    c.send(b"Q\x00\x00\x00\x20select").unwrap();
    c.stream.shutdown(std::net::Shutdown::Write).unwrap();
    // The client went away mid-message: nothing to answer, nothing forwarded.
    let msgs = c.read_to_end().unwrap();
    assert!(msgs.iter().all(|(t, _)| *t != b'D'), "{msgs:?}");
    assert_serving(&mut p);
}

#[test]
fn malformed_fields_inside_a_well_framed_message() {
    let mut p = proxy();
    // A Query whose string has no terminator.
    let msgs = after_login(&p, &frame(b'Q', b"select 1"));
    assert_eq!(sqlstate(&msgs), "08P01");
    // A Bind whose parameter claims more bytes than the message holds.
    let mut bind = b"\0\0".to_vec();
    bind.extend_from_slice(&0i16.to_be_bytes());
    bind.extend_from_slice(&1i16.to_be_bytes());
    bind.extend_from_slice(&1000i32.to_be_bytes());
    bind.extend_from_slice(b"xy");
    let msgs = after_login(&p, &frame(b'B', &bind));
    assert_eq!(sqlstate(&msgs), "08P01");
    assert!(
        first_error(&msgs).unwrap().1.contains("malformed 'B'"),
        "{msgs:?}"
    );
    assert_serving(&mut p);
}

#[test]
fn garbage_before_startup() {
    let mut p = proxy();
    let mut c = RawClient::connect(p.port).unwrap();
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let msgs = c.read_to_end().unwrap();
    assert_eq!(sqlstate(&msgs), "08P01");
    let mut c = RawClient::connect(p.port).unwrap();
    c.send(&[0, 0, 0, 2]).unwrap();
    assert_eq!(sqlstate(&c.read_to_end().unwrap()), "08P01");
    assert_serving(&mut p);
}

#[test]
fn unsupported_protocol_versions() {
    let mut p = proxy();
    let mut c = RawClient::connect(p.port).unwrap();
    let mut pkt = startup_packet("agent", "app");
    pkt[4..8].copy_from_slice(&(2i32 << 16).to_be_bytes());
    c.send(&pkt).unwrap();
    assert_eq!(sqlstate(&c.read_to_end().unwrap()), "0A000");

    // 3.2 with a protocol option: negotiated down to 3.0, then served.
    let mut body = ((3i32 << 16) | 2).to_be_bytes().to_vec();
    body.extend_from_slice(b"user\0agent\0database\0app\0_pq_.frobnicate\0on\0\0");
    let mut pkt = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    pkt.extend_from_slice(&body);
    let mut c = RawClient::connect(p.port).unwrap();
    c.send(&pkt).unwrap();
    let msgs = c.read_until_ready().unwrap();
    let (tag, body) = &msgs[0];
    assert_eq!(*tag, b'v', "NegotiateProtocolVersion first: {msgs:?}");
    assert_eq!(&body[..4], &0i32.to_be_bytes(), "newest minor version is 0");
    assert!(String::from_utf8_lossy(body).contains("_pq_.frobnicate"));
    assert_eq!(msgs.last().unwrap().0, b'Z');
    assert_serving(&mut p);
}

#[test]
fn invalid_utf8_in_a_query() {
    let mut p = proxy();
    let (mut c, _) = RawClient::login(p.port, "agent", "app").unwrap();
    let msgs = c.query("SELECT 'a").unwrap();
    assert_eq!(sqlstate(&msgs), "42601");
    let mut body = b"SELECT '\xff\xfe'".to_vec();
    body.push(0);
    c.send(&frame(b'Q', &body)).unwrap();
    let msgs = c.read_until_ready().unwrap();
    assert_eq!(
        sqlstate(&msgs),
        "22021",
        "invalid UTF-8 is refused: {msgs:?}"
    );
    // The session goes on after the error.
    let msgs = c.query("SELECT 1").unwrap();
    assert!(msgs.iter().any(|(t, _)| *t == b'D'));
    assert_serving(&mut p);
}

#[test]
fn unknown_message_type_passes_by_length() {
    let mut p = proxy();
    let (mut c, _) = RawClient::login(p.port, "agent", "app").unwrap();
    c.send(&frame(b'z', b"\x01\x02\x03")).unwrap();
    let msgs = c.read_to_end().unwrap();
    // PostgreSQL itself judges the unknown type; the proxy relayed it intact.
    assert_eq!(sqlstate(&msgs), "08P01");
    assert!(
        first_error(&msgs)
            .unwrap()
            .1
            .contains("invalid frontend message type 122"),
        "{msgs:?}"
    );
    assert_serving(&mut p);
}

#[test]
fn data_after_ssl_request_is_refused() {
    let mut p = proxy();
    let mut c = RawClient::connect(p.port).unwrap();
    let mut pkt = 8i32.to_be_bytes().to_vec();
    pkt.extend_from_slice(&80877103i32.to_be_bytes());
    pkt.extend_from_slice(&startup_packet("agent", "app"));
    c.send(&pkt).unwrap();
    let msgs = c.read_to_end().unwrap();
    assert_eq!(sqlstate(&msgs), "08P01");
    assert_serving(&mut p);
}

#[test]
fn many_bad_clients_at_once_do_not_disturb_a_good_one() {
    let mut p = proxy();
    let (mut good, _) = RawClient::login(p.port, "agent", "app").unwrap();
    let port = p.port;
    let bad: Vec<_> = (0..40)
        .map(|i| {
            std::thread::spawn(move || {
                let mut c = RawClient::connect(port).unwrap();
                let junk: Vec<u8> = (0..64).map(|j| ((i * 31 + j * 7) % 256) as u8).collect();
                let _ = c.send(&junk);
                let _ = c.read_to_end();
            })
        })
        .collect();
    for t in bad {
        t.join().unwrap();
    }
    let msgs = good.query("SELECT 2").unwrap();
    assert!(msgs.iter().any(|(t, _)| *t == b'D'), "{msgs:?}");
    assert_serving(&mut p);
}

#[test]
fn startup_timeout_closes_silent_clients() {
    let mut p = Proxy::start(
        pg::shared(),
        ProxyOptions {
            limits: vec!["startup_timeout = \"1s\"".into()],
            ..Default::default()
        },
    )
    .unwrap();
    let mut c = RawClient::connect(p.port).unwrap();
    c.stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    // Half a startup packet, then silence.
    c.send(&[0, 0, 0, 40, 0, 3]).unwrap();
    let msgs = c.read_to_end().unwrap();
    assert_eq!(sqlstate(&msgs), "08006");
    assert_serving(&mut p);
}
