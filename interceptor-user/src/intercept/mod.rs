//! Transparent interception: the kernel programs' userspace side.
//!
//! [`loader`] installs the programs and pins them, [`origin`] turns an
//! accepted connection into the workload that made it, [`job`] is
//! `interceptor run`, and [`cgroup`] finds and manages cgroups.

pub mod cgroup;
pub mod job;
pub mod loader;
pub mod origin;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};

use common::{DestPrefix, RuntimeConfig};
use ipnet::IpNet;

use crate::config::{Config, Destination, Intercept};

/// The proxy's listeners for redirected connections.
pub fn listen_addrs(i: &Intercept) -> [SocketAddr; 2] {
    [
        SocketAddr::from((Ipv4Addr::LOCALHOST, i.port)),
        SocketAddr::from((Ipv6Addr::LOCALHOST, i.port)),
    ]
}

pub fn runtime_config(i: &Intercept) -> RuntimeConfig {
    RuntimeConfig::new(Ipv4Addr::LOCALHOST, Ipv6Addr::LOCALHOST, i.port, i.mark)
}

/// Every destination that is redirected, per target: its `destinations`,
/// plus every address its upstream host resolves to, so that the database
/// can't be reached around the proxy by another of its names. A loopback
/// upstream also protects all of 127.0.0.0/8 and ::1 on its port, since
/// each of those reaches the same local server.
pub fn protected_destinations(config: &Config) -> Vec<(String, Destination)> {
    let mut out = Vec::new();
    for t in &config.targets {
        let t = t.get_ref();
        for d in &t.destinations {
            out.push((t.name.clone(), *d));
        }
        let port = t.upstream.port;
        let resolved: Vec<IpAddr> = (t.upstream.host.as_str(), port)
            .to_socket_addrs()
            .map(|a| a.map(|s| s.ip()).collect())
            .unwrap_or_default();
        for ip in resolved {
            if ip.is_loopback() {
                let v4 = ipnet::Ipv4Net::new_assert(Ipv4Addr::new(127, 0, 0, 0), 8);
                out.push((t.name.clone(), Destination::Network(IpNet::V4(v4), port)));
                out.push((
                    t.name.clone(),
                    Destination::Exact(SocketAddr::from((Ipv6Addr::LOCALHOST, port))),
                ));
            } else {
                out.push((
                    t.name.clone(),
                    Destination::Exact(SocketAddr::new(ip, port)),
                ));
            }
        }
    }
    out.dedup();
    out
}

/// The trie entry for one destination.
pub fn trie_entry(d: &Destination) -> (u32, DestPrefix) {
    match *d {
        Destination::Exact(a) => {
            let bits = if a.is_ipv4() { 32 } else { 128 };
            DestPrefix::entry(Some((a.ip(), bits)), a.port())
        }
        Destination::Network(net, port) => {
            DestPrefix::entry(Some((net.addr(), net.prefix_len())), port)
        }
        Destination::AnyHost(port) => DestPrefix::entry(None, port),
    }
}
