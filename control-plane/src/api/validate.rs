//! Validation of webhook configuration. Each rule fails with the field it concerns; the rules are
//! pure functions so that create and update (merged with the stored state) apply the same ones.

use std::collections::BTreeMap;

use herald_shared::proto;
use herald_shared::{catalog, signature};

use super::FieldError;
use super::json;
use crate::store::webhooks::WebhookSpec;

/// The value shown instead of a custom header value or transform variable; sent back unchanged in
/// an update, it keeps the stored value.
pub const MASK: &str = "***";

/// What validation depends on in the server's configuration.
#[derive(Debug, Clone)]
pub struct Rules {
    pub allow_http: bool,
    /// Ranges whose literal addresses a URL may name (`--allow-cidr`).
    pub allow_cidr: Vec<ipnet::IpNet>,
    pub header_prefix: String,
}

const MAX_URL: usize = 2048;
const MAX_NAME: usize = 128;
const MAX_DESCRIPTION: usize = 1024;
const MAX_EVENTS: usize = 100;
const MAX_HEADERS: usize = 64;
const MAX_HEADER_VALUE: usize = 8192;
const MAX_VARS: usize = 64;
const MAX_VAR_VALUE: usize = 4096;
const MAX_TRANSFORM: usize = 64 * 1024;
const MAX_TIMEOUT_MS: i64 = 60_000;
/// Header names that Herald sets itself or that would break the request.
const RESERVED_HEADERS: &[&str] =
    &["traceparent", "tracestate", "host", "content-length", "transfer-encoding", "connection"];

fn f(prefix: &str, name: &str) -> String {
    if prefix.is_empty() { name.to_owned() } else { format!("{prefix}.{name}") }
}

pub fn name(v: &str, field: &str) -> Result<String, FieldError> {
    let len = v.chars().count();
    if v.trim().is_empty() {
        return Err(FieldError::new(field, "is required"));
    }
    if len > MAX_NAME {
        return Err(FieldError::new(field, format!("must be at most {MAX_NAME} characters, not {len}")));
    }
    if v.chars().any(char::is_control) {
        return Err(FieldError::new(field, "must not contain control characters"));
    }
    Ok(v.to_owned())
}

pub fn url(v: &str, rules: &Rules, field: &str) -> Result<String, FieldError> {
    if v.is_empty() {
        return Err(FieldError::new(field, "is required"));
    }
    if v.len() > MAX_URL {
        return Err(FieldError::new(field, format!("must be at most {MAX_URL} characters, not {}", v.len())));
    }
    if !v.is_ascii() || v.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(FieldError::new(
            field,
            "must be ASCII without spaces or control characters (use punycode hosts and percent-encoding)",
        ));
    }
    let parsed = url::Url::parse(v).map_err(|e| FieldError::new(field, format!("is not an absolute URL: {e}")))?;
    match parsed.scheme() {
        "https" => {}
        "http" if rules.allow_http => {}
        "http" => {
            return Err(FieldError::new(field, "must use https (plain http needs a server started with --allow-http)"));
        }
        other => return Err(FieldError::new(field, format!("must use https, not {other}"))),
    }
    // The WHATWG parser forgives `https:///host` and backslashes; a webhook URL must be plain.
    let after_scheme = &v[parsed.scheme().len() + 1..];
    let authority = after_scheme.strip_prefix("//").unwrap_or("/");
    if v.contains('\\')
        || authority.is_empty()
        || authority.starts_with('/')
        || parsed.host_str().is_none_or(str::is_empty)
    {
        return Err(FieldError::new(field, "must have a host"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(FieldError::new(field, "must not contain user-info (put credentials in a header)"));
    }
    // Names are vetted by the agent when it resolves them; a literal address can be judged now.
    let literal: Option<std::net::IpAddr> = match parsed.host() {
        Some(url::Host::Ipv4(ip)) => Some(ip.into()),
        Some(url::Host::Ipv6(ip)) => Some(ip.into()),
        _ => None,
    };
    if let Some(ip) = literal
        && !herald_shared::addr::permitted(&rules.allow_cidr, ip)
    {
        return Err(FieldError::new(
            field,
            format!("must not name the non-global address {ip} (private, loopback, link-local, reserved, …)"),
        ));
    }
    Ok(v.to_owned())
}

pub fn events(v: &[String], field: &str) -> Result<Vec<String>, FieldError> {
    if v.is_empty() {
        return Err(FieldError::new(field, "must name at least one event type (or `*`)"));
    }
    if v.len() > MAX_EVENTS {
        return Err(FieldError::new(field, format!("must have at most {MAX_EVENTS} entries")));
    }
    let mut out: Vec<String> = Vec::with_capacity(v.len());
    for (i, e) in v.iter().enumerate() {
        if !catalog::is_valid_pattern(e) {
            return Err(FieldError::new(
                format!("{field}[{i}]"),
                format!("{e:?} is not an event type, `group.*` or `*` (see ListEventTypes)"),
            ));
        }
        if !out.contains(e) {
            out.push(e.clone());
        }
    }
    Ok(out)
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

pub fn headers(
    v: &std::collections::HashMap<String, String>,
    current: &BTreeMap<String, String>,
    rules: &Rules,
    field: &str,
) -> Result<BTreeMap<String, String>, FieldError> {
    if v.len() > MAX_HEADERS {
        return Err(FieldError::new(field, format!("must have at most {MAX_HEADERS} entries")));
    }
    let prefix = format!("{}-", rules.header_prefix.to_ascii_lowercase());
    let mut out = BTreeMap::new();
    let mut names: Vec<&String> = v.keys().collect();
    names.sort();
    for name in names {
        let value = &v[name];
        let here = format!("{field}[{name:?}]");
        if name.is_empty() || name.len() > 256 || !name.bytes().all(is_tchar) {
            return Err(FieldError::new(here, "is not a valid header name"));
        }
        let lower = name.to_ascii_lowercase();
        if RESERVED_HEADERS.contains(&lower.as_str())
            || lower.starts_with(&prefix)
            || lower.starts_with("x-cloudthinker-")
            || lower.starts_with("webhook-")
        {
            return Err(FieldError::new(here, format!("{name} is reserved: Herald sets it")));
        }
        if value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
            return Err(FieldError::new(here, "must not contain CR, LF or NUL"));
        }
        if value.len() > MAX_HEADER_VALUE || !value.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b)) {
            return Err(FieldError::new(here, format!("must be printable ASCII, at most {MAX_HEADER_VALUE} bytes")));
        }
        if out.keys().any(|k: &String| k.eq_ignore_ascii_case(name)) {
            return Err(FieldError::new(here, "is given twice (header names are case-insensitive)"));
        }
        let value = if value == MASK {
            current
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
                .ok_or_else(|| FieldError::new(&here, "`***` keeps a stored value, but this header has none"))?
        } else {
            value.clone()
        };
        out.insert(name.clone(), value);
    }
    Ok(out)
}

pub fn zone(v: &str, field: &str) -> Result<String, FieldError> {
    if v.is_empty() {
        return Ok("default".to_owned());
    }
    let ok = v.len() <= 63
        && v.as_bytes()[0].is_ascii_alphanumeric()
        && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(v.to_owned())
    } else {
        Err(FieldError::new(field, "must be 1 to 63 of letters, digits, `-` and `_`, starting with a letter or digit"))
    }
}

/// Checks a user-given secret against the scheme it must key.
pub fn secret(v: &str, scheme: i32, field: &str) -> Result<(), FieldError> {
    let len = v.chars().count();
    if len < 16 {
        return Err(FieldError::new(field, format!("must be at least 16 characters, not {len}")));
    }
    if len > 256 || v.chars().any(char::is_control) {
        return Err(FieldError::new(field, "must be at most 256 printable characters"));
    }
    if scheme == proto::SignatureScheme::StandardWebhooks as i32 {
        signature::standard_key(v).map_err(|e| FieldError::new(field, e.to_string()))?;
    }
    Ok(())
}

pub fn scheme(v: i32, field: &str) -> Result<i32, FieldError> {
    match proto::SignatureScheme::try_from(v) {
        Ok(proto::SignatureScheme::Unspecified) => Ok(proto::SignatureScheme::Cloudthinker as i32),
        Ok(s) => Ok(s as i32),
        Err(_) => Err(FieldError::new(field, format!("{v} is not a SignatureScheme value"))),
    }
}

pub fn transform(v: Option<&prost_types::Value>, field: &str) -> Result<Option<serde_json::Value>, FieldError> {
    let Some(v) = v else { return Ok(None) };
    if v.kind.is_none() || matches!(v.kind, Some(prost_types::value::Kind::NullValue(_))) {
        return Ok(None);
    }
    let j = json::to_json(v, 0)
        .ok_or_else(|| FieldError::new(field, format!("nests deeper than {} levels or holds NaN", json::MAX_DEPTH)))?;
    if j.to_string().len() > MAX_TRANSFORM {
        return Err(FieldError::new(field, format!("must be at most {MAX_TRANSFORM} bytes as JSON")));
    }
    check_templates(&j, field)?;
    Ok(Some(j))
}

/// Compiles every string leaf of a transform, naming the leaf that fails.
fn check_templates(j: &serde_json::Value, field: &str) -> Result<(), FieldError> {
    crate::transform::check(j, field).map_err(|e| FieldError::new(e.path, format!("does not compile: {}", e.message)))
}

pub fn transform_vars(
    v: &std::collections::HashMap<String, String>,
    current: &BTreeMap<String, String>,
    field: &str,
) -> Result<BTreeMap<String, String>, FieldError> {
    if v.len() > MAX_VARS {
        return Err(FieldError::new(field, format!("must have at most {MAX_VARS} entries")));
    }
    let mut out = BTreeMap::new();
    for (k, value) in v {
        let here = format!("{field}[{k:?}]");
        let ok_name = !k.is_empty()
            && k.len() <= 64
            && (k.as_bytes()[0].is_ascii_alphabetic() || k.as_bytes()[0] == b'_')
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !ok_name {
            return Err(FieldError::new(here, "names must be identifiers: letters, digits and `_`"));
        }
        if value.len() > MAX_VAR_VALUE {
            return Err(FieldError::new(here, format!("must be at most {MAX_VAR_VALUE} bytes")));
        }
        let value = if value == MASK {
            current
                .get(k)
                .cloned()
                .ok_or_else(|| FieldError::new(&here, "`***` keeps a stored value, but there is none"))?
        } else {
            value.clone()
        };
        out.insert(k.clone(), value);
    }
    Ok(out)
}

pub fn timeout(v: Option<&prost_types::Duration>, field: &str) -> Result<Option<i64>, FieldError> {
    let Some(d) = v else { return Ok(None) };
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return Err(FieldError::new(field, "must be a positive duration"));
    }
    let ms = d.seconds.saturating_mul(1000).saturating_add(i64::from(d.nanos / 1_000_000));
    if ms <= 0 {
        return Err(FieldError::new(field, "must be at least 1ms (leave it absent for the default of 30s)"));
    }
    if ms > MAX_TIMEOUT_MS {
        return Err(FieldError::new(field, "must be at most 60s"));
    }
    Ok(Some(ms))
}

pub fn positive(v: Option<u32>, field: &str) -> Result<Option<i64>, FieldError> {
    match v {
        Some(0) => Err(FieldError::new(field, "must be positive (leave it absent for no limit)")),
        other => Ok(other.map(i64::from)),
    }
}

pub fn description(v: &str, field: &str) -> Result<String, FieldError> {
    let len = v.chars().count();
    if len > MAX_DESCRIPTION {
        return Err(FieldError::new(field, format!("must be at most {MAX_DESCRIPTION} characters, not {len}")));
    }
    Ok(v.to_owned())
}

/// A new webhook's configuration from a create request (`prefix` is `webhook`).
pub fn new_spec(w: &proto::Webhook, rules: &Rules, prefix: &str) -> Result<WebhookSpec, FieldError> {
    let empty = BTreeMap::new();
    let signature_scheme = scheme(w.signature_scheme, &f(prefix, "signature_scheme"))?;
    Ok(WebhookSpec {
        name: name(&w.name, &f(prefix, "name"))?,
        url: url(&w.url, rules, &f(prefix, "url"))?,
        events: events(&w.events, &f(prefix, "events"))?,
        headers: headers(&w.headers, &empty, rules, &f(prefix, "headers"))?,
        active: w.active.unwrap_or(true),
        zone: zone(&w.zone, &f(prefix, "zone"))?,
        transform: transform(w.transform.as_ref(), &f(prefix, "transform"))?,
        transform_vars: transform_vars(&w.transform_vars, &empty, &f(prefix, "transform_vars"))?,
        signature_scheme,
        timeout_ms: timeout(w.timeout.as_ref(), &f(prefix, "timeout"))?,
        rate_limit_per_second: positive(w.rate_limit_per_second, &f(prefix, "rate_limit_per_second"))?,
        max_in_flight: positive(w.max_in_flight, &f(prefix, "max_in_flight"))?,
        description: description(&w.description, &f(prefix, "description"))?,
    })
}

/// The paths `UpdateWebhook` accepts.
pub const UPDATABLE: &[&str] = &[
    "name",
    "url",
    "events",
    "headers",
    "active",
    "zone",
    "transform",
    "transform_vars",
    "signature_scheme",
    "timeout",
    "rate_limit_per_second",
    "max_in_flight",
    "description",
];

/// Checks an update mask before anything is read.
pub fn mask(paths: &[String]) -> Result<(), FieldError> {
    if paths.is_empty() {
        return Err(FieldError::new("update_mask", "must name at least one field to change"));
    }
    for (i, p) in paths.iter().enumerate() {
        if p == "secret" {
            return Err(FieldError::new(
                format!("update_mask.paths[{i}]"),
                "`secret` cannot be updated: use RotateWebhookSecret",
            ));
        }
        if !UPDATABLE.contains(&p.as_str()) {
            return Err(FieldError::new(
                format!("update_mask.paths[{i}]"),
                format!("{p:?} is not an updatable field (one of: {})", UPDATABLE.join(", ")),
            ));
        }
    }
    Ok(())
}

/// Applies the masked fields of `w` to `current` (whose secret is `secret`) and validates them.
pub fn apply_mask(
    mut spec: WebhookSpec,
    secret: &str,
    w: &proto::Webhook,
    paths: &[String],
    rules: &Rules,
) -> Result<WebhookSpec, FieldError> {
    let p = "webhook";
    for path in paths {
        match path.as_str() {
            "name" => spec.name = name(&w.name, &f(p, "name"))?,
            "url" => spec.url = url(&w.url, rules, &f(p, "url"))?,
            "events" => spec.events = events(&w.events, &f(p, "events"))?,
            "headers" => spec.headers = headers(&w.headers, &spec.headers, rules, &f(p, "headers"))?,
            "active" => spec.active = w.active.unwrap_or(true),
            "zone" => spec.zone = zone(&w.zone, &f(p, "zone"))?,
            "transform" => spec.transform = transform(w.transform.as_ref(), &f(p, "transform"))?,
            "transform_vars" => {
                spec.transform_vars = transform_vars(&w.transform_vars, &spec.transform_vars, &f(p, "transform_vars"))?
            }
            "signature_scheme" => {
                let s = scheme(w.signature_scheme, &f(p, "signature_scheme"))?;
                if s == proto::SignatureScheme::StandardWebhooks as i32 && signature::standard_key(secret).is_err() {
                    return Err(FieldError::new(
                        f(p, "signature_scheme"),
                        "the current secret is not a Standard Webhooks secret (whsec_ + base64 of 24 to 64 bytes): rotate it first",
                    ));
                }
                spec.signature_scheme = s;
            }
            "timeout" => spec.timeout_ms = timeout(w.timeout.as_ref(), &f(p, "timeout"))?,
            "rate_limit_per_second" => {
                spec.rate_limit_per_second = positive(w.rate_limit_per_second, &f(p, "rate_limit_per_second"))?
            }
            "max_in_flight" => spec.max_in_flight = positive(w.max_in_flight, &f(p, "max_in_flight"))?,
            "description" => spec.description = description(&w.description, &f(p, "description"))?,
            other => return Err(FieldError::new("update_mask", format!("{other:?} is not an updatable field"))),
        }
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules { allow_http: false, allow_cidr: Vec::new(), header_prefix: "X-CloudThinker".into() }
    }

    #[test]
    fn urls() {
        let r = rules();
        assert!(url("https://example.com/hook", &r, "url").is_ok());
        for bad in [
            "",
            "example.com/hook",
            "http://example.com",
            "ftp://example.com",
            "https://user:pw@example.com",
            "https://user@example.com",
            "https:///path",
            "https://exämple.com",
            "https://example.com/a b",
            "https://127.0.0.1/hook",
            "https://2130706433/hook",
            "https://10.0.0.1/hook",
            "https://169.254.169.254/latest/meta-data",
            "https://[::1]:8443/hook",
            "https://[::ffff:192.168.0.1]/hook",
            "https://[fd00::1]/hook",
        ] {
            assert_eq!(url(bad, &r, "webhook.url").unwrap_err().field, "webhook.url", "{bad}");
        }
        let long = format!("https://example.com/{}", "a".repeat(2030));
        assert!(url(&long, &r, "url").is_err());
        assert!(url("https://93.184.216.34/hook", &r, "url").is_ok(), "global literals are fine");
        let opened = Rules { allow_cidr: vec!["127.0.0.0/8".parse().unwrap()], ..rules() };
        assert!(url("https://127.0.0.1:8443/hook", &opened, "url").is_ok(), "--allow-cidr opens a range");
        assert!(url("https://[::1]:8443/hook", &opened, "url").is_err());
        assert!(url("http://example.com", &Rules { allow_http: true, ..r }, "url").is_ok());
    }

    #[test]
    fn header_rules() {
        let r = rules();
        let h = |k: &str, v: &str| std::collections::HashMap::from([(k.to_owned(), v.to_owned())]);
        let none = BTreeMap::new();
        assert!(headers(&h("Authorization", "Basic abc"), &none, &r, "headers").is_ok());
        assert!(headers(&h("Content-Type", "application/json"), &none, &r, "headers").is_ok());
        for (k, v) in [
            ("X-CloudThinker-Signature", "x"),
            ("x-cloudthinker-event", "x"),
            ("webhook-id", "x"),
            ("Host", "x"),
            ("traceparent", "x"),
            ("Content-Length", "1"),
            ("Transfer-Encoding", "chunked"),
            ("Connection", "close"),
            ("Bad Name", "x"),
            ("X-Ok", "a\r\nInjected: 1"),
            ("X-Ok", "a\0b"),
            ("", "x"),
        ] {
            let e = headers(&h(k, v), &none, &r, "webhook.headers").unwrap_err();
            assert!(e.field.starts_with("webhook.headers["), "{k}: {e:?}");
        }
        let stored = BTreeMap::from([("Authorization".to_owned(), "Basic old".to_owned())]);
        let kept = headers(&h("Authorization", MASK), &stored, &r, "headers").unwrap();
        assert_eq!(kept["Authorization"], "Basic old");
    }

    #[test]
    fn other_rules() {
        assert!(name("", "name").is_err());
        assert!(name(&"n".repeat(129), "name").is_err());
        assert!(name(&"é".repeat(128), "name").is_ok());
        assert!(events(&[], "events").is_err());
        assert_eq!(events(&["incident.*".into(), "nope".into()], "events").unwrap_err().field, "events[1]");
        assert_eq!(zone("", "zone").unwrap(), "default");
        assert!(zone("eu-west_1", "zone").is_ok());
        assert!(zone("eu west", "zone").is_err());
        assert!(zone("-eu", "zone").is_err());
        assert!(secret("short", 1, "secret").is_err());
        assert!(secret("a-long-enough-secret", 1, "secret").is_ok());
        assert!(secret("a-long-enough-secret", 2, "secret").is_err());
        assert!(scheme(7, "signature_scheme").is_err());
        assert_eq!(scheme(0, "s").unwrap(), 1);
        assert!(positive(Some(0), "max_in_flight").is_err());
        assert_eq!(positive(None, "max_in_flight").unwrap(), None);
        assert!(timeout(Some(&prost_types::Duration { seconds: 61, nanos: 0 }), "timeout").is_err());
        assert!(timeout(Some(&prost_types::Duration { seconds: 0, nanos: 0 }), "timeout").is_err());
        assert_eq!(timeout(Some(&prost_types::Duration { seconds: 5, nanos: 0 }), "timeout").unwrap(), Some(5000));
        assert!(mask(&[]).is_err());
        assert!(mask(&["secret".into()]).is_err());
        assert!(mask(&["nonsense".into()]).is_err());
        assert!(mask(&["name".into(), "active".into()]).is_ok());
        let t = |j: serde_json::Value| transform(Some(&json::from_json(&j)), "webhook.transform");
        assert!(t(serde_json::json!({"text": "New {{ type }}: {{ data.title }}"})).unwrap().is_some());
        assert_eq!(t(serde_json::json!({"text": "{{ unclosed"})).unwrap_err().field, "webhook.transform.text");
        assert_eq!(t(serde_json::json!({"a": [1, "{% if %}"]})).unwrap_err().field, "webhook.transform.a[1]");
    }
}
