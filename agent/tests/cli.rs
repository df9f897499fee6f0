//! The `herald-agent` command line. (Its presence also makes `cargo test` build the binary.)

use std::process::Command;

#[test]
fn a_control_plane_and_a_token_are_required() {
    let out = Command::new(env!("CARGO_BIN_EXE_herald-agent")).env_clear().output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--control-plane") && err.contains("--token"), "{err}");
}
