//! The `herald` command line refuses bad flags with a clear message before touching anything.
//! (Its presence also makes `cargo test` build the `herald` binary that `herald-tests` runs.)

use std::process::Command;

#[test]
fn serve_without_a_secret_key_explains_itself() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .env_remove("HERALD_SECRET_KEY")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--secret-key is required"), "{err}");
    assert!(!dir.path().join("herald.db").exists(), "nothing is created before the flags are valid");
}

#[test]
fn bad_retry_schedule_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--retry-schedule", "0s,soon", "--secret-key", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("soon"));
}
