//! The egress guard: webhook URLs are chosen by strangers, so the agent refuses to connect to any
//! address that is not global (private, loopback, link-local, CGNAT, multicast, documentation,
//! IPv4 embedded in IPv6, …) unless `--allow-cidr` opens its range.
//!
//! Names are resolved once, by this module, and the HTTP client connects to exactly the addresses
//! that passed: there is no second lookup for a DNS rebinding to slip through.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

/// Why the guard refused.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("blocked: {0} is not a global address (open its range with --allow-cidr)")]
    Blocked(IpAddr),
    #[error("dns: {0}")]
    Dns(String),
}

/// The guard's configuration.
#[derive(Debug, Clone, Default)]
pub struct Guard {
    pub allow: Vec<IpNet>,
}

impl Guard {
    /// Whether a connection to `ip` is allowed.
    pub fn permits(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.allow.iter().any(|net| net.contains(&ip)) || is_global(ip)
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are judged as the IPv4 address they carry.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether `ip` is a public unicast address, reachable on the internet. Everything that is not
/// provably global is refused (the standard library's `is_global` is unstable).
pub fn is_global(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => is_global_v4(v4),
        IpAddr::V6(v6) => is_global_v6(v6),
    }
}

fn is_global_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(a == 0                                   // "this network"
        || a == 10                             // private
        || (a == 100 && (64..128).contains(&b)) // CGNAT 100.64/10
        || a == 127                            // loopback
        || (a == 169 && b == 254)              // link-local, cloud metadata
        || (a == 172 && (16..32).contains(&b)) // private
        || (a == 192 && b == 0 && c == 0)      // IETF protocol assignments
        || (a == 192 && b == 0 && c == 2)      // TEST-NET-1
        || (a == 192 && b == 88 && c == 99)    // 6to4 relay anycast
        || (a == 192 && b == 168)              // private
        || (a == 198 && (18..20).contains(&b)) // benchmarking
        || (a == 198 && b == 51 && c == 100)   // TEST-NET-2
        || (a == 203 && b == 0 && c == 113)    // TEST-NET-3
        || a >= 224) // multicast, reserved, broadcast
}

fn is_global_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || (s[0] & 0xfe00) == 0xfc00           // unique local fc00::/7
        || (s[0] & 0xffc0) == 0xfe80           // link-local fe80::/10
        || (s[0] & 0xffc0) == 0xfec0           // site-local (deprecated)
        || (s[0] & 0xff00) == 0xff00           // multicast
        || (s[0] == 0x2001 && s[1] == 0x0db8)  // documentation
        || (s[0] == 0x2001 && s[1] == 0)       // Teredo 2001::/32 (embeds IPv4)
        || (s[0] == 0x2001 && (s[1] & 0xfff0) == 0x0010) // ORCHIDv1/v2
        || s[0] == 0x2002                      // 6to4 (embeds IPv4)
        || (s[0] == 0x0064 && s[1] == 0xff9b)  // NAT64 64:ff9b::/96 and 64:ff9b:1::/48
        || (s[0] == 0x0100 && s[1..4] == [0, 0, 0]) // discard 100::/64
        || s[0..6] == [0, 0, 0, 0, 0, 0]        // IPv4-compatible ::a.b.c.d (deprecated)
        || (s[0] & 0xe000) != 0x2000) // outside global unicast 2000::/3
}

/// A reqwest resolver that resolves once and returns only the addresses the guard permits.
#[derive(Clone)]
pub struct GuardedResolver {
    pub guard: Arc<Guard>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let guard = self.guard.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await
                .map_err(|e| {
                    Box::new(EgressError::Dns(format!("{host}: {e}"))) as Box<dyn std::error::Error + Send + Sync>
                })?
                .collect();
            if addrs.is_empty() {
                return Err(Box::new(EgressError::Dns(format!("{host}: no addresses"))) as _);
            }
            let allowed: Vec<SocketAddr> = addrs.iter().copied().filter(|a| guard.permits(a.ip())).collect();
            match allowed.is_empty() {
                true => Err(Box::new(EgressError::Blocked(addrs[0].ip())) as _),
                false => Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_table() {
        let refused = [
            "0.0.0.0",
            "10.1.2.3",
            "100.64.0.1",
            "100.127.255.254",
            "127.0.0.1",
            "169.254.169.254",
            "172.16.0.1",
            "172.31.255.255",
            "192.0.0.8",
            "192.0.2.1",
            "192.88.99.1",
            "192.168.1.1",
            "198.18.0.1",
            "198.51.100.7",
            "203.0.113.7",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "2001:db8::1",
            "2001:0:4136:e378::1",
            "2002:7f00:1::1",
            "64:ff9b::7f00:1",
            "64:ff9b:1::1",
            "100::1",
            "2001:10::1",
        ];
        let allowed = [
            "8.8.8.8",
            "1.1.1.1",
            "93.184.216.34",
            "100.128.0.1",
            "172.32.0.1",
            "::ffff:8.8.8.8",
            "2606:4700::1111",
            "2a00:1450:4001::1",
        ];
        for a in refused {
            assert!(!is_global(a.parse().unwrap()), "{a} must be refused");
        }
        for a in allowed {
            assert!(is_global(a.parse().unwrap()), "{a} must be allowed");
        }
    }

    #[test]
    fn allow_cidr_opens_a_range() {
        let guard = Guard { allow: vec!["127.0.0.0/8".parse().unwrap()] };
        assert!(guard.permits("127.0.0.1".parse().unwrap()));
        assert!(guard.permits("::ffff:127.0.0.1".parse().unwrap()), "mapped addresses are judged as IPv4");
        assert!(!guard.permits("10.0.0.1".parse().unwrap()));
        assert!(!guard.permits("::1".parse().unwrap()));
    }
}
