//! A minimal blocking HTTP/1.1 client for the server tests: one request per connection (`Connection: close`),
//! Content-Length and chunked bodies, and server-sent events read one at a time.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::Value;

const IO_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("status {}: body is not JSON ({e}): {}", self.status, self.text()))
    }
}

/// Sends one request and returns the response head with the reader positioned at the body.
fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> std::io::Result<(Head, BufReader<TcpStream>)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = body {
        request.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body.unwrap_or_default());
    stream.write_all(&bytes)?;
    let mut reader = BufReader::new(stream);
    let head = read_head(&mut reader)?;
    Ok((head, reader))
}

struct Head {
    status: u16,
    headers: Vec<(String, String)>,
}

impl Head {
    fn is_chunked(&self) -> bool {
        self.headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"))
    }

    fn content_length(&self) -> Option<usize> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("content-length")).and_then(|(_, v)| v.parse().ok())
    }
}

fn read_line(reader: &mut impl BufRead) -> std::io::Result<String> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed"));
    }
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

fn read_head(reader: &mut impl BufRead) -> std::io::Result<Head> {
    loop {
        let status_line = read_line(reader)?;
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line `{status_line}`")))?;
        let mut headers = Vec::new();
        loop {
            let line = read_line(reader)?;
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        if status != 100 {
            return Ok(Head { status, headers });
        }
    }
}

/// Reads one chunk of a chunked body; `None` at the last chunk.
fn read_chunk(reader: &mut impl BufRead) -> std::io::Result<Option<Vec<u8>>> {
    let size_line = read_line(reader)?;
    let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
        .map_err(|_| std::io::Error::other(format!("bad chunk size `{size_line}`")))?;
    if size == 0 {
        return Ok(None);
    }
    let mut chunk = vec![0; size];
    reader.read_exact(&mut chunk)?;
    read_line(reader)?;
    Ok(Some(chunk))
}

/// Sends a request and returns the open connection without reading anything; dropping it disconnects.
pub fn send_only(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(addr).expect("connecting");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).and_then(|()| stream.write_all(body)).expect("sending the request");
    stream
}

/// One request, the whole response.
pub fn request(addr: SocketAddr, method: &str, path: &str, body: Option<&[u8]>) -> std::io::Result<Response> {
    request_with(addr, method, path, &[], body)
}

/// One request with extra headers, the whole response.
pub fn request_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> std::io::Result<Response> {
    let (head, mut reader) = send(addr, method, path, headers, body)?;
    let mut body = Vec::new();
    if head.is_chunked() {
        while let Some(chunk) = read_chunk(&mut reader)? {
            body.extend_from_slice(&chunk);
        }
    } else if let Some(len) = head.content_length() {
        body.resize(len, 0);
        reader.read_exact(&mut body)?;
    } else {
        reader.read_to_end(&mut body)?;
    }
    Ok(Response { status: head.status, headers: head.headers, body })
}

pub fn get(addr: SocketAddr, path: &str) -> Response {
    request(addr, "GET", path, None).unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

pub fn post(addr: SocketAddr, path: &str, body: &Value) -> Response {
    post_raw(addr, path, body.to_string().as_bytes())
}

pub fn post_raw(addr: SocketAddr, path: &str, body: &[u8]) -> Response {
    request(addr, "POST", path, Some(body)).unwrap_or_else(|e| panic!("POST {path}: {e}"))
}

/// A streamed (SSE) response, read one event at a time. Dropping it closes the connection.
pub struct EventStream {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    reader: BufReader<TcpStream>,
    buffer: Vec<u8>,
    ended: bool,
}

impl EventStream {
    pub fn open(addr: SocketAddr, path: &str, body: &Value) -> EventStream {
        let (head, reader) = send(addr, "POST", path, &[], Some(body.to_string().as_bytes()))
            .unwrap_or_else(|e| panic!("POST {path} (stream): {e}"));
        assert!(head.is_chunked(), "a stream is sent chunked (status {})", head.status);
        EventStream { status: head.status, headers: head.headers, reader, buffer: Vec::new(), ended: false }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The payload of the next `data:` event, or `None` when the body ended.
    pub fn next_data(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = self.buffer.drain(..end + 2).collect();
                let event = String::from_utf8(event).expect("events are UTF-8");
                let data =
                    event.trim_end().strip_prefix("data: ").unwrap_or_else(|| panic!("not a data event: {event:?}"));
                return Some(data.to_string());
            }
            if self.ended {
                assert!(self.buffer.is_empty(), "trailing bytes after the last event: {:?}", self.buffer);
                return None;
            }
            match read_chunk(&mut self.reader).expect("reading the stream") {
                Some(chunk) => self.buffer.extend_from_slice(&chunk),
                None => self.ended = true,
            }
        }
    }

    /// Every remaining payload.
    pub fn collect_data(mut self) -> Vec<String> {
        std::iter::from_fn(|| self.next_data()).collect()
    }
}
