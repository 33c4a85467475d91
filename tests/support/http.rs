//! A plain HTTP/1.1 GET for scraping `/metrics`, `/healthz` and `/readyz`,
//! and reading one series out of the Prometheus text format.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// GET `path` on `addr` (HOST:PORT): (status, body); (0, "") when nothing
/// answers.
pub fn get(addr: &str, path: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return (0, String::new());
    };
    if s.set_read_timeout(Some(Duration::from_secs(5))).is_err()
        || write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .is_err()
    {
        return (0, String::new());
    }
    let mut raw = String::new();
    if s.read_to_string(&mut raw).is_err() {
        return (0, String::new());
    }
    let status = raw.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The value of one series (`name` or `name{labels}`, exactly as rendered).
pub fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}
