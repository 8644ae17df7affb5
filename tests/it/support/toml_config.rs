//! Test configs as typed TOML: a template is parsed once, then changed key by key. A change that
//! names a key which is not there (or, for [`TomlConfig::add`], one that already is) panics, so a
//! template edit cannot silently turn a test's patch into a no-op the way `str::replace` could.

use std::fmt;
use toml::{Table, Value};

#[derive(Clone, Debug)]
pub struct TomlConfig(Table);

impl TomlConfig {
    pub fn parse(text: &str) -> TomlConfig {
        TomlConfig(
            text.parse::<Table>()
                .unwrap_or_else(|e| panic!("test config is not TOML: {e}\n{text}")),
        )
    }

    /// Replaces the value at `path` (dotted: `server.request_timeout`, `routes.0.upstream`),
    /// which must already be there.
    pub fn set(mut self, path: &str, value: impl Into<Value>) -> TomlConfig {
        let (table, key) = self.parent(path, false);
        assert!(
            table.contains_key(key),
            "set {path}: no such key in the test config"
        );
        table.insert(key.to_string(), value.into());
        self
    }

    /// Adds `path`, which must not be there yet; missing tables on the way are created.
    pub fn add(mut self, path: &str, value: impl Into<Value>) -> TomlConfig {
        let (table, key) = self.parent(path, true);
        assert!(
            !table.contains_key(key),
            "add {path}: already in the test config"
        );
        table.insert(key.to_string(), value.into());
        self
    }

    /// Removes `path`, which must be there.
    pub fn remove(mut self, path: &str) -> TomlConfig {
        let (table, key) = self.parent(path, false);
        assert!(
            table.remove(key).is_some(),
            "remove {path}: no such key in the test config"
        );
        self
    }

    /// The value at `path`, which must be there.
    pub fn get(&self, path: &str) -> &Value {
        let missing = || panic!("get {path}: no such key in the test config");
        let mut parts = path.split('.');
        let mut v = parts
            .next()
            .and_then(|first| self.0.get(first))
            .unwrap_or_else(missing);
        for part in parts {
            v = match v {
                Value::Table(t) => t.get(part),
                Value::Array(items) => part.parse::<usize>().ok().and_then(|i| items.get(i)),
                _ => None,
            }
            .unwrap_or_else(missing);
        }
        v
    }

    pub fn text(&self) -> String {
        self.0.to_string()
    }

    /// The table that holds the last segment of `path` (creating missing tables when
    /// `create`), and that segment.
    fn parent<'a>(&mut self, path: &'a str, create: bool) -> (&mut Table, &'a str) {
        let (dirs, key) = path.rsplit_once('.').unwrap_or(("", path));
        let mut at = &mut self.0;
        let mut parts = dirs.split('.').filter(|p| !p.is_empty());
        while let Some(part) = parts.next() {
            if create && !at.contains_key(part) {
                at.insert(part.to_string(), Value::Table(Table::new()));
            }
            let v = at
                .get_mut(part)
                .unwrap_or_else(|| panic!("{path}: no table {part} in the test config"));
            let v = match v {
                Value::Array(items) => {
                    let i = parts.next().and_then(|i| i.parse::<usize>().ok());
                    let i = i.unwrap_or_else(|| panic!("{path}: {part} is an array; name an item"));
                    items
                        .get_mut(i)
                        .unwrap_or_else(|| panic!("{path}: no item {i} in {part}"))
                }
                other => other,
            };
            at = match v {
                Value::Table(t) => t,
                _ => panic!("{path}: {part} is not a table"),
            };
        }
        (at, key)
    }
}

impl fmt::Display for TomlConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

#[test]
fn patches_change_typed_values_and_fail_loudly_on_a_missing_key() {
    let config = TomlConfig::parse("[server]\nlisten = \"a\"\n[[routes]]\npath = \"/x/\"\n")
        .set("server.listen", "b")
        .add("server.workers", 2)
        .add("limits.login_per_minute", 1)
        .set("routes.0.path", "/y/");
    let again = TomlConfig::parse(&config.text());
    assert_eq!(again.get("server.listen").as_str(), Some("b"));
    assert_eq!(again.get("server.workers").as_integer(), Some(2));
    assert_eq!(again.get("limits.login_per_minute").as_integer(), Some(1));
    let routes = again.get("routes").as_array().unwrap();
    assert_eq!(routes[0]["path"].as_str(), Some("/y/"));
    let removed = again.clone().remove("server.workers");
    assert!(!removed.text().contains("workers"));
    for patch in [
        (|c: TomlConfig| c.set("server.request_timeout", "2s")) as fn(TomlConfig) -> TomlConfig,
        |c| c.set("sever.listen", "c"),
        |c| c.add("server.listen", "c"),
        |c| c.remove("server.shutdown_grace"),
        |c| c.set("routes.1.path", "/z/"),
    ] {
        let copy = again.clone();
        assert!(
            std::panic::catch_unwind(move || patch(copy)).is_err(),
            "a patch of a missing (or, for add, present) key must panic"
        );
    }
}
