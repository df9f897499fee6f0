//! The gRPC edge: the only place that touches generated protobuf types. Requests are validated
//! and converted to domain types here, once; store errors become statuses here, in one place.

pub mod agents;
pub mod deliveries;
pub mod events;
pub mod json;
pub mod validate;
pub mod webhooks;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::store::StoreError;

/// An invalid field: answered as INVALID_ARGUMENT naming the field, in the message and in a
/// `google.rpc.BadRequest` detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError { field: field.into(), message: message.into() }
    }
}

impl From<FieldError> for Status {
    fn from(e: FieldError) -> Status {
        invalid_argument(&e.field, &e.message)
    }
}

/// INVALID_ARGUMENT naming `field`.
pub fn invalid_argument(field: &str, message: &str) -> Status {
    Status::with_error_details(
        Code::InvalidArgument,
        format!("{field}: {message}"),
        ErrorDetails::with_bad_request_violation(field, message),
    )
}

/// Runs a handler's write and what must follow its commit (the dispatcher told of a changed
/// webhook, watchers told, the dispatcher woken) on a task of its own. A caller that goes away
/// meanwhile (a deadline, a closed connection) drops the handler, and with it whatever the
/// handler had not done yet, while the writer commits the write anyway: a changed URL or secret
/// the dispatcher was never told of would be sent with the old one for as long as it stayed
/// cached. On a task of its own, all of it happens either way.
pub(crate) async fn detached<T, F>(work: F) -> Result<T, Status>
where
    T: Send + 'static,
    F: std::future::Future<Output = Result<T, Status>> + Send + 'static,
{
    tokio::spawn(work).await.unwrap_or_else(|e| {
        tracing::error!(error = %e, "a request's task failed");
        Err(Status::internal("internal error"))
    })
}

/// Maps a store error to the status users see. Internal errors are logged in full and answered
/// with a plain "internal error".
pub fn status_of(e: StoreError) -> Status {
    match e {
        StoreError::NotFound(what) => Status::not_found(format!("{what} not found")),
        StoreError::AlreadyExists { field, message } if !field.is_empty() => Status::with_error_details(
            Code::AlreadyExists,
            format!("{field}: {message}"),
            ErrorDetails::with_bad_request_violation(field, message),
        ),
        StoreError::AlreadyExists { .. } => Status::already_exists("already exists"),
        StoreError::Invalid { field, message } => invalid_argument(&field, &message),
        StoreError::Unavailable(detail) => {
            tracing::warn!(%detail, "database unavailable");
            Status::unavailable("database unavailable, retry later")
        }
        StoreError::Stalled(message) => {
            tracing::warn!(%message, "publish stalled");
            Status::unavailable(message)
        }
        StoreError::Internal(detail) => {
            tracing::error!(%detail, "internal error");
            Status::internal("internal error")
        }
    }
}

/// Opaque page tokens: `p1.` + base64url of the last id of the previous page.
pub mod page {
    use super::*;

    /// Default and largest page sizes.
    pub const DEFAULT: u64 = 100;
    pub const MAX: i32 = 1000;

    /// The page size to use, or the error naming `page_size`.
    pub fn size(requested: i32) -> Result<u64, FieldError> {
        match requested {
            0 => Ok(DEFAULT),
            n if (1..=MAX).contains(&n) => Ok(n as u64),
            _ => Err(FieldError::new("page_size", format!("must be between 0 and {MAX}"))),
        }
    }

    /// The token that continues after `last_id`.
    pub fn token(last_id: &str) -> String {
        format!("p1.{}", URL_SAFE_NO_PAD.encode(last_id))
    }

    /// The id a token continues after, or the error naming `page_token`.
    pub fn after(token: &str) -> Result<Option<String>, FieldError> {
        if token.is_empty() {
            return Ok(None);
        }
        let bad = || FieldError::new("page_token", "is not a token returned by this API");
        let encoded = token.strip_prefix("p1.").ok_or_else(bad)?;
        let raw = URL_SAFE_NO_PAD.decode(encoded).map_err(|_| bad())?;
        let id = String::from_utf8(raw).map_err(|_| bad())?;
        if !herald_shared::ids::is_valid_event_id(&id) {
            return Err(bad());
        }
        Ok(Some(id))
    }
}

/// Converts milliseconds since the epoch to a protobuf timestamp.
pub fn timestamp(millis: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: millis.div_euclid(1000), nanos: (millis.rem_euclid(1000) * 1_000_000) as i32 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_refuse_forgeries() {
        let t = page::token("wh_01jc0000000000000000000000");
        assert_eq!(page::after(&t).unwrap().as_deref(), Some("wh_01jc0000000000000000000000"));
        assert_eq!(page::after("").unwrap(), None);
        for bad in ["garbage", "p1.!!!", "p2.d2g", &format!("p1.{}", URL_SAFE_NO_PAD.encode("a' OR 1=1"))] {
            assert_eq!(page::after(bad).unwrap_err().field, "page_token", "{bad}");
        }
    }

    #[test]
    fn page_sizes() {
        assert_eq!(page::size(0).unwrap(), 100);
        assert_eq!(page::size(5).unwrap(), 5);
        assert!(page::size(-1).is_err());
        assert!(page::size(1001).is_err());
    }

    #[test]
    fn timestamps_convert() {
        let t = timestamp(1_705_314_600_250);
        assert_eq!((t.seconds, t.nanos), (1_705_314_600, 250_000_000));
    }
}
