//! A trusted proxy's W3C `baggage` vetting (`telemetry::trace::baggage::valid`): it never
//! panics, a request's fields are judged as the one list they make (valid apart exactly when
//! valid joined by commas), and what it accepts holds at most 64 members in 8,192 bytes.
use http::HeaderValue;
use vestibule::telemetry::trace::baggage::valid;

pub fn fuzz(data: &[u8]) {
    let fields: Vec<HeaderValue> = data
        .split(|&b| b == b'\n')
        .filter_map(|field| HeaderValue::from_bytes(field).ok())
        .collect();
    let apart = valid(fields.iter());
    let joined = fields
        .iter()
        .map(HeaderValue::as_bytes)
        .collect::<Vec<_>>()
        .join(&b","[..]);
    if let (false, Ok(one)) = (fields.is_empty(), HeaderValue::from_bytes(&joined)) {
        assert_eq!(apart, valid(std::iter::once(&one)), "{fields:?}");
    }
    if apart && !fields.is_empty() {
        assert!(joined.len() <= 8192, "{} bytes accepted", joined.len());
        let members = joined.split(|&b| b == b',').count();
        assert!(members <= 64, "{members} members accepted");
    }
}
