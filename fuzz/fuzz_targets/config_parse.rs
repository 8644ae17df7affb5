//! Configuration parsing with `${VAR}` interpolation (`config::Config::parse`). Variables come
//! from a fixed environment whose values include TOML-significant characters, and every
//! `${SECRET…}` expands to a marker. Besides "no panic": a failure names at least one problem, and
//! when the marker can only reach secret settings (client secret, session keys, Redis), neither an
//! error nor the parsed configuration's `Debug` shows it.
use std::path::Path;

use vestibule::config::{Config, parse_duration, parse_size};

const MARKER: &str = "Sx3cr3t-Marker";
/// Mirrors `config::validate::SECRET_PATHS`.
const SECRET_PATHS: [&str; 3] = ["oidc.client_secret", "session.keys", "session.redis"];

fn env(name: &str) -> Option<String> {
    let value = match name {
        "EMPTY" => "",
        "PORT" => "8080",
        "ISSUER" => "https://idp.example.com",
        "QUOTE" => "\"'",
        "NEWLINE" => "a\nb",
        "DOLLAR" => "${HOME}$$",
        "KEY" => "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY",
        _ if name.starts_with("SECRET") => MARKER,
        _ if name.starts_with('V') => name,
        _ => return None,
    };
    Some(value.to_owned())
}

fn is_secret_path(path: &str) -> bool {
    SECRET_PATHS.iter().any(|p| path.starts_with(p))
}

/// Whether some value outside the secret paths could expand to (or contain) the marker.
fn marker_outside_secrets(value: &toml::Value, path: &str) -> bool {
    match value {
        toml::Value::String(s) => {
            (s.contains("SECRET") || s.contains(MARKER)) && !is_secret_path(path)
        }
        toml::Value::Array(items) => items
            .iter()
            .enumerate()
            .any(|(i, item)| marker_outside_secrets(item, &format!("{path}[{i}]"))),
        toml::Value::Table(table) => table.iter().any(|(key, item)| {
            let path = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            key.contains(MARKER) || marker_outside_secrets(item, &path)
        }),
        _ => false,
    }
}

pub fn fuzz(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if text.len() < 64 {
        let _ = parse_duration(&text);
        let _ = parse_size(&text);
    }
    let only_in_secrets = match text.parse::<toml::Table>() {
        Ok(table) => !marker_outside_secrets(&toml::Value::Table(table), ""),
        Err(_) => !text.contains(MARKER),
    };
    match Config::parse(&text, Path::new("/nonexistent/vestibule-fuzz"), &env) {
        Ok(config) => {
            let _ = config.redirect_uri();
            let shown = format!("{config:?}");
            assert!(
                !only_in_secrets || !shown.contains(MARKER),
                "a secret shows in the configuration's Debug output"
            );
        }
        Err(errors) => {
            assert!(!errors.0.is_empty(), "a failure must name a problem");
            let shown = errors.to_string();
            assert!(
                !only_in_secrets || !shown.contains(MARKER),
                "a secret shows in an error: {shown}"
            );
        }
    }
}
