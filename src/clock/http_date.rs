//! The `Date` header of answers Vestibule's own HTTP/1 server side writes (`server::lane`):
//! formatted at most once a second by each connection, as hyper caches its own.

use std::time::{SystemTime, UNIX_EPOCH};

/// Bytes of an IMF-fixdate, e.g. `Sun, 06 Nov 1994 08:49:37 GMT`.
const LEN: usize = 29;

/// The current time as an HTTP date (RFC 9110 §5.6.7), formatted again when the second changes.
pub struct HttpDate {
    second: u64,
    text: [u8; LEN],
}

impl Default for HttpDate {
    fn default() -> Self {
        HttpDate {
            second: u64::MAX,
            text: [b' '; LEN],
        }
    }
}

impl HttpDate {
    /// Appends the current time to `out`.
    pub fn write(&mut self, out: &mut Vec<u8>) {
        let now = SystemTime::now();
        let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if self.second != second {
            let text = httpdate::fmt_http_date(now);
            if let Some(bytes) = text.as_bytes().get(..LEN) {
                self.text.copy_from_slice(bytes);
            }
            self.second = second;
        }
        out.extend_from_slice(&self.text);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    #[test]
    fn the_date_is_an_imf_fixdate_of_now() {
        let mut date = super::HttpDate::default();
        for _ in 0..2 {
            let mut out = Vec::new();
            date.write(&mut out);
            let text = String::from_utf8(out).unwrap();
            let parsed = httpdate::parse_http_date(&text).unwrap();
            let drift = std::time::SystemTime::now()
                .duration_since(parsed)
                .unwrap_or_default();
            assert!(drift.as_secs() <= 1, "{text} is {drift:?} old");
            assert!(text.ends_with(" GMT") && text.len() == 29, "{text}");
        }
    }
}
