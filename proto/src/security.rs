//! Who may join a job: a join token that every RPC must carry, and optional TLS (rustls) for
//! the connection itself, with client certificates for mutual TLS.
//!
//! The token answers "is this one of our workers?"; TLS answers "is this our coordinator, and
//! can anyone read or alter the parameters on the way?". Without TLS the token travels in
//! clear text, so it only keeps out processes that cannot watch the network.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::service::Interceptor;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use tonic::{Request, Status};

/// Metadata key that carries the token, as `Bearer <token>` (RFC 6750).
const AUTHORIZATION: &str = "authorization";

/// What went wrong while reading a join token or TLS material.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    /// A join token given directly (flag or environment) is unusable.
    #[error("join token {0}")]
    InvalidToken(TokenProblem),
    /// A join token read from a file is unusable.
    #[error("join token in {} {problem}", path.display())]
    InvalidTokenFile {
        /// The file the token came from.
        path: PathBuf,
        /// What is wrong with its contents.
        problem: TokenProblem,
    },
    /// Both ways of giving the token were used; which one wins would be a guess.
    #[error("both --join-token and --join-token-file are given; use one of them")]
    TokenGivenTwice,
    /// A file could not be read.
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        /// The role of the file, e.g. "TLS certificate".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why reading failed.
        source: io::Error,
    },
    /// A file that should be PEM text has no PEM block at all (DER, or the wrong file).
    #[error("{what} {} is not PEM (no `-----BEGIN` line)", path.display())]
    NotPem {
        /// The role of the file.
        what: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// A file has PEM blocks that cannot be decoded.
    #[error("{what} {} is not valid PEM: {detail}", path.display())]
    InvalidPem {
        /// The role of the file.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The decoder's complaint.
        detail: String,
    },
    /// A PEM file holds no `CERTIFICATE` block, e.g. a key given where a certificate belongs.
    #[error("{what} {} holds no certificate (no `-----BEGIN CERTIFICATE-----` block)", path.display())]
    NoCertificate {
        /// The role of the file.
        what: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// A PEM file holds no private key, e.g. a certificate given where the key belongs.
    #[error("{what} {} holds no private key (expected a PKCS#8, PKCS#1 or SEC1 PEM block)", path.display())]
    NoPrivateKey {
        /// The role of the file.
        what: &'static str,
        /// The file.
        path: PathBuf,
    },
}

/// Why a join token is unusable. Never contains the token itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenProblem {
    /// Nothing but whitespace: almost certainly an unset variable or an empty file.
    #[error("is empty or only whitespace")]
    Empty,
    /// A character that cannot travel in the `authorization` header. Spaces are refused too:
    /// proxies may trim or fold them, and the two sides would then disagree.
    #[error(
        "has a character at position {position} that an HTTP header cannot carry \
         (allowed: visible ASCII without spaces; use e.g. hex or base64)"
    )]
    Character {
        /// 1-based position of the first offending character.
        position: usize,
    },
}

/// A secret shared by the coordinator and its workers: a worker must present it on every RPC.
///
/// `Debug` prints `JoinToken(****)` so that the secret never reaches a log line, and equality
/// takes the same time wherever the first difference is.
#[derive(Clone)]
pub struct JoinToken(Arc<str>);

impl JoinToken {
    /// Checks that `token` is non-empty visible ASCII (no spaces), so it fits an HTTP header.
    pub fn new(token: String) -> Result<JoinToken, SecurityError> {
        check(&token).map_err(SecurityError::InvalidToken)?;
        Ok(JoinToken(token.into()))
    }

    /// Reads the token from a file, without the trailing newline that editors and
    /// `echo > file` add, and checks it as [`JoinToken::new`] does.
    pub fn from_file(path: &Path) -> Result<JoinToken, SecurityError> {
        let text = std::fs::read_to_string(path).map_err(|source| SecurityError::Read {
            what: "join token file",
            path: path.to_owned(),
            source,
        })?;
        let token = text.trim_end();
        check(token).map_err(|problem| SecurityError::InvalidTokenFile {
            path: path.to_owned(),
            problem,
        })?;
        Ok(JoinToken(token.into()))
    }

    /// The token from `--join-token` (or its environment variable) or from
    /// `--join-token-file`; `None` when neither is given, an error when both are.
    pub fn resolve(
        value: Option<String>,
        file: Option<PathBuf>,
    ) -> Result<Option<JoinToken>, SecurityError> {
        match (value, file) {
            (Some(_), Some(_)) => Err(SecurityError::TokenGivenTwice),
            (Some(value), None) => JoinToken::new(value).map(Some),
            (None, Some(file)) => JoinToken::from_file(&file).map(Some),
            (None, None) => Ok(None),
        }
    }

    /// The secret itself, to hand to a process this one starts (through its environment,
    /// where `ps` does not show it).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is this token, in time that does not depend on where they differ.
    fn matches(&self, presented: &[u8]) -> bool {
        constant_time_eq(self.0.as_bytes(), presented)
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JoinToken(****)")
    }
}

impl PartialEq for JoinToken {
    fn eq(&self, other: &JoinToken) -> bool {
        self.matches(other.0.as_bytes())
    }
}

impl Eq for JoinToken {}

fn check(token: &str) -> Result<(), TokenProblem> {
    if token.trim().is_empty() {
        return Err(TokenProblem::Empty);
    }
    match token.chars().position(|c| !c.is_ascii_graphic()) {
        Some(index) => Err(TokenProblem::Character {
            position: index + 1,
        }),
        None => Ok(()),
    }
}

/// Compares every byte up to the longer length, so that an attacker timing the answer learns
/// nothing about how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut difference = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        // black_box keeps the optimiser from turning the fold back into an early exit.
        difference = std::hint::black_box(difference | (x ^ y));
    }
    difference == 0
}

/// Server-side interceptor: with a token configured, refuses every request that does not carry
/// `authorization: Bearer <token>`; without one, lets everything through.
///
/// Use it as `CoordinatorServer::with_interceptor(service, ServerAuth::new(token))`.
#[derive(Debug, Clone)]
pub struct ServerAuth {
    token: Option<JoinToken>,
}

impl ServerAuth {
    /// An interceptor that requires `token`, or nothing when `None`.
    pub fn new(token: Option<JoinToken>) -> ServerAuth {
        ServerAuth { token }
    }

    fn problem(token: &JoinToken, metadata: &MetadataMap) -> Option<&'static str> {
        let Some(value) = metadata.get(AUTHORIZATION) else {
            return Some(
                "missing join token: this coordinator requires `authorization: Bearer <token>` \
                 (give the worker --join-token or --join-token-file)",
            );
        };
        // The scheme is case-insensitive (RFC 9110); the token itself is not.
        let presented = value.as_encoded_bytes();
        let scheme = b"bearer ";
        if presented.len() < scheme.len() || !presented[..scheme.len()].eq_ignore_ascii_case(scheme)
        {
            return Some("malformed authorization metadata: expected `Bearer <token>`");
        }
        if !token.matches(&presented[scheme.len()..]) {
            return Some("wrong join token");
        }
        None
    }
}

impl Interceptor for ServerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(token) = &self.token else {
            return Ok(request);
        };
        match ServerAuth::problem(token, request.metadata()) {
            None => Ok(request),
            Some(problem) => {
                let peer = request
                    .remote_addr()
                    .map_or_else(|| "unknown".to_owned(), |addr| addr.to_string());
                tracing::warn!(%peer, "rejected a request: {problem}");
                Err(Status::unauthenticated(problem))
            }
        }
    }
}

/// Client-side interceptor: adds `authorization: Bearer <token>` to every request when a token
/// is configured.
///
/// Use it as `CoordinatorClient::with_interceptor(channel, ClientAuth::new(token))`.
#[derive(Debug, Clone)]
pub struct ClientAuth {
    header: Option<AsciiMetadataValue>,
}

impl ClientAuth {
    /// An interceptor that presents `token`, or nothing when `None`.
    pub fn new(token: Option<JoinToken>) -> ClientAuth {
        let header = token.map(|token| {
            let mut header = AsciiMetadataValue::try_from(format!("Bearer {}", token.0))
                .expect("a JoinToken is visible ASCII, which a header value can carry");
            // Sensitive values are kept out of HPACK's table (and out of tonic's Debug output).
            header.set_sensitive(true);
            header
        });
        ClientAuth { header }
    }
}

impl Interceptor for ClientAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(header) = &self.header {
            request.metadata_mut().insert(AUTHORIZATION, header.clone());
        }
        Ok(request)
    }
}

/// TLS for the coordinator's server, from PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    /// The server's certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key of the leaf certificate.
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by this CA (mutual TLS).
    pub client_ca: Option<PathBuf>,
}

impl ServerTls {
    /// Reads and checks the files, so that a wrong path or file fails at start-up with its
    /// name rather than at the first handshake.
    pub fn load(&self) -> Result<ServerTlsConfig, SecurityError> {
        let cert = read_certificates("TLS certificate", &self.cert)?;
        let key = read_private_key("TLS private key", &self.key)?;
        let mut config = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
        if let Some(client_ca) = &self.client_ca {
            let ca = read_certificates("client CA certificate", client_ca)?;
            // tonic requires a client certificate whenever a client CA is set.
            config = config.client_ca_root(Certificate::from_pem(ca));
        }
        Ok(config)
    }
}

/// TLS for a worker's connection to the coordinator, from PEM files. Only the given CA is
/// trusted, never the system's roots.
///
/// tonic uses TLS only for `https://` endpoints: with an `http://` address the configuration
/// is silently ignored, so the coordinator address must say `https://`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTls {
    /// The CA that signed the coordinator's certificate.
    pub ca: PathBuf,
    /// The name to check the coordinator's certificate against; by default the host of the
    /// endpoint address (a DNS name or an IP address).
    pub domain: Option<String>,
    /// Certificate chain and private key to present when the coordinator requires mutual TLS.
    pub cert_key: Option<(PathBuf, PathBuf)>,
}

impl ClientTls {
    /// Reads and checks the files, so that a wrong path or file fails with its name.
    pub fn load(&self) -> Result<ClientTlsConfig, SecurityError> {
        let ca = read_certificates("CA certificate", &self.ca)?;
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        if let Some(domain) = &self.domain {
            config = config.domain_name(domain.clone());
        }
        if let Some((cert, key)) = &self.cert_key {
            let cert = read_certificates("client TLS certificate", cert)?;
            let key = read_private_key("client TLS private key", key)?;
            config = config.identity(Identity::from_pem(cert, key));
        }
        Ok(config)
    }
}

fn read_pem(what: &'static str, path: &Path) -> Result<Vec<u8>, SecurityError> {
    std::fs::read(path).map_err(|source| SecurityError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

/// The file's bytes, once it is known to hold at least one decodable certificate: tonic only
/// parses them at the first handshake, with an error that names no file.
fn read_certificates(what: &'static str, path: &Path) -> Result<Vec<u8>, SecurityError> {
    let pem = read_pem(what, path)?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| invalid_pem(what, path, error))?;
    if certificates.is_empty() {
        return Err(if has_pem_block(&pem) {
            SecurityError::NoCertificate {
                what,
                path: path.to_owned(),
            }
        } else {
            SecurityError::NotPem {
                what,
                path: path.to_owned(),
            }
        });
    }
    Ok(pem)
}

/// As [`read_certificates`], for a private key.
fn read_private_key(what: &'static str, path: &Path) -> Result<Vec<u8>, SecurityError> {
    let pem = read_pem(what, path)?;
    match PrivateKeyDer::from_pem_slice(&pem) {
        Ok(_) => Ok(pem),
        Err(pem::Error::NoItemsFound) if has_pem_block(&pem) => Err(SecurityError::NoPrivateKey {
            what,
            path: path.to_owned(),
        }),
        Err(pem::Error::NoItemsFound) => Err(SecurityError::NotPem {
            what,
            path: path.to_owned(),
        }),
        Err(error) => Err(invalid_pem(what, path, error)),
    }
}

fn has_pem_block(text: &[u8]) -> bool {
    text.windows(b"-----BEGIN ".len())
        .any(|window| window == b"-----BEGIN ")
}

fn invalid_pem(what: &'static str, path: &Path, error: pem::Error) -> SecurityError {
    SecurityError::InvalidPem {
        what,
        path: path.to_owned(),
        detail: error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    use tempfile::TempDir;
    use tokio::net::TcpListener;
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;
    use tokio_stream::wrappers::TcpListenerStream;
    use tonic::transport::{Channel, Endpoint, Server};
    use tonic::{Code, Response, Streaming};

    use super::*;
    use crate::v1::coordinator_client::CoordinatorClient;
    use crate::v1::coordinator_server::{Coordinator, CoordinatorServer};
    use crate::v1::{
        CoordinatorMessage, DatasetChunk, FetchDatasetRequest, RegisterReply, RegisterRequest,
        WorkerMessage,
    };

    const SECRET: &str = "s3cr3t-Token_42";

    fn token(text: &str) -> JoinToken {
        JoinToken::new(text.to_owned()).unwrap()
    }

    // --- tokens

    #[test]
    fn empty_and_whitespace_tokens_are_refused() {
        for text in ["", " ", "\t\n", "   \r\n"] {
            let error = JoinToken::new(text.to_owned()).unwrap_err();
            assert!(
                matches!(error, SecurityError::InvalidToken(TokenProblem::Empty)),
                "{text:?}: {error}"
            );
        }
    }

    #[test]
    fn characters_a_header_cannot_carry_are_refused_with_their_position() {
        for (text, position) in [("ab cd", 3), ("abc\n", 4), ("\u{7f}x", 1), ("tökén", 2)] {
            let error = JoinToken::new(text.to_owned()).unwrap_err();
            assert!(
                matches!(
                    error,
                    SecurityError::InvalidToken(TokenProblem::Character { position: p }) if p == position
                ),
                "{text:?}: {error}"
            );
            assert!(error.to_string().contains("HTTP header"), "{error}");
        }
    }

    #[test]
    fn token_file_loses_its_trailing_newline() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, format!("{SECRET}\n")).unwrap();
        assert_eq!(JoinToken::from_file(&path).unwrap(), token(SECRET));
        std::fs::write(&path, format!("{SECRET} \r\n\n")).unwrap();
        assert_eq!(JoinToken::from_file(&path).unwrap(), token(SECRET));
    }

    #[test]
    fn token_file_errors_name_the_file() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "\n").unwrap();
        let error = JoinToken::from_file(&path).unwrap_err();
        assert!(matches!(
            &error,
            SecurityError::InvalidTokenFile { path: p, problem: TokenProblem::Empty } if p == &path
        ));
        assert!(
            error.to_string().contains(&*path.to_string_lossy()),
            "{error}"
        );

        let missing = dir.path().join("absent");
        let error = JoinToken::from_file(&missing).unwrap_err();
        assert!(matches!(&error, SecurityError::Read { path: p, .. } if p == &missing));
        assert!(error.to_string().contains("absent"), "{error}");
    }

    #[test]
    fn resolve_takes_one_source_and_refuses_two() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "from-file\n").unwrap();

        assert_eq!(JoinToken::resolve(None, None).unwrap(), None);
        assert_eq!(
            JoinToken::resolve(Some("flag".into()), None).unwrap(),
            Some(token("flag"))
        );
        assert_eq!(
            JoinToken::resolve(None, Some(path.clone())).unwrap(),
            Some(token("from-file"))
        );
        let error = JoinToken::resolve(Some("flag".into()), Some(path)).unwrap_err();
        assert!(matches!(error, SecurityError::TokenGivenTwice));
        let message = error.to_string();
        assert!(
            message.contains("--join-token ") && message.contains("--join-token-file"),
            "{message}"
        );
    }

    #[test]
    fn debug_hides_the_secret() {
        let token = token(SECRET);
        assert_eq!(format!("{token:?}"), "JoinToken(****)");
        for debug in [
            format!("{:?}", ServerAuth::new(Some(token.clone()))),
            format!("{:?}", ClientAuth::new(Some(token))),
        ] {
            assert!(!debug.contains(SECRET), "{debug}");
        }
    }

    #[test]
    fn equality_needs_every_byte_and_the_same_length() {
        assert_eq!(token("abcd"), token("abcd"));
        assert_ne!(token("abcd"), token("abce"));
        assert_ne!(token("abcd"), token("bbcd"));
        assert_ne!(token("abc"), token("abcd"));
        assert_ne!(token("abcd"), token("abc"));
        // A zero byte must not stand in for the missing tail of the shorter one.
        assert!(!constant_time_eq(b"abc", b"abc\0"));
        assert!(constant_time_eq(b"", b""));
    }

    // --- interceptors

    fn request_with(authorization: Option<&str>) -> Request<()> {
        let mut request = Request::new(());
        if let Some(value) = authorization {
            request
                .metadata_mut()
                .insert(AUTHORIZATION, value.parse().unwrap());
        }
        request
    }

    fn server_auth() -> ServerAuth {
        ServerAuth::new(Some(token(SECRET)))
    }

    #[test]
    fn without_a_token_everything_passes() {
        let mut auth = ServerAuth::new(None);
        assert!(auth.call(request_with(None)).is_ok());
        assert!(auth.call(request_with(Some("Bearer anything"))).is_ok());
    }

    #[test]
    fn the_right_token_passes() {
        let mut auth = server_auth();
        assert!(
            auth.call(request_with(Some(&format!("Bearer {SECRET}"))))
                .is_ok()
        );
        // The scheme is case-insensitive.
        assert!(
            auth.call(request_with(Some(&format!("bearer {SECRET}"))))
                .is_ok()
        );
    }

    #[test]
    fn a_missing_token_is_unauthenticated_and_said_to_be_missing() {
        let status = server_auth().call(request_with(None)).unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
        assert!(status.message().contains("missing"), "{status}");
    }

    #[test]
    fn a_wrong_token_is_unauthenticated_and_not_echoed() {
        for presented in [
            "Bearer wrong",
            &format!("Bearer {SECRET}x"),
            "Bearer s3cr3t",
        ] {
            let status = server_auth()
                .call(request_with(Some(presented)))
                .unwrap_err();
            assert_eq!(status.code(), Code::Unauthenticated);
            assert!(status.message().contains("wrong join token"), "{status}");
            assert!(!status.message().contains(SECRET), "{status}");
        }
    }

    #[test]
    fn a_malformed_header_is_unauthenticated() {
        for presented in [
            SECRET,
            &format!("Basic {SECRET}"),
            &format!("Bearer:{SECRET}"),
            "Bearer",
        ] {
            let status = server_auth()
                .call(request_with(Some(presented)))
                .unwrap_err();
            assert_eq!(status.code(), Code::Unauthenticated, "{presented:?}");
            assert!(status.message().contains("malformed"), "{status}");
        }
    }

    #[test]
    fn client_auth_satisfies_server_auth() {
        let mut server = server_auth();
        let sent = ClientAuth::new(Some(token(SECRET)))
            .call(Request::new(()))
            .unwrap();
        assert!(server.call(sent).is_ok());

        let sent = ClientAuth::new(Some(token("other")))
            .call(Request::new(()))
            .unwrap();
        assert_eq!(server.call(sent).unwrap_err().code(), Code::Unauthenticated);

        let sent = ClientAuth::new(None).call(Request::new(())).unwrap();
        assert!(sent.metadata().get(AUTHORIZATION).is_none());
        let status = server.call(sent).unwrap_err();
        assert!(status.message().contains("missing"), "{status}");
    }

    // --- TLS files

    /// A CA, kept as the PEM certificate clients trust and the issuer that signs leaves.
    struct TestCa {
        cert_pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    fn test_ca(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf certificate and its key, as PEM.
    fn leaf(ca: &TestCa, names: &[&str], usage: ExtendedKeyUsagePurpose) -> (String, String) {
        let names: Vec<String> = names.iter().map(|name| name.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, &names[0]);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// PEM files in a temporary directory: `ca` and a server certificate it signed, valid for
    /// localhost and 127.0.0.1.
    struct Files {
        dir: TempDir,
        ca: PathBuf,
        server_cert: PathBuf,
        server_key: PathBuf,
    }

    impl Files {
        fn new(ca: &TestCa) -> Files {
            let dir = TempDir::new().unwrap();
            let (cert, key) = leaf(
                ca,
                &["localhost", "127.0.0.1"],
                ExtendedKeyUsagePurpose::ServerAuth,
            );
            Files {
                ca: write_file(&dir, "ca.pem", &ca.cert_pem),
                server_cert: write_file(&dir, "server.pem", &cert),
                server_key: write_file(&dir, "server.key", &key),
                dir,
            }
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
            write_file(&self.dir, name, text)
        }

        fn server_tls(&self, client_ca: Option<PathBuf>) -> ServerTlsConfig {
            ServerTls {
                cert: self.server_cert.clone(),
                key: self.server_key.clone(),
                client_ca,
            }
            .load()
            .unwrap()
        }

        /// Client credentials signed by `ca`, written under `name`.
        fn client_cert_key(&self, ca: &TestCa, name: &str) -> (PathBuf, PathBuf) {
            let (cert, key) = leaf(ca, &[name], ExtendedKeyUsagePurpose::ClientAuth);
            (
                self.write(&format!("{name}.pem"), &cert),
                self.write(&format!("{name}.key"), &key),
            )
        }
    }

    fn write_file(dir: &TempDir, name: &str, text: &str) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn tls_files_load() {
        let ca = test_ca("test CA");
        let files = Files::new(&ca);
        files.server_tls(Some(files.ca.clone()));
        let client_cert_key = files.client_cert_key(&ca, "worker-1");
        ClientTls {
            ca: files.ca.clone(),
            domain: Some("localhost".into()),
            cert_key: Some(client_cert_key),
        }
        .load()
        .unwrap();
    }

    #[test]
    fn tls_file_errors_name_the_file_and_the_problem() {
        let ca = test_ca("test CA");
        let files = Files::new(&ca);
        let not_pem = files.write("ca.der", "this is not a certificate\n");
        let broken = files.write(
            "broken.pem",
            "-----BEGIN CERTIFICATE-----\n!!!not base64!!!\n-----END CERTIFICATE-----\n",
        );
        let server = |cert: &Path, key: &Path| {
            ServerTls {
                cert: cert.to_owned(),
                key: key.to_owned(),
                client_ca: None,
            }
            .load()
            .unwrap_err()
        };
        let client = |ca: &Path| {
            ClientTls {
                ca: ca.to_owned(),
                domain: None,
                cert_key: None,
            }
            .load()
            .unwrap_err()
        };
        let missing = files.dir.path().join("missing.pem");

        let cases = [
            (
                server(&missing, &files.server_key),
                "missing.pem",
                "cannot read",
            ),
            (
                server(&files.server_key, &files.server_key),
                "server.key",
                "no certificate",
            ),
            (
                server(&files.server_cert, &files.server_cert),
                "server.pem",
                "no private key",
            ),
            (server(&files.server_cert, &not_pem), "ca.der", "not PEM"),
            (client(&not_pem), "ca.der", "not PEM"),
            (client(&broken), "broken.pem", "not valid PEM"),
            (client(&missing), "missing.pem", "cannot read"),
        ];
        for (error, file, problem) in cases {
            let message = error.to_string();
            assert!(message.contains(file), "{message}");
            assert!(message.contains(problem), "{message}");
        }
        let error = client(&files.server_key);
        assert!(
            matches!(&error, SecurityError::NoCertificate { path, .. } if path == &files.server_key),
            "{error}"
        );
    }

    // --- real servers over real sockets

    /// Answers `Register` only: enough to tell whether a call got through the TLS and auth
    /// layers, which are what these tests are about.
    struct Fixed;

    const WORKER_ID: u64 = 7;

    #[tonic::async_trait]
    impl Coordinator for Fixed {
        async fn register(
            &self,
            _request: Request<RegisterRequest>,
        ) -> Result<Response<RegisterReply>, Status> {
            Ok(Response::new(RegisterReply {
                worker_id: WORKER_ID,
                ..Default::default()
            }))
        }

        type SessionStream = tokio_stream::Empty<Result<CoordinatorMessage, Status>>;

        async fn session(
            &self,
            _request: Request<Streaming<WorkerMessage>>,
        ) -> Result<Response<Self::SessionStream>, Status> {
            Err(Status::unimplemented("not served in this test"))
        }

        type FetchDatasetStream = tokio_stream::Empty<Result<DatasetChunk, Status>>;

        async fn fetch_dataset(
            &self,
            _request: Request<FetchDatasetRequest>,
        ) -> Result<Response<Self::FetchDatasetStream>, Status> {
            Err(Status::unimplemented("not served in this test"))
        }

        async fn status(
            &self,
            _request: Request<crate::v1::StatusRequest>,
        ) -> Result<Response<crate::v1::StatusReply>, Status> {
            Err(Status::unimplemented("not served in this test"))
        }
    }

    struct TestServer {
        addr: SocketAddr,
        stop: oneshot::Sender<()>,
        task: JoinHandle<Result<(), tonic::transport::Error>>,
    }

    impl TestServer {
        async fn start(tls: Option<ServerTlsConfig>, auth: ServerAuth) -> TestServer {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let mut builder = Server::builder();
            if let Some(tls) = tls {
                builder = builder.tls_config(tls).unwrap();
            }
            let (stop, stopped) = oneshot::channel();
            let router = builder.add_service(CoordinatorServer::with_interceptor(Fixed, auth));
            let task = tokio::spawn(router.serve_with_incoming_shutdown(
                TcpListenerStream::new(listener),
                async {
                    stopped.await.ok();
                },
            ));
            TestServer { addr, stop, task }
        }

        async fn stop(self) {
            self.stop.send(()).unwrap();
            self.task.await.unwrap().unwrap();
        }
    }

    #[derive(Debug)]
    enum CallError {
        Connect(String),
        Status(Status),
    }

    /// Connects to `url` and calls `Register`, as a worker would.
    async fn register(
        url: String,
        tls: Option<&ClientTls>,
        auth: ClientAuth,
    ) -> Result<u64, CallError> {
        let mut endpoint = Endpoint::from_shared(url)
            .unwrap()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(10));
        if let Some(tls) = tls {
            endpoint = endpoint.tls_config(tls.load().unwrap()).unwrap();
        }
        let channel: Channel = endpoint
            .connect()
            .await
            .map_err(|error| CallError::Connect(error_chain(&error)))?;
        let mut client = CoordinatorClient::with_interceptor(channel, auth);
        let reply = client
            .register(RegisterRequest::default())
            .await
            .map_err(CallError::Status)?;
        Ok(reply.into_inner().worker_id)
    }

    fn error_chain(error: &dyn std::error::Error) -> String {
        let mut text = error.to_string();
        let mut source = error.source();
        while let Some(error) = source {
            text = format!("{text}: {error}");
            source = error.source();
        }
        text
    }

    /// Why a call failed, whether at connecting or at the call: a TLS 1.3 client learns that
    /// the server refused its certificate only after its handshake is done.
    fn failure(error: CallError) -> String {
        match error {
            CallError::Connect(text) => text,
            CallError::Status(status) => {
                let source = std::error::Error::source(&status)
                    .map(error_chain)
                    .unwrap_or_default();
                format!("{status}: {source}")
            }
        }
    }

    fn no_auth() -> ClientAuth {
        ClientAuth::new(None)
    }

    #[tokio::test]
    async fn tls_call_succeeds_with_the_right_ca() {
        let ca = test_ca("test CA");
        let files = Files::new(&ca);
        let server = TestServer::start(Some(files.server_tls(None)), ServerAuth::new(None)).await;

        // By IP address, checked against the certificate's IP name.
        let by_ip = ClientTls {
            ca: files.ca.clone(),
            domain: None,
            cert_key: None,
        };
        let url = format!("https://{}", server.addr);
        assert_eq!(
            register(url.clone(), Some(&by_ip), no_auth())
                .await
                .unwrap(),
            WORKER_ID
        );

        // With an explicit name, as when the address is not the name in the certificate.
        let by_name = ClientTls {
            domain: Some("localhost".into()),
            ..by_ip
        };
        assert_eq!(
            register(url, Some(&by_name), no_auth()).await.unwrap(),
            WORKER_ID
        );

        server.stop().await;
    }

    #[tokio::test]
    async fn tls_call_fails_with_a_wrong_ca_or_name() {
        let ca = test_ca("test CA");
        let files = Files::new(&ca);
        let server = TestServer::start(Some(files.server_tls(None)), ServerAuth::new(None)).await;
        let url = format!("https://{}", server.addr);

        let other_ca = files.write("other-ca.pem", &test_ca("other CA").cert_pem);
        let wrong_ca = ClientTls {
            ca: other_ca,
            domain: None,
            cert_key: None,
        };
        let error = failure(
            register(url.clone(), Some(&wrong_ca), no_auth())
                .await
                .unwrap_err(),
        );
        assert!(error.contains("UnknownIssuer"), "{error}");

        let wrong_name = ClientTls {
            ca: files.ca.clone(),
            domain: Some("coordinator.example".into()),
            cert_key: None,
        };
        let error = failure(
            register(url, Some(&wrong_name), no_auth())
                .await
                .unwrap_err(),
        );
        assert!(error.contains("not valid for name"), "{error}");

        server.stop().await;
    }

    #[tokio::test]
    async fn tls_server_requires_the_join_token() {
        let ca = test_ca("test CA");
        let files = Files::new(&ca);
        let server = TestServer::start(Some(files.server_tls(None)), server_auth()).await;
        let url = format!("https://{}", server.addr);
        let tls = ClientTls {
            ca: files.ca.clone(),
            domain: None,
            cert_key: None,
        };

        match register(url.clone(), Some(&tls), no_auth()).await {
            Err(CallError::Status(status)) => {
                assert_eq!(status.code(), Code::Unauthenticated, "{status}");
                assert!(status.message().contains("missing"), "{status}");
            }
            other => panic!("expected Unauthenticated, got {other:?}"),
        }
        match register(
            url.clone(),
            Some(&tls),
            ClientAuth::new(Some(token("wrong"))),
        )
        .await
        {
            Err(CallError::Status(status)) => {
                assert_eq!(status.code(), Code::Unauthenticated, "{status}");
            }
            other => panic!("expected Unauthenticated, got {other:?}"),
        }
        let auth = ClientAuth::new(Some(token(SECRET)));
        assert_eq!(register(url, Some(&tls), auth).await.unwrap(), WORKER_ID);

        server.stop().await;
    }

    #[tokio::test]
    async fn plain_server_requires_the_join_token() {
        let server = TestServer::start(None, server_auth()).await;
        let url = format!("http://{}", server.addr);
        match register(url.clone(), None, no_auth()).await {
            Err(CallError::Status(status)) => assert_eq!(status.code(), Code::Unauthenticated),
            other => panic!("expected Unauthenticated, got {other:?}"),
        }
        let auth = ClientAuth::new(Some(token(SECRET)));
        assert_eq!(register(url, None, auth).await.unwrap(), WORKER_ID);
        server.stop().await;
    }

    #[tokio::test]
    async fn mutual_tls_requires_a_client_certificate_from_the_client_ca() {
        let ca = test_ca("test CA");
        let files = Files::new(&ca);
        let client_ca = test_ca("client CA");
        let client_ca_path = files.write("client-ca.pem", &client_ca.cert_pem);
        let server = TestServer::start(
            Some(files.server_tls(Some(client_ca_path))),
            ServerAuth::new(None),
        )
        .await;
        let url = format!("https://{}", server.addr);
        let tls = |cert_key| ClientTls {
            ca: files.ca.clone(),
            domain: None,
            cert_key,
        };

        let error = failure(
            register(url.clone(), Some(&tls(None)), no_auth())
                .await
                .unwrap_err(),
        );
        assert!(error.contains("CertificateRequired"), "{error}");

        // Signed by the server's CA, which the server does not accept for clients.
        let stranger = files.client_cert_key(&ca, "stranger");
        let error = failure(
            register(url.clone(), Some(&tls(Some(stranger))), no_auth())
                .await
                .unwrap_err(),
        );
        assert!(error.contains("UnknownCA"), "{error}");

        let worker = files.client_cert_key(&client_ca, "worker-1");
        let reply = register(url, Some(&tls(Some(worker))), no_auth()).await;
        assert_eq!(reply.unwrap(), WORKER_ID);

        server.stop().await;
    }
}
