//! Pieces shared by the control plane, the agent and the tests: the generated gRPC contract, the
//! event envelope, ids, the signature schemes, the event-type catalog and the retry schedule.
//!
//! Apart from `telemetry` (which installs the log subscriber and the trace exporter), everything
//! here is a pure function of its inputs, so the agent and the control plane can never disagree
//! on what an envelope, a signature or an address is.

pub mod addr;
pub mod catalog;
pub mod codec;
pub mod envelope;
pub mod headers;
pub mod ids;
pub mod memory;
pub mod retry;
pub mod signature;
pub mod telemetry;

/// Generated protobuf messages and gRPC stubs of package `herald.v1`.
pub mod proto {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("herald.v1");

    /// Encoded `FileDescriptorSet` of the Herald API, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("herald_descriptor");
}

/// The class of an attempt for metrics: its HTTP status class (`2xx` … `5xx`), or its error
/// kind when there was no answer (`timeout`, `connect`, `blocked`, …). A bounded label set.
pub fn attempt_class(status: u32, error_kind: proto::ErrorKind) -> String {
    match status {
        100..=599 => format!("{}xx", status / 100),
        _ => error_kind.as_str_name().trim_start_matches("ERROR_KIND_").to_ascii_lowercase(),
    }
}

/// The version every binary reports (`User-Agent: Herald/<version>`, agent hello).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
