//! `${VAR}` interpolation: every string value in the file may name environment variables, so
//! secrets stay out of the file. `${VAR:-fallback}` gives a default; `$$` is a literal `$`.

/// Replaces each `${NAME}` in `text` using `lookup`. Returns the names that were missing.
pub fn interpolate(
    text: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String, InterpolationError> {
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
            (Some(value), None) => out.push_str(&value),
            (Some(value), Some(_)) if !value.is_empty() => out.push_str(&value),
            (_, Some(fallback)) => out.push_str(fallback),
            (None, None) => return Err(InterpolationError::Missing(name.to_string())),
        }
        rest = &body[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
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
        assert_eq!(interpolate("x${A}y", &env).as_deref(), Ok("xalphay"));
        assert_eq!(interpolate("${B:-dflt}", &env).as_deref(), Ok("dflt"));
        assert_eq!(interpolate("${EMPTY:-dflt}", &env).as_deref(), Ok("dflt"));
        assert_eq!(interpolate("$$ and $x", &env).as_deref(), Ok("$ and $x"));
        assert_eq!(
            interpolate("${B}", &env),
            Err(InterpolationError::Missing("B".into()))
        );
        assert_eq!(interpolate("${A", &env), Err(InterpolationError::Unclosed));
    }
}
