//! HTTP/1.x for a forward proxy, sans-IO: message heads (RFC 9112 §2-§5), request targets
//! (RFC 9112 §3.2), body framing (RFC 9112 §6) and the chunked coding (RFC 9112 §7.1), plus the
//! rewrite of a proxied message (hop-by-hop fields, RFC 9110 §7.6.1).
//!
//! Everything here works on byte slices and owns no socket and no clock.
//!
//! - Heads: [`parse_request_head`] and [`parse_response_head`] return `Ok(Parsed::Incomplete)` for
//!   a valid prefix, `Ok(Parsed::Complete(head, consumed))` once the empty line ending the head is
//!   in the input (bytes after it are the body or the next message), or a [`ParseError`]. A start
//!   line that cannot be valid is reported as soon as it is visible, so a client sending binary
//!   garbage (a TLS hello, a SOCKS greeting) is answered at once rather than at the timeout. A head
//!   that does not end within [`Limits::max_head_bytes`] is [`ParseError::HeadTooLarge`]. A driver
//!   reading a head in small pieces should call [`head_end`] on the new bytes first and parse
//!   only once the end is there, so that the work stays linear in the head's size.
//! - Strictness: lines end in CRLF, or a bare LF (RFC 9112 §2.2 allows recipients to accept it);
//!   a CR anywhere else, obsolete line folding, whitespace before a field's colon, field names
//!   that are not tokens and control characters in values are errors, because those are the
//!   ambiguities request smuggling is made of. Empty lines before a request line are skipped
//!   (RFC 9112 §2.2).
//! - Bodies: [`request_body`] and [`response_body`] decide how a body is delimited, and a
//!   [`BodyTracker`] says how many bytes of a stream belong to it. Chunked bodies are not decoded:
//!   the tracker parses chunk sizes, chunk ends and the trailer section only to find where the
//!   body ends, so the proxy forwards the coding byte for byte.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::dial::{MAX_DOMAIN_LEN, TargetAddr};

/// Default cap on the size of a message head (start line, fields and the empty line).
pub const DEFAULT_MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most header fields accepted in one head.
pub const MAX_HEADERS: usize = 100;
/// Longest chunk-size line (size, extensions, line end), and longest trailer field line.
pub const MAX_CHUNK_LINE: usize = 4096;

/// Size limits applied while parsing heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest head, from the first byte of the start line to the end of the empty line.
    pub max_head_bytes: usize,
    /// Most header fields.
    pub max_headers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_head_bytes: DEFAULT_MAX_HEAD_BYTES,
            max_headers: MAX_HEADERS,
        }
    }
}

/// Result of a parser that did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed<T> {
    /// The input is a valid but unfinished prefix; read more bytes.
    Incomplete,
    /// A head, and the number of input bytes it occupied.
    Complete(T, usize),
}

/// Input that can never become an acceptable HTTP message (or that this proxy refuses).
///
/// [`ParseError::status`] gives the status code a client is answered with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The head does not end within the size limit.
    #[error("message head larger than {0} bytes")]
    HeadTooLarge(usize),
    /// The head has more header fields than allowed.
    #[error("more than {0} header fields")]
    TooManyHeaders(usize),
    /// The request line or status line is malformed.
    #[error("malformed start line")]
    BadStartLine,
    /// A well-formed HTTP version other than 1.0 and 1.1.
    #[error("HTTP version not supported")]
    UnsupportedVersion,
    /// A header field line is malformed (name not a token, whitespace before the colon, control
    /// characters in the value).
    #[error("malformed header field")]
    BadHeader,
    /// A header line starts with whitespace (obsolete line folding, RFC 9112 §5.2).
    #[error("obsolete line folding")]
    ObsFold,
    /// A carriage return that does not end a line.
    #[error("bare CR in message head")]
    BareCr,
    /// The request target is not a usable URI or authority.
    #[error("bad request target: {0}")]
    BadTarget(&'static str),
    /// An `https://` absolute URI: a proxy cannot speak TLS for the client.
    #[error("https URIs must be tunnelled with CONNECT")]
    HttpsUri,
    /// An origin-form (`/path`) or asterisk-form target: a request for a server, not a proxy.
    #[error("not a proxy request: the target must be an absolute http:// URI")]
    NotProxyRequest,
    /// A CONNECT target without a port.
    #[error("CONNECT target needs an explicit port")]
    MissingPort,
    /// More than one Host field (RFC 9112 §3.2).
    #[error("more than one Host header field")]
    MultipleHosts,
    /// A Content-Length that is not a number, or several that differ.
    #[error("invalid Content-Length")]
    BadContentLength,
    /// Framing that is ambiguous: Transfer-Encoding with Content-Length, or Transfer-Encoding
    /// in an HTTP/1.0 request (RFC 9112 §6.1, §6.3).
    #[error("ambiguous message framing")]
    AmbiguousFraming,
    /// A Transfer-Encoding list that is empty, or in which `chunked` is repeated or not last.
    #[error("invalid Transfer-Encoding")]
    BadTransferEncoding,
    /// A request transfer coding other than `chunked`.
    #[error("transfer coding not implemented")]
    UnsupportedTransferCoding,
    /// A chunked body that breaks RFC 9112 §7.1.
    #[error("malformed chunked body: {0}")]
    BadChunk(&'static str),
    /// The stream ended before the body did.
    #[error("body truncated")]
    TruncatedBody,
}

impl ParseError {
    /// The status code a client whose request fails with this error is answered with.
    pub fn status(&self) -> u16 {
        match self {
            Self::UnsupportedVersion => 505,
            Self::UnsupportedTransferCoding => 501,
            _ => 400,
        }
    }
}

/// An HTTP version this proxy speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    /// HTTP/1.0: connections close after each response unless agreed otherwise.
    Http10,
    /// HTTP/1.1: connections persist unless `Connection: close`.
    Http11,
}

impl Version {
    /// The protocol string, e.g. `HTTP/1.1`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http10 => "HTTP/1.0",
            Self::Http11 => "HTTP/1.1",
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One header field. The name is a token (ASCII) as received; the value has no surrounding
/// whitespace and may contain obs-text (bytes >= 0x80), hence bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Header {
    /// Field name, case preserved.
    pub name: String,
    /// Field value, without leading or trailing whitespace.
    pub value: Vec<u8>,
}

impl Header {
    /// A field from a name and a value.
    pub fn new(name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        Self {
            name: name.into(),
            value: value.into(),
        }
    }

    /// Whether the field is called `name` (ASCII case-insensitive).
    pub fn is(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name)
    }
}

impl fmt::Debug for Header {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Credentials must not reach logs through a Debug print.
        if self.is("proxy-authorization") || self.is("authorization") {
            write!(f, "{}: <redacted>", self.name)
        } else {
            write!(f, "{}: {}", self.name, String::from_utf8_lossy(&self.value))
        }
    }
}

/// The header fields of a message, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(pub Vec<Header>);

impl Headers {
    /// Values of every field called `name`, in order.
    pub fn values<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.0
            .iter()
            .filter(move |h| h.is(name))
            .map(|h| h.value.as_slice())
    }

    /// The elements of the comma-separated lists in every field called `name`, trimmed, empty
    /// elements skipped (RFC 9110 §5.6.1). Non-UTF-8 elements are skipped.
    pub fn list<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.values(name)
            .flat_map(|v| v.split(|&b| b == b','))
            .filter_map(|e| std::str::from_utf8(trim_ows(e)).ok())
            .filter(|e| !e.is_empty())
    }

    /// Whether a list field `name` contains `token` (ASCII case-insensitive).
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.list(name).any(|e| e.eq_ignore_ascii_case(token))
    }

    /// Whether there is a field called `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.0.iter().any(|h| h.is(name))
    }

    /// Number of fields.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no fields.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn encode(&self, out: &mut Vec<u8>) {
        for h in &self.0 {
            encode_field(&h.name, &h.value, out);
        }
    }
}

/// A request head: request line and fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// The method token, case-sensitive (RFC 9110 §9.1).
    pub method: String,
    /// The request target as received (visible ASCII).
    pub target: String,
    /// The protocol version.
    pub version: Version,
    /// The header fields.
    pub headers: Headers,
}

impl RequestHead {
    /// Whether this is a CONNECT request.
    pub fn is_connect(&self) -> bool {
        self.method == "CONNECT"
    }

    /// Whether this is a HEAD request (whose response never has a body).
    pub fn is_head(&self) -> bool {
        self.method == "HEAD"
    }

    /// Whether the client lets the connection persist after this exchange: HTTP/1.1 without a
    /// `close` option in `Connection` or `Proxy-Connection`. HTTP/1.0 clients are always closed
    /// (keeping them needs `Keep-Alive` negotiation this proxy does not do).
    pub fn keep_alive(&self) -> bool {
        self.version == Version::Http11
            && !self.headers.has_token("connection", "close")
            && !self.headers.has_token("proxy-connection", "close")
    }

    /// Whether the client asks to switch protocols (RFC 9110 §7.8): an `Upgrade` field and the
    /// `upgrade` option in `Connection`. Only HTTP/1.1 can upgrade.
    pub fn wants_upgrade(&self) -> bool {
        self.version == Version::Http11
            && self.headers.has_token("connection", "upgrade")
            && self.headers.contains("upgrade")
    }

    /// Appends the head in wire form.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.target.as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.version.as_str().as_bytes());
        out.extend_from_slice(b"\r\n");
        self.headers.encode(out);
        out.extend_from_slice(b"\r\n");
    }
}

/// A response head: status line and fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// The protocol version.
    pub version: Version,
    /// The three-digit status code.
    pub status: u16,
    /// The reason phrase (possibly empty; may contain obs-text).
    pub reason: Vec<u8>,
    /// The header fields.
    pub headers: Headers,
}

impl ResponseHead {
    /// Whether the server lets its connection persist: HTTP/1.1 without `Connection: close`, or
    /// HTTP/1.0 with `Connection: keep-alive`.
    pub fn keep_alive(&self) -> bool {
        match self.version {
            Version::Http11 => !self.headers.has_token("connection", "close"),
            Version::Http10 => self.headers.has_token("connection", "keep-alive"),
        }
    }

    /// Whether this is an interim (1xx) response.
    pub fn is_interim(&self) -> bool {
        (100..200).contains(&self.status)
    }

    /// Appends the head in wire form.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.version.as_str().as_bytes());
        out.extend_from_slice(format!(" {:03} ", self.status).as_bytes());
        out.extend_from_slice(&self.reason);
        out.extend_from_slice(b"\r\n");
        self.headers.encode(out);
        out.extend_from_slice(b"\r\n");
    }
}

/// Number of leading empty lines (`CRLF` or `LF`) in `input`, which a server skips before a
/// request line (RFC 9112 §2.2). A lone trailing CR is not counted.
pub fn leading_empty_lines(input: &[u8]) -> usize {
    let mut i = 0;
    loop {
        match input.get(i..) {
            Some([b'\n', ..]) => i += 1,
            Some([b'\r', b'\n', ..]) => i += 2,
            _ => return i,
        }
    }
}

/// Where the head that starts at `input[0]` ends: the index just past the empty line, if it is in
/// `input`. The search starts at `from` (clamped, minus the 3 bytes an ending may straddle), so a
/// driver that has already searched the first `from` bytes need not search them again.
///
/// `input` must not start with an empty line (see [`leading_empty_lines`]).
pub fn head_end(input: &[u8], from: usize) -> Option<usize> {
    let start = from.saturating_sub(3).min(input.len());
    let mut i = start;
    while let Some(offset) = input[i..].iter().position(|&b| b == b'\n') {
        let nl = i + offset;
        match input.get(nl + 1..) {
            Some([b'\n', ..]) => return Some(nl + 2),
            Some([b'\r', b'\n', ..]) => return Some(nl + 3),
            _ => i = nl + 1,
        }
    }
    None
}

/// Which start line a [`HeadScanner`] checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadKind {
    /// A request line.
    Request,
    /// A status line.
    Response,
}

/// Finds the end of a head arriving in pieces, in time linear in its size.
///
/// Call [`HeadScanner::handle_input`] with the whole buffer each time bytes were appended; only
/// the new bytes are examined. It reports the head's end (then parse `&input[..end]` with
/// [`parse_request_head`] or [`parse_response_head`]), or an error as soon as the start line is
/// visibly invalid or the head outgrows the limit. A request's leading empty lines must be
/// removed before the first call (see [`leading_empty_lines`]).
#[derive(Debug, Clone)]
pub struct HeadScanner {
    kind: HeadKind,
    max_head_bytes: usize,
    /// Bytes of the input examined so far.
    checked: usize,
    /// Whether the start line is complete (and was validated).
    line_done: bool,
}

impl HeadScanner {
    /// A scanner for a head of `kind` no larger than `max_head_bytes`.
    pub fn new(kind: HeadKind, max_head_bytes: usize) -> Self {
        Self {
            kind,
            max_head_bytes,
            checked: 0,
            line_done: false,
        }
    }

    /// Whether any byte has been examined.
    pub fn started(&self) -> bool {
        self.checked > 0
    }

    /// Examines the bytes appended to `input` since the last call; returns the head's length once
    /// its end is in `input`.
    ///
    /// # Errors
    ///
    /// [`ParseError::BadStartLine`] (or another start-line error) for a start line that cannot be
    /// valid, [`ParseError::HeadTooLarge`] when the head does not end within the limit.
    pub fn handle_input(&mut self, input: &[u8]) -> Result<Option<usize>, ParseError> {
        let start = self.checked.min(input.len());
        if !self.line_done {
            for (i, &b) in input.iter().enumerate().skip(start) {
                if b == b'\n' {
                    self.line_done = true;
                    let line = &input[..i];
                    let line = line.strip_suffix(b"\r").unwrap_or(line);
                    if line.contains(&b'\r') {
                        return Err(ParseError::BareCr);
                    }
                    match self.kind {
                        HeadKind::Request => parse_request_line(line).map(|_| ())?,
                        HeadKind::Response => parse_status_line(line).map(|_| ())?,
                    }
                    break;
                }
                if !(0x20..0x7F).contains(&b) && b != b'\r' {
                    return Err(ParseError::BadStartLine);
                }
            }
        }
        let end = head_end(input, start);
        self.checked = input.len();
        match end {
            Some(end) if end > self.max_head_bytes => {
                Err(ParseError::HeadTooLarge(self.max_head_bytes))
            }
            Some(end) => Ok(Some(end)),
            None if input.len() >= self.max_head_bytes => {
                Err(ParseError::HeadTooLarge(self.max_head_bytes))
            }
            None => Ok(None),
        }
    }
}

/// Parses a request head from the start of `input`, skipping empty lines before it.
///
/// # Errors
///
/// Any [`ParseError`] about heads: start line, version, fields, size and count limits.
pub fn parse_request_head(
    input: &[u8],
    limits: &Limits,
) -> Result<Parsed<RequestHead>, ParseError> {
    let skip = leading_empty_lines(input);
    let rest = &input[skip..];
    let Some(end) = head_end(rest, 0) else {
        check_partial_start_line(rest, parse_request_line)?;
        if rest.len() >= limits.max_head_bytes {
            return Err(ParseError::HeadTooLarge(limits.max_head_bytes));
        }
        return Ok(Parsed::Incomplete);
    };
    if end > limits.max_head_bytes {
        return Err(ParseError::HeadTooLarge(limits.max_head_bytes));
    }
    let mut lines = Lines::new(&rest[..end]);
    let (method, target, version) = parse_request_line(lines.next_line()?)?;
    let headers = parse_fields(&mut lines, limits)?;
    let head = RequestHead {
        method,
        target,
        version,
        headers,
    };
    Ok(Parsed::Complete(head, skip + end))
}

/// Parses a response head from the start of `input`.
///
/// # Errors
///
/// Any [`ParseError`] about heads: status line, version, fields, size and count limits.
pub fn parse_response_head(
    input: &[u8],
    limits: &Limits,
) -> Result<Parsed<ResponseHead>, ParseError> {
    let Some(end) = head_end(input, 0) else {
        check_partial_start_line(input, parse_status_line)?;
        if input.len() >= limits.max_head_bytes {
            return Err(ParseError::HeadTooLarge(limits.max_head_bytes));
        }
        return Ok(Parsed::Incomplete);
    };
    if end > limits.max_head_bytes {
        return Err(ParseError::HeadTooLarge(limits.max_head_bytes));
    }
    let mut lines = Lines::new(&input[..end]);
    let (version, status, reason) = parse_status_line(lines.next_line()?)?;
    let headers = parse_fields(&mut lines, limits)?;
    let head = ResponseHead {
        version,
        status,
        reason,
        headers,
    };
    Ok(Parsed::Complete(head, end))
}

/// Lines of a complete head, each without its line ending.
struct Lines<'a> {
    rest: &'a [u8],
}

impl<'a> Lines<'a> {
    fn new(head: &'a [u8]) -> Self {
        Self { rest: head }
    }

    fn next_line(&mut self) -> Result<&'a [u8], ParseError> {
        let Some(nl) = self.rest.iter().position(|&b| b == b'\n') else {
            // Unreachable for a head that `head_end` delimited; treat as malformed.
            return Err(ParseError::BadStartLine);
        };
        let line = &self.rest[..nl];
        self.rest = &self.rest[nl + 1..];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.contains(&b'\r') {
            return Err(ParseError::BareCr);
        }
        Ok(line)
    }
}

/// Validates the start line of an unfinished head as far as it goes.
fn check_partial_start_line<T>(
    input: &[u8],
    parse: fn(&[u8]) -> Result<T, ParseError>,
) -> Result<(), ParseError> {
    match input.iter().position(|&b| b == b'\n') {
        Some(nl) => {
            let line = &input[..nl];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.contains(&b'\r') {
                return Err(ParseError::BareCr);
            }
            parse(line).map(|_| ())
        }
        None => {
            // An unfinished start line is visible ASCII and spaces, perhaps with its CR.
            let line = input.strip_suffix(b"\r").unwrap_or(input);
            if line.iter().all(|&b| (0x20..0x7F).contains(&b)) {
                Ok(())
            } else {
                Err(ParseError::BadStartLine)
            }
        }
    }
}

/// `method SP request-target SP HTTP-version` (RFC 9112 §3).
fn parse_request_line(line: &[u8]) -> Result<(String, String, Version), ParseError> {
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ParseError::BadStartLine);
    };
    if !is_token(method) || target.is_empty() || !target.iter().all(|&b| is_vchar(b)) {
        return Err(ParseError::BadStartLine);
    }
    let version = parse_version(version)?;
    // Both are ASCII, checked above.
    let method = String::from_utf8_lossy(method).into_owned();
    let target = String::from_utf8_lossy(target).into_owned();
    Ok((method, target, version))
}

/// `HTTP-version SP status-code SP [reason-phrase]` (RFC 9112 §4). A missing SP after the code is
/// tolerated, as deployed servers send it.
fn parse_status_line(line: &[u8]) -> Result<(Version, u16, Vec<u8>), ParseError> {
    let Some(sp) = line.iter().position(|&b| b == b' ') else {
        return Err(ParseError::BadStartLine);
    };
    let version = parse_version(&line[..sp])?;
    let rest = &line[sp + 1..];
    let (code, reason) = match rest.get(3) {
        None => (rest, &[][..]),
        Some(b' ') => (&rest[..3], &rest[4..]),
        Some(_) => return Err(ParseError::BadStartLine),
    };
    let [a, b, c] = code else {
        return Err(ParseError::BadStartLine);
    };
    if !(b'1'..=b'9').contains(a) || !b.is_ascii_digit() || !c.is_ascii_digit() {
        return Err(ParseError::BadStartLine);
    }
    if !reason
        .iter()
        .all(|&b| b == b'\t' || b == b' ' || is_vchar(b) || b >= 0x80)
    {
        return Err(ParseError::BadStartLine);
    }
    let status = u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0');
    Ok((version, status, reason.to_vec()))
}

fn parse_version(bytes: &[u8]) -> Result<Version, ParseError> {
    match bytes {
        b"HTTP/1.1" => Ok(Version::Http11),
        b"HTTP/1.0" => Ok(Version::Http10),
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if major.is_ascii_digit() && minor.is_ascii_digit() =>
        {
            Err(ParseError::UnsupportedVersion)
        }
        _ => Err(ParseError::BadStartLine),
    }
}

/// Field lines up to the empty line (RFC 9112 §5).
fn parse_fields(lines: &mut Lines<'_>, limits: &Limits) -> Result<Headers, ParseError> {
    let mut headers = Vec::new();
    loop {
        let line = lines.next_line()?;
        if line.is_empty() {
            return Ok(Headers(headers));
        }
        if headers.len() >= limits.max_headers {
            return Err(ParseError::TooManyHeaders(limits.max_headers));
        }
        headers.push(parse_field(line)?);
    }
}

fn parse_field(line: &[u8]) -> Result<Header, ParseError> {
    if matches!(line.first(), Some(b' ' | b'\t')) {
        return Err(ParseError::ObsFold);
    }
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return Err(ParseError::BadHeader);
    };
    let name = &line[..colon];
    // No whitespace is allowed between the name and the colon (RFC 9112 §5.1): `is_token`
    // rejects it.
    if !is_token(name) {
        return Err(ParseError::BadHeader);
    }
    let value = trim_ows(&line[colon + 1..]);
    if !value.iter().all(|&b| is_field_byte(b)) {
        return Err(ParseError::BadHeader);
    }
    Ok(Header {
        name: String::from_utf8_lossy(name).into_owned(),
        value: value.to_vec(),
    })
}

fn trim_ows(bytes: &[u8]) -> &[u8] {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = bytes.iter().position(|b| !is_ows(b)).unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !is_ows(b))
        .map_or(start, |i| i + 1);
    &bytes[start..end]
}

/// tchar (RFC 9110 §5.6.2).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_token(bytes: &[u8]) -> bool {
    !bytes.is_empty() && bytes.iter().all(|&b| is_tchar(b))
}

fn is_vchar(b: u8) -> bool {
    (0x21..0x7F).contains(&b)
}

/// A byte allowed in a field value: VCHAR, SP, HTAB, obs-text.
fn is_field_byte(b: u8) -> bool {
    b == b'\t' || b == b' ' || is_vchar(b) || b >= 0x80
}

fn encode_field(name: &str, value: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

// ---------------------------------------------------------------------------------------------
// Request targets

/// An `http://` absolute URI split for forwarding (RFC 9112 §3.2.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AbsoluteUri {
    /// Where to connect: port 80 unless the URI names one.
    pub target: TargetAddr,
    /// The authority as written (`host[:port]`), for a `Host` field.
    pub authority: String,
    /// The origin-form target: absolute path and query, `/` when the URI has no path.
    pub path: String,
}

/// Parses the target of a non-CONNECT proxy request: an absolute `http://` URI.
///
/// # Errors
///
/// [`ParseError::HttpsUri`] for `https://`, [`ParseError::NotProxyRequest`] for origin-form and
/// asterisk-form targets, [`ParseError::BadTarget`] for other schemes, user info, a bad host or
/// port.
pub fn parse_absolute_uri(target: &str) -> Result<AbsoluteUri, ParseError> {
    if target.starts_with('/') || target == "*" {
        return Err(ParseError::NotProxyRequest);
    }
    let Some((scheme, rest)) = target.split_once("://") else {
        return Err(ParseError::BadTarget("not an absolute URI"));
    };
    if scheme.eq_ignore_ascii_case("https") {
        return Err(ParseError::HttpsUri);
    }
    if !scheme.eq_ignore_ascii_case("http") {
        return Err(ParseError::BadTarget("unsupported URI scheme"));
    }
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let path = path.split('#').next().unwrap_or_default();
    let path = match path.chars().next() {
        None => "/".to_owned(),
        Some('?') => format!("/{path}"),
        Some(_) => path.to_owned(),
    };
    let (host, port) = split_authority(authority)?;
    let port = port.unwrap_or(80);
    Ok(AbsoluteUri {
        target: target_addr(host, port)?,
        authority: authority.to_owned(),
        path,
    })
}

/// Parses the authority-form target of a CONNECT request: `host:port` (RFC 9112 §3.2.3).
///
/// # Errors
///
/// [`ParseError::MissingPort`] without a port, [`ParseError::BadTarget`] for a bad host or port.
pub fn parse_connect_target(target: &str) -> Result<TargetAddr, ParseError> {
    let (host, port) = split_authority(target)?;
    let Some(port) = port else {
        return Err(ParseError::MissingPort);
    };
    target_addr(host, port)
}

/// Splits `host[:port]`, where host may be a bracketed IPv6 literal. An empty port (`host:`) is
/// no port (RFC 3986 §3.2.3).
fn split_authority(authority: &str) -> Result<(&str, Option<u16>), ParseError> {
    if authority.contains('@') {
        return Err(ParseError::BadTarget("user info in URI"));
    }
    let (host, port) = if authority.starts_with('[') {
        let Some(close) = authority.find(']') else {
            return Err(ParseError::BadTarget("unterminated IPv6 literal"));
        };
        match &authority[close + 1..] {
            "" => (&authority[..=close], None),
            rest => match rest.strip_prefix(':') {
                Some(port) => (&authority[..=close], Some(port)),
                None => return Err(ParseError::BadTarget("garbage after IPv6 literal")),
            },
        }
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    let port = match port {
        None | Some("") => None,
        Some(port) => Some(parse_port(port)?),
    };
    if host.is_empty() {
        return Err(ParseError::BadTarget("empty host"));
    }
    Ok((host, port))
}

fn parse_port(port: &str) -> Result<u16, ParseError> {
    if port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ParseError::BadTarget("bad port"));
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err(ParseError::BadTarget("bad port")),
        Ok(port) => Ok(port),
    }
}

/// An IP literal becomes [`TargetAddr::Ip`]; a name becomes a lowercased [`TargetAddr::Domain`]
/// (names are case-insensitive, and the lowercased form makes connection reuse exact).
fn target_addr(host: &str, port: u16) -> Result<TargetAddr, ParseError> {
    if let Some(inner) = host.strip_prefix('[') {
        let literal = inner.strip_suffix(']').unwrap_or(inner);
        return literal
            .parse::<Ipv6Addr>()
            .map(|ip| TargetAddr::Ip(SocketAddr::new(IpAddr::V6(ip), port)))
            .map_err(|_| ParseError::BadTarget("bad IPv6 literal"));
    }
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return Ok(TargetAddr::Ip(SocketAddr::new(IpAddr::V4(ip), port)));
    }
    let valid_name = host.len() <= MAX_DOMAIN_LEN
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        && !host.starts_with('.')
        && !host.contains("..");
    if !valid_name {
        return Err(ParseError::BadTarget("bad host name"));
    }
    Ok(TargetAddr::Domain(host.to_ascii_lowercase(), port))
}

// ---------------------------------------------------------------------------------------------
// Bodies

/// How a message body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLength {
    /// No body.
    Empty,
    /// Exactly this many bytes (`Content-Length`).
    Fixed(u64),
    /// The chunked transfer coding.
    Chunked,
    /// Everything until the sender closes the connection (responses only).
    UntilClose,
}

/// How the body of a request is delimited.
///
/// Only `chunked` is accepted as a transfer coding; Transfer-Encoding together with
/// Content-Length, or in an HTTP/1.0 request, is refused rather than guessed at (both are request
/// smuggling vectors, RFC 9112 §6.1 and §6.3).
///
/// # Errors
///
/// [`ParseError::AmbiguousFraming`], [`ParseError::BadTransferEncoding`],
/// [`ParseError::UnsupportedTransferCoding`] (501) and [`ParseError::BadContentLength`].
pub fn request_body(head: &RequestHead) -> Result<BodyLength, ParseError> {
    let has_te = head.headers.contains("transfer-encoding");
    let length = content_length(&head.headers)?;
    if has_te {
        if length.is_some() || head.version == Version::Http10 {
            return Err(ParseError::AmbiguousFraming);
        }
        let codings: Vec<&str> = head.headers.list("transfer-encoding").collect();
        if codings.iter().any(|c| !c.eq_ignore_ascii_case("chunked")) {
            return Err(ParseError::UnsupportedTransferCoding);
        }
        if codings.len() != 1 {
            return Err(ParseError::BadTransferEncoding);
        }
        return Ok(BodyLength::Chunked);
    }
    Ok(match length {
        None | Some(0) => BodyLength::Empty,
        Some(n) => BodyLength::Fixed(n),
    })
}

/// How the body of a response to a `request_method` request is delimited.
///
/// HEAD responses and 1xx, 204 and 304 responses have none. With Transfer-Encoding the body is
/// chunked if `chunked` is the last coding and lasts until the close otherwise (the
/// Content-Length is then ignored, RFC 9112 §6.3 rules 3-4); without either field, it lasts until
/// the close.
///
/// # Errors
///
/// [`ParseError::BadContentLength`] for an invalid or inconsistent Content-Length.
pub fn response_body(request_method: &str, head: &ResponseHead) -> Result<BodyLength, ParseError> {
    if request_method == "HEAD" || head.is_interim() || matches!(head.status, 204 | 304) {
        return Ok(BodyLength::Empty);
    }
    if head.headers.contains("transfer-encoding") {
        let last = head.headers.list("transfer-encoding").last();
        let chunked = head.version == Version::Http11
            && last.is_some_and(|c| c.eq_ignore_ascii_case("chunked"));
        return Ok(if chunked {
            BodyLength::Chunked
        } else {
            BodyLength::UntilClose
        });
    }
    Ok(match content_length(&head.headers)? {
        None => BodyLength::UntilClose,
        Some(0) => BodyLength::Empty,
        Some(n) => BodyLength::Fixed(n),
    })
}

/// The Content-Length, if any: every value (fields and list elements) must be the same decimal
/// number (RFC 9110 §8.6).
fn content_length(headers: &Headers) -> Result<Option<u64>, ParseError> {
    let mut found = None;
    for value in headers.values("content-length") {
        for element in value.split(|&b| b == b',') {
            let element = trim_ows(element);
            if element.is_empty() || element.len() > 19 || !element.iter().all(u8::is_ascii_digit) {
                return Err(ParseError::BadContentLength);
            }
            let n = element
                .iter()
                .fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
            if found.is_some_and(|f| f != n) {
                return Err(ParseError::BadContentLength);
            }
            found = Some(n);
        }
    }
    Ok(found)
}

/// Finds where a body ends in a byte stream, without changing it.
///
/// Feed it the stream's bytes with [`BodyTracker::handle_input`]; it says how many of them belong
/// to the body. Once [`BodyTracker::is_done`], the remaining bytes belong to the next message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyTracker {
    state: BodyState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyState {
    /// `n` more body bytes.
    Fixed(u64),
    /// Until the close.
    UntilClose,
    /// Chunked, in one of its parts.
    Chunked(Chunk),
    /// Complete.
    Done,
}

/// Position inside a chunked body (RFC 9112 §7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// In the hex digits of a chunk size (`digits` seen so far, `line` bytes of the line).
    Size { size: u64, digits: u8, line: usize },
    /// After the digits: whitespace and extensions up to the line end.
    Extension { size: u64, line: usize },
    /// Saw the CR of the size line.
    SizeLf { size: u64 },
    /// In the data of a chunk, `left` bytes to go.
    Data { left: u64 },
    /// Expecting the CR after chunk data.
    DataCr,
    /// Expecting the LF after chunk data.
    DataLf,
    /// At the start of a trailer line (or of the final empty line); `total` trailer bytes so far.
    TrailerStart { total: usize },
    /// In a trailer field line.
    Trailer { line: usize, total: usize },
    /// Saw the CR of a trailer line (`empty`: of the final empty line).
    TrailerLf { empty: bool, total: usize },
}

impl BodyTracker {
    /// A tracker for a body delimited as `length`.
    pub fn new(length: BodyLength) -> Self {
        let state = match length {
            BodyLength::Empty | BodyLength::Fixed(0) => BodyState::Done,
            BodyLength::Fixed(n) => BodyState::Fixed(n),
            BodyLength::Chunked => BodyState::Chunked(Chunk::Size {
                size: 0,
                digits: 0,
                line: 0,
            }),
            BodyLength::UntilClose => BodyState::UntilClose,
        };
        Self { state }
    }

    /// Whether the body is complete.
    pub fn is_done(&self) -> bool {
        self.state == BodyState::Done
    }

    /// Takes the next bytes of the stream; returns how many of them (a prefix) belong to the body.
    /// All of them are taken unless the body ends inside `input`.
    ///
    /// # Errors
    ///
    /// [`ParseError::BadChunk`] when a chunked body breaks the grammar.
    pub fn handle_input(&mut self, input: &[u8]) -> Result<usize, ParseError> {
        let mut used = 0;
        while used < input.len() {
            match &mut self.state {
                BodyState::Done => break,
                BodyState::UntilClose => used = input.len(),
                BodyState::Fixed(left) => {
                    let take = clamp(*left, input.len() - used);
                    used += take;
                    *left -= take as u64;
                    if *left == 0 {
                        self.state = BodyState::Done;
                    }
                }
                BodyState::Chunked(Chunk::Data { left }) => {
                    let take = clamp(*left, input.len() - used);
                    used += take;
                    *left -= take as u64;
                    if *left == 0 {
                        self.state = BodyState::Chunked(Chunk::DataCr);
                    }
                }
                BodyState::Chunked(chunk) => {
                    let next = step_chunk(*chunk, input[used])?;
                    used += 1;
                    self.state = next;
                }
            }
        }
        Ok(used)
    }

    /// The stream ended.
    ///
    /// # Errors
    ///
    /// [`ParseError::TruncatedBody`] unless the body was complete or lasts until the close (which
    /// completes it).
    pub fn handle_eof(&mut self) -> Result<(), ParseError> {
        match self.state {
            BodyState::Done => Ok(()),
            BodyState::UntilClose => {
                self.state = BodyState::Done;
                Ok(())
            }
            BodyState::Fixed(_) | BodyState::Chunked(_) => Err(ParseError::TruncatedBody),
        }
    }
}

fn clamp(left: u64, available: usize) -> usize {
    usize::try_from(left).map_or(available, |left| left.min(available))
}

/// One byte of chunked framing (everything but chunk data).
fn step_chunk(chunk: Chunk, b: u8) -> Result<BodyState, ParseError> {
    let next = match chunk {
        Chunk::Size { size, digits, line } => {
            let line = line + 1;
            if line > MAX_CHUNK_LINE {
                return Err(ParseError::BadChunk("chunk-size line too long"));
            }
            match (b as char).to_digit(16) {
                Some(d) => {
                    if digits >= 16 {
                        return Err(ParseError::BadChunk("chunk size too large"));
                    }
                    Chunk::Size {
                        size: size << 4 | u64::from(d),
                        digits: digits + 1,
                        line,
                    }
                }
                None if digits == 0 => return Err(ParseError::BadChunk("missing chunk size")),
                None => return chunk_size_line_byte(size, line, b, false),
            }
        }
        Chunk::Extension { size, line } => {
            let line = line + 1;
            if line > MAX_CHUNK_LINE {
                return Err(ParseError::BadChunk("chunk-size line too long"));
            }
            return chunk_size_line_byte(size, line, b, true);
        }
        Chunk::SizeLf { size } => match b {
            b'\n' => return Ok(after_size_line(size)),
            _ => return Err(ParseError::BadChunk("CR without LF")),
        },
        // Data is consumed in bulk by `BodyTracker::handle_input` and never reaches this
        // function; should it, that is a framing error rather than a panic.
        Chunk::Data { .. } => return Err(ParseError::BadChunk("unexpected chunk data")),
        Chunk::DataCr => match b {
            b'\r' => Chunk::DataLf,
            b'\n' => Chunk::Size {
                size: 0,
                digits: 0,
                line: 0,
            },
            _ => return Err(ParseError::BadChunk("chunk data longer than its size")),
        },
        Chunk::DataLf => match b {
            b'\n' => Chunk::Size {
                size: 0,
                digits: 0,
                line: 0,
            },
            _ => return Err(ParseError::BadChunk("CR without LF")),
        },
        Chunk::TrailerStart { total } => match b {
            b'\r' => Chunk::TrailerLf { empty: true, total },
            b'\n' => return Ok(BodyState::Done),
            b' ' | b'\t' => return Err(ParseError::BadChunk("folded trailer line")),
            _ => Chunk::Trailer {
                line: 1,
                total: total + 1,
            },
        },
        Chunk::Trailer { line, total } => {
            let total = total + 1;
            if line + 1 > MAX_CHUNK_LINE || total > DEFAULT_MAX_HEAD_BYTES {
                return Err(ParseError::BadChunk("trailer section too large"));
            }
            match b {
                b'\r' => Chunk::TrailerLf {
                    empty: false,
                    total,
                },
                b'\n' => Chunk::TrailerStart { total },
                b if b == b'\t' || b == b' ' || is_vchar(b) || b >= 0x80 => Chunk::Trailer {
                    line: line + 1,
                    total,
                },
                _ => return Err(ParseError::BadChunk("control character in trailer")),
            }
        }
        Chunk::TrailerLf { empty, total } => match (b, empty) {
            (b'\n', true) => return Ok(BodyState::Done),
            (b'\n', false) => Chunk::TrailerStart { total },
            _ => return Err(ParseError::BadChunk("CR without LF")),
        },
    };
    Ok(BodyState::Chunked(next))
}

/// A byte of a chunk-size line after the size digits. Right after the digits only BWS, `;` (an
/// extension) or the line end may come; inside extensions any visible byte, whitespace or
/// obs-text.
fn chunk_size_line_byte(
    size: u64,
    line: usize,
    b: u8,
    in_extension: bool,
) -> Result<BodyState, ParseError> {
    Ok(match b {
        b'\r' => BodyState::Chunked(Chunk::SizeLf { size }),
        b'\n' => after_size_line(size),
        b'\t' | b' ' | b';' => BodyState::Chunked(Chunk::Extension { size, line }),
        b if in_extension && (is_vchar(b) || b >= 0x80) => {
            BodyState::Chunked(Chunk::Extension { size, line })
        }
        _ => return Err(ParseError::BadChunk("invalid byte in chunk-size line")),
    })
}

fn after_size_line(size: u64) -> BodyState {
    if size == 0 {
        BodyState::Chunked(Chunk::TrailerStart { total: 0 })
    } else {
        BodyState::Chunked(Chunk::Data { left: size })
    }
}

// ---------------------------------------------------------------------------------------------
// Rewriting for forwarding

/// Fields that concern one connection only and are never forwarded (RFC 9110 §7.6.1), plus
/// `Proxy-Connection` (a non-standard relative of `Connection`) and the proxy's own
/// authentication fields.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
];

/// Whether the field `name` must not be forwarded: a fixed hop-by-hop field, or one that the
/// message's `Connection` field lists.
fn is_hop_by_hop(name: &str, headers: &Headers) -> bool {
    HOP_BY_HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
        || headers
            .list("connection")
            .any(|listed| listed.eq_ignore_ascii_case(name))
}

/// Appends the request to send upstream for `head`, whose target parsed as `uri`:
///
/// - the request line in origin form (`GET /path?query HTTP/1.1`), same method and version;
/// - the client's `Host` field kept, or one made from the URI's authority when the client sent
///   none;
/// - hop-by-hop fields removed; with `upgrade`, the `Upgrade` field kept and
///   `Connection: upgrade` sent (the only connection option forwarded);
/// - every other field as received, in order, and `Via` added (RFC 9110 §7.6.3).
pub fn encode_forwarded_request(
    head: &RequestHead,
    uri: &AbsoluteUri,
    upgrade: bool,
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(head.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(uri.path.as_bytes());
    out.push(b' ');
    out.extend_from_slice(head.version.as_str().as_bytes());
    out.extend_from_slice(b"\r\n");
    if !head.headers.contains("host") {
        encode_field("Host", uri.authority.as_bytes(), out);
    }
    for h in &head.headers.0 {
        let keep_upgrade = upgrade && h.is("upgrade");
        if keep_upgrade || !is_hop_by_hop(&h.name, &head.headers) {
            encode_field(&h.name, &h.value, out);
        }
    }
    if upgrade {
        encode_field("Connection", b"upgrade", out);
    }
    encode_field("Via", via(head.version).as_bytes(), out);
    out.extend_from_slice(b"\r\n");
}

/// Appends the response to send to the client for `head`: status line as received, hop-by-hop
/// fields removed (and `Content-Length` when `Transfer-Encoding` is present), `Via` added, and `Connection: close` when `close` (the proxy closes the
/// client's connection after this response). With `upgrade` (a 101 answering an upgrade
/// request), `Upgrade` and `Connection: upgrade` are forwarded instead.
pub fn encode_forwarded_response(
    head: &ResponseHead,
    close: bool,
    upgrade: bool,
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(head.version.as_str().as_bytes());
    out.extend_from_slice(format!(" {:03} ", head.status).as_bytes());
    out.extend_from_slice(&head.reason);
    out.extend_from_slice(b"\r\n");
    // With Transfer-Encoding the Content-Length is meaningless (RFC 9112 §6.3) and two framings
    // would let the client disagree with us about where the body ends: drop it.
    let has_te = head.headers.contains("transfer-encoding");
    for h in &head.headers.0 {
        let keep_upgrade = upgrade && h.is("upgrade");
        let dropped_length = has_te && h.is("content-length");
        if keep_upgrade || !(dropped_length || is_hop_by_hop(&h.name, &head.headers)) {
            encode_field(&h.name, &h.value, out);
        }
    }
    if upgrade {
        encode_field("Connection", b"upgrade", out);
    } else if close && !head.is_interim() {
        encode_field("Connection", b"close", out);
    }
    encode_field("Via", via(head.version).as_bytes(), out);
    out.extend_from_slice(b"\r\n");
}

fn via(version: Version) -> &'static str {
    match version {
        Version::Http10 => "1.0 tailnode",
        Version::Http11 => "1.1 tailnode",
    }
}

/// Decodes the credentials of a `Proxy-Authorization: Basic <base64(user:pass)>` value
/// (RFC 7617). Returns `None` for other schemes and malformed values.
pub fn basic_credentials(value: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    use base64::Engine as _;
    let value = trim_ows(value);
    let space = value.iter().position(|&b| b == b' ')?;
    let (scheme, token) = value.split_at(space);
    if !scheme.eq_ignore_ascii_case(b"basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(trim_ows(token))
        .ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    Some((decoded[..colon].to_vec(), decoded[colon + 1..].to_vec()))
}

/// The standard reason phrase of the statuses this proxy sends itself.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        405 => "Method Not Allowed",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits() -> Limits {
        Limits::default()
    }

    fn request(bytes: &[u8]) -> (RequestHead, usize) {
        match parse_request_head(bytes, &limits()).unwrap() {
            Parsed::Complete(head, n) => (head, n),
            Parsed::Incomplete => panic!("incomplete: {:?}", String::from_utf8_lossy(bytes)),
        }
    }

    fn response(bytes: &[u8]) -> (ResponseHead, usize) {
        match parse_response_head(bytes, &limits()).unwrap() {
            Parsed::Complete(head, n) => (head, n),
            Parsed::Incomplete => panic!("incomplete"),
        }
    }

    fn request_err(bytes: &[u8]) -> ParseError {
        parse_request_head(bytes, &limits()).unwrap_err()
    }

    #[test]
    fn request_head_parses_and_reports_prefixes_incomplete() {
        let bytes = b"GET http://example.com/x?y=1 HTTP/1.1\r\nHost: example.com\r\nX-A:  v w \t\r\n\r\nBODY";
        let (head, n) = request(bytes);
        assert_eq!(n, bytes.len() - 4, "the body is not part of the head");
        assert_eq!(head.method, "GET");
        assert_eq!(head.target, "http://example.com/x?y=1");
        assert_eq!(head.version, Version::Http11);
        assert_eq!(
            head.headers.0,
            vec![
                Header::new("Host", "example.com"),
                Header::new("X-A", "v w")
            ]
        );
        for end in 0..n {
            assert_eq!(
                parse_request_head(&bytes[..end], &limits()),
                Ok(Parsed::Incomplete),
                "prefix {end}"
            );
        }
    }

    #[test]
    fn bare_lf_lines_and_leading_empty_lines_are_accepted() {
        let (head, n) = request(b"\r\n\nPOST http://a/ HTTP/1.0\nContent-Length: 3\n\nabc");
        assert_eq!(n, 46);
        assert_eq!(head.method, "POST");
        assert_eq!(head.version, Version::Http10);
        assert_eq!(request_body(&head), Ok(BodyLength::Fixed(3)));
        assert_eq!(leading_empty_lines(b"\r\n\r\nG"), 4);
        assert_eq!(leading_empty_lines(b"\r"), 0);
    }

    #[test]
    fn malformed_request_heads() {
        let cases: &[(&[u8], ParseError)] = &[
            (b"GET  http://a/ HTTP/1.1\r\n\r\n", ParseError::BadStartLine),
            (b"GET http://a/\r\n\r\n", ParseError::BadStartLine),
            (b"G(T http://a/ HTTP/1.1\r\n\r\n", ParseError::BadStartLine),
            (
                b"GET http://a/ HTTP/1.1 x\r\n\r\n",
                ParseError::BadStartLine,
            ),
            (b"GET http://a/ HTTX/1.1\r\n\r\n", ParseError::BadStartLine),
            (
                b"GET http://a/ HTTP/2.0\r\n\r\n",
                ParseError::UnsupportedVersion,
            ),
            (
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
                ParseError::UnsupportedVersion,
            ),
            (
                b"GET http://a/ HTTP/1.1\r\nX : y\r\n\r\n",
                ParseError::BadHeader,
            ),
            (
                b"GET http://a/ HTTP/1.1\r\nNoColon\r\n\r\n",
                ParseError::BadHeader,
            ),
            (
                b"GET http://a/ HTTP/1.1\r\n: v\r\n\r\n",
                ParseError::BadHeader,
            ),
            (
                b"GET http://a/ HTTP/1.1\r\nX: a\x01b\r\n\r\n",
                ParseError::BadHeader,
            ),
            (
                b"GET http://a/ HTTP/1.1\r\nX: a\r\n b\r\n\r\n",
                ParseError::ObsFold,
            ),
            (
                b"GET http://a/ HTTP/1.1\r\nX: a\rb\r\n\r\n",
                ParseError::BareCr,
            ),
            (b"GET http://a/\r HTTP/1.1\r\n\r\n", ParseError::BareCr),
        ];
        for (bytes, expected) in cases {
            assert_eq!(
                &request_err(bytes),
                expected,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn garbage_is_rejected_before_the_head_ends() {
        // A TLS ClientHello and a SOCKS5 greeting: no line end, binary bytes.
        assert_eq!(
            request_err(&[0x16, 0x03, 0x01, 0x00]),
            ParseError::BadStartLine
        );
        assert_eq!(request_err(&[5, 1, 0]), ParseError::BadStartLine);
        // A complete but invalid request line, before any header.
        assert_eq!(request_err(b"HELLO\r\n"), ParseError::BadStartLine);
        // A valid request line waits for the rest.
        assert_eq!(
            parse_request_head(b"GET http://a/ HTTP/1.1\r\nHost: a", &limits()),
            Ok(Parsed::Incomplete)
        );
    }

    #[test]
    fn size_and_count_limits() {
        let small = Limits {
            max_head_bytes: 64,
            max_headers: 2,
        };
        let mut long = b"GET http://a/ HTTP/1.1\r\nX: ".to_vec();
        long.resize(64, b'a');
        assert_eq!(
            parse_request_head(&long, &small),
            Err(ParseError::HeadTooLarge(64))
        );
        long.truncate(63);
        assert_eq!(parse_request_head(&long, &small), Ok(Parsed::Incomplete));
        let mut complete_but_big = b"GET http://a/ HTTP/1.1\r\nX: ".to_vec();
        complete_but_big.resize(70, b'a');
        complete_but_big.extend_from_slice(b"\r\n\r\n");
        assert_eq!(
            parse_request_head(&complete_but_big, &small),
            Err(ParseError::HeadTooLarge(64))
        );
        let three = b"GET http://a/ HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n";
        assert_eq!(
            parse_request_head(three, &small),
            Err(ParseError::TooManyHeaders(2))
        );
        assert!(matches!(
            parse_request_head(
                &three[..three.len() - 9],
                &Limits {
                    max_headers: 2,
                    max_head_bytes: 1024
                }
            ),
            Ok(Parsed::Incomplete)
        ));
    }

    #[test]
    fn head_end_finds_both_line_endings_and_resumes() {
        assert_eq!(head_end(b"A\r\n\r\nx", 0), Some(5));
        assert_eq!(head_end(b"A\n\nx", 0), Some(3));
        assert_eq!(head_end(b"A\n\r\nx", 0), Some(4));
        assert_eq!(head_end(b"A\r\nB\r\n", 0), None);
        let bytes = b"A: b\r\n\r\n";
        // Resuming anywhere before the end finds it.
        for from in 0..=bytes.len() {
            assert_eq!(head_end(bytes, from), Some(8), "from {from}");
        }
    }

    #[test]
    fn head_scanner_agrees_with_the_parser_fed_byte_by_byte() {
        let bytes = b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\nNEXT";
        let mut scanner = HeadScanner::new(HeadKind::Request, 1024);
        assert!(!scanner.started());
        let mut found = None;
        for n in 1..=bytes.len() {
            if let Some(end) = scanner.handle_input(&bytes[..n]).unwrap() {
                found = Some((n, end));
                break;
            }
        }
        assert_eq!(found, Some((bytes.len() - 4, bytes.len() - 4)));
        assert!(scanner.started());

        let mut garbage = HeadScanner::new(HeadKind::Request, 1024);
        assert_eq!(garbage.handle_input(b"GET"), Ok(None));
        assert_eq!(
            garbage.handle_input(b"GET\x16"),
            Err(ParseError::BadStartLine)
        );
        let mut bad_line = HeadScanner::new(HeadKind::Request, 1024);
        assert_eq!(
            bad_line.handle_input(b"HELLO\r\n"),
            Err(ParseError::BadStartLine)
        );
        let mut bad_status = HeadScanner::new(HeadKind::Response, 1024);
        assert_eq!(
            bad_status.handle_input(b"HTTP/1.1 OK\r\n"),
            Err(ParseError::BadStartLine)
        );
        let mut big = HeadScanner::new(HeadKind::Request, 32);
        assert_eq!(
            big.handle_input(b"GET http://a/ HTTP/1.1\r\nX: 1"),
            Ok(None)
        );
        assert_eq!(
            big.handle_input(b"GET http://a/ HTTP/1.1\r\nX: 12345678"),
            Err(ParseError::HeadTooLarge(32))
        );
    }

    #[test]
    fn status_lines() {
        let (head, n) = response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi");
        assert_eq!(
            (head.version, head.status, &head.reason[..]),
            (Version::Http11, 200, &b"OK"[..])
        );
        assert_eq!(n, 38);
        let (head, _) = response(b"HTTP/1.0 404\r\n\r\n");
        assert_eq!((head.status, head.reason.len()), (404, 0));
        let (head, _) = response(b"HTTP/1.1 500 Bad \xe9t\xe9\r\n\r\n");
        assert_eq!(head.reason, b"Bad \xe9t\xe9");
        for bad in [
            &b"HTTP/1.1 20 OK\r\n\r\n"[..],
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 099 X\r\n\r\n",
            b"HTTP/1.1\r\n\r\n",
            b"SSH-2.0-OpenSSH\r\n\r\n",
        ] {
            assert_eq!(
                parse_response_head(bad, &limits()),
                Err(ParseError::BadStartLine),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn absolute_uris() {
        let uri = parse_absolute_uri("http://Peer.Example:8080/a/b?c=d#frag").unwrap();
        assert_eq!(uri.target, TargetAddr::Domain("peer.example".into(), 8080));
        assert_eq!(uri.authority, "Peer.Example:8080");
        assert_eq!(uri.path, "/a/b?c=d");
        let uri = parse_absolute_uri("HTTP://peer").unwrap();
        assert_eq!(uri.target, TargetAddr::Domain("peer".into(), 80));
        assert_eq!(uri.path, "/");
        let uri = parse_absolute_uri("http://peer:?q").unwrap();
        assert_eq!((uri.target.port(), uri.path.as_str()), (80, "/?q"));
        let uri = parse_absolute_uri("http://100.64.0.2/").unwrap();
        assert_eq!(uri.target, TargetAddr::Ip("100.64.0.2:80".parse().unwrap()));
        let uri = parse_absolute_uri("http://[fd7a:115c:a1e0::1]:81/x").unwrap();
        assert_eq!(
            uri.target,
            TargetAddr::Ip("[fd7a:115c:a1e0::1]:81".parse().unwrap())
        );
        assert_eq!(uri.authority, "[fd7a:115c:a1e0::1]:81");
        let uri = parse_absolute_uri("http://[::1]").unwrap();
        assert_eq!(uri.target, TargetAddr::Ip("[::1]:80".parse().unwrap()));

        let errors = [
            ("https://peer/", ParseError::HttpsUri),
            ("/index.html", ParseError::NotProxyRequest),
            ("*", ParseError::NotProxyRequest),
            (
                "ftp://peer/",
                ParseError::BadTarget("unsupported URI scheme"),
            ),
            ("peer:80", ParseError::BadTarget("not an absolute URI")),
            (
                "http://user:pw@peer/",
                ParseError::BadTarget("user info in URI"),
            ),
            ("http:///x", ParseError::BadTarget("empty host")),
            ("http://peer:0/", ParseError::BadTarget("bad port")),
            ("http://peer:65536/", ParseError::BadTarget("bad port")),
            ("http://peer:8a/", ParseError::BadTarget("bad port")),
            (
                "http://[::1/",
                ParseError::BadTarget("unterminated IPv6 literal"),
            ),
            (
                "http://[::1]x/",
                ParseError::BadTarget("garbage after IPv6 literal"),
            ),
            ("http://[zz]/", ParseError::BadTarget("bad IPv6 literal")),
            ("http://pe%72/", ParseError::BadTarget("bad host name")),
            ("http://a..b/", ParseError::BadTarget("bad host name")),
        ];
        for (target, expected) in errors {
            assert_eq!(parse_absolute_uri(target), Err(expected), "{target}");
        }
    }

    #[test]
    fn connect_targets() {
        assert_eq!(
            parse_connect_target("Peer:443"),
            Ok(TargetAddr::Domain("peer".into(), 443))
        );
        assert_eq!(
            parse_connect_target("[fd00::2]:22"),
            Ok(TargetAddr::Ip("[fd00::2]:22".parse().unwrap()))
        );
        assert_eq!(
            parse_connect_target("10.0.0.1:8443"),
            Ok(TargetAddr::Ip("10.0.0.1:8443".parse().unwrap()))
        );
        assert_eq!(parse_connect_target("peer"), Err(ParseError::MissingPort));
        assert_eq!(parse_connect_target("peer:"), Err(ParseError::MissingPort));
        assert_eq!(parse_connect_target("[::1]"), Err(ParseError::MissingPort));
        assert_eq!(
            parse_connect_target(":443"),
            Err(ParseError::BadTarget("empty host"))
        );
        assert!(parse_connect_target("http://peer:443").is_err());
    }

    fn head_with(version: Version, headers: &[(&str, &str)]) -> RequestHead {
        RequestHead {
            method: "POST".into(),
            target: "http://a/".into(),
            version,
            headers: Headers(headers.iter().map(|(n, v)| Header::new(*n, *v)).collect()),
        }
    }

    #[test]
    fn request_framing() {
        use Version::*;
        type Case<'a> = (
            Version,
            &'a [(&'a str, &'a str)],
            Result<BodyLength, ParseError>,
        );
        let cases: &[Case<'_>] = &[
            (Http11, &[], Ok(BodyLength::Empty)),
            (Http11, &[("Content-Length", "0")], Ok(BodyLength::Empty)),
            (
                Http11,
                &[("content-length", "12")],
                Ok(BodyLength::Fixed(12)),
            ),
            (
                Http11,
                &[("Content-Length", "5, 5"), ("Content-Length", "5")],
                Ok(BodyLength::Fixed(5)),
            ),
            (
                Http11,
                &[("Content-Length", "5"), ("Content-Length", "6")],
                Err(ParseError::BadContentLength),
            ),
            (
                Http11,
                &[("Content-Length", "-1")],
                Err(ParseError::BadContentLength),
            ),
            (
                Http11,
                &[("Content-Length", "")],
                Err(ParseError::BadContentLength),
            ),
            (
                Http11,
                &[("Content-Length", "99999999999999999999")],
                Err(ParseError::BadContentLength),
            ),
            (
                Http11,
                &[("Transfer-Encoding", "chunked")],
                Ok(BodyLength::Chunked),
            ),
            (
                Http11,
                &[("Transfer-Encoding", "Chunked")],
                Ok(BodyLength::Chunked),
            ),
            (
                Http11,
                &[("Transfer-Encoding", "chunked"), ("Content-Length", "3")],
                Err(ParseError::AmbiguousFraming),
            ),
            (
                Http10,
                &[("Transfer-Encoding", "chunked")],
                Err(ParseError::AmbiguousFraming),
            ),
            (
                Http11,
                &[("Transfer-Encoding", "gzip, chunked")],
                Err(ParseError::UnsupportedTransferCoding),
            ),
            (
                Http11,
                &[("Transfer-Encoding", "gzip")],
                Err(ParseError::UnsupportedTransferCoding),
            ),
            (
                Http11,
                &[("Transfer-Encoding", "chunked, chunked")],
                Err(ParseError::BadTransferEncoding),
            ),
            (
                Http11,
                &[("Transfer-Encoding", "")],
                Err(ParseError::BadTransferEncoding),
            ),
        ];
        for (version, headers, expected) in cases {
            assert_eq!(
                &request_body(&head_with(*version, headers)),
                expected,
                "{headers:?}"
            );
        }
        assert_eq!(ParseError::UnsupportedTransferCoding.status(), 501);
        assert_eq!(ParseError::UnsupportedVersion.status(), 505);
        assert_eq!(ParseError::AmbiguousFraming.status(), 400);
    }

    #[test]
    fn response_framing() {
        let resp = |status: u16, version: Version, headers: &[(&str, &str)]| ResponseHead {
            version,
            status,
            reason: Vec::new(),
            headers: Headers(headers.iter().map(|(n, v)| Header::new(*n, *v)).collect()),
        };
        let v11 = Version::Http11;
        let cl = [("Content-Length", "10")];
        assert_eq!(
            response_body("GET", &resp(200, v11, &cl)),
            Ok(BodyLength::Fixed(10))
        );
        assert_eq!(
            response_body("HEAD", &resp(200, v11, &cl)),
            Ok(BodyLength::Empty)
        );
        for status in [100, 103, 204, 304] {
            assert_eq!(
                response_body("GET", &resp(status, v11, &cl)),
                Ok(BodyLength::Empty)
            );
        }
        assert_eq!(
            response_body("GET", &resp(200, v11, &[])),
            Ok(BodyLength::UntilClose)
        );
        assert_eq!(
            response_body(
                "GET",
                &resp(
                    200,
                    v11,
                    &[
                        ("Transfer-Encoding", "gzip, chunked"),
                        ("Content-Length", "3")
                    ]
                )
            ),
            Ok(BodyLength::Chunked)
        );
        assert_eq!(
            response_body("GET", &resp(200, v11, &[("Transfer-Encoding", "gzip")])),
            Ok(BodyLength::UntilClose)
        );
        assert_eq!(
            response_body("GET", &resp(200, v11, &[("Content-Length", "x")])),
            Err(ParseError::BadContentLength)
        );
    }

    #[test]
    fn keep_alive_and_upgrade() {
        use Version::*;
        assert!(head_with(Http11, &[]).keep_alive());
        assert!(!head_with(Http11, &[("Connection", "Close")]).keep_alive());
        assert!(!head_with(Http11, &[("Proxy-Connection", "close")]).keep_alive());
        assert!(!head_with(Http10, &[("Connection", "keep-alive")]).keep_alive());
        assert!(
            head_with(
                Http11,
                &[
                    ("Connection", "keep-alive, Upgrade"),
                    ("Upgrade", "websocket")
                ]
            )
            .wants_upgrade()
        );
        assert!(!head_with(Http11, &[("Upgrade", "websocket")]).wants_upgrade());
        let resp = |version, headers: &[(&str, &str)]| ResponseHead {
            version,
            status: 200,
            reason: Vec::new(),
            headers: Headers(headers.iter().map(|(n, v)| Header::new(*n, *v)).collect()),
        };
        assert!(resp(Http11, &[]).keep_alive());
        assert!(!resp(Http11, &[("Connection", "close")]).keep_alive());
        assert!(!resp(Http10, &[]).keep_alive());
        assert!(resp(Http10, &[("Connection", "Keep-Alive")]).keep_alive());
    }

    /// Feeds `body` to a tracker in pieces of `step` bytes; returns the bytes it took.
    fn track(length: BodyLength, body: &[u8], step: usize) -> Result<(usize, bool), ParseError> {
        let mut tracker = BodyTracker::new(length);
        let mut used = 0;
        for piece in body.chunks(step.max(1)) {
            let n = tracker.handle_input(piece)?;
            used += n;
            if n < piece.len() {
                assert!(tracker.is_done(), "stopped early without being done");
                break;
            }
        }
        Ok((used, tracker.is_done()))
    }

    #[test]
    fn chunked_bodies_end_where_they_should() {
        let body = b"5\r\nhello\r\n1a;ext=\"v\"\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-Sum: 1\r\nY: 2\r\n\r\n";
        let next = b"GET http://a/ HTTP/1.1\r\n\r\n";
        let stream = [&body[..], &next[..]].concat();
        for step in [1, 2, 3, 7, 64, 1000] {
            assert_eq!(
                track(BodyLength::Chunked, &stream, step),
                Ok((body.len(), true)),
                "step {step}"
            );
        }
        // Bare LF line ends, no trailers, upper-case hex.
        let lf = b"A\nabcdefghij\n0\n\nrest";
        assert_eq!(track(BodyLength::Chunked, lf, 1), Ok((lf.len() - 4, true)));
        // Unfinished: everything is taken, not done, and EOF is a truncation.
        let mut tracker = BodyTracker::new(BodyLength::Chunked);
        assert_eq!(tracker.handle_input(b"5\r\nhel"), Ok(6));
        assert!(!tracker.is_done());
        assert_eq!(tracker.handle_eof(), Err(ParseError::TruncatedBody));
    }

    #[test]
    fn malformed_chunked_bodies() {
        let cases: &[(&[u8], &str)] = &[
            (b"x\r\n", "missing chunk size"),
            (b"\r\n", "missing chunk size"),
            (b"5\r\nhelloX", "chunk data longer than its size"),
            (b"5\rx", "CR without LF"),
            (b"5\r\nhello\rx", "CR without LF"),
            (b"11111111111111111\r\n", "chunk size too large"),
            (b"5\x01\r\n", "invalid byte in chunk-size line"),
            (b"5x\r\n", "invalid byte in chunk-size line"),
            (b"5;a\x01\r\n", "invalid byte in chunk-size line"),
            (b"0\r\n folded\r\n\r\n", "folded trailer line"),
            (b"0\r\nX: \x01\r\n\r\n", "control character in trailer"),
        ];
        for (body, reason) in cases {
            assert_eq!(
                track(BodyLength::Chunked, body, 1),
                Err(ParseError::BadChunk(reason)),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
        let mut long = b"5;".to_vec();
        long.resize(MAX_CHUNK_LINE + 1, b'a');
        assert_eq!(
            track(BodyLength::Chunked, &long, 100),
            Err(ParseError::BadChunk("chunk-size line too long"))
        );
        // Sizes up to 16 hex digits are fine (the data then simply never ends here).
        assert_eq!(
            track(BodyLength::Chunked, b"ffffffffffffffff\r\nab", 1),
            Ok((20, false))
        );
    }

    #[test]
    fn fixed_and_close_delimited_bodies() {
        assert_eq!(track(BodyLength::Fixed(5), b"helloNEXT", 2), Ok((5, true)));
        assert_eq!(track(BodyLength::Fixed(5), b"hel", 2), Ok((3, false)));
        assert_eq!(track(BodyLength::Empty, b"NEXT", 2), Ok((0, true)));
        let mut close = BodyTracker::new(BodyLength::UntilClose);
        assert_eq!(close.handle_input(b"anything"), Ok(8));
        assert!(!close.is_done());
        assert_eq!(close.handle_eof(), Ok(()));
        assert!(close.is_done());
        let mut fixed = BodyTracker::new(BodyLength::Fixed(2));
        assert_eq!(fixed.handle_eof(), Err(ParseError::TruncatedBody));
    }

    fn parse_forwarded(bytes: &[u8]) -> RequestHead {
        request(bytes).0
    }

    #[test]
    fn forwarded_request_is_origin_form_without_hop_by_hop_fields() {
        let (head, _) = request(
            b"GET http://peer:8080/p?q HTTP/1.1\r\nHost: peer:8080\r\nProxy-Authorization: Basic dTpw\r\n\
              Proxy-Connection: keep-alive\r\nConnection: keep-alive, X-Private\r\nX-Private: 1\r\n\
              Keep-Alive: 300\r\nTE: trailers\r\nTrailer: X\r\nUpgrade: h2c\r\nAccept: */*\r\n\r\n",
        );
        let uri = parse_absolute_uri(&head.target).unwrap();
        let mut out = Vec::new();
        encode_forwarded_request(&head, &uri, false, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /p?q HTTP/1.1\r\nHost: peer:8080\r\nAccept: */*\r\nVia: 1.1 tailnode\r\n\r\n"
        );

        let (head, _) = request(b"PUT http://[::1]:81 HTTP/1.0\r\nContent-Length: 0\r\n\r\n");
        let uri = parse_absolute_uri(&head.target).unwrap();
        let mut out = Vec::new();
        encode_forwarded_request(&head, &uri, false, &mut out);
        let forwarded = parse_forwarded(&out);
        assert_eq!(forwarded.target, "/");
        assert_eq!(forwarded.version, Version::Http10);
        assert_eq!(
            forwarded.headers.values("host").collect::<Vec<_>>(),
            [b"[::1]:81"]
        );

        let (head, _) = request(
            b"GET http://a/ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        );
        assert!(head.wants_upgrade());
        let uri = parse_absolute_uri(&head.target).unwrap();
        let mut out = Vec::new();
        encode_forwarded_request(&head, &uri, true, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\nVia: 1.1 tailnode\r\n\r\n"
        );
    }

    #[test]
    fn forwarded_response_marks_the_close() {
        let (head, _) = response(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n\
              Proxy-Authenticate: Basic\r\nContent-Length: 12\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        let mut out = Vec::new();
        encode_forwarded_response(&head, true, false, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\nVia: 1.1 tailnode\r\n\r\n"
        );
        let (head, _) = response(b"HTTP/1.1 100 Continue\r\n\r\n");
        let mut out = Vec::new();
        encode_forwarded_response(&head, true, false, &mut out);
        assert_eq!(out, b"HTTP/1.1 100 Continue\r\nVia: 1.1 tailnode\r\n\r\n");
    }

    #[test]
    fn basic_credentials_decode() {
        assert_eq!(
            basic_credentials(b"Basic dTpwOnE="),
            Some((b"u".to_vec(), b"p:q".to_vec()))
        );
        assert_eq!(
            basic_credentials(b"basic   YWxpY2U6czNjcmV0"),
            Some((b"alice".to_vec(), b"s3cret".to_vec()))
        );
        assert_eq!(basic_credentials(b"Bearer dTpw"), None);
        assert_eq!(basic_credentials(b"Basic !!!"), None);
        assert_eq!(basic_credentials(b"Basic bm9jb2xvbg=="), None, "no colon");
        assert_eq!(basic_credentials(b"Basic"), None);
    }

    #[test]
    fn header_debug_redacts_credentials() {
        let h = Header::new("Proxy-Authorization", "Basic dTpw");
        assert_eq!(format!("{h:?}"), "Proxy-Authorization: <redacted>");
    }

    fn token_strategy() -> impl Strategy<Value = String> {
        "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,16}"
    }

    fn header_strategy() -> impl Strategy<Value = Header> {
        (
            token_strategy(),
            // Values without surrounding whitespace (the parser trims it), including obs-text.
            proptest::collection::vec(
                prop_oneof![0x21u8..0x7F, 0x80u8..=0xFF, Just(b' '), Just(b'\t')],
                0..40,
            )
            .prop_map(|v| trim_ows(&v).to_vec()),
        )
            .prop_map(|(name, value)| Header { name, value })
    }

    fn version_strategy() -> impl Strategy<Value = Version> {
        prop_oneof![Just(Version::Http10), Just(Version::Http11)]
    }

    proptest! {
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let small = Limits { max_head_bytes: 256, max_headers: 4 };
            let _ = parse_request_head(&bytes, &small);
            let _ = parse_request_head(&bytes, &limits());
            let _ = parse_response_head(&bytes, &small);
            let _ = parse_response_head(&bytes, &limits());
            let _ = head_end(&bytes, bytes.len() / 2);
            if let Ok(s) = std::str::from_utf8(&bytes) {
                let _ = parse_absolute_uri(s);
                let _ = parse_connect_target(s);
            }
            let _ = basic_credentials(&bytes);
            let mut tracker = BodyTracker::new(BodyLength::Chunked);
            let _ = tracker.handle_input(&bytes);
        }

        #[test]
        fn parsers_never_panic_on_plausible_input(
            start in prop_oneof![
                Just(b"GET http://a/ HTTP/1.1\r\n".to_vec()),
                Just(b"HTTP/1.1 200 OK\r\n".to_vec()),
                Just(b"0\r\n".to_vec()),
                Just(b"a;x=y\r\n0123456789\r\n".to_vec()),
            ],
            tail in proptest::collection::vec(
                prop_oneof![any::<u8>(), Just(b'\r'), Just(b'\n'), Just(b':'), Just(b' ')], 0..300),
        ) {
            let bytes = [start, tail].concat();
            let _ = parse_request_head(&bytes, &limits());
            let _ = parse_response_head(&bytes, &limits());
            let mut tracker = BodyTracker::new(BodyLength::Chunked);
            for piece in bytes.chunks(3) {
                if tracker.handle_input(piece).is_err() || tracker.is_done() {
                    break;
                }
            }
        }

        #[test]
        fn request_head_round_trips(
            method in token_strategy(),
            target in "[!-~]{1,60}",
            version in version_strategy(),
            headers in proptest::collection::vec(header_strategy(), 0..12),
            trailing in proptest::collection::vec(any::<u8>(), 0..8),
        ) {
            let head = RequestHead { method, target, version, headers: Headers(headers) };
            let mut bytes = Vec::new();
            head.encode(&mut bytes);
            let len = bytes.len();
            let resume = head_end(&bytes[..len / 2], 0);
            prop_assert_eq!(resume, None);
            prop_assert_eq!(head_end(&bytes, len / 2), Some(len));
            for n in [0, 1, len / 3, len / 2, len - 1] {
                prop_assert_eq!(parse_request_head(&bytes[..n], &limits()), Ok(Parsed::Incomplete));
            }
            bytes.extend_from_slice(&trailing);
            prop_assert_eq!(parse_request_head(&bytes, &limits()), Ok(Parsed::Complete(head, len)));
        }

        #[test]
        fn response_head_round_trips(
            version in version_strategy(),
            status in 100u16..1000,
            reason in "[ -~]{0,20}",
            headers in proptest::collection::vec(header_strategy(), 0..12),
        ) {
            let head = ResponseHead {
                version,
                status,
                reason: reason.trim_end().as_bytes().to_vec(),
                headers: Headers(headers),
            };
            let mut bytes = Vec::new();
            head.encode(&mut bytes);
            let len = bytes.len();
            prop_assert_eq!(parse_response_head(&bytes, &limits()), Ok(Parsed::Complete(head, len)));
        }

        #[test]
        fn chunked_bodies_round_trip(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 0..6),
            trailers in proptest::collection::vec(header_strategy(), 0..3),
            step in 1usize..64,
        ) {
            let mut body = Vec::new();
            for chunk in &chunks {
                body.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                body.extend_from_slice(chunk);
                body.extend_from_slice(b"\r\n");
            }
            body.extend_from_slice(b"0\r\n");
            for t in &trailers {
                encode_field(&t.name, &t.value, &mut body);
            }
            body.extend_from_slice(b"\r\n");
            let stream = [&body[..], b"NEXT"].concat();
            prop_assert_eq!(track(BodyLength::Chunked, &stream, step), Ok((body.len(), true)));
            // Every strict prefix is unfinished.
            let mut tracker = BodyTracker::new(BodyLength::Chunked);
            prop_assert_eq!(tracker.handle_input(&body[..body.len() - 1]), Ok(body.len() - 1));
            prop_assert!(!tracker.is_done());
        }
    }
}
