//! The load generator's TLS client (rustls with ring): SNI from the request's host, ALPN by
//! protocol, never a resumed session, and no check of the server's certificate or signature.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// The ALPN protocol names.
pub const H2: &[u8] = b"h2";
pub const HTTP1: &[u8] = b"http/1.1";

/// A TLS client for a run's connections, offering one ALPN protocol.
#[derive(Clone)]
pub struct Client {
    connector: TlsConnector,
    alpn: &'static [u8],
}

impl Client {
    /// TLS 1.2 and 1.3 with ring's defaults, offering `alpn` (`H2` or `HTTP1`). Resumption is
    /// off, so every handshake is a full one: what a new client costs the server.
    pub fn new(alpn: &'static [u8]) -> Client {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports TLS 1.2 and 1.3")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Unverified(provider)))
            .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        config.resumption = rustls::client::Resumption::disabled();
        Client {
            connector: TlsConnector::from(Arc::new(config)),
            alpn,
        }
    }

    /// The TLS handshake on `stream`. HTTP/2 needs the server to choose `h2`; for HTTP/1.1 a
    /// server that chooses nothing is fine.
    pub async fn connect(
        &self,
        name: ServerName<'static>,
        stream: TcpStream,
    ) -> Result<TlsStream<TcpStream>, String> {
        let stream = self
            .connector
            .connect(name, stream)
            .await
            .map_err(|e| kind_of(&e))?;
        match stream.get_ref().1.alpn_protocol() {
            Some(chosen) if chosen == self.alpn => Ok(stream),
            None if self.alpn == HTTP1 => Ok(stream),
            _ => Err(format!(
                "tls: the server did not choose ALPN {}",
                String::from_utf8_lossy(self.alpn)
            )),
        }
    }
}

/// What one handshake with `addr` negotiated: `TLSv1_3 TLS13_AES_256_GCM_SHA384 X25519, ALPN
/// h2, Full handshake`.
pub async fn negotiated(
    client: &Client,
    addr: std::net::SocketAddr,
    host: &str,
) -> Result<String, String> {
    let name = server_name(host)?;
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {}", crate::load::io_kind(&e)))?;
    let stream = client.connect(name, stream).await?;
    let tls = stream.get_ref().1;
    let or_none = |v: Option<String>| v.unwrap_or_else(|| "none".into());
    Ok(format!(
        "{} {} {}, ALPN {}, {} handshake",
        or_none(tls.protocol_version().map(|v| format!("{v:?}"))),
        or_none(
            tls.negotiated_cipher_suite()
                .map(|s| format!("{:?}", s.suite()))
        ),
        or_none(
            tls.negotiated_key_exchange_group()
                .map(|g| format!("{:?}", g.name()))
        ),
        or_none(
            tls.alpn_protocol()
                .map(|p| String::from_utf8_lossy(p).into_owned())
        ),
        or_none(tls.handshake_kind().map(|k| format!("{k:?}"))),
    ))
}

/// The SNI of requests to `host` (a `Host` value, with or without a port): its name, or no SNI
/// for an IP address.
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    let authority: http::uri::Authority = host
        .parse()
        .map_err(|e| format!("host {host:?} is not a valid authority: {e}"))?;
    let name = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    ServerName::try_from(name.to_owned())
        .map_err(|e| format!("host {host:?} is no TLS server name: {e}"))
}

/// A short name for a failed handshake: `tls: <rustls's reason>`, or the I/O error's kind.
fn kind_of(error: &std::io::Error) -> String {
    match error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => format!("tls: {tls}"),
        None => format!("tls: {}", crate::load::io_kind(error)),
    }
}

/// Accepts any certificate and handshake signature: the load generator measures servers on
/// this machine and authenticates none of them (the example certificates are self-signed CAs,
/// which a WebPKI verifier refuses as a server's own), and the CPU a check would take stays
/// with the servers measured.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
