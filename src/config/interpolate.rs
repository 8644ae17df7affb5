//! `${VAR}` interpolation: every string value in the file may name environment variables, so
//! secrets stay out of the file. `${VAR:-fallback}` gives a default; `$$` is a literal `$`.

/// Replaces each `${NAME}` in `text` using `lookup`; also returns the names of the variables
/// without a default that were set but empty (a likely mistake, named if the value is refused).
pub fn interpolate(
    text: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<(String, Vec<String>), InterpolationError> {
    let mut empty = Vec::new();
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
            continue;
        }
        let Some(body) = after.strip_prefix('{') else {
            out.push('$');
            rest = after;
            continue;
        };
        let Some(end) = body.find('}') else {
            return Err(InterpolationError::Unclosed);
        };
        let inner = &body[..end];
        let (name, fallback) = match inner.split_once(":-") {
            Some((name, fallback)) => (name, Some(fallback)),
            None => (inner, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(InterpolationError::BadName(name.to_string()));
        }
        match (lookup(name), fallback) {
            (Some(value), None) => {
                if value.is_empty() {
                    empty.push(name.to_string());
                }
                out.push_str(&value);
            }
            (Some(value), Some(_)) if !value.is_empty() => out.push_str(&value),
            (_, Some(fallback)) => out.push_str(fallback),
            (None, None) => return Err(InterpolationError::Missing(name.to_string())),
        }
        rest = &body[end + 1..];
    }
    out.push_str(rest);
    Ok((out, empty))
}

#[derive(Debug, PartialEq, Eq)]
pub enum InterpolationError {
    Missing(String),
    BadName(String),
    Unclosed,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "A" => Some("alpha".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn variables_defaults_and_escapes_expand() {
        let expanded = |text| interpolate(text, &env).map(|(text, _)| text);
        assert_eq!(expanded("x${A}y").as_deref(), Ok("xalphay"));
        assert_eq!(expanded("${B:-dflt}").as_deref(), Ok("dflt"));
        assert_eq!(expanded("${EMPTY:-dflt}").as_deref(), Ok("dflt"));
        assert_eq!(expanded("$$ and $x").as_deref(), Ok("$ and $x"));
        // Set but empty, without a default: expanded, and named.
        assert_eq!(
            interpolate("${A}${EMPTY}${EMPTY:-}", &env),
            Ok(("alpha".to_string(), vec!["EMPTY".to_string()]))
        );
        assert_eq!(
            interpolate("${B}", &env),
            Err(InterpolationError::Missing("B".into()))
        );
        assert_eq!(interpolate("${A", &env), Err(InterpolationError::Unclosed));
    }
}
