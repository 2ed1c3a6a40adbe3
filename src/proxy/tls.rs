//! TLS termination with rustls: certificates chosen by SNI (exact names before `*.` wildcards,
//! the first certificate for everything else), ALPN `h2` and `http/1.1`, TLS 1.2 and 1.3 with
//! ring's cipher suites (AEAD and forward secrecy only), and certificates replaced while
//! connections stay open: on SIGHUP and when a file changes (a Kubernetes Secret volume swaps
//! a symlink). A reload that fails keeps the certificates in use.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::config::CertificateFiles;

/// How often the certificate files are looked at for changes.
const WATCH_EVERY: Duration = Duration::from_secs(2);

/// What a client that negotiated no ALPN protocol, or `http/1.1`, speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Negotiated {
    Http1,
    Http2,
}

/// Why a handshake failed, as counted in `wakegate_tls_handshake_failures_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// No complete handshake within the header read timeout.
    Timeout,
    /// The client closed the connection (or reset it) before the handshake ended, as clients
    /// that reject the certificate do.
    Closed,
    /// The client sent a TLS alert: most often it does not trust the certificate.
    Alert,
    /// No TLS version, cipher suite, key exchange group or signature scheme in common.
    Incompatible,
    /// The client offered ALPN protocols and none is `h2` or `http/1.1`.
    NoApplicationProtocol,
    /// Not TLS, or TLS that breaks the protocol (plain HTTP sent to the HTTPS port lands here).
    InvalidMessage,
    Other,
}

impl HandshakeFailure {
    pub const ALL: [HandshakeFailure; 7] = [
        HandshakeFailure::Timeout,
        HandshakeFailure::Closed,
        HandshakeFailure::Alert,
        HandshakeFailure::Incompatible,
        HandshakeFailure::NoApplicationProtocol,
        HandshakeFailure::InvalidMessage,
        HandshakeFailure::Other,
    ];

    pub fn label(self) -> &'static str {
        match self {
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Closed => "closed",
            HandshakeFailure::Alert => "alert_received",
            HandshakeFailure::Incompatible => "incompatible",
            HandshakeFailure::NoApplicationProtocol => "no_application_protocol",
            HandshakeFailure::InvalidMessage => "invalid_message",
            HandshakeFailure::Other => "other",
        }
    }

    fn of(error: &io::Error) -> Self {
        let tls = error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        match tls {
            Some(rustls::Error::AlertReceived(_)) => HandshakeFailure::Alert,
            Some(rustls::Error::PeerIncompatible(_)) => HandshakeFailure::Incompatible,
            Some(rustls::Error::NoApplicationProtocol) => HandshakeFailure::NoApplicationProtocol,
            Some(
                rustls::Error::InvalidMessage(_)
                | rustls::Error::PeerMisbehaved(_)
                | rustls::Error::InappropriateMessage { .. }
                | rustls::Error::InappropriateHandshakeMessage { .. },
            ) => HandshakeFailure::InvalidMessage,
            Some(_) => HandshakeFailure::Other,
            None => match error.kind() {
                io::ErrorKind::UnexpectedEof
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe => HandshakeFailure::Closed,
                _ => HandshakeFailure::Other,
            },
        }
    }
}

/// A certificate or key file that cannot serve, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateError {
    pub path: PathBuf,
    pub problem: String,
}

impl fmt::Display for CertificateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.problem)
    }
}

/// Every problem of a set of certificates, one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateErrors(pub Vec<CertificateError>);

impl fmt::Display for CertificateErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for CertificateErrors {}

/// One loaded certificate chain with its key, and the host names it serves.
#[derive(Debug)]
pub struct Certificate {
    pub files: CertificateFiles,
    /// The DNS names of its subjectAltName extension, lowercase (`*.` wildcards included).
    pub names: Vec<String>,
    /// The end of the end-entity certificate's validity, in seconds since the Unix epoch.
    pub not_after: i64,
    key: Arc<CertifiedKey>,
}

/// The certificates in use, indexed for the handshake's lookup by SNI.
#[derive(Debug)]
pub struct Certificates {
    /// In the configuration's order; the first is the default.
    pub loaded: Vec<Certificate>,
    exact: HashMap<String, usize>,
    /// `*.example.com` under `example.com`.
    wildcard: HashMap<String, usize>,
}

impl Certificates {
    /// Reads and checks every pair of files; reports every problem found, each naming its file.
    pub fn load(files: &[CertificateFiles]) -> Result<Self, CertificateErrors> {
        let provider = provider();
        let mut loaded = Vec::with_capacity(files.len());
        let mut errors = Vec::new();
        for (i, pair) in files.iter().enumerate() {
            match load_pair(pair, &provider) {
                Ok(certificate) if certificate.names.is_empty() && i > 0 => {
                    errors.push(CertificateError {
                        path: pair.cert.clone(),
                        problem: "the certificate names no DNS host in its subjectAltName, \
                                  so no client could be given it by SNI; only the first \
                                  (default) certificate may name none"
                            .to_owned(),
                    })
                }
                Ok(certificate) => loaded.push(certificate),
                Err(error) => errors.push(error),
            }
        }
        if files.is_empty() {
            errors.push(CertificateError {
                path: PathBuf::new(),
                problem: "no certificate configured".to_owned(),
            });
        }
        if !errors.is_empty() {
            return Err(CertificateErrors(errors));
        }
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for (i, certificate) in loaded.iter().enumerate() {
            for name in &certificate.names {
                // The first certificate that names a host serves it.
                match name.strip_prefix("*.") {
                    Some(parent) => wildcard.entry(parent.to_owned()).or_insert(i),
                    None => exact.entry(name.clone()).or_insert(i),
                };
            }
        }
        Ok(Self {
            loaded,
            exact,
            wildcard,
        })
    }

    /// The certificate for a client that asked for `server_name` (SNI): one naming it exactly,
    /// else one whose wildcard covers it (one label deep, as RFC 6125 allows), else the first.
    pub fn pick(&self, server_name: Option<&str>) -> &Certificate {
        let found = server_name.and_then(|name| {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            self.exact.get(&name).or_else(|| {
                let (_, parent) = name.split_once('.')?;
                self.wildcard.get(parent)
            })
        });
        &self.loaded[found.copied().unwrap_or(0)]
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_pair(
    files: &CertificateFiles,
    provider: &CryptoProvider,
) -> Result<Certificate, CertificateError> {
    let cert_error = |problem: String| CertificateError {
        path: files.cert.clone(),
        problem,
    };
    let key_error = |problem: String| CertificateError {
        path: files.key.clone(),
        problem,
    };
    let chain = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| cert_error(pem_problem(&e, "CERTIFICATE")))?;
    let Some(leaf) = chain.first() else {
        return Err(cert_error(
            "no CERTIFICATE block: expected a PEM certificate chain, the server's own \
             certificate first"
                .to_owned(),
        ));
    };
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| cert_error(format!("the first certificate cannot be parsed: {e}")))?;
    let names = parsed
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    x509_parser::extensions::GeneralName::DNSName(dns) => {
                        Some(dns.to_ascii_lowercase())
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let not_after = parsed.validity().not_after.timestamp();
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| key_error(pem_problem(&e, "PRIVATE KEY")))?;
    let key = CertifiedKey::from_der(chain, key, provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => key_error(format!(
            "the key does not belong to the certificate in {}",
            files.cert.display()
        )),
        other => key_error(format!(
            "cannot use the private key: {other} (expected an RSA, ECDSA P-256/P-384 or \
             Ed25519 key in PEM: PKCS#8, PKCS#1 or SEC1)"
        )),
    })?;
    Ok(Certificate {
        files: files.clone(),
        names,
        not_after,
        key: Arc::new(key),
    })
}

fn pem_problem(error: &pem::Error, what: &str) -> String {
    match error {
        pem::Error::Io(io) => format!("cannot read: {io}"),
        pem::Error::NoItemsFound => format!("no {what} block: expected a PEM file"),
        other => format!("not a valid PEM file: {other:?}"),
    }
}

/// Hands rustls the certificate of each handshake from the certificates in use, which a
/// reload swaps whole.
#[derive(Debug)]
struct Resolver(ArcSwap<Certificates>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load().pick(hello.server_name()).key.clone())
    }
}

/// Handshake counts for `/metrics`.
#[derive(Debug, Default)]
pub struct TlsStats {
    pub handshakes: AtomicU64,
    failures: [AtomicU64; HandshakeFailure::ALL.len()],
    pub reloads: AtomicU64,
    pub failed_reloads: AtomicU64,
}

impl TlsStats {
    pub fn failures(&self, why: HandshakeFailure) -> u64 {
        self.failures[why as usize].load(Ordering::Relaxed)
    }

    fn failed(&self, why: HandshakeFailure) {
        self.failures[why as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// The HTTPS side of the proxy: one acceptor shared by every worker.
pub struct Tls {
    acceptor: TlsAcceptor,
    resolver: Arc<Resolver>,
    /// The files last loaded (or asked for by a reload), and what they looked like then.
    watched: Mutex<(Vec<CertificateFiles>, Vec<Fingerprint>)>,
    pub stats: TlsStats,
}

impl Tls {
    /// Loads `files` and builds the acceptor.
    pub fn new(files: &[CertificateFiles]) -> Result<Self, CertificateErrors> {
        let fingerprints = fingerprints(files);
        let certificates = Certificates::load(files)?;
        let resolver = Arc::new(Resolver(ArcSwap::from_pointee(certificates)));
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .expect("ring supports TLS 1.2 and 1.3")
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        // Session tickets let a returning client skip the full handshake (TLS 1.3 resumption).
        if let Ok(ticketer) = rustls::crypto::ring::Ticketer::new() {
            config.ticketer = ticketer;
        }
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            resolver,
            watched: Mutex::new((files.to_vec(), fingerprints)),
            stats: TlsStats::default(),
        })
    }

    /// The certificates in use.
    pub fn certificates(&self) -> arc_swap::Guard<Arc<Certificates>> {
        self.resolver.0.load()
    }

    /// Completes the handshake of a new connection within `timeout`; a failure is counted
    /// and logged at debug level, and touches no other connection.
    pub async fn accept(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        timeout: Duration,
    ) -> Option<(TlsStream<TcpStream>, Negotiated)> {
        let failure = match tokio::time::timeout(timeout, self.acceptor.accept(stream)).await {
            Ok(Ok(stream)) => {
                self.stats.handshakes.fetch_add(1, Ordering::Relaxed);
                let negotiated = match stream.get_ref().1.alpn_protocol() {
                    Some(b"h2") => Negotiated::Http2,
                    _ => Negotiated::Http1,
                };
                return Some((stream, negotiated));
            }
            Ok(Err(error)) => {
                let why = HandshakeFailure::of(&error);
                tracing::debug!(%peer, %error, reason = why.label(), "TLS handshake failed");
                why
            }
            Err(_) => HandshakeFailure::Timeout,
        };
        self.stats.failed(failure);
        None
    }

    /// Loads `files` and, if every one is good, serves them from the next handshake on;
    /// otherwise keeps the certificates in use and says why.
    pub fn reload(&self, files: &[CertificateFiles]) -> Result<(), CertificateErrors> {
        let fingerprints = fingerprints(files);
        *lock(&self.watched) = (files.to_vec(), fingerprints);
        self.swap(files)
    }

    fn swap(&self, files: &[CertificateFiles]) -> Result<(), CertificateErrors> {
        match Certificates::load(files) {
            Ok(certificates) => {
                let names: Vec<_> = certificates
                    .loaded
                    .iter()
                    .flat_map(|c| c.names.iter().map(String::as_str))
                    .collect();
                tracing::info!(names = %names.join(","), "TLS certificates loaded");
                self.resolver.0.store(Arc::new(certificates));
                self.stats.reloads.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(errors) => {
                tracing::error!(
                    error = %errors.0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
                    "TLS certificates not reloaded; keeping the ones in use"
                );
                self.stats.failed_reloads.fetch_add(1, Ordering::Relaxed);
                Err(errors)
            }
        }
    }

    /// Looks at the certificate files every two seconds and reloads when one has changed
    /// (its size, its modification time, or the file a symlink leads to), until `stop`.
    pub async fn watch(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(WATCH_EVERY) => {}
                () = stop.cancelled() => return,
            }
            let files = {
                let mut watched = lock(&self.watched);
                let now = fingerprints(&watched.0);
                if now == watched.1 {
                    continue;
                }
                watched.1 = now;
                watched.0.clone()
            };
            // A half-written pair fails here and loads on the next change, when the writer is
            // done (a Secret volume swaps both files at once).
            let _ = self.swap(&files);
        }
    }
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("certificates", &self.resolver.0.load().loaded)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What a certificate or key file looks like from outside, through any symlinks.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint(Option<(u64, u64, u64, Option<SystemTime>)>);

fn fingerprints(files: &[CertificateFiles]) -> Vec<Fingerprint> {
    let of = |path: &Path| {
        Fingerprint(
            std::fs::metadata(path)
                .ok()
                .map(|m| (m.dev(), m.ino(), m.len(), m.modified().ok())),
        )
    };
    files
        .iter()
        .flat_map(|pair| [of(&pair.cert), of(&pair.key)])
        .collect()
}
