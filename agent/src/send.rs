//! Making one attempt: sign, add the documented headers, POST with a timeout, follow no
//! redirect, read the response up to the limit, classify any error.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use herald_shared::proto::{self, ErrorKind, SignatureScheme};
use herald_shared::signature;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http_body_util::{BodyExt as _, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::egress::{EgressError, Guard, GuardedResolver};

/// hyper's pooled client over TLS (or plain HTTP where allowed), resolving through the guard.
///
/// hyper directly rather than through reqwest: reqwest wraps every request in layers Herald does
/// not use (a redirect policy that parses the URL again on the way out and on the way back, a
/// copy of the headers), which cost about a third of the agent's CPU per delivery
/// (docs/BENCHMARKS.md, item 53).
type HttpClient = Client<HttpsConnector<HttpConnector<GuardedResolver>>, Full<Bytes>>;

/// Sends jobs. Cheap to clone: one connection pool for every job.
#[derive(Clone)]
pub struct Sender {
    client: HttpClient,
    guard: Arc<Guard>,
    allow_http: bool,
    parsed: Arc<Mutex<Parsed>>,
}

/// What jobs repeat, parsed once: header names per prefix, and endpoints (parsing a URL costs
/// more than copying one). Bounded: past the bound it starts again empty.
#[derive(Default)]
struct Parsed {
    names: HashMap<String, Arc<Names>>,
    endpoints: HashMap<String, Endpoint>,
}

/// An endpoint URL as a request needs it: parsed and normalised by the URL standard's rules (the
/// same rules a browser applies: `http://2130706433/` is 127.0.0.1), then as the URI sent.
#[derive(Clone)]
struct Endpoint {
    uri: http::Uri,
    scheme: Scheme,
    /// The host, when the URL names an address rather than a name.
    literal: Option<std::net::IpAddr>,
}

#[derive(Clone)]
enum Scheme {
    Https,
    Http,
    Other(String),
}

impl Endpoint {
    fn parse(text: &str) -> Result<Endpoint, String> {
        let url = url::Url::parse(text).map_err(|e| e.to_string())?;
        // The control plane refuses them; a URL's credentials are never sent, nor put in HTTP/2's
        // `:authority`.
        if !url.username().is_empty() || url.password().is_some() {
            return Err("credentials in the URL are not allowed".to_owned());
        }
        let scheme = match url.scheme() {
            "https" => Scheme::Https,
            "http" => Scheme::Http,
            other => Scheme::Other(other.to_owned()),
        };
        let literal = match url.host() {
            Some(url::Host::Ipv4(ip)) => Some(std::net::IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => Some(std::net::IpAddr::V6(ip)),
            _ => None,
        };
        let uri = match scheme {
            Scheme::Other(_) => http::Uri::default(),
            _ => http::Uri::try_from(url.as_str()).map_err(|e| e.to_string())?,
        };
        Ok(Endpoint { uri, scheme, literal })
    }
}

/// At most this many of each (URLs up to 2 KiB each: a few MiB at worst).
const PARSED_MAX: usize = 1024;

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
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| SetupError::Client(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let guard = Arc::new(guard);
        let mut http = HttpConnector::new_with_resolver(GuardedResolver { guard: guard.clone() });
        http.enforce_http(false);
        http.set_nodelay(true);
        // A pooled connection whose peer or NAT vanished is found out within a minute (15 s, then
        // 3 probes 15 s apart), inside the pool's idle timeout, rather than taking the next
        // request into a dead connection for its whole timeout.
        http.set_keepalive(Some(Duration::from_secs(15)));
        http.set_keepalive_interval(Some(Duration::from_secs(15)));
        http.set_keepalive_retries(Some(3));
        // Offers h2 and http/1.1 by ALPN.
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(max_in_flight.max(1))
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(https);
        Ok(Sender { client, guard, allow_http, parsed: Arc::default() })
    }

    /// Makes the attempt `job` describes and reports it, with its headers as JSON objects when
    /// `headers_json` (the control plane reads them so) and as maps otherwise. Never fails: every
    /// problem is a result.
    pub async fn attempt(
        &self,
        job: &proto::Job,
        body_limit: usize,
        prefix_default: &str,
        headers_json: bool,
    ) -> proto::AttemptResult {
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
        match self.send(job, body_limit, prefix_default, started.timestamp(), headers_json, &mut result).await {
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
        headers_json: bool,
        result: &mut proto::AttemptResult,
    ) -> Result<(), (ErrorKind, String)> {
        let endpoint = self.endpoint(&job.url).map_err(|e| (ErrorKind::Other, format!("invalid URL: {e}")))?;
        match &endpoint.scheme {
            Scheme::Https => {}
            Scheme::Http if self.allow_http => {}
            Scheme::Http => return Err((ErrorKind::Blocked, not_allowed("http"))),
            Scheme::Other(other) => return Err((ErrorKind::Blocked, not_allowed(other))),
        }
        // Literal addresses never reach the resolver: vet them here.
        if let Some(ip) = endpoint.literal
            && !self.guard.permits(ip)
        {
            return Err((ErrorKind::Blocked, EgressError::Blocked(ip).to_string()));
        }
        let prefix = job.signing.as_ref().map_or("", |s| s.header_prefix.as_str());
        let names =
            self.names(if prefix.is_empty() { prefix_default } else { prefix }).map_err(|e| (ErrorKind::Other, e))?;
        let (headers, masked) = headers(job, &names, unix_now).map_err(|e| (ErrorKind::Other, e))?;
        let shown = shown(&headers, &masked);
        if headers_json {
            result.request_headers_json = herald_shared::headers::to_json(&shown);
        } else {
            result.request_headers = shown.into_iter().map(|(k, v)| (k.to_owned(), v.into_owned())).collect();
        }
        let timeout = job
            .timeout
            .map(|d| Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32))
            .filter(|d| !d.is_zero())
            .unwrap_or(Duration::from_secs(30));
        // One deadline for the whole attempt: connecting, sending, and reading the response.
        let deadline = tokio::time::Instant::now() + timeout;
        let mut request = http::Request::new(Full::new(job.body.clone()));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = endpoint.uri;
        *request.headers_mut() = headers;
        request.headers_mut().entry(http::header::ACCEPT).or_insert(HeaderValue::from_static("*/*"));
        let response = match tokio::time::timeout_at(deadline, self.client.request(request)).await {
            Err(_) => return Err((ErrorKind::Timeout, "timed out".into())),
            Ok(sent) => sent.map_err(|e| classify(&e))?,
        };
        let status = response.status();
        result.status = u32::from(status.as_u16());
        let answered = joined(response.headers());
        if headers_json {
            result.response_headers_json = herald_shared::headers::to_json(&answered);
        } else {
            result.response_headers = answered.into_iter().map(|(k, v)| (k.to_owned(), v.into_owned())).collect();
        }
        if status.as_u16() == 429 || status.as_u16() == 503 {
            result.retry_after = response
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(retry_after)
                .map(|d| prost_types::Duration { seconds: d.as_secs() as i64, nanos: 0 });
        }
        let mut incoming = response.into_body();
        let mut body = Vec::new();
        while body.len() < body_limit {
            match tokio::time::timeout_at(deadline, incoming.frame()).await {
                Ok(Some(Ok(frame))) => {
                    if let Some(chunk) = frame.data_ref() {
                        body.extend_from_slice(&chunk[..chunk.len().min(body_limit - body.len())]);
                    }
                }
                // The status decides success; a body cut short, or still coming when the timeout
                // ends the request, is kept as far as it came.
                Ok(Some(Err(_))) | Ok(None) | Err(_) => break,
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

impl Sender {
    fn endpoint(&self, text: &str) -> Result<Endpoint, String> {
        if let Some(endpoint) = self.parsed.lock().expect("parsed lock").endpoints.get(text) {
            return Ok(endpoint.clone());
        }
        let endpoint = Endpoint::parse(text)?;
        let mut parsed = self.parsed.lock().expect("parsed lock");
        if parsed.endpoints.len() >= PARSED_MAX {
            parsed.endpoints.clear();
        }
        parsed.endpoints.insert(text.to_owned(), endpoint.clone());
        Ok(endpoint)
    }

    fn names(&self, prefix: &str) -> Result<Arc<Names>, String> {
        if let Some(names) = self.parsed.lock().expect("parsed lock").names.get(prefix) {
            return Ok(names.clone());
        }
        let names = Arc::new(Names::new(prefix)?);
        let mut parsed = self.parsed.lock().expect("parsed lock");
        if parsed.names.len() >= PARSED_MAX {
            parsed.names.clear();
        }
        parsed.names.insert(prefix.to_owned(), names.clone());
        Ok(names)
    }
}

/// The longest `Retry-After` reported: a year (the control plane caps it lower,
/// `--retry-after-max`).
const RETRY_AFTER_MAX: Duration = Duration::from_secs(366 * 24 * 3600);

/// Parses `Retry-After`: delay seconds or an HTTP date, at most [`RETRY_AFTER_MAX`].
pub fn retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs).min(RETRY_AFTER_MAX));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(std::time::SystemTime::now()).unwrap_or(Duration::ZERO).min(RETRY_AFTER_MAX))
}

fn not_allowed(scheme: &str) -> String {
    format!("blocked: {scheme} is not allowed (https only; --allow-http)")
}

/// Sorts a client error into an error kind, with a message for people. (The attempt's own
/// deadline is not among them; the kernel's, a connect or keep-alive that timed out, is.)
fn classify(e: &hyper_util::client::legacy::Error) -> (ErrorKind, String) {
    // A failed connection's outer text ("client error (Connect)") says no more than its kind.
    let mut source: Option<&(dyn std::error::Error + 'static)> =
        if e.is_connect() { std::error::Error::source(e).or(Some(e)) } else { Some(e) };
    let mut chain = Vec::new();
    while let Some(s) = source {
        if let Some(egress) = s.downcast_ref::<EgressError>() {
            return match egress {
                EgressError::Blocked(_) => (ErrorKind::Blocked, egress.to_string()),
                EgressError::Dns(_) => (ErrorKind::Dns, egress.to_string()),
            };
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::TimedOut
        {
            return (ErrorKind::Timeout, format!("timed out: {io}"));
        }
        if s.downcast_ref::<rustls::Error>().is_some() {
            return (ErrorKind::Tls, format!("tls: {s}"));
        }
        chain.push(s.to_string());
        source = s.source();
    }
    let text = chain.join(": ");
    if text.contains("certificate") || text.contains("tls") || text.contains("TLS") {
        (ErrorKind::Tls, text)
    } else if e.is_connect() {
        (ErrorKind::Connect, text)
    } else {
        (ErrorKind::Protocol, text)
    }
}

/// Herald's own header names under one prefix (`X-CloudThinker` unless the webhook sets
/// another), parsed once and kept by the [`Sender`].
pub struct Names {
    signature: HeaderName,
    signature_next: HeaderName,
    event: HeaderName,
    event_id: HeaderName,
    delivery: HeaderName,
    attempt: HeaderName,
    user_agent: HeaderValue,
}

impl Names {
    /// The names under `prefix`; an error names the header that cannot be formed.
    pub fn new(prefix: &str) -> Result<Names, String> {
        let name = |suffix: &str| {
            let name = format!("{prefix}-{suffix}");
            HeaderName::from_bytes(name.as_bytes()).map_err(|e| format!("header {name}: {e}"))
        };
        Ok(Names {
            signature: name("Signature")?,
            signature_next: name("Signature-Next")?,
            event: name("Event")?,
            event_id: name("Event-Id")?,
            delivery: name("Delivery")?,
            attempt: name("Attempt")?,
            user_agent: HeaderValue::try_from(format!("Herald/{}", herald_shared::VERSION))
                .map_err(|e| format!("header user-agent: {e}"))?,
        })
    }
}

/// The headers of a delivery, and the names of its custom headers (masked in the attempt log).
pub fn headers(job: &proto::Job, names: &Names, unix_now: i64) -> Result<(HeaderMap, Vec<HeaderName>), String> {
    let value = |name: &str, text: &str| HeaderValue::from_str(text).map_err(|e| format!("header {name}: {e}"));
    let default = proto::Signing::default();
    let signing = job.signing.as_ref().unwrap_or(&default);
    let mut map = HeaderMap::with_capacity(12 + job.headers.len());
    map.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    map.insert(http::header::USER_AGENT, names.user_agent.clone());
    let signature = signature::cloudthinker(&signing.secret, &job.body);
    map.insert(names.signature.clone(), HeaderValue::try_from(signature).map_err(|e| e.to_string())?);
    map.insert(names.event.clone(), value(names.event.as_str(), &job.event_type)?);
    map.insert(names.event_id.clone(), value(names.event_id.as_str(), &job.event_id)?);
    map.insert(names.delivery.clone(), value(names.delivery.as_str(), &job.delivery_id)?);
    map.insert(names.attempt.clone(), HeaderValue::from(job.attempt));
    if !signing.next_secret.is_empty() {
        let next = signature::cloudthinker(&signing.next_secret, &job.body);
        map.insert(names.signature_next.clone(), HeaderValue::try_from(next).map_err(|e| e.to_string())?);
    }
    if !job.traceparent.is_empty() {
        map.insert(HeaderName::from_static("traceparent"), value("traceparent", &job.traceparent)?);
    }
    if signing.scheme == SignatureScheme::StandardWebhooks as i32 {
        // During a rotation from a secret of another form (which only the CloudThinker scheme
        // can use), the new secret alone signs this way; a delivery fails only if no secret can.
        let keys: Vec<_> = [&signing.secret, &signing.next_secret]
            .into_iter()
            .filter(|s| !s.is_empty())
            .map(|s| signature::standard_key(s))
            .collect();
        if keys.iter().all(|k| k.is_err())
            && let Some(Err(e)) = keys.first()
        {
            return Err(format!("standard webhooks secret: {e}"));
        }
        let mut sigs = String::new();
        for key in keys.iter().flatten() {
            if !sigs.is_empty() {
                sigs.push(' ');
            }
            sigs.push_str(&signature::standard(key, &job.event_id, unix_now, &job.body));
        }
        map.insert(HeaderName::from_static("webhook-id"), value("webhook-id", &job.event_id)?);
        map.insert(HeaderName::from_static("webhook-timestamp"), HeaderValue::from(unix_now));
        map.insert(
            HeaderName::from_static("webhook-signature"),
            HeaderValue::try_from(sigs).map_err(|e| e.to_string())?,
        );
    }
    // Custom headers come last: `Content-Type` may be overridden, nothing else Herald sets can be
    // (the control plane refuses reserved names).
    let mut custom = Vec::with_capacity(job.headers.len());
    for (name, text) in &job.headers {
        let n = HeaderName::from_bytes(name.as_bytes()).map_err(|e| format!("header {name}: {e}"))?;
        let v = value(name, text)?;
        map.insert(n.clone(), v);
        custom.push(n);
    }
    Ok((map, custom))
}

/// The request headers as the attempt log shows them: sorted by (lowercase) name, the values of
/// `masked` replaced by `***`.
pub fn shown<'a>(map: &'a HeaderMap, masked: &[HeaderName]) -> Vec<(&'a str, Cow<'a, str>)> {
    let mut shown: Vec<_> = map
        .iter()
        .map(|(name, value)| {
            let value =
                if masked.contains(name) { Cow::Borrowed("***") } else { String::from_utf8_lossy(value.as_bytes()) };
            (name.as_str(), value)
        })
        .collect();
    shown.sort_by(|a, b| a.0.cmp(b.0));
    shown
}

/// Response headers sorted by name, each name once: a repeated name's values joined with `, `
/// in the order they came.
fn joined(map: &HeaderMap) -> Vec<(&str, Cow<'_, str>)> {
    let mut pairs: Vec<_> =
        map.iter().map(|(name, value)| (name.as_str(), String::from_utf8_lossy(value.as_bytes()))).collect();
    // Stable: a name's values keep their order.
    pairs.sort_by(|a, b| a.0.cmp(b.0));
    let mut out: Vec<(&str, Cow<'_, str>)> = Vec::with_capacity(pairs.len());
    for (name, value) in pairs {
        match out.last_mut() {
            Some((last, joined)) if *last == name => {
                let joined = joined.to_mut();
                joined.push_str(", ");
                joined.push_str(&value);
            }
            _ => out.push((name, value)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the egress check and the connector see of a URL: the URL standard's reading of its
    /// host (so an address in any spelling is a literal, checked before connecting), the scheme in
    /// lower case, and never its credentials.
    #[test]
    fn endpoints_are_read_by_the_url_standard() {
        for (text, literal, uri) in [
            ("http://2130706433/hook", "127.0.0.1", "http://127.0.0.1/hook"),
            ("HTTP://0x7f.1:8080/a?b=c", "127.0.0.1", "http://127.0.0.1:8080/a?b=c"),
            ("https://[::ffff:7f00:1]/", "::ffff:127.0.0.1", "https://[::ffff:7f00:1]/"),
        ] {
            let e = Endpoint::parse(text).unwrap();
            assert_eq!(e.literal, Some(literal.parse().unwrap()), "{text}");
            assert_eq!(e.uri.to_string(), uri, "{text}");
        }
        let named = Endpoint::parse("https://Hooks.Example.com./in").unwrap();
        assert!(named.literal.is_none() && matches!(named.scheme, Scheme::Https));
        assert_eq!(named.uri.host(), Some("hooks.example.com."));
        assert!(matches!(Endpoint::parse("ftp://example.com/").unwrap().scheme, Scheme::Other(s) if s == "ftp"));
        for text in ["https://user:pw@example.com/", "https://user@example.com/", "https://:pw@example.com/"] {
            assert_eq!(
                Endpoint::parse(text).err().as_deref(),
                Some("credentials in the URL are not allowed"),
                "{text}"
            );
        }
        assert!(Endpoint::parse("not a url").is_err());
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(retry_after("120"), Some(Duration::from_secs(120)));
        assert_eq!(retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), Some(Duration::ZERO), "a past date means now");
        let future = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(3600));
        let d = retry_after(&future).unwrap();
        assert!(d > Duration::from_secs(3500) && d <= Duration::from_secs(3600), "{d:?}");
        assert_eq!(retry_after("soon"), None);
        assert_eq!(retry_after("99999999999999999999"), None, "past u64");
        assert_eq!(retry_after("99999999999999999"), Some(RETRY_AFTER_MAX));
        assert_eq!(retry_after("Fri, 31 Dec 9999 23:59:59 GMT"), Some(RETRY_AFTER_MAX));
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
        let (map, masked) = headers(&job, &Names::new("X-CloudThinker").unwrap(), 1_700_000_000).unwrap();
        let shown = shown(&map, &masked);
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
        let logged = |name: &str| shown.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_ref());
        assert_eq!(logged("authorization"), Some("***"));
        assert_eq!(logged("x-cloudthinker-attempt"), Some("2"));
        assert!(shown.windows(2).all(|w| w[0].0 < w[1].0), "sorted, each name once: {shown:?}");
        assert!(!map.contains_key("webhook-signature"));
        // As JSON, the same object the control plane stores.
        let json = herald_shared::headers::to_json(&shown);
        assert!(herald_shared::headers::is_object(&json), "sorted, each name once: {json}");
        assert!(json.contains(r#""authorization":"***""#) && !json.contains("Basic secret"), "{json}");
        // The map an older control plane gets holds the same pairs.
        let as_map: HashMap<String, String> = shown.iter().map(|(k, v)| ((*k).to_owned(), v.to_string())).collect();
        assert_eq!(as_map, herald_shared::headers::to_map(&json));
    }

    /// A webhook switched to Standard Webhooks during a rotation from a secret of another form:
    /// the new `whsec_` secret signs `webhook-signature` alone, the old one still signs
    /// `X-CloudThinker-Signature`; with no usable secret at all, the job fails by name.
    #[test]
    fn standard_webhooks_sign_with_the_secrets_that_can() {
        let whsec = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let mut job = proto::Job {
            event_id: "evt_1".into(),
            body: bytes::Bytes::from_static(br#"{"a":1}"#),
            signing: Some(proto::Signing {
                secret: "an-old-plain-secret-0123".into(),
                next_secret: whsec.into(),
                scheme: SignatureScheme::StandardWebhooks as i32,
                header_prefix: String::new(),
            }),
            ..Default::default()
        };
        let names = Names::new("X-CloudThinker").unwrap();
        let (map, _) = headers(&job, &names, 1_700_000_000).unwrap();
        let key = signature::standard_key(whsec).unwrap();
        let expected = signature::standard(&key, "evt_1", 1_700_000_000, br#"{"a":1}"#);
        assert_eq!(map["webhook-signature"], expected.as_str(), "the new secret alone");
        assert_eq!(
            map["X-CloudThinker-Signature"],
            signature::cloudthinker("an-old-plain-secret-0123", br#"{"a":1}"#).as_str()
        );
        job.signing.as_mut().unwrap().next_secret = String::new();
        let err = headers(&job, &names, 1_700_000_000).unwrap_err();
        assert!(err.starts_with("standard webhooks secret"), "{err}");
    }

    #[test]
    fn a_custom_content_type_is_sent_and_masked_and_odd_bytes_are_shown_lossily() {
        let job = proto::Job {
            body: bytes::Bytes::from_static(b"{}"),
            headers: [("Content-Type".to_owned(), "application/vnd.custom+json".to_owned())].into(),
            ..Default::default()
        };
        let (mut map, masked) = headers(&job, &Names::new("X-CloudThinker").unwrap(), 1_700_000_000).unwrap();
        assert_eq!(map["content-type"], "application/vnd.custom+json", "the custom value is sent");
        map.insert("x-odd", HeaderValue::from_bytes(b"caf\xe9").unwrap());
        let json = herald_shared::headers::to_json(&shown(&map, &masked));
        assert!(json.contains(r#""content-type":"***""#), "{json}");
        assert!(json.contains("\"x-odd\":\"caf\u{fffd}\""), "{json}");
        assert!(herald_shared::headers::is_object(&json), "{json}");
    }

    #[test]
    fn repeated_response_headers_are_joined_in_order() {
        let mut map = HeaderMap::new();
        // Enough values of one name among others that an unstable sort would reorder them.
        for i in 0..40i32 {
            map.append("set-cookie", HeaderValue::from(i));
            map.append(HeaderName::from_bytes(format!("x-{i:02}").as_bytes()).unwrap(), HeaderValue::from(i));
        }
        map.append("content-length", HeaderValue::from_static("2"));
        let joined = joined(&map);
        assert_eq!(joined.len(), 42);
        assert_eq!(joined[0], ("content-length", Cow::Borrowed("2")));
        let cookies = (0..40).map(|i| i.to_string()).collect::<Vec<_>>().join(", ");
        assert_eq!(joined[1], ("set-cookie", Cow::Owned(cookies)));
        assert!(joined.windows(2).all(|w| w[0].0 < w[1].0), "sorted, each name once");
    }
}
