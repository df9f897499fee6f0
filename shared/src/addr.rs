//! Which IP addresses are global: the one definition that the agent's egress guard and the
//! control plane's URL validation share, so they can never disagree on what "private" means.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// Whether `ip` may be reached: it is global, or one of the `allow` ranges (`--allow-cidr`)
/// contains it. IPv4-mapped addresses are judged as the IPv4 address they carry.
pub fn permitted(allow: &[IpNet], ip: IpAddr) -> bool {
    let v4 = canonical(ip);
    // A range may be written either way: `127.0.0.0/8`, or mapped as `::ffff:127.0.0.0/104`.
    allow.iter().any(|net| net.contains(&v4) || net.contains(&ip)) || is_global(v4)
}

/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are judged as the IPv4 address they carry.
pub fn canonical(ip: IpAddr) -> IpAddr {
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
        || (s[0] == 0x3fff && s[1] < 0x1000)   // documentation 3fff::/20
        || (s[0] == 0x2001 && s[1] == 0)       // Teredo 2001::/32 (embeds IPv4)
        || (s[0] == 0x2001 && s[1] == 0x0002 && s[2] == 0) // benchmarking 2001:2::/48
        || (s[0] == 0x2001 && (s[1] & 0xfff0) == 0x0010) // ORCHIDv1 2001:10::/28 (deprecated)
        || s[0] == 0x2002                      // 6to4 (embeds IPv4)
        || (s[0] == 0x0064 && s[1] == 0xff9b)  // NAT64 64:ff9b::/96 and 64:ff9b:1::/48
        || (s[0] == 0x0100 && s[1..4] == [0, 0, 0]) // discard 100::/64
        || s[0..6] == [0, 0, 0, 0, 0, 0]        // IPv4-compatible ::a.b.c.d (deprecated)
        || (s[0] & 0xe000) != 0x2000) // outside global unicast 2000::/3
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
            "0.1.2.3",
            "10.255.255.255",
            "100.100.100.200",
            "192.0.0.170",
            "192.168.255.255",
            "255.255.255.254",
            "::ffff:169.254.169.254",
            "::ffff:192.168.0.1",
            "fd00:ec2::254",
            "ff05::2",
            "2001::1",
            "2002:c0a8:101::1",
            "64:ff9b::a9fe:a9fe",
            "febf::1",
            "3fff::1",
            "2001:2::1",
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
            "9.9.9.9",
            "100.63.255.255",
            "169.253.0.1",
            "172.15.255.255",
            "192.0.1.1",
            "192.169.0.1",
            "198.20.0.1",
            "223.255.255.254",
            "2001:4860:4860::8888",
            "2600::1",
            "3fff:ffff::1",
        ];
        assert!(refused.len() + allowed.len() >= 40, "the table covers every range");
        for a in refused {
            assert!(!is_global(a.parse().unwrap()), "{a} must be refused");
        }
        for a in allowed {
            assert!(is_global(a.parse().unwrap()), "{a} must be allowed");
        }
    }

    #[test]
    fn allow_cidr_opens_a_range() {
        let allow: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap()];
        assert!(permitted(&allow, "127.0.0.1".parse().unwrap()));
        assert!(permitted(&allow, "::ffff:127.0.0.1".parse().unwrap()), "mapped addresses are judged as IPv4");
        assert!(!permitted(&allow, "10.0.0.1".parse().unwrap()));
        assert!(!permitted(&allow, "::1".parse().unwrap()));
        assert!(permitted(&allow, "8.8.8.8".parse().unwrap()));
        let mapped: Vec<IpNet> = vec!["::ffff:127.0.0.0/104".parse().unwrap()];
        assert!(permitted(&mapped, "::ffff:127.0.0.1".parse().unwrap()), "a range may be written mapped");
    }
}
