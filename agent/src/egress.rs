//! The egress guard: webhook URLs are chosen by strangers, so the agent refuses to connect to any
//! address that is not global (private, loopback, link-local, CGNAT, multicast, documentation,
//! IPv4 embedded in IPv6, …) unless `--allow-cidr` opens its range.
//!
//! Names are resolved once, by this module, and the HTTP client connects to exactly the addresses
//! that passed: there is no second lookup for a DNS rebinding to slip through.

use std::net::{IpAddr, SocketAddr};
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
        herald_shared::addr::permitted(&self.allow, ip)
    }
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
    fn the_guard_applies_its_allowed_ranges() {
        let guard = Guard { allow: vec!["127.0.0.0/8".parse().unwrap()] };
        assert!(guard.permits("127.0.0.1".parse().unwrap()));
        assert!(!guard.permits("169.254.169.254".parse().unwrap()));
    }
}
