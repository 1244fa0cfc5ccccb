//! Who may join: TLS for all traffic and a join token, with the real binaries.

use crate::support::{binary, init_logging, mnist_dir};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::{path::Path, process::Command};
use tracing::info;

/// Writes `ca.pem`, and `server.pem` / `server.key` signed by it for localhost and 127.0.0.1.
fn write_certificates(dir: &Path) -> anyhow::Result<()> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "lockstep test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    std::fs::write(dir.join("ca.pem"), ca.self_signed(&ca_key)?.pem())?;
    let issuer = Issuer::new(ca, ca_key);

    let mut server = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])?;
    server
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate()?;
    std::fs::write(
        dir.join("server.pem"),
        server.signed_by(&key, &issuer)?.pem(),
    )?;
    std::fs::write(dir.join("server.key"), key.serialize_pem())?;
    Ok(())
}

/// `coordinator --workers 2` serving TLS with a join token: the workers it spawns connect
/// over TLS with the token (handed over in their environment) and the job completes.
#[test]
fn a_job_runs_over_tls_with_a_join_token() -> anyhow::Result<()> {
    init_logging();
    let pki = tempfile::tempdir()?;
    write_certificates(pki.path())?;
    let run_dir = tempfile::tempdir()?;
    info!("--- train over TLS");
    let output = Command::new(binary("coordinator"))
        .args(["--workers", "2", "--model", "softmax", "--epochs", "1"])
        .arg("--data-dir")
        .arg(mnist_dir())
        .arg("--run-dir")
        .arg(run_dir.path())
        .arg("--tls-cert")
        .arg(pki.path().join("server.pem"))
        .arg("--tls-key")
        .arg(pki.path().join("server.key"))
        .arg("--tls-ca")
        .arg(pki.path().join("ca.pem"))
        .env("LOCKSTEP_JOIN_TOKEN", "correct-horse-battery-staple")
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "coordinator failed:\n{stderr}");
    assert!(
        !stderr.contains("correct-horse-battery-staple"),
        "the token reached a log line"
    );
    let metrics = std::fs::read_to_string(run_dir.path().join("metrics.jsonl"))?;
    let record: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap_or(""))?;
    assert_eq!(record["samples"], 60_000);
    assert!(
        record["test_accuracy"].as_f64().unwrap_or(0.0) > 0.85,
        "{record}"
    );
    Ok(())
}

/// TLS flags that cannot work are refused before anything starts, naming the problem.
#[test]
fn unusable_tls_and_token_settings_are_named() -> anyhow::Result<()> {
    init_logging();
    let pki = tempfile::tempdir()?;
    write_certificates(pki.path())?;
    let coordinator = |args: &[&str]| -> anyhow::Result<String> {
        let output = Command::new(binary("coordinator"))
            .args(["--external-workers", "--listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(mnist_dir())
            .args(args)
            .output()?;
        assert!(!output.status.success(), "{args:?} was accepted");
        Ok(String::from_utf8_lossy(&output.stderr).into_owned())
    };
    let ca = pki.path().join("ca.pem");
    let ca = ca.to_str().expect("a UTF-8 temporary path");

    info!("--- a certificate file that is not PEM");
    let stderr = coordinator(&["--tls-cert", "/dev/null", "--tls-key", ca])?;
    assert!(stderr.contains("/dev/null"), "{stderr}");

    info!("--- a token given twice");
    let stderr = coordinator(&["--join-token", "a", "--join-token-file", ca])?;
    assert!(stderr.contains("--join-token-file"), "{stderr}");

    info!("--- a worker told to use TLS over http://");
    let output = Command::new(binary("worker"))
        .args(["--coordinator", "http://127.0.0.1:1", "--tls-ca", ca])
        .arg("--data-dir")
        .arg(mnist_dir())
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("https://"), "{stderr}");
    Ok(())
}

/// `coordinator status` reaches a coordinator that serves TLS with a join token the way a
/// worker does: with the CA and the token, and only with them. The job waits for an external
/// worker that never comes, so it is still running whenever the command asks.
#[test]
fn status_over_tls_needs_the_ca_and_the_token() -> anyhow::Result<()> {
    use crate::procs::{Procs, field};
    init_logging();
    let pki = tempfile::tempdir()?;
    write_certificates(pki.path())?;
    let run_dir = tempfile::tempdir()?;
    let mut procs = Procs::new();
    let mut command = Command::new(binary("coordinator"));
    command
        .args([
            "--workers",
            "1",
            "--external-workers",
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(mnist_dir())
        .arg("--run-dir")
        .arg(run_dir.path())
        .arg("--tls-cert")
        .arg(pki.path().join("server.pem"))
        .arg("--tls-key")
        .arg(pki.path().join("server.key"))
        .env("LOCKSTEP_JOIN_TOKEN", "correct-horse-battery-staple");
    let coordinator = procs.spawn("coordinator", command);
    let line = coordinator.log.wait_for("coordinator listening");
    let addr = field(&line.text, "addr").expect("an addr field");
    let port = addr.rsplit(':').next().expect("a port");
    let url = format!("https://localhost:{port}");
    let status = |token: Option<&str>, ca: bool| -> anyhow::Result<(bool, String)> {
        let mut command = Command::new(binary("coordinator"));
        command.args(["status", "--coordinator", &url]);
        if ca {
            command.arg("--tls-ca").arg(pki.path().join("ca.pem"));
        }
        if let Some(token) = token {
            command.env("LOCKSTEP_JOIN_TOKEN", token);
        }
        let output = command.output()?;
        let text = String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr);
        Ok((output.status.success(), text))
    };

    info!("--- with the CA and the token");
    let (ok, text) = status(Some("correct-horse-battery-staple"), true)?;
    assert!(ok, "{text}");
    assert!(text.contains("waiting for workers"), "{text}");

    info!("--- without the token, with a wrong one, without the CA");
    let (ok, text) = status(None, true)?;
    assert!(!ok && text.contains("missing join token"), "{text}");
    let (ok, text) = status(Some("wrong"), true)?;
    assert!(!ok && text.contains("wrong join token"), "{text}");
    let (ok, text) = status(Some("correct-horse-battery-staple"), false)?;
    assert!(!ok && text.contains("--tls-ca"), "{text}");
    Ok(())
}
