//! HTTP/1.1 on the wire, the pieces both sides of the gateway read the same way: the API port's server
//! (`server/http1.rs`) and the upstream client (`backends/pool.rs`). Where a head ends, field lists, the one-hop
//! fields, a head's end-to-end fields passed on as they came ([`Fields`]: a request's to the backend, an answer's
//! to the client), `Content-Length` and `Transfer-Encoding` as RFC 9112 reads them, and a body's framing decoded
//! from a read buffer (by length, by chunks, or until the close).

use bytes::{Buf, Bytes, BytesMut};
use smallvec::SmallVec;

/// A head (request or answer) may take at most this many bytes.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Fields a head may have at most.
pub const MAX_HEADERS: usize = 100;
/// Bytes asked of a socket per read.
pub const READ_CHUNK: usize = 8 * 1024;
/// A chunk-size line (with extensions) or a trailer line may take at most this many bytes.
const MAX_LINE_BYTES: usize = 4 * 1024;
/// Hex digits a chunk size may have at most (sizes stay far below `u64::MAX`).
const MAX_CHUNK_SIZE_DIGITS: usize = 15;

/// The comma-separated items of one field value, trimmed (empty ones included).
pub fn list(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(<[u8]>::trim_ascii)
}

/// Fields of one hop only (RFC 9110 §7.6.1), plus `host` (each hop names its own) and `expect` (the gateway has
/// read the body already): never passed on, in either direction. `name` in any case.
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    let names: &[&[u8]] = match name.len() {
        2 => &[b"te"],
        4 => &[b"host"],
        6 => &[b"expect"],
        7 => &[b"trailer", b"upgrade"],
        10 => &[b"connection", b"keep-alive"],
        16 => &[b"proxy-connection"],
        17 => &[b"transfer-encoding"],
        18 => &[b"proxy-authenticate"],
        19 => &[b"proxy-authorization"],
        _ => return false,
    };
    names.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// The field names a `Connection` value lists (its options other than `close` and `keep-alive`, which name no
/// field one hop may still carry): fields of that hop only.
pub fn connection_named(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    list(value).filter(|t| !t.is_empty() && !t.eq_ignore_ascii_case(b"close") && !t.eq_ignore_ascii_case(b"keep-alive"))
}

/// What a `Connection` value says of the connection: (`close`, `keep-alive`).
pub fn connection_options(value: &[u8]) -> (bool, bool) {
    list(value).fold((false, false), |(close, keep), t| {
        (close || t.eq_ignore_ascii_case(b"close"), keep || t.eq_ignore_ascii_case(b"keep-alive"))
    })
}

/// What a head's `Transfer-Encoding` fields say: whether there is one, how many codings they name, and whether
/// the last one is `chunked`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Codings {
    /// A `Transfer-Encoding` field is present (even one naming no coding).
    pub present: bool,
    /// The codings named.
    pub count: usize,
    pub last_chunked: bool,
}

impl Codings {
    /// At least one coding is named.
    pub fn any(&self) -> bool {
        self.count > 0
    }

    pub fn add(&mut self, value: &[u8]) {
        self.present = true;
        for coding in list(value).filter(|t| !t.is_empty()) {
            self.count += 1;
            self.last_chunked = coding.eq_ignore_ascii_case(b"chunked");
        }
    }
}

/// Where the head at the start of `buf` ends: just past its empty line, when it has all arrived. Lines end with
/// CRLF or a bare LF, and empty lines before the head are skipped, as httparse reads them, so a head found here is
/// one httparse reads whole (or refuses). Found first, the head is split off its read buffer and parsed where it
/// lies: its fields share those bytes instead of a copy of them.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    let mut from = buf.iter().position(|&b| b != b'\r' && b != b'\n')?;
    while let Some(at) = memchr::memchr(b'\n', &buf[from..]) {
        let next = from + at + 1;
        match buf.get(next..) {
            Some([b'\n', ..]) => return Some(next + 1),
            Some([b'\r', b'\n', ..]) => return Some(next + 2),
            _ => from = next,
        }
    }
    None
}

/// A head's end-to-end fields kept as they came, for a head passed on: the head's bytes and the lines kept of them.
/// Written out, runs of lines that follow each other with CRLF line ends are copied in one piece; no map is built
/// and no value copied or shared one by one.
#[derive(Debug, Clone, Default)]
pub struct Fields {
    raw: Bytes,
    /// Each kept field's line in `raw`: from its name to its line end (CR LF or LF, left out).
    lines: SmallVec<[(u32, u32); 12]>,
}

impl Fields {
    /// Keeps, of the parsed `fields` of the head in `raw` (where they point), those `keep` returns true for.
    pub fn new<'h>(
        raw: &Bytes,
        fields: &[httparse::Header<'h>],
        mut keep: impl FnMut(&httparse::Header<'h>) -> bool,
    ) -> Self {
        let base = raw.as_ptr() as usize;
        let mut lines = SmallVec::new();
        for h in fields {
            // (Every field is shown to `keep`, which reads the framing ones; only the kept ones' lines are found.)
            if !keep(h) {
                continue;
            }
            // (A field's name and value hold no LF: the first after its name ends its line.)
            let Some(start) = (h.name.as_ptr() as usize).checked_sub(base) else { continue };
            let name_end = start + h.name.len();
            let Some(lf) = raw.get(name_end..).and_then(|rest| memchr::memchr(b'\n', rest)) else { continue };
            let end = name_end + lf - usize::from(lf > 0 && raw[name_end + lf - 1] == b'\r');
            if let (Ok(start), Ok(end)) = (u32::try_from(start), u32::try_from(end)) {
                lines.push((start, end));
            }
        }
        Self { raw: raw.clone(), lines }
    }

    /// Leaves out the fields whose name is one of `names` (any case).
    pub fn remove(&mut self, names: &[&[u8]]) {
        if names.is_empty() {
            return;
        }
        let raw = &self.raw;
        self.lines.retain(|&mut (start, end)| {
            let name = split_line(&raw[start as usize..end as usize]).0;
            !names.iter().any(|n| n.eq_ignore_ascii_case(name))
        });
    }

    /// Each field's name and value (trimmed), in order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.lines.iter().map(|&(start, end)| split_line(&self.raw[start as usize..end as usize]))
    }

    /// The first value of the field `name` (any case).
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.iter().find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes())).map(|(_, value)| value)
    }

    /// Appends every field, each line ended with CR LF.
    pub fn write(&self, out: &mut Vec<u8>) {
        let mut lines = self.lines.iter().peekable();
        while let Some(&(start, mut end)) = lines.next() {
            // A run: each line ends with CR LF and the next one starts right after it.
            while let Some(&&(next, next_end)) = lines.peek()
                && self.raw.get(end as usize..next as usize) == Some(b"\r\n")
            {
                end = next_end;
                lines.next();
            }
            out.extend_from_slice(&self.raw[start as usize..end as usize]);
            out.extend_from_slice(b"\r\n");
        }
    }
}

#[cfg(test)]
impl Fields {
    /// The fields `name: value` of `lines`, as a head holding them gives them.
    pub fn of(lines: &[(&str, &str)]) -> Self {
        let mut text = String::from("GET / HTTP/1.1\r\n");
        for (name, value) in lines {
            text += &format!("{name}: {value}\r\n");
        }
        text += "\r\n";
        let raw = Bytes::from(text);
        let mut slots = [httparse::EMPTY_HEADER; 32];
        let mut parsed = httparse::Request::new(&mut slots);
        assert!(parsed.parse(&raw).is_ok_and(|status| status.is_complete()));
        Self::new(&raw, parsed.headers, |_| true)
    }
}

/// A field line's name and value (trimmed).
fn split_line(line: &[u8]) -> (&[u8], &[u8]) {
    let colon = memchr::memchr(b':', line).unwrap_or(line.len());
    (&line[..colon], line.get(colon + 1..).unwrap_or_default().trim_ascii())
}

/// Adds one `Content-Length` field's value to what the head's earlier ones said: every comma-separated item must
/// be the same run of digits, else the reason it is not.
pub fn add_content_length(length: &mut Option<u64>, value: &[u8]) -> Result<(), String> {
    for item in list(value) {
        let value = (!item.is_empty() && item.iter().all(u8::is_ascii_digit))
            .then(|| std::str::from_utf8(item).ok()?.parse::<u64>().ok())
            .flatten()
            .ok_or_else(|| format!("an invalid Content-Length `{}`", item.escape_ascii()))?;
        if length.is_some_and(|l| l != value) {
            return Err("conflicting Content-Length values".into());
        }
        *length = Some(value);
    }
    Ok(())
}

/// `n` in decimal, in `digits`.
pub fn itoa(mut n: u64, digits: &mut [u8; 20]) -> &[u8] {
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &digits[at..];
        }
    }
}

/// How a body is delimited (RFC 9112 §6.3), and how far its reading has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// This many bytes are left.
    Length(u64),
    Chunked(Chunk),
    /// Until the sender closes the connection (which is then not reused).
    UntilClose,
    Done,
}

/// Where a chunked body's reading stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// At a chunk-size line.
    Size,
    /// In a chunk's data, this many bytes left.
    Data(u64),
    /// At the line break after a chunk's data.
    DataEnd,
    /// In the trailer section after the last chunk.
    Trailers,
}

/// What [`Framing::decode`] took from a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// The body's next bytes.
    Data(Bytes),
    /// Nothing until more bytes are read.
    More,
    /// The body is complete.
    End,
}

impl Framing {
    /// Takes the body's next data from `buf` (chunk extensions ignored, trailer fields dropped), or says that more
    /// bytes are needed, or that the body is complete; the reason when the bytes are not a body of this framing.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, &'static str> {
        loop {
            match *self {
                Self::Done => return Ok(Decoded::End),
                Self::Length(0) => {
                    *self = Self::Done;
                    return Ok(Decoded::End);
                }
                Self::Length(left) => {
                    let Some(data) = take_data(buf, left) else { return Ok(Decoded::More) };
                    *self = Self::Length(left - data.len() as u64);
                    return Ok(Decoded::Data(data));
                }
                Self::UntilClose => return Ok(take_data(buf, u64::MAX).map_or(Decoded::More, Decoded::Data)),
                Self::Chunked(Chunk::Data(left)) => {
                    let Some(data) = take_data(buf, left) else { return Ok(Decoded::More) };
                    let left = left - data.len() as u64;
                    *self = Self::Chunked(if left == 0 { Chunk::DataEnd } else { Chunk::Data(left) });
                    return Ok(Decoded::Data(data));
                }
                Self::Chunked(state) => {
                    let Some(line) = take_line(buf)? else { return Ok(Decoded::More) };
                    *self = match state {
                        Chunk::Size => match chunk_size(&line) {
                            Some(0) => Self::Chunked(Chunk::Trailers),
                            Some(size) => Self::Chunked(Chunk::Data(size)),
                            None => return Err("an invalid chunk size"),
                        },
                        Chunk::DataEnd if line.is_empty() => Self::Chunked(Chunk::Size),
                        Chunk::DataEnd => return Err("chunk data longer than its size"),
                        // Trailer fields are dropped; an empty line ends the body.
                        Chunk::Trailers if line.is_empty() => Self::Done,
                        Chunk::Trailers | Chunk::Data(_) => Self::Chunked(state),
                    };
                }
            }
        }
    }

    /// Where the body stood when its connection ended before its end (for the error).
    pub fn cut_short(&self) -> &'static str {
        match self {
            Self::Chunked(Chunk::Data(_)) => "in the middle of a chunk",
            Self::Chunked(_) => "before the end of a chunked body",
            _ => "before the end of its body",
        }
    }
}

/// Up to `left` bytes of data from `buf` (none when it is empty).
fn take_data(buf: &mut BytesMut, left: u64) -> Option<Bytes> {
    if buf.is_empty() || left == 0 {
        return None;
    }
    let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
    Some(buf.split_to(n).freeze())
}

/// A whole line (without its CRLF) from `buf`, or `None` when it has not all arrived.
fn take_line(buf: &mut BytesMut) -> Result<Option<BytesMut>, &'static str> {
    match buf.windows(2).position(|w| w == b"\r\n") {
        Some(at) => {
            let line = buf.split_to(at);
            buf.advance(2);
            Ok(Some(line))
        }
        None if buf.len() > MAX_LINE_BYTES => Err("a chunk line over 4 KiB"),
        None => Ok(None),
    }
}

/// The size of a chunk-size line: hex digits only, then optionally whitespace and `;` extensions
/// (`1a;name=value` → 26). Anything else (a sign, leading whitespace, an empty size) is refused.
pub fn chunk_size(line: &[u8]) -> Option<u64> {
    let end = line.iter().position(|b| !b.is_ascii_hexdigit()).unwrap_or(line.len());
    let (digits, rest) = line.split_at(end);
    let rest = rest.trim_ascii_start();
    if digits.is_empty() || digits.len() > MAX_CHUNK_SIZE_DIGITS || !(rest.is_empty() || rest.starts_with(b";")) {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sizes_are_hex_digits_then_optional_extensions() {
        assert_eq!(chunk_size(b"1a"), Some(26));
        assert_eq!(chunk_size(b"1A;name=value"), Some(26));
        assert_eq!(chunk_size(b"1a ;name"), Some(26));
        assert_eq!(chunk_size(b"0"), Some(0));
        for bad in [&b""[..], b"xyz", b"+a", b" 1a", b"1a x", b"ffffffffffffffffff", b";x"] {
            assert_eq!(chunk_size(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    /// A chunked body fed a byte at a time decodes to its data (extension ignored, trailer dropped) and ends;
    /// what follows it stays in the buffer.
    #[test]
    fn a_chunked_body_decodes_from_any_split_of_its_bytes() {
        let wire = b"3;x=1\r\nabc\r\n2\r\nde\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        let mut framing = Framing::Chunked(Chunk::Size);
        let (mut buf, mut data, mut ended) = (BytesMut::new(), Vec::new(), false);
        for &byte in wire {
            buf.extend_from_slice(&[byte]);
            loop {
                match framing.decode(&mut buf).unwrap() {
                    Decoded::Data(d) => data.extend_from_slice(&d),
                    Decoded::More => break,
                    Decoded::End => {
                        ended = true;
                        break;
                    }
                }
            }
            if ended {
                break;
            }
        }
        assert_eq!((data.as_slice(), ended), (&b"abcde"[..], true));
        assert_eq!(&buf[..], b"");
        let mut buf = BytesMut::from(&wire[..]);
        let mut framing = Framing::Chunked(Chunk::Size);
        while framing.decode(&mut buf).unwrap() != Decoded::End {}
        assert_eq!(&buf[..], b"NEXT");
        let mut bad = BytesMut::from(&b"3\r\nabcd\r\n"[..]);
        let mut framing = Framing::Chunked(Chunk::Size);
        assert_eq!(framing.decode(&mut bad), Ok(Decoded::Data(Bytes::from_static(b"abc"))));
        assert_eq!(framing.decode(&mut bad), Err("chunk data longer than its size"));
    }

    #[test]
    fn a_head_ends_at_its_first_empty_line_whatever_its_line_ends() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nbody"), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\nA: b\n\nbody"), Some(21));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\n\r\n"), Some(23));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n\n"), Some(23));
        assert_eq!(head_end(b"\r\n\nGET / HTTP/1.1\r\n\r\n"), Some(21), "empty lines before it are skipped");
        for partial in [&b""[..], b"GET / HTTP/1.1\r\n", b"GET / HTTP/1.1\r\nA: b\r\n\r", b"\r", b"\r\n\r\n"] {
            assert_eq!(head_end(partial), None, "{:?}", String::from_utf8_lossy(partial));
        }
        // What httparse reads of each found head: all of it.
        for wire in [
            &b"GET / HTTP/1.1\r\nA: b\r\n\r\n"[..],
            b"GET / HTTP/1.1\nA: b\n\n",
            b"GET / HTTP/1.1\r\nA: b\n\r\n",
            b"\r\n\nGET / HTTP/1.1\r\n\r\n",
        ] {
            let mut fields = [httparse::EMPTY_HEADER; 4];
            let parsed = httparse::Request::new(&mut fields).parse(wire).unwrap();
            assert_eq!(parsed, httparse::Status::Complete(head_end(wire).unwrap()));
        }
    }

    /// Kept fields are written back with CRLF line ends, runs of CRLF lines in one piece, and found by name.
    #[test]
    fn fields_are_kept_as_they_came() {
        let raw = Bytes::from_static(b"HTTP/1.1 200 OK\r\nA: 1\r\nDrop: x\r\nB:  two  \r\nC: 3\nD: 4\r\nE:\r\n\r\n");
        let mut slots = [httparse::EMPTY_HEADER; 8];
        let mut parsed = httparse::Response::new(&mut slots);
        assert!(parsed.parse(&raw).unwrap().is_complete());
        let mut fields = Fields::new(&raw, parsed.headers, |h| h.name != "Drop");
        let mut out = Vec::new();
        fields.write(&mut out);
        assert_eq!(String::from_utf8(out).unwrap(), "A: 1\r\nB:  two  \r\nC: 3\r\nD: 4\r\nE:\r\n");
        assert_eq!(fields.get("b"), Some(&b"two"[..]));
        assert_eq!(fields.get("e"), Some(&b""[..]));
        assert_eq!(fields.get("drop"), None);
        fields.remove(&[b"c", b"A"]);
        let names: Vec<_> = fields.iter().map(|(name, _)| name).collect();
        assert_eq!(names, [&b"B"[..], b"D", b"E"]);
        let mut out = Vec::new();
        fields.write(&mut out);
        assert_eq!(String::from_utf8(out).unwrap(), "B:  two  \r\nD: 4\r\nE:\r\n");
    }

    #[test]
    fn connection_options_and_named_fields() {
        assert_eq!(connection_options(b"Keep-Alive, X-A"), (false, true));
        assert_eq!(connection_options(b"close"), (true, false));
        assert_eq!(connection_named(b"close, X-A, keep-alive,,x-b").collect::<Vec<_>>(), [&b"X-A"[..], b"x-b"]);
    }
}
