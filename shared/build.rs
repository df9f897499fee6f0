//! Compiles `proto/herald/v1/*.proto` with the pure-Rust `protox` compiler, so building needs no `protoc`.
//! The encoded descriptor set is kept for gRPC reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let files =
        ["herald/v1/webhook.proto", "herald/v1/event.proto", "herald/v1/delivery.proto", "herald/v1/agent.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }
    let fds = protox::compile(files, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("herald_descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .bytes(".herald.v1.Job.body")
        .codec_path("crate::codec::HeraldCodec")
        .compile_fds(fds)?;
    Ok(())
}
