//! Types shared by the kernel programs (`interceptor-ebpf`) and the daemon.
//!
//! `#[repr(C)]` and `no_std` so both sides agree on layout; the eBPF loader
//! (interception issue) adds `aya::Pod` impls behind the `user` feature.
#![no_std]

/// The key of an origin record as the daemon looks it up on accept: the
/// client's own address and port, as the proxy sees them as the peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OriginKey {
    /// IPv4 addresses are stored v4-mapped (::ffff:a.b.c.d).
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: [u8; 6],
}
