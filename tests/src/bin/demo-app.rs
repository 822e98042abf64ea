//! The demo app convoy deploys on the test bed: a tiny HTTP server whose
//! version and behaviour are fixed when its release is packed, in
//! `release.toml` beside the binary:
//!
//! ```toml
//! version = "2.0.0"
//! mode = "healthy"        # or "unhealthy" (GET /health answers 500) or "crash"
//! port = 8080
//! ```
//!
//! `GET /` answers `demo <version>`; `GET /health` answers 200 `ok`, or
//! 500 when packed `unhealthy` or while `/etc/demo-unhealthy` on the host
//! lists this version on a line of its own (to make one host of a fleet fail
//! one release).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::PathBuf;

fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"'))
    })
}

fn failing_here(version: &str) -> bool {
    std::fs::read_to_string("/etc/demo-unhealthy").is_ok_and(|t| t.lines().any(|l| l.trim() == version))
}

fn main() {
    let exe = std::env::current_exe().expect("current exe");
    // <release>/bin/demo-app → <release>/release.toml; the install path is a
    // symlink, so resolve from argv[0]'s directory as systemd started it.
    let root = std::env::args().nth(1).map(PathBuf::from).unwrap_or_else(|| {
        exe.parent()
            .and_then(|p| p.parent())
            .expect("release root")
            .to_path_buf()
    });
    let text = std::fs::read_to_string(root.join("release.toml")).unwrap_or_else(|e| {
        eprintln!("demo-app: {}: {e}", root.join("release.toml").display());
        std::process::exit(1)
    });
    let version = field(&text, "version").unwrap_or("unknown").to_owned();
    let mode = field(&text, "mode").unwrap_or("healthy").to_owned();
    let port: u16 = field(&text, "port").and_then(|p| p.parse().ok()).unwrap_or(8080);
    if mode == "crash" {
        eprintln!("demo-app {version}: crashing on start, as packed");
        std::process::exit(3);
    }
    let listener = TcpListener::bind(("0.0.0.0", port)).unwrap_or_else(|e| {
        eprintln!("demo-app: bind port {port}: {e}");
        std::process::exit(1)
    });
    eprintln!("demo-app {version} ({mode}) listening on port {port}");
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let mut line = String::new();
        let mut reader = BufReader::new(&stream);
        if reader.read_line(&mut line).is_err() {
            continue;
        }
        // Drain the headers.
        let mut h = String::new();
        while reader.read_line(&mut h).map(|n| n > 2).unwrap_or(false) {
            h.clear();
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/");
        let (status, body) = match path {
            "/health" if mode == "unhealthy" || failing_here(&version) => {
                ("500 Internal Server Error", "unhealthy\n".to_owned())
            }
            "/health" => ("200 OK", "ok\n".to_owned()),
            _ => ("200 OK", format!("demo {version}\n")),
        };
        let _ = write!(
            stream,
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
}
