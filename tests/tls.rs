//! TLS termination as clients see it: the certificate each host name gets (SNI, exact names
//! before wildcards, a default), HTTP/1.1 and HTTP/2 by ALPN (with curl, a real client),
//! `X-Forwarded-Proto: https`, certificates replaced on SIGHUP and when their files change
//! while open connections keep working, failed handshakes counted by reason without touching
//! other connections, and bad certificate files reported by `wakegate check` and at start.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use wakegate_test_support::*;

/// A self-signed certificate for `names`, written as `<stem>.crt` and `<stem>.key` in `dir`.
struct Pair {
    cert: PathBuf,
    key: PathBuf,
    der: CertificateDer<'static>,
    pem: String,
}

fn pair(dir: &Path, stem: &str, names: &[&str]) -> Pair {
    let generated =
        rcgen::generate_simple_self_signed(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .expect("generate a certificate");
    let (cert, key) = (
        dir.join(format!("{stem}.crt")),
        dir.join(format!("{stem}.key")),
    );
    let pem = generated.cert.pem();
    std::fs::write(&cert, &pem).expect("write cert");
    std::fs::write(&key, generated.signing_key.serialize_pem()).expect("write key");
    Pair {
        cert,
        key,
        der: generated.cert.der().clone(),
        pem,
    }
}

/// `[tls]` on a free port with `pairs`, the first the default.
fn tls_head(pairs: &[(&Path, &Path)]) -> String {
    let mut head = "[tls]\nlisten = \"127.0.0.1:0\"\n".to_owned();
    for (cert, key) in pairs {
        head.push_str(&format!(
            "[[tls.certificate]]\ncert = {:?}\nkey = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        ));
    }
    head
}

/// One fixed-upstream target for every host.
fn upstream_target(backend: &DemoBackend) -> String {
    format!(
        "[[target]]\nname = \"app\"\nhosts = [\"*\"]\nupstream = \"{}\"\n",
        backend.addr
    )
}

/// wakegate with `[tls]` serving `pairs` (the first the default) in front of a demo backend.
struct Https {
    wg: Wakegate,
    /// The HTTPS listener.
    addr: SocketAddr,
    backend: DemoBackend,
}

impl Https {
    async fn start(pairs: &[(&Path, &Path)]) -> Self {
        let backend = DemoBackend::start().await;
        let wg = Wakegate::start(&tls_head(pairs), &upstream_target(&backend)).await;
        let addr = wg.https.expect("the HTTPS address in the log");
        Self { wg, addr, backend }
    }

    /// An HTTP/1.1 connection for `app.test` that trusts only `der`, with one request answered.
    async fn open(&self, der: &CertificateDer<'static>) -> Http1 {
        let stream = connect(self.addr, "app.test", Trust::Only(der), &[b"http/1.1"])
            .await
            .expect("handshake");
        let mut open = Http1::open(stream).await;
        assert_eq!(open.get("app.test", "/").await.0, 200);
        open
    }
}

/// Accepts any certificate: for looking at which one wakegate presents, not for trusting it.
#[derive(Debug)]
struct Observer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Observer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// How a test client checks wakegate's certificate.
enum Trust<'a> {
    /// Any certificate (to see which one is presented).
    Any,
    /// Only this one, as a root.
    Only(&'a CertificateDer<'static>),
}

async fn connect(
    addr: SocketAddr,
    server_name: &str,
    trust: Trust<'_>,
    alpn: &[&[u8]],
) -> std::io::Result<TlsStream<TcpStream>> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions");
    let mut config = match trust {
        Trust::Any => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Observer(provider())))
            .with_no_client_auth(),
        Trust::Only(root) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(root.clone()).expect("a root");
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let name = ServerName::try_from(server_name.to_owned()).expect("a server name");
    let tcp = TcpStream::connect(addr).await?;
    TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

/// The certificate wakegate presents to a client asking for `server_name`.
async fn presented(addr: SocketAddr, server_name: &str) -> CertificateDer<'static> {
    let stream = within(
        5,
        "TLS handshake",
        connect(addr, server_name, Trust::Any, &[]),
    )
    .await
    .unwrap_or_else(|e| panic!("handshake for {server_name}: {e}"));
    stream
        .get_ref()
        .1
        .peer_certificates()
        .expect("a certificate")[0]
        .clone()
}

/// Polls new handshakes for `server_name` until wakegate presents `expected`.
async fn wait_for_certificate(
    wg: &Wakegate,
    addr: SocketAddr,
    server_name: &str,
    expected: &CertificateDer<'static>,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while presented(addr, server_name).await != *expected {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new certificate for {server_name} was never presented; log:\n{}",
            wg.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An HTTP/1.1 connection over TLS that stays open between requests.
struct Http1 {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
}

impl Http1 {
    async fn open(stream: TlsStream<TcpStream>) -> Self {
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("HTTP/1.1 over TLS");
        tokio::spawn(connection);
        Self { sender }
    }

    async fn get(&mut self, host: &str, path: &str) -> (u16, String) {
        let req = http::Request::get(path)
            .header(http::header::HOST, host)
            .body(Empty::new())
            .unwrap();
        let response = within(5, "request over TLS", self.sender.send_request(req))
            .await
            .expect("response");
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}

/// Waits until the metric reads `value` (15 s at most: a file change is seen within 2 s), or
/// fails saying what it read.
async fn wait_for_metric(wg: &Wakegate, name: &str, labels: &str, value: f64) {
    let what = format!("{name}{{{labels}}} never read {value}");
    wg.wait_for_metrics(&what, Duration::from_secs(15), |text| {
        metric(text, name, labels) == Some(value)
    })
    .await;
}

async fn tls_metric(wg: &Wakegate, name: &str, labels: &str) -> f64 {
    metric(&wg.metrics().await, name, labels).unwrap_or_else(|| panic!("{name}{{{labels}}}"))
}

#[tokio::test]
async fn each_host_name_gets_its_certificate_by_sni_exact_before_wildcard_else_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let default = pair(dir.path(), "default", &["app.test"]);
    let wildcard = pair(dir.path(), "wildcard", &["*.wild.test"]);
    let exact = pair(dir.path(), "exact", &["exact.wild.test", "other.test"]);
    let https = Https::start(&[
        (&default.cert, &default.key),
        (&wildcard.cert, &wildcard.key),
        (&exact.cert, &exact.key),
    ])
    .await;
    let (wg, addr) = (&https.wg, https.addr);

    for (name, expected, which) in [
        ("app.test", &default, "exact name"),
        ("APP.test", &default, "names are case-insensitive"),
        ("x.wild.test", &wildcard, "wildcard"),
        ("exact.wild.test", &exact, "exact name before the wildcard"),
        ("other.test", &exact, "second name of a certificate"),
        (
            "a.b.wild.test",
            &default,
            "a wildcard covers one label only",
        ),
        (
            "unknown.test",
            &default,
            "no certificate names it: the first",
        ),
        ("127.0.0.1", &default, "no SNI (an IP address): the first"),
    ] {
        assert!(
            presented(addr, name).await == expected.der,
            "{name} ({which}) got another certificate"
        );
    }
    // A client is done with its handshake once it has sent its Finished; wakegate counts the
    // handshake when it has read it, a moment later.
    wait_for_metric(wg, "wakegate_tls_handshakes_total", "", 8.0).await;
    let expiry = tls_metric(
        wg,
        "wakegate_tls_certificate_expiry_timestamp_seconds",
        "wildcard.crt",
    )
    .await;
    assert!(
        expiry > 1.7e9,
        "notAfter of the wildcard certificate: {expiry}"
    );
}

/// curl, a real client, over HTTP/1.1 and over HTTP/2 (ALPN), trusting only the certificate
/// of the name it asks for.
#[tokio::test]
async fn curl_gets_http1_and_h2_by_alpn_and_the_upstream_is_told_https() {
    wakegate_test_support::needs_tool!("curl", "Debian: apt-get install curl");
    let dir = tempfile::tempdir().unwrap();
    let app = pair(dir.path(), "app", &["app.test"]);
    let https = Https::start(&[(&app.cert, &app.key)]).await;
    let addr = https.addr;

    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let out = tokio::process::Command::new("curl")
            .args(["--silent", "--show-error", flag, "--cacert"])
            .arg(&app.cert)
            .arg("--resolve")
            .arg(format!("app.test:{}:127.0.0.1", addr.port()))
            // What the client claims does not count: wakegate terminated TLS itself.
            .args(["-H", "X-Forwarded-Proto: http"])
            .args(["--write-out", "\n%{http_code} %{http_version}"])
            .arg(format!("https://app.test:{}/headers", addr.port()))
            .stdin(Stdio::null())
            .output()
            .await
            .expect("curl runs (install curl to run the TLS tests)");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "curl {flag}: {}\n{stdout}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (body, status) = stdout.rsplit_once('\n').expect("body and status line");
        assert_eq!(status, format!("200 {version}"), "curl {flag}");
        let headers: serde_json::Value = serde_json::from_str(body).expect("/headers is JSON");
        assert_eq!(headers["x-forwarded-proto"], "https", "curl {flag}: {body}");
        assert_eq!(headers["x-forwarded-for"], "127.0.0.1");
    }
    assert!(app.pem.starts_with("-----BEGIN CERTIFICATE-----"));

    // The same by hand: what each ALPN offer negotiates.
    for (offer, negotiated) in [
        (&[b"h2".as_slice(), b"http/1.1"][..], Some(b"h2".as_slice())),
        (&[b"http/1.1".as_slice()][..], Some(b"http/1.1".as_slice())),
        (&[][..], None),
    ] {
        let stream = connect(addr, "app.test", Trust::Only(&app.der), offer)
            .await
            .expect("handshake");
        assert_eq!(stream.get_ref().1.alpn_protocol(), negotiated);
    }
}

/// A Kubernetes Secret volume: `tls.crt` and `tls.key` are symlinks through `..data`, which
/// the kubelet points at a new directory when the Secret changes.
struct SecretVolume {
    dir: PathBuf,
    generation: u32,
}

impl SecretVolume {
    fn new(dir: &Path) -> Self {
        std::os::unix::fs::symlink("..data/tls.crt", dir.join("tls.crt")).unwrap();
        std::os::unix::fs::symlink("..data/tls.key", dir.join("tls.key")).unwrap();
        Self {
            dir: dir.to_owned(),
            generation: 0,
        }
    }

    /// Publishes `cert` and `key` (PEM text) as the kubelet does: a new directory, then one
    /// atomic rename of the `..data` symlink.
    fn publish(&mut self, cert: &str, key: &str) {
        self.generation += 1;
        let version = format!("..v{}", self.generation);
        std::fs::create_dir(self.dir.join(&version)).unwrap();
        std::fs::write(self.dir.join(&version).join("tls.crt"), cert).unwrap();
        std::fs::write(self.dir.join(&version).join("tls.key"), key).unwrap();
        let staged = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&version, &staged).unwrap();
        std::fs::rename(&staged, self.dir.join("..data")).unwrap();
    }

    fn cert(&self) -> PathBuf {
        self.dir.join("tls.crt")
    }

    fn key(&self) -> PathBuf {
        self.dir.join("tls.key")
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

#[tokio::test]
async fn https_connections_handed_to_another_worker_finish_their_handshake_there() {
    let dir = tempfile::tempdir().unwrap();
    let app = pair(dir.path(), "app", &["app.test"]);
    let backend = DemoBackend::start().await;
    let head = format!(
        "{}[listen]\nworkers = 2\n",
        tls_head(&[(&app.cert, &app.key)])
    );
    let wg = Wakegate::start(&head, &upstream_target(&backend)).await;
    let https = Https {
        addr: wg.https.expect("the HTTPS address in the log"),
        wg,
        backend,
    };
    // One at a time, each answered before the next: the connections alternate between the
    // workers whatever the kernel's hash does, so some reach their worker handed over,
    // before their handshake.
    let mut open = Vec::new();
    for n in 1..=10 {
        open.push(https.open(&app.der).await);
        assert_evenly_spread(&https.wg.metrics().await, 2, n);
    }
    for connection in &mut open {
        assert_eq!(connection.get("app.test", "/").await.0, 200);
    }
}

#[tokio::test]
async fn certificates_are_replaced_when_their_files_change_and_open_connections_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let made = tempfile::tempdir().unwrap();
    let first = pair(made.path(), "first", &["app.test"]);
    let second = pair(made.path(), "second", &["app.test"]);
    let mut volume = SecretVolume::new(dir.path());
    volume.publish(&read(&first.cert), &read(&first.key));

    let https = Https::start(&[(&volume.cert(), &volume.key())]).await;
    let (wg, addr) = (&https.wg, https.addr);
    assert!(presented(addr, "app.test").await == first.der);
    let mut open = https.open(&first.der).await;

    // The Secret changes: new handshakes get the new certificate, the open connection goes on.
    volume.publish(&read(&second.cert), &read(&second.key));
    wait_for_certificate(wg, addr, "app.test", &second.der).await;
    assert_eq!(open.get("app.test", "/").await.0, 200);
    assert_eq!(
        tls_metric(
            wg,
            "wakegate_tls_certificate_reloads_total",
            "result=\"ok\""
        )
        .await,
        1.0
    );

    // A broken pair (the first certificate with the second one's key) is not taken: the
    // failure is logged and counted, and the second certificate stays in use.
    volume.publish(&read(&first.cert), &read(&second.key));
    wait_for_metric(
        wg,
        "wakegate_tls_certificate_reloads_total",
        "result=\"failed\"",
        1.0,
    )
    .await;
    assert!(presented(addr, "app.test").await == second.der);
    assert!(
        wg.logs()
            .contains("the key does not belong to the certificate"),
        "the log says why:\n{}",
        wg.logs()
    );
    assert_eq!(open.get("app.test", "/").await.0, 200);
}

#[tokio::test]
async fn sighup_loads_the_certificates_the_configuration_names_now() {
    let dir = tempfile::tempdir().unwrap();
    let app = pair(dir.path(), "app", &["app.test"]);
    let api = pair(dir.path(), "api", &["api.test"]);
    let https = Https::start(&[(&app.cert, &app.key)]).await;
    let (wg, addr) = (&https.wg, https.addr);
    assert!(
        presented(addr, "api.test").await == app.der,
        "only one so far"
    );
    let mut open = https.open(&app.der).await;

    wg.rewrite_config(
        &tls_head(&[(&app.cert, &app.key), (&api.cert, &api.key)]),
        &upstream_target(&https.backend),
    );
    wg.signal(libc::SIGHUP);
    wait_for_certificate(wg, addr, "api.test", &api.der).await;
    assert!(presented(addr, "app.test").await == app.der);
    assert_eq!(open.get("app.test", "/").await.0, 200);
}

#[tokio::test]
async fn failed_handshakes_are_counted_by_reason_and_other_connections_carry_on() {
    let dir = tempfile::tempdir().unwrap();
    let app = pair(dir.path(), "app", &["app.test"]);
    let stranger = pair(dir.path(), "stranger", &["app.test"]);
    let https = Https::start(&[(&app.cert, &app.key)]).await;
    let (wg, addr) = (&https.wg, https.addr);
    let mut open = https.open(&app.der).await;

    // Plain HTTP to the HTTPS port: no answer but a closed connection.
    let response = raw_exchange(addr, "GET / HTTP/1.1\r\nHost: app.test\r\n\r\n").await;
    assert!(!response.starts_with("HTTP/1.1 200"), "{response:?}");
    // A client that trusts another certificate refuses this one (an alert).
    let refused = connect(addr, "app.test", Trust::Only(&stranger.der), &[]).await;
    assert!(refused.is_err(), "the client must refuse the certificate");
    // ALPN offers wakegate does not speak.
    let unknown = connect(addr, "app.test", Trust::Only(&app.der), &[b"spdy/3"]).await;
    assert!(unknown.is_err(), "no common application protocol");
    // A client that goes away halfway through its ClientHello.
    {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
            .await
            .unwrap();
        tcp.shutdown().await.unwrap();
        let mut rest = Vec::new();
        let _ = within(5, "wakegate closes", tcp.read_to_end(&mut rest)).await;
    }

    let expected = [
        ("invalid_message", 1.0),
        ("alert_received", 1.0),
        ("no_application_protocol", 1.0),
        ("closed", 1.0),
    ];
    within(5, "every failure counted", async {
        loop {
            let text = wg.metrics().await;
            let counted = |reason: &str| {
                metric(
                    &text,
                    "wakegate_tls_handshake_failures_total",
                    &format!("reason=\"{reason}\""),
                )
            };
            if expected.iter().all(|(r, n)| counted(r) == Some(*n)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(
        open.get("app.test", "/").await.0,
        200,
        "the open connection"
    );
    assert_eq!(
        tls_metric(wg, "wakegate_tls_handshakes_total", "").await,
        1.0
    );
}

#[test]
fn check_and_start_name_each_unusable_certificate_file_and_why() {
    let dir = tempfile::tempdir().unwrap();
    let good = pair(dir.path(), "good", &["app.test"]);
    let other = pair(dir.path(), "other", &["api.test"]);
    let missing = dir.path().join("missing.crt");
    let garbage = dir.path().join("garbage.key");
    std::fs::write(&garbage, "not a key\n").unwrap();
    let config = dir.path().join("wakegate.toml");
    std::fs::write(
        &config,
        format!(
            "{}\n[listen]\nproxy = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n",
            tls_head(&[
                (&good.cert, &good.key),
                (&missing, &good.key),
                (&good.cert, &garbage),
                (&good.cert, &other.key),
            ])
        ),
    )
    .unwrap();

    let out = std::process::Command::new(bin())
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .expect("wakegate check");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let got = |path: &Path| {
        format!(
            "tls.certificate: got {:?}, expected a usable file",
            path.display().to_string()
        )
    };
    for expected in [
        format!("{}: cannot read", got(&missing)),
        format!("{}: no PRIVATE KEY block", got(&garbage)),
        format!(
            "{}: the key does not belong to the certificate in {}",
            got(&other.key),
            good.cert.display()
        ),
        "has 3 problem(s)".to_owned(),
    ] {
        assert!(stderr.contains(&expected), "{expected:?} in:\n{stderr}");
    }

    let out = std::process::Command::new(bin())
        .args(["run", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .output()
        .expect("wakegate run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "wakegate must not start:\n{stderr}");
    assert!(
        stderr.contains(&format!("{}: cannot read", missing.display())),
        "{stderr}"
    );
}

/// A WebSocket (`wss://`) upgrade over TLS: the tunnel carries messages both ways.
#[tokio::test]
async fn websockets_upgrade_over_tls() {
    use tokio_tungstenite::tungstenite::Message;

    let dir = tempfile::tempdir().unwrap();
    let app = pair(dir.path(), "app", &["app.test"]);
    let https = Https::start(&[(&app.cert, &app.key)]).await;
    let stream = connect(
        https.addr,
        "app.test",
        Trust::Only(&app.der),
        &[b"http/1.1"],
    )
    .await
    .expect("handshake");
    let (mut ws, response) = within(
        10,
        "the WebSocket handshake over TLS",
        tokio_tungstenite::client_async("wss://app.test/ws", stream),
    )
    .await
    .expect("WebSocket handshake through the HTTPS listener");
    assert_eq!(response.status(), http::StatusCode::SWITCHING_PROTOCOLS);
    echoes(
        &mut ws,
        [
            Message::text("over TLS"),
            Message::binary(vec![7u8; 70_000]),
        ],
    )
    .await;
    ws.close(None).await.expect("closed cleanly");
}

/// `openssl s_client`, another real client, offering what wakegate must refuse: TLS 1.1, and
/// TLS 1.2 cipher suites without AEAD. Each refusal is counted as `incompatible`.
#[tokio::test]
async fn only_tls_1_2_and_1_3_with_aead_cipher_suites_are_accepted() {
    wakegate_test_support::needs_tool!("openssl", "Debian: apt-get install openssl");
    let dir = tempfile::tempdir().unwrap();
    let app = pair(dir.path(), "app", &["app.test"]);
    let https = Https::start(&[(&app.cert, &app.key)]).await;
    let addr = https.addr;
    let s_client = |args: &[&str]| {
        let mut command = tokio::process::Command::new("openssl");
        command
            .args(["s_client", "-connect", &addr.to_string()])
            .args(["-servername", "app.test"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        async move {
            let out = within(10, "openssl s_client", command.output())
                .await
                .expect("openssl runs (install openssl to run the TLS tests)");
            (
                out.status.success(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            )
        }
    };

    for (args, version) in [
        (&["-tls1_3"][..], "TLSv1.3"),
        (
            &["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"][..],
            "TLSv1.2",
        ),
        (
            &["-tls1_2", "-cipher", "ECDHE-ECDSA-CHACHA20-POLY1305"][..],
            "TLSv1.2",
        ),
    ] {
        let (ok, out) = s_client(args).await;
        assert!(ok, "{args:?} must be accepted:\n{out}");
        assert!(
            out.contains(&format!("New, {version}, Cipher is")),
            "{args:?}:\n{out}"
        );
    }
    // The client's own floor is lowered (security level 0) so that it offers what it refuses
    // by default: the refusal must be wakegate's.
    for args in [
        &["-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"][..],
        &["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA:@SECLEVEL=0"][..],
        &[
            "-tls1_2",
            "-cipher",
            "ECDHE-ECDSA-AES256-SHA384:@SECLEVEL=0",
        ][..],
    ] {
        let (ok, out) = s_client(args).await;
        assert!(!ok, "{args:?} must be refused:\n{out}");
    }
    wait_for_metric(
        &https.wg,
        "wakegate_tls_handshake_failures_total",
        "reason=\"incompatible\"",
        3.0,
    )
    .await;
}
