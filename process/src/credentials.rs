use clap::Args;
use proto::security::{ClientTls, JoinToken, SecurityError};
use std::path::PathBuf;

/// What a client shows the coordinator: the join token and TLS settings. The worker's flags,
/// and those of `coordinator status`.
#[derive(Debug, Clone, Default, Args)]
pub struct Credentials {
    /// Secret the coordinator requires on every call (see the coordinator's --join-token).
    #[arg(long, env = "LOCKSTEP_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,

    /// File holding the join token.
    #[arg(long, env = "LOCKSTEP_JOIN_TOKEN_FILE")]
    pub join_token_file: Option<PathBuf>,

    /// PEM file of the CA that signed the coordinator's certificate; connects with TLS (the
    /// --coordinator URL must then be https://).
    #[arg(long, env = "LOCKSTEP_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// Name to expect in the coordinator's certificate [default: the URL's host].
    #[arg(long, env = "LOCKSTEP_TLS_DOMAIN")]
    pub tls_domain: Option<String>,

    /// PEM certificate and key to present to coordinators that require client certificates
    /// (mutual TLS).
    #[arg(long, env = "LOCKSTEP_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, env = "LOCKSTEP_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

impl Credentials {
    /// The join token, from the flag or the file.
    pub fn join_token(&self) -> Result<Option<JoinToken>, SecurityError> {
        JoinToken::resolve(self.join_token.clone(), self.join_token_file.clone())
    }

    /// TLS settings, when --tls-ca is given.
    pub fn tls(&self) -> Option<ClientTls> {
        self.tls_ca.as_ref().map(|ca| ClientTls {
            ca: ca.clone(),
            domain: self.tls_domain.clone(),
            cert_key: self.tls_cert.clone().zip(self.tls_key.clone()),
        })
    }
}
