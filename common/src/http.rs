//! A small HTTP/1.1 client: the agent's HTTP health checks and the
//! controller's webhooks. Plain http, or https verified against the roots
//! the caller gives (the system's, plus any extra CA it trusts).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// What came back: the status and up to the caller's limit of the body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Bytes,
}

/// One request.
pub struct Request<'a> {
    pub method: hyper::Method,
    pub url: &'a str,
    /// Sent as `application/json` when present.
    pub json: Option<Bytes>,
    /// Roots for https URLs; an https URL without them is refused.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Body bytes read at most (0: the body is not read).
    pub body_limit: usize,
    /// None when the caller bounds the whole call itself.
    pub timeout: Option<Duration>,
}

/// Checks that `url` is an http:// or https:// URL with a host.
pub fn check_url(url: &str) -> Result<hyper::Uri, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http" | "https") if uri.host().is_some() => Ok(uri),
        _ => Err(format!("{url:?} must be an http:// or https:// URL with a host")),
    }
}

/// TLS client settings trusting the system's roots plus, when given, the
/// CA certificates in `extra_ca` (PEM).
pub fn tls_roots(extra_ca: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    // A missing or partly unreadable system store leaves fewer roots, which
    // shows up as a verification error naming the server.
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = extra_ca {
        let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut n = 0;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("{}: not a usable CA certificate: {e}", path.display()))?;
            n += 1;
        }
        if n == 0 {
            return Err(format!("{}: no PEM certificate in it", path.display()));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Sends `req`; an error says which stage failed (connect, TLS, request).
pub async fn send(req: Request<'_>) -> Result<Response, String> {
    match req.timeout {
        Some(t) => tokio::time::timeout(t, send_now(req))
            .await
            .map_err(|_| format!("no answer within {t:?}"))?,
        None => send_now(req).await,
    }
}

async fn send_now(req: Request<'_>) -> Result<Response, String> {
    let uri = check_url(req.url)?;
    // As the URL writes it: an IPv6 literal keeps its brackets in `Host`.
    let authority_host = uri.host().expect("checked").to_owned();
    let host = authority_host.trim_start_matches('[').trim_end_matches(']').to_owned();
    let https = uri.scheme_str() == Some("https");
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    if https && req.tls.is_none() {
        return Err("https is not supported here".into());
    }
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut builder = hyper::Request::builder()
        .method(req.method)
        .uri(path)
        .header(hyper::header::HOST, format!("{authority_host}:{port}"))
        .header(hyper::header::USER_AGENT, concat!("convoy/", env!("CARGO_PKG_VERSION")));
    if req.json.is_some() {
        builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    let request = builder
        .body(Full::new(req.json.unwrap_or_default()))
        .map_err(|e| e.to_string())?;
    if https {
        let tls = req.tls.expect("checked above");
        let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| format!("TLS: {e}"))?;
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        exchange(stream, request, req.body_limit).await
    } else {
        exchange(tcp, request, req.body_limit).await
    }
}

async fn exchange<S>(stream: S, request: hyper::Request<Full<Bytes>>, body_limit: usize) -> Result<Response, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let resp = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = resp.status().as_u16();
    let body = if body_limit == 0 {
        Bytes::new()
    } else {
        Limited::new(resp.into_body(), body_limit)
            .collect()
            .await
            .map_err(|e| format!("reading body: {e}"))?
            .to_bytes()
    };
    Ok(Response { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        assert!(check_url("http://127.0.0.1:8080/health").is_ok());
        assert!(check_url("https://hooks.example/x").is_ok());
        assert!(check_url("ftp://x/")
            .unwrap_err()
            .contains("must be an http:// or https://"));
        assert!(check_url("/just/a/path").unwrap_err().contains("must be"));
        assert!(check_url("http://exa mple/").unwrap_err().contains("is not a URL"));
    }

    #[test]
    fn extra_roots_must_hold_a_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("ca.pem");
        std::fs::write(&f, "not pem").unwrap();
        assert!(tls_roots(Some(&f)).unwrap_err().contains("no PEM certificate"));
        assert!(tls_roots(Some(&dir.path().join("missing.pem")))
            .unwrap_err()
            .contains("missing.pem"));
    }

    /// The request a listener on `bind` sees for a GET of `url_of(addr)`.
    async fn request_seen(bind: &str) -> (std::net::SocketAddr, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind(bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0; 4096];
            let n = s.read(&mut buf).await.unwrap();
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                .await
                .unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        let url = format!("http://{addr}/health");
        let r = send(Request {
            method: hyper::Method::GET,
            url: &url,
            json: None,
            tls: None,
            body_limit: 0,
            timeout: Some(Duration::from_secs(5)),
        })
        .await
        .unwrap();
        assert_eq!(r.status, 200);
        (addr, server.await.unwrap())
    }

    #[tokio::test]
    async fn the_host_header_is_the_urls_authority() {
        let (addr, seen) = request_seen("127.0.0.1:0").await;
        assert!(seen.contains(&format!("host: 127.0.0.1:{}\r\n", addr.port())), "{seen}");
        // An IPv6 literal keeps its brackets (RFC 7230 section 5.4).
        let (addr, seen) = request_seen("[::1]:0").await;
        assert!(seen.contains(&format!("host: [::1]:{}\r\n", addr.port())), "{seen}");
    }

    /// A plain http exchange against a listener on loopback.
    #[tokio::test]
    async fn posts_json_and_reads_the_status() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0; 4096];
            let n = s.read(&mut buf).await.unwrap();
            s.write_all(b"HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\nok")
                .await
                .unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        let r = send(Request {
            method: hyper::Method::POST,
            url: &url,
            json: Some(Bytes::from_static(b"{\"a\":1}")),
            tls: None,
            body_limit: 16,
            timeout: Some(Duration::from_secs(5)),
        })
        .await
        .unwrap();
        assert_eq!((r.status, &r.body[..]), (202, &b"ok"[..]));
        let seen = server.await.unwrap();
        assert!(seen.starts_with("POST /hook HTTP/1.1"), "{seen}");
        assert!(seen.contains("content-type: application/json"), "{seen}");
        assert!(seen.ends_with("{\"a\":1}"), "{seen}");
        let https = send(Request {
            method: hyper::Method::GET,
            url: "https://127.0.0.1:1/",
            json: None,
            tls: None,
            body_limit: 0,
            timeout: Some(Duration::from_secs(5)),
        })
        .await;
        assert_eq!(https.unwrap_err(), "https is not supported here");
    }
}
