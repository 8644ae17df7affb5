//! `returnUrl` validation (`oidc::local_return_url`): whatever it accepts must be a local path
//! that stays one after percent-decoding (once and twice), that resolves against the public origin
//! to that same origin, and that can be sent back as a `Location` header.
use percent_encoding::percent_decode_str;
use url::Url;
use vestibule::oidc::local_return_url;

fn assert_local(path: &str, what: &str) {
    assert!(
        path.starts_with('/'),
        "{what} does not start with /: {path:?}"
    );
    assert!(!path.starts_with("//"), "{what} starts with //: {path:?}");
    assert!(!path.contains('\\'), "{what} has a backslash: {path:?}");
    assert!(
        !path.chars().any(char::is_control),
        "{what} has a control character: {path:?}"
    );
}

pub fn fuzz(data: &[u8]) {
    // The query string is decoded leniently (form_urlencoded), so any string can arrive.
    let raw = String::from_utf8_lossy(data);
    let Some(accepted) = local_return_url(&raw) else {
        return;
    };
    assert_local(&accepted, "accepted value");
    let once = percent_decode_str(&accepted).decode_utf8_lossy();
    assert_local(&once, "decoded once");
    let twice = percent_decode_str(&once).decode_utf8_lossy();
    assert_local(&twice, "decoded twice");

    let Ok(origin) = Url::parse("https://app.example.com/bff/callback") else {
        return;
    };
    match origin.join(&accepted) {
        Ok(target) => {
            assert_eq!(
                target.origin(),
                origin.origin(),
                "{accepted:?} leaves the origin"
            );
            assert_eq!(target.username(), "", "{accepted:?}");
            assert_eq!(target.password(), None, "{accepted:?}");
        }
        Err(e) => panic!("accepted {accepted:?} does not resolve: {e}"),
    }
    // The callback redirects to it; a value that cannot be a header would lose the redirect.
    assert!(
        http::HeaderValue::from_str(&accepted).is_ok(),
        "accepted {accepted:?} cannot be a Location header"
    );
}
