//! What sluice's two HTTP/1.1 codecs share: the server's (`server/h1.rs`)
//! and the upstream client's (`client/h1.rs`).

/// A decimal length (`content-length`, or one part of a list of them):
/// digits only, at most 19 of them, so it cannot overflow.
pub fn parse_length(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0'))
    })
}

/// Whether a comma-separated header value holds `token` (any case).
pub fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// A chunk-size line: `n` in hex and CRLF.
pub fn push_chunk_size(out: &mut Vec<u8>, n: usize) {
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_are_digits_only_and_cannot_overflow() {
        assert_eq!(parse_length(b"0"), Some(0));
        assert_eq!(parse_length(b"571"), Some(571));
        assert_eq!(
            parse_length(b"9999999999999999999"),
            Some(9_999_999_999_999_999_999)
        );
        for bad in [
            &b""[..],
            b"+1",
            b"-1",
            b" 1",
            b"1a",
            b"99999999999999999999",
        ] {
            assert_eq!(
                parse_length(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn tokens_are_found_in_lists_in_any_case() {
        assert!(has_token(b"keep-alive, Close", b"close"));
        assert!(has_token(b"close", b"close"));
        assert!(!has_token(b"keep-alive", b"close"));
        assert!(!has_token(b"closed", b"close"));
    }

    #[test]
    fn chunk_sizes_are_hex_lines() {
        let mut out = Vec::new();
        push_chunk_size(&mut out, 0);
        push_chunk_size(&mut out, 255);
        push_chunk_size(&mut out, 0x1_0000);
        assert_eq!(out, b"0\r\nff\r\n10000\r\n");
    }
}
