//! The client's end of the connection to a coordinator, as the worker and `coordinator status`
//! make it: the URL, TLS exactly when the URL says `https://`, the join token on every call.

use crate::security::{ClientAuth, ClientTls, SecurityError};
use crate::v1::coordinator_client::CoordinatorClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// A client of the coordinator that sends the join token with every call.
pub type Client = CoordinatorClient<InterceptedService<Channel, ClientAuth>>;

/// Why a coordinator address and TLS settings cannot make a connection.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The address does not parse as a URL.
    #[error("not a valid URL: {0}")]
    Url(String),
    /// TLS settings with an `http://` address, which tonic would silently ignore.
    #[error("--tls-ca is given but the URL is not https://; TLS would not be used")]
    TlsWithoutHttps,
    /// An `https://` address without the CA to check the coordinator's certificate.
    #[error("an https:// URL needs --tls-ca, the CA that signed the coordinator's certificate")]
    HttpsWithoutTls,
    /// A CA, certificate or key file that cannot be used.
    #[error(transparent)]
    Security(#[from] SecurityError),
    /// TLS settings that tonic refuses.
    #[error("TLS settings: {0}")]
    Tls(String),
}

/// The coordinator at `url`, with `tls` when the URL is `https://`. A URL and TLS settings
/// that do not go together are refused here, rather than connecting without TLS or failing
/// at the first handshake. Timeouts and window sizes are the caller's.
pub fn endpoint(url: &str, tls: Option<&ClientTls>) -> Result<Endpoint, EndpointError> {
    let endpoint =
        Endpoint::from_shared(url.to_owned()).map_err(|e| EndpointError::Url(e.to_string()))?;
    match (tls, url.starts_with("https://")) {
        (Some(tls), true) => endpoint
            .tls_config(tls.load()?)
            .map_err(|e| EndpointError::Tls(e.to_string())),
        (Some(_), false) => Err(EndpointError::TlsWithoutHttps),
        (None, true) => Err(EndpointError::HttpsWithoutTls),
        (None, false) => Ok(endpoint),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn tls(ca: &str) -> ClientTls {
        ClientTls {
            ca: PathBuf::from(ca),
            domain: None,
            cert_key: None,
        }
    }

    #[test]
    fn tls_exactly_when_the_url_says_https() {
        assert!(endpoint("http://127.0.0.1:50051", None).is_ok());
        assert!(matches!(
            endpoint("not a url", None),
            Err(EndpointError::Url(_))
        ));
        assert!(matches!(
            endpoint("https://localhost:50051", None),
            Err(EndpointError::HttpsWithoutTls)
        ));
        assert!(matches!(
            endpoint("http://localhost:50051", Some(&tls("/no/such/ca.pem"))),
            Err(EndpointError::TlsWithoutHttps)
        ));
        let error = endpoint("https://localhost:50051", Some(&tls("/no/such/ca.pem"))).unwrap_err();
        assert!(matches!(error, EndpointError::Security(_)), "{error}");
        assert!(error.to_string().contains("/no/such/ca.pem"), "{error}");
    }
}
