//! A bounded load generator: a fixed number of GET requests per second to
//! each target for a fixed time, then it stops by itself (or when
//! dropped). Only test-bed and loopback addresses are accepted.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::testbed::http_get;

/// Requests in flight per target at most; beyond it a tick is skipped.
const MAX_IN_FLIGHT: usize = 64;

#[derive(Default)]
pub struct Counts {
    pub ok: AtomicU64,
    pub errors: AtomicU64,
    /// No answer (connection refused or reset, timeout).
    pub failed: AtomicU64,
    /// Every answer 200: when its request was sent and answered, and its
    /// body.
    pub answers: Mutex<Vec<Answer>>,
}

#[derive(Debug, Clone)]
pub struct Answer {
    pub sent: Instant,
    pub done: Instant,
    pub body: String,
}

pub struct Load {
    stop: Arc<AtomicBool>,
    pub counts: Arc<Counts>,
    threads: Vec<JoinHandle<()>>,
}

fn allowed(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || (v4.octets()[0] == 198 && (v4.octets()[1] & 0xfe) == 18),
        IpAddr::V6(v6) => v6.is_loopback(),
    }
}

impl Load {
    /// `rate` requests per second to each of `targets` for `duration`.
    pub fn start(targets: &[SocketAddr], path: &str, rate: u32, duration: Duration) -> Load {
        assert!(
            targets.iter().all(|t| allowed(t.ip())),
            "load goes only to the test bed (198.18.0.0/15) and loopback: {targets:?}"
        );
        assert!((1..=200).contains(&rate), "rate {rate}/s is out of bounds (1 to 200)");
        assert!(duration <= Duration::from_secs(600), "a load runs at most 10 minutes");
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Counts::default());
        let threads = targets
            .iter()
            .map(|&target| {
                let (stop, counts, path) = (stop.clone(), counts.clone(), path.to_owned());
                std::thread::spawn(move || drive(target, &path, rate, duration, &stop, &counts))
            })
            .collect();
        Load { stop, counts, threads }
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn drive(target: SocketAddr, path: &str, rate: u32, duration: Duration, stop: &AtomicBool, counts: &Arc<Counts>) {
    let start = Instant::now();
    let every = Duration::from_secs(1) / rate;
    let in_flight = Arc::new(AtomicUsize::new(0));
    let mut next = start;
    while !stop.load(Ordering::SeqCst) && start.elapsed() < duration {
        if in_flight.load(Ordering::SeqCst) < MAX_IN_FLIGHT {
            in_flight.fetch_add(1, Ordering::SeqCst);
            let (counts, in_flight, path) = (counts.clone(), in_flight.clone(), path.to_owned());
            std::thread::spawn(move || {
                let sent = Instant::now();
                match http_get(target, &path) {
                    Some((200, body)) => {
                        let done = Instant::now();
                        counts.answers.lock().unwrap().push(Answer { sent, done, body });
                        counts.ok.fetch_add(1, Ordering::Relaxed)
                    }
                    Some(_) => counts.errors.fetch_add(1, Ordering::Relaxed),
                    None => counts.failed.fetch_add(1, Ordering::Relaxed),
                };
                in_flight.fetch_sub(1, Ordering::SeqCst);
            });
        }
        next += every;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
    }
    // Let the requests under way finish, bounded.
    let deadline = Instant::now() + Duration::from_secs(5);
    while in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop();
    }
}
