use super::*;

const STRICT: PathOptions = PathOptions::STRICT;

#[test]
fn canonical_paths_are_borrowed_unchanged() {
    for path in [
        "/",
        "/api/x",
        "/api/x/",
        "/api/a%20b/caf%C3%A9",
        "/a-b_c~d/e.f/..g/.../g..",
        "/%25/%252e/%3B/%3F%23",
        "/x:y@z!$&'()*+,=",
        "/%E2%82%AC/%F0%9F%98%80",
    ] {
        let canonical = canonicalize(path, STRICT);
        assert!(
            matches!(canonical, Ok(Cow::Borrowed(p)) if p == path),
            "{path}: {canonical:?}"
        );
    }
}

#[test]
fn equivalent_spellings_become_one_canonical_path() {
    for (raw, want) in [
        ("/api/./x", "/api/x"),
        ("/api//x", "/api/x"),
        ("//api/x", "/api/x"),
        ("/api/x//", "/api/x/"),
        ("/api/a/../x", "/api/x"),
        ("/api/x/.", "/api/x/"),
        ("/api/x/..", "/api/"),
        ("/api/x/y/../..", "/api/"),
        ("/api/x/../..", "/"),
        ("/a/b/c/./../../g", "/a/g"),
        ("/.", "/"),
        ("/./", "/"),
        ("/api/%62eta", "/api/beta"),
        ("/%41%7a%30%2D%5F%7E", "/Az0-_~"),
        ("/file%2ejson", "/file.json"),
        ("/api/caf%c3%a9", "/api/caf%C3%A9"),
        ("/api/a%2cb", "/api/a%2Cb"),
        ("/api/café", "/api/caf%C3%A9"),
        ("/x/../€", "/%E2%82%AC"),
    ] {
        assert_eq!(canonicalize(raw, STRICT).as_deref(), Ok(want), "{raw}");
    }
}

#[test]
fn ambiguous_forms_are_refused_with_their_reason() {
    use BadPath::*;
    for (raw, want) in [
        ("", NotAbsolute),
        ("api/x", NotAbsolute),
        ("*", NotAbsolute),
        ("/api/%", BadPercentEncoding),
        ("/api/%2", BadPercentEncoding),
        ("/api/%zz", BadPercentEncoding),
        ("/api/%+1", BadPercentEncoding),
        ("/api/a%2Fb", EncodedSlash),
        ("/api/a%2fb", EncodedSlash),
        ("/api\\x", Backslash),
        ("/api/%5C", Backslash),
        ("/api/%5c..", Backslash),
        ("/api/%2e", EncodedDotSegment),
        ("/api/%2E%2E", EncodedDotSegment),
        ("/api/.%2e/x", EncodedDotSegment),
        ("/api/%2e./x", EncodedDotSegment),
        ("/api/x;v=1", PathParameter),
        ("/api/..;/x", PathParameter),
        ("/api/;", PathParameter),
        ("/api/x%00", ControlCharacter),
        ("/api/x\0", ControlCharacter),
        ("/api/x%0A", ControlCharacter),
        ("/api/x\t", ControlCharacter),
        ("/api/x%7f", ControlCharacter),
        ("/api/x%C2%85", ControlCharacter),
        ("/api/x\u{85}", ControlCharacter),
        ("/api/%ff", InvalidUtf8),
        ("/api/%80", InvalidUtf8),
        ("/api/%c3", InvalidUtf8),
        ("/api/%c3/x", InvalidUtf8),
        ("/api/%c3x", InvalidUtf8),
        ("/api/%c3é", InvalidUtf8),
        ("/api/%c3%28", InvalidUtf8),
        ("/api/%c0%af", InvalidUtf8),
        ("/api/%e0%80%af", InvalidUtf8),
        ("/api/%ed%a0%80", InvalidUtf8),
        ("/api/%f4%90%80%80", InvalidUtf8),
        ("/api/%f8%88%80%80%80", InvalidUtf8),
        ("/..", AboveRoot),
        ("/../x", AboveRoot),
        ("/api/../..", AboveRoot),
        ("/a/b/../../../c", AboveRoot),
        ("/a//../../c", AboveRoot),
    ] {
        assert_eq!(canonicalize(raw, STRICT), Err(want), "{raw:?}");
    }
}

#[test]
fn allow_encoded_slash_keeps_it_encoded_but_not_next_to_dots() {
    let slash = PathOptions {
        allow_encoded_slash: true,
        ..STRICT
    };
    assert_eq!(
        canonicalize("/files/a%2Fb", slash),
        Ok(Cow::Borrowed("/files/a%2Fb"))
    );
    assert_eq!(
        canonicalize("/files/./a%2fb%2F%2Fc", slash).as_deref(),
        Ok("/files/a%2Fb%2F%2Fc")
    );
    for raw in [
        "/files/a%2F..",
        "/files/..%2Fa",
        "/files/a%2F.%2Fb",
        "/files/a%2F%2e%2e%2Fb",
    ] {
        assert_eq!(
            canonicalize(raw, slash),
            Err(BadPath::EncodedSlash),
            "{raw}"
        );
    }
    // The other refusals stay.
    assert_eq!(
        canonicalize("/files/a;v=1", slash),
        Err(BadPath::PathParameter)
    );
    assert_eq!(canonicalize("/files/a%5Cb", slash), Err(BadPath::Backslash));
    assert_eq!(
        canonicalize("/files/a%2Fb", STRICT),
        Err(BadPath::EncodedSlash)
    );
}

#[test]
fn allow_path_params_keeps_them_but_not_on_dot_segments() {
    let params = PathOptions {
        allow_path_params: true,
        ..STRICT
    };
    assert_eq!(
        canonicalize("/api/x;v=1/y;a;b=2", params),
        Ok(Cow::Borrowed("/api/x;v=1/y;a;b=2"))
    );
    assert_eq!(
        canonicalize("/api/%78;v=%2e/./y", params).as_deref(),
        Ok("/api/x;v=./y")
    );
    for raw in ["/api/..;/x", "/api/.;v=1", "/api/%2e%2e;/x", "/api/x;.."] {
        assert_eq!(
            canonicalize(raw, params),
            Err(BadPath::PathParameter),
            "{raw}"
        );
    }
    assert_eq!(
        canonicalize("/api/x;a%2Fb", params),
        Err(BadPath::EncodedSlash)
    );
    assert_eq!(
        canonicalize("/api/x;v=1", STRICT),
        Err(BadPath::PathParameter)
    );
}

#[test]
fn the_routing_view_drops_parameters_and_decodes_encoded_slashes() {
    for (canonical, want) in [
        ("/api/x", "/api/x"),
        ("/api/beta;v=1/x", "/api/beta/x"),
        ("/api/;v=1/beta/x", "/api/beta/x"),
        ("/api/beta%2Fx", "/api/beta/x"),
        ("/api/%2Fbeta/x", "/api/beta/x"),
        ("/api/x;a=%2F/y", "/api/x/y"),
    ] {
        assert_eq!(routing_view(canonical).as_deref(), Ok(want), "{canonical}");
    }
    assert!(matches!(routing_view("/api/x"), Ok(Cow::Borrowed(_))));
}

/// Every short string over an alphabet of troublesome characters: no panic, and whatever is
/// accepted is canonical (idempotent, borrowed the second time), absolute, free of empty and
/// dot segments, and — under the strict options — of `%2F`, `;` and `\`.
#[test]
fn never_panics_and_accepts_only_canonical_results() {
    const ALPHABET: [&str; 12] = ["/", ".", "%", "2", "e", "F", "f", ";", "a", "é", "\\", "\0"];
    let options = [
        STRICT,
        PathOptions::LENIENT,
        PathOptions {
            allow_encoded_slash: true,
            ..STRICT
        },
    ];
    let mut input = String::new();
    let mut accepted = 0;
    for n in 0..ALPHABET.len().pow(5) {
        input.clear();
        input.push('/');
        let mut k = n;
        for _ in 0..5 {
            input.push_str(ALPHABET[k % ALPHABET.len()]);
            k /= ALPHABET.len();
        }
        for opts in options {
            let Ok(out) = canonicalize(&input, opts) else {
                continue;
            };
            accepted += 1;
            let out = out.into_owned();
            assert!(
                matches!(canonicalize(&out, opts), Ok(Cow::Borrowed(_))),
                "{input:?} -> {out:?} is not canonical"
            );
            assert!(out.starts_with('/'), "{input:?} -> {out:?}");
            let segments: Vec<&str> = out[1..].split('/').collect();
            for (i, s) in segments.iter().enumerate() {
                assert!(
                    *s != "." && *s != ".." && (!s.is_empty() || i + 1 == segments.len()),
                    "{input:?} -> {out:?}"
                );
            }
            if opts == STRICT {
                assert!(
                    !out.contains("%2F") && !out.contains(';') && !out.contains('\\'),
                    "{input:?} -> {out:?}"
                );
                assert_eq!(
                    canonicalize(&input, PathOptions::LENIENT).as_deref(),
                    Ok(out.as_str()),
                    "strict and lenient agree on {input:?}"
                );
            }
        }
    }
    assert!(accepted > 10_000, "the alphabet exercises acceptance too");
}

#[test]
fn segments_are_what_splitting_at_each_slash_gives() {
    for text in [
        "",
        "/",
        "//",
        "a",
        "a/",
        "/a",
        "a/b",
        "a//b/",
        "api/items",
        "é/ü/",
        "x/é/%2F/;y",
        "a/../b/./c",
        "€/😀/",
    ] {
        let ours: Vec<&str> = Segments(Some(text)).collect();
        let split: Vec<&str> = text.split('/').collect();
        assert_eq!(ours, split, "{text:?}");
    }
}
