//! The demo app convoy deploys on the test bed: a small HTTP server whose
//! version and behaviour are fixed when its release is packed, in
//! `release.toml` beside the binary:
//!
//! ```toml
//! version = "2.0.0"
//! mode = "healthy"        # or "unhealthy" (GET /health answers 500) or "crash"
//! port = 8080
//! latency = "40ms"        # how long GET / takes (default 0)
//! extra_latency = "300ms" # added to it: a slower release
//! error_rate = 0.2        # the share of GET / answered 500 (exactly, in order)
//! errors_after = "20s"    # error_rate applies only this long after start
//! start_delay = "500ms"   # how long it takes to start listening
//! ```
//!
//! `CONVOY_PORT` in the environment (a blue-green slot's) overrides
//! `port`; with `CONVOY_SLOT` set, `GET /` answers
//! `demo <version> <address it was reached at>/<slot>`.
//!
//! `GET /` answers `demo <version>`; `GET /health` answers 200 `ok`, or
//! 500 when packed `unhealthy` or while `/etc/demo-unhealthy` on the host
//! lists this version on a line of its own (to make one host of a fleet fail
//! one release). `/health` ignores `error_rate` and the latencies: a release
//! can pass its health checks and still fail real traffic.
//!
//! `GET /config` answers what the release's rendered `config/app.env`
//! holds: `DATABASE_URL=...` and `API_KEY_HASH=<FNV-1a of API_KEY>`;
//! `FAIL_HEALTH=true` in it makes `/health` answer 500.
//!
//! `GET /metrics` serves, in Prometheus' text format, the requests to `/`
//! by status (`http_requests_total{code}`) and their latency
//! (`http_request_duration_seconds`, a histogram).

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"'))
    })
}

fn failing_here(version: &str) -> bool {
    std::fs::read_to_string("/etc/demo-unhealthy").is_ok_and(|t| t.lines().any(|l| l.trim() == version))
}

/// Histogram bucket bounds, in seconds.
const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
];

/// Requests to `/` so far.
#[derive(Default)]
struct Stats {
    ok: u64,
    errors: u64,
    /// Count per bucket (not cumulative), and above the last.
    buckets: [u64; BUCKETS.len() + 1],
    sum: f64,
}

impl Stats {
    fn render(&self) -> String {
        let mut s = String::from("# TYPE http_requests_total counter\n");
        s.push_str(&format!("http_requests_total{{code=\"200\"}} {}\n", self.ok));
        s.push_str(&format!("http_requests_total{{code=\"500\"}} {}\n", self.errors));
        s.push_str("# TYPE http_request_duration_seconds histogram\n");
        let mut cumulative = 0;
        for (i, le) in BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i];
            s.push_str(&format!(
                "http_request_duration_seconds_bucket{{le=\"{le}\"}} {cumulative}\n"
            ));
        }
        let count = cumulative + self.buckets[BUCKETS.len()];
        s.push_str(&format!(
            "http_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}\n"
        ));
        s.push_str(&format!("http_request_duration_seconds_sum {}\n", self.sum));
        s.push_str(&format!("http_request_duration_seconds_count {count}\n"));
        s
    }
}

/// `300ms`, `2s` or a number of milliseconds.
fn millis(text: Option<&str>) -> Duration {
    let t = text.unwrap_or("0").trim();
    let ms = if let Some(n) = t.strip_suffix("ms") {
        n.parse().unwrap_or(0)
    } else if let Some(n) = t.strip_suffix('s') {
        n.parse::<u64>().unwrap_or(0) * 1000
    } else {
        t.parse().unwrap_or(0)
    };
    Duration::from_millis(ms)
}

struct Behaviour {
    version: String,
    mode: String,
    latency: Duration,
    error_rate: f64,
    errors_after: Duration,
    started: Instant,
    slot: Option<String>,
    /// `config/app.env` of the release, when configuration rendered one.
    config: Option<String>,
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
    // A blue-green slot's port comes from its environment file.
    let port: u16 = std::env::var("CONVOY_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .or_else(|| field(&text, "port").and_then(|p| p.parse().ok()))
        .unwrap_or(8080);
    if mode == "crash" {
        eprintln!("demo-app {version}: crashing on start, as packed");
        std::process::exit(3);
    }
    // A real service takes a moment to start; meanwhile its port refuses.
    std::thread::sleep(millis(field(&text, "start_delay")));
    let listener = TcpListener::bind(("0.0.0.0", port)).unwrap_or_else(|e| {
        eprintln!("demo-app: bind port {port}: {e}");
        std::process::exit(1)
    });
    eprintln!("demo-app {version} ({mode}) listening on port {port}");
    let behaviour = Arc::new(Behaviour {
        latency: millis(field(&text, "latency")) + millis(field(&text, "extra_latency")),
        error_rate: field(&text, "error_rate").and_then(|r| r.parse().ok()).unwrap_or(0.0),
        errors_after: millis(field(&text, "errors_after")),
        // A slot says where it runs, so that traffic through a balancer
        // can be traced to a host's slot.
        slot: std::env::var("CONVOY_SLOT").ok(),
        config: std::fs::read_to_string(root.join("config/app.env")).ok(),
        started: Instant::now(),
        version,
        mode,
    });
    let stats = Arc::new(Mutex::new(Stats::default()));
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let (behaviour, stats) = (behaviour.clone(), stats.clone());
        std::thread::spawn(move || serve(stream, &behaviour, &stats));
    }
}

fn serve(mut stream: TcpStream, b: &Behaviour, stats: &Mutex<Stats>) {
    let start = Instant::now();
    let mut line = String::new();
    let mut reader = BufReader::new(&stream);
    if reader.read_line(&mut line).is_err() {
        return;
    }
    // Drain the headers.
    let mut h = String::new();
    while reader.read_line(&mut h).map(|n| n > 2).unwrap_or(false) {
        h.clear();
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/");
    let configured = |key: &str| {
        b.config.as_deref().and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
                .map(str::to_owned)
        })
    };
    let (status, body) = match path {
        "/health"
            if b.mode == "unhealthy"
                || failing_here(&b.version)
                || configured("FAIL_HEALTH").as_deref() == Some("true") =>
        {
            ("500 Internal Server Error", "unhealthy\n".to_owned())
        }
        "/health" => ("200 OK", "ok\n".to_owned()),
        "/metrics" => ("200 OK", stats.lock().unwrap().render()),
        // What the app read from its rendered configuration: DATABASE_URL
        // as is, API_KEY only as a hash.
        "/config" => (
            "200 OK",
            format!(
                "DATABASE_URL={}\nAPI_KEY_HASH={}\n",
                configured("DATABASE_URL").unwrap_or_default(),
                configured("API_KEY").map(|k| fnv1a(&k)).unwrap_or_default()
            ),
        ),
        _ => {
            std::thread::sleep(b.latency);
            let mut s = stats.lock().unwrap();
            let n = s.ok + s.errors;
            // Exactly error_rate of the requests, spread evenly.
            let fail = b.started.elapsed() >= b.errors_after
                && ((n + 1) as f64 * b.error_rate).floor() > (n as f64 * b.error_rate).floor();
            let took = start.elapsed().as_secs_f64();
            let i = BUCKETS.iter().position(|le| took <= *le).unwrap_or(BUCKETS.len());
            s.buckets[i] += 1;
            s.sum += took;
            if fail {
                s.errors += 1;
                ("500 Internal Server Error", "error\n".to_owned())
            } else {
                s.ok += 1;
                let whoami = match (&b.slot, stream.local_addr()) {
                    (Some(slot), Ok(addr)) => format!(" {}/{slot}", addr.ip()),
                    _ => String::new(),
                };
                ("200 OK", format!("demo {}{whoami}\n", b.version))
            }
        }
    };
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// FNV-1a, 64 bits, in hex: enough to show which value the app read
/// without showing it (and without a hashing crate in this small binary).
pub fn fnv1a(s: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}
