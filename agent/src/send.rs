//! Making one attempt: sign, add the documented headers, POST with a timeout, follow no
//! redirect, read the response up to the limit, classify any error.

use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_shared::proto::{self, ErrorKind, SignatureScheme};
use herald_shared::signature;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use crate::egress::{EgressError, Guard, GuardedResolver};

/// Sends jobs. Cheap to clone: one connection pool for every job.
#[derive(Clone)]
pub struct Sender {
    client: reqwest::Client,
    guard: Arc<Guard>,
    allow_http: bool,
}

/// A failure to build the HTTP client.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot read the CA certificate {0}: {1}")]
    Ca(String, String),
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

impl Sender {
    /// An HTTP client that trusts the system roots (plus `extra_ca`, PEM), speaks HTTP/2 where
    /// offered, ignores proxy variables, follows no redirect and resolves through the guard.
    ///
    /// It keeps up to `max_in_flight` idle connections per host: a burst to one receiver then
    /// finds its connections again, rather than all but a few being closed and opened anew (with
    /// a TLS handshake each, and sockets in `TIME_WAIT` by the ten thousand, which can use up the
    /// ephemeral ports toward one receiver). Idle connections close after 90 s.
    pub fn new(
        guard: Guard,
        allow_http: bool,
        extra_ca: Option<&std::path::Path>,
        max_in_flight: usize,
    ) -> Result<Sender, SetupError> {
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
        if let Some(path) = extra_ca {
            use rustls_pki_types::pem::PemObject as _;
            let shown = path.display().to_string();
            let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
                .map_err(|e| SetupError::Ca(shown.clone(), e.to_string()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| SetupError::Ca(shown.clone(), e.to_string()))?;
            for cert in certs {
                roots.add(cert).map_err(|e| SetupError::Ca(shown.clone(), e.to_string()))?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| SetupError::Client(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let guard = Arc::new(guard);
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(Arc::new(GuardedResolver { guard: guard.clone() }))
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(max_in_flight.max(1))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| SetupError::Client(e.to_string()))?;
        Ok(Sender { client, guard, allow_http })
    }

    /// Makes the attempt `job` describes and reports it. Never fails: every problem is a result.
    pub async fn attempt(&self, job: &proto::Job, body_limit: usize, prefix_default: &str) -> proto::AttemptResult {
        let started = chrono::Utc::now();
        let clock = Instant::now();
        let mut result = proto::AttemptResult {
            lease_id: job.lease_id.clone(),
            delivery_id: job.delivery_id.clone(),
            attempt: job.attempt,
            started_at: Some(prost_types::Timestamp {
                seconds: started.timestamp(),
                nanos: started.timestamp_subsec_nanos() as i32,
            }),
            ..Default::default()
        };
        match self.send(job, body_limit, prefix_default, started.timestamp(), &mut result).await {
            Ok(()) => {}
            Err((kind, message)) => {
                result.error_kind = kind as i32;
                result.error_message = message;
            }
        }
        let took = clock.elapsed();
        result.duration =
            Some(prost_types::Duration { seconds: took.as_secs() as i64, nanos: took.subsec_nanos() as i32 });
        result
    }

    async fn send(
        &self,
        job: &proto::Job,
        body_limit: usize,
        prefix_default: &str,
        unix_now: i64,
        result: &mut proto::AttemptResult,
    ) -> Result<(), (ErrorKind, String)> {
        let url = reqwest::Url::parse(&job.url).map_err(|e| (ErrorKind::Other, format!("invalid URL: {e}")))?;
        match url.scheme() {
            "https" => {}
            "http" if self.allow_http => {}
            other => {
                return Err((
                    ErrorKind::Blocked,
                    format!("blocked: {other} is not allowed (https only; --allow-http)"),
                ));
            }
        }
        // Literal addresses never reach the resolver: vet them here.
        let literal = match url.host() {
            Some(url::Host::Ipv4(ip)) => Some(std::net::IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => Some(std::net::IpAddr::V6(ip)),
            _ => None,
        };
        if let Some(ip) = literal
            && !self.guard.permits(ip)
        {
            return Err((ErrorKind::Blocked, EgressError::Blocked(ip).to_string()));
        }
        let (headers, shown) = headers(job, prefix_default, unix_now).map_err(|e| (ErrorKind::Other, e))?;
        result.request_headers = shown;
        let timeout = job
            .timeout
            .map(|d| Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32))
            .filter(|d| !d.is_zero())
            .unwrap_or(Duration::from_secs(30));
        let response = self
            .client
            .post(url)
            .headers(headers)
            .body(job.body.clone())
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| classify(&e))?;
        let status = response.status();
        result.status = u32::from(status.as_u16());
        for (name, value) in response.headers() {
            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
            result
                .response_headers
                .entry(name.as_str().to_owned())
                .and_modify(|v| {
                    v.push_str(", ");
                    v.push_str(&value);
                })
                .or_insert(value);
        }
        if status.as_u16() == 429 || status.as_u16() == 503 {
            result.retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(retry_after)
                .map(|d| prost_types::Duration { seconds: d.as_secs() as i64, nanos: 0 });
        }
        let mut response = response;
        let mut body = Vec::new();
        while body.len() < body_limit {
            match response.chunk().await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk[..chunk.len().min(body_limit - body.len())]),
                Ok(None) => break,
                // The status decides success; a body cut short is kept as far as it came.
                Err(e) if e.is_timeout() => return Err((ErrorKind::Timeout, "timed out reading the response".into())),
                Err(_) => break,
            }
        }
        result.response_body = body;
        if status.is_success() {
            Ok(())
        } else if status.is_redirection() {
            Err((ErrorKind::HttpStatus, format!("redirect {status} not followed")))
        } else {
            Err((ErrorKind::HttpStatus, format!("HTTP {status}")))
        }
    }
}

/// Parses `Retry-After`: delay seconds or an HTTP date.
pub fn retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(std::time::SystemTime::now()).unwrap_or(Duration::ZERO))
}

/// Sorts a client error into an error kind, with a message for people.
fn classify(e: &reqwest::Error) -> (ErrorKind, String) {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut chain = Vec::new();
    while let Some(s) = source {
        if let Some(egress) = s.downcast_ref::<EgressError>() {
            return match egress {
                EgressError::Blocked(_) => (ErrorKind::Blocked, egress.to_string()),
                EgressError::Dns(_) => (ErrorKind::Dns, egress.to_string()),
            };
        }
        if s.downcast_ref::<rustls::Error>().is_some() {
            return (ErrorKind::Tls, format!("tls: {s}"));
        }
        chain.push(s.to_string());
        source = s.source();
    }
    let text = chain.join(": ");
    if e.is_timeout() {
        (ErrorKind::Timeout, "timed out".into())
    } else if text.contains("certificate") || text.contains("tls") || text.contains("TLS") {
        (ErrorKind::Tls, text)
    } else if e.is_connect() {
        (ErrorKind::Connect, text)
    } else {
        (ErrorKind::Protocol, text)
    }
}

/// The headers of a delivery, and the same with custom values masked (for the attempt log).
pub fn headers(
    job: &proto::Job,
    prefix_default: &str,
    unix_now: i64,
) -> Result<(HeaderMap, std::collections::HashMap<String, String>), String> {
    let signing = job.signing.clone().unwrap_or_default();
    let prefix =
        if signing.header_prefix.is_empty() { prefix_default.to_owned() } else { signing.header_prefix.clone() };
    let mut own: Vec<(String, String)> = vec![
        ("content-type".into(), "application/json".into()),
        ("user-agent".into(), format!("Herald/{}", herald_shared::VERSION)),
        (format!("{prefix}-Signature"), signature::cloudthinker(&signing.secret, &job.body)),
        (format!("{prefix}-Event"), job.event_type.clone()),
        (format!("{prefix}-Event-Id"), job.event_id.clone()),
        (format!("{prefix}-Delivery"), job.delivery_id.clone()),
        (format!("{prefix}-Attempt"), job.attempt.to_string()),
    ];
    if !signing.next_secret.is_empty() {
        own.push((format!("{prefix}-Signature-Next"), signature::cloudthinker(&signing.next_secret, &job.body)));
    }
    if !job.traceparent.is_empty() {
        own.push(("traceparent".into(), job.traceparent.clone()));
    }
    if signing.scheme == SignatureScheme::StandardWebhooks as i32 {
        let mut sigs = Vec::new();
        for secret in [&signing.secret, &signing.next_secret].into_iter().filter(|s| !s.is_empty()) {
            let key = signature::standard_key(secret).map_err(|e| format!("standard webhooks secret: {e}"))?;
            sigs.push(signature::standard(&key, &job.event_id, unix_now, &job.body));
        }
        own.push(("webhook-id".into(), job.event_id.clone()));
        own.push(("webhook-timestamp".into(), unix_now.to_string()));
        own.push(("webhook-signature".into(), sigs.join(" ")));
    }
    let mut map = HeaderMap::with_capacity(own.len() + job.headers.len());
    let mut shown = std::collections::HashMap::with_capacity(own.len() + job.headers.len());
    for (name, value) in &own {
        let n = HeaderName::from_bytes(name.as_bytes()).map_err(|e| format!("header {name}: {e}"))?;
        let v = HeaderValue::from_str(value).map_err(|e| format!("header {name}: {e}"))?;
        map.insert(n, v);
        shown.insert(name.to_ascii_lowercase(), value.clone());
    }
    // Custom headers come last: `Content-Type` may be overridden, nothing else Herald sets can be
    // (the control plane refuses reserved names).
    for (name, value) in &job.headers {
        let n = HeaderName::from_bytes(name.as_bytes()).map_err(|e| format!("header {name}: {e}"))?;
        let v = HeaderValue::from_str(value).map_err(|e| format!("header {name}: {e}"))?;
        map.insert(n, v);
        shown.insert(name.to_ascii_lowercase(), "***".to_owned());
    }
    Ok((map, shown))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        assert_eq!(retry_after("120"), Some(Duration::from_secs(120)));
        assert_eq!(retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), Some(Duration::ZERO), "a past date means now");
        let future = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(3600));
        let d = retry_after(&future).unwrap();
        assert!(d > Duration::from_secs(3500) && d <= Duration::from_secs(3600), "{d:?}");
        assert_eq!(retry_after("soon"), None);
    }

    #[test]
    fn headers_carry_signatures_and_mask_custom_values() {
        let job = proto::Job {
            event_id: "evt_1".into(),
            event_type: "incident.created".into(),
            delivery_id: "dlv_1".into(),
            attempt: 2,
            body: bytes::Bytes::from_static(br#"{"a":1}"#),
            headers: [("Authorization".to_owned(), "Basic secret".to_owned())].into(),
            signing: Some(proto::Signing {
                secret: "old-secret-0123456789".into(),
                next_secret: "new-secret-0123456789".into(),
                scheme: SignatureScheme::Cloudthinker as i32,
                header_prefix: String::new(),
            }),
            ..Default::default()
        };
        let (map, shown) = headers(&job, "X-CloudThinker", 1_700_000_000).unwrap();
        assert_eq!(
            map["X-CloudThinker-Signature"],
            signature::cloudthinker("old-secret-0123456789", br#"{"a":1}"#).as_str()
        );
        assert_eq!(
            map["X-CloudThinker-Signature-Next"],
            signature::cloudthinker("new-secret-0123456789", br#"{"a":1}"#).as_str()
        );
        assert_eq!(map["X-CloudThinker-Attempt"], "2");
        assert_eq!(map["authorization"], "Basic secret");
        assert_eq!(shown["authorization"], "***");
        assert!(!map.contains_key("webhook-signature"));
    }
}
