//! The egress guard: webhook URLs are chosen by strangers, so the agent refuses to connect to any
//! address that is not global (private, loopback, link-local, CGNAT, multicast, documentation,
//! IPv4 embedded in IPv6, …) unless `--allow-cidr` opens its range.
//!
//! Names are resolved once, by this module, and the HTTP client connects to exactly the addresses
//! that passed: there is no second lookup for a DNS rebinding to slip through.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::dns::Name;
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

/// The HTTP client's resolver: it resolves once and returns only the addresses the guard
/// permits. (Literal addresses never reach it; the sender vets those itself.)
#[derive(Clone)]
pub struct GuardedResolver {
    pub guard: Arc<Guard>,
}

impl tower_service::Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = EgressError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, EgressError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), EgressError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let guard = self.guard.clone();
        Box::pin(async move {
            let host = name.as_str();
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, 0))
                .await
                .map_err(|e| EgressError::Dns(format!("{host}: {e}")))?
                .collect();
            if addrs.is_empty() {
                return Err(EgressError::Dns(format!("{host}: no addresses")));
            }
            let allowed: Vec<SocketAddr> = addrs.iter().copied().filter(|a| guard.permits(a.ip())).collect();
            match allowed.is_empty() {
                true => Err(EgressError::Blocked(addrs[0].ip())),
                false => Ok(allowed.into_iter()),
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
