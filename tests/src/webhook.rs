//! A webhook receiver on loopback for the tests: it answers 200 and hands
//! each JSON body on, over http or https.

use anyhow::Result;

/// A webhook receiver on loopback: answers 200 and hands each JSON body on.
pub fn webhook_receiver(
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
) -> Result<(u16, std::sync::mpsc::Receiver<serde_json::Value>)> {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for tcp in listener.incoming().map_while(|s| s.ok()) {
            let stream: Box<dyn ReadWrite> = match &tls {
                None => Box::new(tcp),
                Some(cfg) => match rustls::ServerConnection::new(cfg.clone()) {
                    Ok(conn) => Box::new(rustls::StreamOwned::new(conn, tcp)),
                    Err(_) => continue,
                },
            };
            let mut reader = BufReader::new(stream);
            let mut len = 0usize;
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                line.clear();
            }
            let mut body = vec![0; len];
            if reader.read_exact(&mut body).is_err() {
                continue;
            }
            let _ = reader
                .get_mut()
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            let _ = reader.get_mut().flush();
            if let Ok(v) = serde_json::from_slice(&body) {
                if tx.send(v).is_err() {
                    return;
                }
            }
        }
    });
    Ok((port, rx))
}

trait ReadWrite: std::io::Read + std::io::Write + Send {}
impl<T: std::io::Read + std::io::Write + Send> ReadWrite for T {}
