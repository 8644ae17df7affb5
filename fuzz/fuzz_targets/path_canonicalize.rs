//! Path canonicalisation (`proxy::path::canonicalize`), strict and lenient: it never panics, and
//! whatever it accepts is canonical — absolute, no `//`, no `.` or `..` segment, no control
//! character, no `\`, no escaped unreserved character — and comes back unchanged when run again.
use vestibule::proxy::path::{PathOptions, canonicalize};

fn assert_canonical(path: &str, options: PathOptions) {
    assert!(path.starts_with('/'), "not absolute: {path:?}");
    assert!(!path.contains("//"), "has //: {path:?}");
    assert!(!path.contains('\\'), "has a backslash: {path:?}");
    assert!(
        !path.chars().any(char::is_control),
        "has a control character: {path:?}"
    );
    for segment in path.split('/') {
        assert!(segment != "." && segment != "..", "dot segment in {path:?}");
    }
    let lower = path.to_ascii_lowercase();
    for escaped in ["%2e", "%41", "%61", "%30", "%7e", "%5f", "%2d"] {
        assert!(
            !lower.contains(escaped),
            "{escaped} left escaped in {path:?}"
        );
    }
    match canonicalize(path, options) {
        Ok(again) => assert_eq!(again, path, "not a fixed point"),
        Err(e) => panic!("its own output {path:?} is refused: {e}"),
    }
}

pub fn fuzz(data: &[u8]) {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    for options in [PathOptions::STRICT, PathOptions::LENIENT] {
        if let Ok(path) = canonicalize(raw, options) {
            assert_canonical(&path, options);
            if !options.allow_encoded_slash {
                assert!(!path.to_ascii_lowercase().contains("%2f"), "{path:?}");
            }
            if !options.allow_path_params {
                assert!(!path.contains(';'), "{path:?}");
            }
        }
    }
}
