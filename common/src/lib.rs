//! Types shared by the kernel programs (`interceptor-ebpf`) and the daemon.
//!
//! Every map key and value is `#[repr(C)]` with explicit padding, so the
//! layout the verifier sees is the one userspace writes. Addresses are kept
//! as 16 bytes with IPv4 stored v4-mapped (`::ffff:a.b.c.d`): one key space
//! for connect4, connect6 and v4-mapped connect6, so a tagged process can't
//! reach a protected IPv4 destination by spelling it as IPv6.
#![cfg_attr(not(feature = "user"), no_std)]

/// Names of the maps, as the eBPF object defines them and as they are
/// pinned under `<bpffs>/interceptor/maps/`.
pub mod map_names {
    pub const PROTECTED: &str = "PROTECTED";
    pub const RUNTIME: &str = "RUNTIME";
    pub const PENDING: &str = "PENDING";
    pub const ORIGINS: &str = "ORIGINS";
    pub const ALL: [&str; 4] = [PROTECTED, RUNTIME, PENDING, ORIGINS];
}

/// Names of the programs in the eBPF object.
pub mod program_names {
    pub const CONNECT4: &str = "intercept_connect4";
    pub const CONNECT6: &str = "intercept_connect6";
    pub const SOCKOPS: &str = "intercept_sockops";
    pub const ALL: [&str; 3] = [CONNECT4, CONNECT6, SOCKOPS];
}

/// Capacity of the two origin maps. LRU, so a flood of connects that are
/// never accepted evicts the oldest records (those clients are then refused
/// by the proxy, which never guesses) instead of failing new inserts.
pub const ORIGIN_CAPACITY: u32 = 65_536;
/// Capacity of the protected-destination trie.
pub const PROTECTED_CAPACITY: u32 = 1_024;

/// Bits of the LPM key that precede the address: the port.
pub const PORT_PREFIX_BITS: u32 = 16;
/// `prefix_len` of an IPv4 CIDR inside the v4-mapped space starts here.
pub const V4_MAPPED_PREFIX_BITS: u32 = 96;

/// The data half of a protected-destination LPM key: port first, so that a
/// prefix of just the port means "any host on this port", then the address.
/// `prefix_len` counts bits from the start of this struct.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DestPrefix {
    /// Network byte order.
    pub port: [u8; 2],
    /// IPv4 stored v4-mapped.
    pub addr: [u8; 16],
}

/// Value stored for a protected destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DestValue {
    /// Non-zero when the entry is live; kept so the value is never empty.
    pub protected: u32,
}

/// `RuntimeConfig::flags` bit: the programs are armed. Until the daemon has
/// written the listener addresses, protected connects are refused.
pub const RUNTIME_ARMED: u32 = 1;
/// `RuntimeConfig::flags` bit: emit aya-log debug lines.
pub const RUNTIME_DEBUG_LOG: u32 = 2;

/// The single entry of the `RUNTIME` array: where the proxy listens and
/// which socket mark its own upstream sockets carry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RuntimeConfig {
    /// IPv4 listener, network byte order as `bpf_sock_addr.user_ip4` holds it.
    pub proxy_ip4: [u8; 4],
    /// IPv6 listener, network byte order.
    pub proxy_ip6: [u8; 16],
    /// Listener port, network byte order (both listeners share it).
    pub proxy_port: [u8; 2],
    pub _pad: [u8; 2],
    /// Sockets with this `SO_MARK` are the proxy's own and pass untouched.
    pub mark: u32,
    pub flags: u32,
}

/// What the kernel saw when a tagged process connected to a protected
/// destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OriginRecord {
    /// The destination the process asked for (IPv4 v4-mapped).
    pub dst_addr: [u8; 16],
    /// Host byte order.
    pub dst_port: u16,
    /// `AF_INET` or `AF_INET6` of the connecting socket.
    pub family: u16,
    /// Thread id (kernel "pid").
    pub pid: u32,
    /// Process id (kernel "tgid").
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    pub _pad: u32,
    /// The cgroup v2 id, which is the inode number of its directory.
    pub cgroup_id: u64,
    pub comm: [u8; 16],
}

/// The key of an origin record as the daemon looks it up on accept: the
/// client's own address and port, which the proxy sees as the peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct OriginKey {
    /// IPv4 addresses are stored v4-mapped (::ffff:a.b.c.d).
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// Writes the v4-mapped form of an IPv4 address given in network order.
#[inline(always)]
pub const fn v4_mapped(ip4: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, ip4[0], ip4[1], ip4[2], ip4[3],
    ]
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    use std::net::{IpAddr, SocketAddr};

    // SAFETY: all of these are repr(C), Copy, with explicit padding fields
    // and no pointers, so any bit pattern the kernel writes is valid.
    unsafe impl aya::Pod for DestPrefix {}
    unsafe impl aya::Pod for DestValue {}
    unsafe impl aya::Pod for RuntimeConfig {}
    unsafe impl aya::Pod for OriginRecord {}
    unsafe impl aya::Pod for OriginKey {}

    /// The 16-byte form every map uses for an address.
    pub fn addr_bytes(ip: IpAddr) -> [u8; 16] {
        match ip {
            IpAddr::V4(v4) => v4_mapped(v4.octets()),
            IpAddr::V6(v6) => v6.octets(),
        }
    }

    /// Turns the 16-byte map form back into the address a user would write:
    /// v4-mapped addresses come back as IPv4.
    pub fn ip_from_bytes(bytes: [u8; 16]) -> IpAddr {
        let v6 = std::net::Ipv6Addr::from(bytes);
        match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }
    }

    impl OriginKey {
        /// The key for a connection whose peer (the client) is `peer`.
        pub fn for_peer(peer: SocketAddr) -> Self {
            OriginKey {
                addr: addr_bytes(peer.ip()),
                port: peer.port(),
                _pad: [0; 6],
            }
        }
    }

    impl OriginRecord {
        pub fn destination(&self) -> SocketAddr {
            SocketAddr::new(ip_from_bytes(self.dst_addr), self.dst_port)
        }

        pub fn comm(&self) -> String {
            let end = self
                .comm
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(self.comm.len());
            String::from_utf8_lossy(&self.comm[..end]).into_owned()
        }
    }

    impl DestPrefix {
        /// The LPM entry for `addr/bits` on `port` (`None`: any host), as
        /// `(prefix_len, data)`. `bits` counts in the address's own family
        /// (0..=32 for IPv4).
        pub fn entry(addr: Option<(IpAddr, u8)>, port: u16) -> (u32, Self) {
            let (bytes, addr_bits) = match addr {
                None => ([0; 16], 0),
                Some((ip @ IpAddr::V4(_), bits)) => {
                    (addr_bytes(ip), V4_MAPPED_PREFIX_BITS + u32::from(bits))
                }
                Some((ip @ IpAddr::V6(_), bits)) => (addr_bytes(ip), u32::from(bits)),
            };
            let data = DestPrefix {
                port: port.to_be_bytes(),
                addr: bytes,
            };
            (PORT_PREFIX_BITS + addr_bits, data)
        }
    }

    impl RuntimeConfig {
        pub fn new(ip4: std::net::Ipv4Addr, ip6: std::net::Ipv6Addr, port: u16, mark: u32) -> Self {
            RuntimeConfig {
                proxy_ip4: ip4.octets(),
                proxy_ip6: ip6.octets(),
                proxy_port: port.to_be_bytes(),
                _pad: [0; 2],
                mark,
                flags: RUNTIME_ARMED,
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn v4_and_v4_mapped_share_a_key() {
            let a = OriginKey::for_peer("127.0.0.1:4000".parse().unwrap());
            let b = OriginKey::for_peer("[::ffff:127.0.0.1]:4000".parse().unwrap());
            assert_eq!(a, b);
            assert_ne!(a, OriginKey::for_peer("[::1]:4000".parse().unwrap()));
        }

        #[test]
        fn dest_prefixes() {
            assert_eq!(DestPrefix::entry(None, 5432).0, 16);
            let (bits, data) = DestPrefix::entry(Some(("10.0.0.5".parse().unwrap(), 32)), 5432);
            assert_eq!(bits, 16 + 128);
            assert_eq!(data.port, [0x15, 0x38]);
            assert_eq!(&data.addr[10..], &[0xff, 0xff, 10, 0, 0, 5]);
            let net6 = DestPrefix::entry(Some(("fd00::".parse().unwrap(), 64)), 5432);
            assert_eq!(net6.0, 16 + 64);
            assert_eq!(std::mem::size_of::<DestPrefix>(), 18);
        }

        #[test]
        fn record_round_trips_addresses() {
            let rec = OriginRecord {
                dst_addr: addr_bytes("10.1.2.3".parse().unwrap()),
                dst_port: 5432,
                comm: *b"psql\0\0\0\0\0\0\0\0\0\0\0\0",
                ..Default::default()
            };
            assert_eq!(rec.destination(), "10.1.2.3:5432".parse().unwrap());
            assert_eq!(rec.comm(), "psql");
        }
    }
}

#[cfg(feature = "user")]
pub use user::{addr_bytes, ip_from_bytes};
