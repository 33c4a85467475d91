//! A plain HTTP/1.1 GET for scraping `/metrics`, `/healthz` and `/readyz`,
//! and reading one series out of the Prometheus text format.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// GET `path` on `addr` (HOST:PORT): (status, body); (0, "") when nothing
/// answers.
pub fn get(addr: &str, path: &str) -> (u16, String) {
    let (status, _, body) = get_accepting(addr, path, None);
    (status, body)
}

/// GET `path` with an `Accept` header: (status, content type, body); (0,
/// "", "") when nothing answers.
pub fn get_accepting(addr: &str, path: &str, accept: Option<&str>) -> (u16, String, String) {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return (0, String::new(), String::new());
    };
    let accept = accept.map(|a| format!("Accept: {a}\r\n")).unwrap_or_default();
    if s.set_read_timeout(Some(Duration::from_secs(5))).is_err()
        || write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{accept}Connection: close\r\n\r\n"
        )
        .is_err()
    {
        return (0, String::new(), String::new());
    }
    let mut raw = String::new();
    if s.read_to_string(&mut raw).is_err() {
        return (0, String::new(), String::new());
    }
    let status = raw.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    (status, content_type, body.to_owned())
}

/// The value of one series (`name` or `name{labels}`, exactly as rendered).
pub fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}
