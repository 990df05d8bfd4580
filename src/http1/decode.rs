//! Decoding a message body off a connection's read buffer (RFC 9112 §6,
//! §7.1): by length, chunked, or until the close. Frames are split off the
//! buffer without copying. The decoder is a pure state machine over bytes,
//! so it is unit-tested, fuzzed, and checked against hyper's.

use bytes::{Buf, Bytes, BytesMut};

use super::Framing;

/// Longest chunk-size line (extensions included) and all trailers together.
const MAX_CHUNK_LINE: usize = 4 * 1024;
const MAX_TRAILERS: usize = 16 * 1024;

/// Why a body could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// Not valid framing: a bad chunk line, a missing CRLF, trailers too long.
    Invalid(&'static str),
    /// The connection closed before the end of the body.
    Truncated,
}

/// How far into a body, and what is left.
pub enum Decoder {
    /// Bytes still to come.
    Length(u64),
    /// Where in the chunked coding, and the trailer bytes seen.
    Chunked(Chunked, usize),
    Eof,
    Done,
}

#[derive(Clone, Copy)]
pub enum Chunked {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

/// What the decoder made of the buffer.
pub enum Decoded {
    Data(Bytes),
    /// The body is complete.
    End,
    /// Needs more bytes.
    More,
}

impl Decoder {
    pub fn new(framing: Framing) -> Self {
        match framing {
            Framing::Empty => Self::Length(0),
            Framing::Length(n) => Self::Length(n),
            Framing::Chunked => Self::Chunked(Chunked::Size, 0),
            Framing::Eof => Self::Eof,
        }
    }

    /// Whether the body is complete.
    pub fn is_end(&self) -> bool {
        matches!(self, Self::Done | Self::Length(0))
    }

    /// The bytes still to come, when the framing says.
    pub fn remaining(&self) -> Option<u64> {
        match self {
            Self::Length(n) => Some(*n),
            Self::Done => Some(0),
            _ => None,
        }
    }

    /// Takes what of the body `buf` holds: a frame split off it, the end,
    /// or a need for more bytes.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, DecodeError> {
        match self {
            Self::Done | Self::Length(0) => {
                *self = Self::Done;
                Ok(Decoded::End)
            }
            _ if buf.is_empty() => Ok(Decoded::More),
            Self::Length(rest) => {
                let n = (*rest).min(buf.len() as u64);
                *rest -= n;
                Ok(Decoded::Data(buf.split_to(n as usize).freeze()))
            }
            Self::Eof => Ok(Decoded::Data(buf.split().freeze())),
            Self::Chunked(state, trailers) => decode_chunked(state, trailers, buf).map(|d| {
                if matches!(d, Decoded::End) {
                    *self = Self::Done;
                }
                d
            }),
        }
    }

    /// When the upstream closes the connection.
    pub fn at_eof(&mut self) -> Result<(), DecodeError> {
        match self {
            Self::Eof | Self::Done => {
                *self = Self::Done;
                Ok(())
            }
            _ => Err(DecodeError::Truncated),
        }
    }
}

fn decode_chunked(
    state: &mut Chunked,
    trailers: &mut usize,
    buf: &mut BytesMut,
) -> Result<Decoded, DecodeError> {
    loop {
        match *state {
            Chunked::Size => {
                let Some(line) = take_line(buf, MAX_CHUNK_LINE)? else {
                    return Ok(Decoded::More);
                };
                let size = parse_chunk_size(&line)?;
                *state = if size == 0 {
                    Chunked::Trailers
                } else {
                    Chunked::Data(size)
                };
            }
            Chunked::Data(rest) => {
                if buf.is_empty() {
                    return Ok(Decoded::More);
                }
                let n = rest.min(buf.len() as u64);
                *state = if n == rest {
                    Chunked::DataEnd
                } else {
                    Chunked::Data(rest - n)
                };
                return Ok(Decoded::Data(buf.split_to(n as usize).freeze()));
            }
            Chunked::DataEnd => {
                if buf.len() < 2 {
                    return Ok(Decoded::More);
                }
                if &buf[..2] != b"\r\n" {
                    return Err(DecodeError::Invalid("chunk not followed by CRLF"));
                }
                buf.advance(2);
                *state = Chunked::Size;
            }
            Chunked::Trailers => {
                let Some(line) = take_line(buf, MAX_TRAILERS.saturating_sub(*trailers))? else {
                    return Ok(Decoded::More);
                };
                if line.is_empty() {
                    return Ok(Decoded::End);
                }
                // Trailers are dropped: nothing downstream of a proxy of SSE needs them.
                *trailers += line.len() + 2;
            }
        }
    }
}

/// Takes a CRLF-terminated line off `buf`, without its CRLF.
fn take_line(buf: &mut BytesMut, max: usize) -> Result<Option<BytesMut>, DecodeError> {
    let Some(lf) = buf.iter().position(|&b| b == b'\n') else {
        return if buf.len() > max {
            Err(DecodeError::Invalid("chunk line or trailers too long"))
        } else {
            Ok(None)
        };
    };
    if lf > max || lf == 0 || buf[lf - 1] != b'\r' {
        return Err(DecodeError::Invalid("invalid chunk line"));
    }
    let mut line = buf.split_to(lf + 1);
    line.truncate(lf - 1);
    Ok(Some(line))
}

/// Hex digits, then optional whitespace and `;extensions`, which are ignored.
fn parse_chunk_size(line: &[u8]) -> Result<u64, DecodeError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 15 {
        return Err(DecodeError::Invalid("invalid chunk size"));
    }
    let rest = line[digits..].trim_ascii_start();
    if !rest.is_empty() && rest[0] != b';' {
        return Err(DecodeError::Invalid("invalid chunk size"));
    }
    let size = line[..digits].iter().fold(0u64, |n, &d| {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            _ => (d | 0x20) - b'a' + 10,
        };
        n * 16 + u64::from(v)
    });
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunked(input: &[u8]) -> Result<(Vec<u8>, bool), DecodeError> {
        let mut buf = BytesMut::from(input);
        let mut d = Decoder::new(Framing::Chunked);
        let mut out = Vec::new();
        loop {
            match d.decode(&mut buf)? {
                Decoded::Data(b) => out.extend_from_slice(&b),
                Decoded::End => return Ok((out, buf.is_empty())),
                Decoded::More => return Ok((out, false)),
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_with_extensions_and_trailers() {
        let (body, _) = chunked(b"5\r\nhello\r\n0\r\n\r\n").unwrap();
        assert_eq!(body, b"hello");
        let (body, _) =
            chunked(b"5;foo=bar\r\nhello\r\n6 ; x\r\n world\r\n0\r\nx-t: 1\r\n\r\n").unwrap();
        assert_eq!(body, b"hello world");
        let (body, _) = chunked(b"A\r\n0123456789\r\n0\r\n\r\n").unwrap();
        assert_eq!(body, b"0123456789");
    }

    #[test]
    fn chunked_decoding_waits_for_more_at_every_boundary() {
        let whole = b"5\r\nhello\r\n3\r\nabc\r\n0\r\nt: v\r\n\r\n";
        for cut in 0..whole.len() {
            let mut buf = BytesMut::new();
            let mut d = Decoder::new(Framing::Chunked);
            let mut out = Vec::new();
            let mut ended = false;
            for part in [&whole[..cut], &whole[cut..]] {
                buf.extend_from_slice(part);
                loop {
                    match d.decode(&mut buf).unwrap() {
                        Decoded::Data(b) => out.extend_from_slice(&b),
                        Decoded::End => {
                            ended = true;
                            break;
                        }
                        Decoded::More => break,
                    }
                }
            }
            assert!(ended, "cut at {cut}");
            assert_eq!(out, b"helloabc", "cut at {cut}");
        }
    }

    #[test]
    fn broken_chunked_bodies_are_errors() {
        for bad in [
            &b"zz\r\nhello\r\n"[..],
            b"5\r\nhelloXX0\r\n\r\n",
            b"5\nhello\r\n",
            b"ffffffffffffffff\r\n",
            b"5 x\r\nhello\r\n",
            b"\r\n",
        ] {
            assert!(chunked(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let endless = vec![b'1'; MAX_CHUNK_LINE + 1];
        assert!(chunked(&endless).is_err());
    }
}
