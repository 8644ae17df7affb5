//! The keys of every table, read off the serde structs of [`super::raw`] so that a key is named
//! in exactly one place: its field. serde's derive hands the field names of a struct to
//! `deserialize_struct`; a deserializer that answers every request with an empty value, and
//! offers each field exactly once, therefore walks the whole schema and records each table.
//!
//! Table paths: `server.tls`; an array of tables gets `[]` (`routes[]`), a map of tables `.*`
//! (`features.*`).

use super::raw;
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, SeqAccess, Visitor};
use std::fmt;

/// Every table of the file and the keys it accepts, in the order the raw structs declare them.
pub struct Schema(Vec<(String, &'static [&'static str])>);

impl Schema {
    /// The schema of the whole file, from [`raw::Root`].
    pub fn of_file() -> Schema {
        let mut tables = Vec::new();
        // The walk cannot fail on the raw structs (the unit test below checks it finishes);
        // whatever it recorded before an error is still the truth about those tables.
        let _ = raw::Root::deserialize(Probe {
            path: String::new(),
            tables: &mut tables,
        });
        Schema(tables)
    }

    /// The keys of the table at `path` (a schema path such as `routes[]`), if it is a table.
    pub fn keys(&self, path: &str) -> Option<&'static [&'static str]> {
        self.0
            .iter()
            .find(|(p, _)| p == path)
            .map(|(_, keys)| *keys)
    }

    #[cfg(test)]
    /// Every key that holds a value rather than a table, as a schema path
    /// (`server.tls.cert`, `routes[].path`, `features.*.role`).
    pub fn leaves(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (table, keys) in &self.0 {
            for key in *keys {
                let path = join(table, key);
                let nested = [path.clone(), format!("{path}[]"), format!("{path}.*")];
                if !nested.iter().any(|p| self.keys(p).is_some()) {
                    out.push(path);
                }
            }
        }
        out
    }
}

pub(super) fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

#[derive(Debug)]
struct ProbeError(String);

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ProbeError {}

impl de::Error for ProbeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        ProbeError(msg.to_string())
    }
}

struct Probe<'a> {
    path: String,
    tables: &'a mut Vec<(String, &'static [&'static str])>,
}

impl<'de> de::Deserializer<'de> for Probe<'_> {
    type Error = ProbeError;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, ProbeError> {
        Err(de::Error::custom(format!(
            "{}: a raw field needs a concrete type",
            self.path
        )))
    }
    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        visitor.visit_bool(false)
    }
    fn deserialize_i64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        visitor.visit_i64(0)
    }
    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        visitor.visit_f64(0.0)
    }
    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        visitor.visit_str("")
    }
    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        visitor.visit_str("")
    }
    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        visitor.visit_some(self)
    }
    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        visitor.visit_seq(Entries {
            entries: vec![("", format!("{}[]", self.path))],
            next: 0,
            tables: self.tables,
        })
    }
    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        visitor.visit_map(Entries {
            entries: vec![("*", format!("{}.*", self.path))],
            next: 0,
            tables: self.tables,
        })
    }
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ProbeError> {
        self.tables.push((self.path.clone(), fields));
        visitor.visit_map(Entries {
            entries: fields.iter().map(|f| (*f, join(&self.path, f))).collect(),
            next: 0,
            tables: self.tables,
        })
    }

    serde::forward_to_deserialize_any! {
        i8 i16 i32 i128 u8 u16 u32 u64 u128 f32 char bytes byte_buf unit unit_struct
        newtype_struct tuple tuple_struct enum identifier ignored_any
    }
}

/// The fields of a struct, the one key of a map, or the one element of an array.
struct Entries<'a> {
    /// (key offered, schema path of its value)
    entries: Vec<(&'static str, String)>,
    next: usize,
    tables: &'a mut Vec<(String, &'static [&'static str])>,
}

impl Entries<'_> {
    fn value<'de, T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, ProbeError> {
        let path = self
            .entries
            .get(self.next)
            .map(|(_, p)| p.clone())
            .unwrap_or_default();
        self.next += 1;
        seed.deserialize(Probe {
            path,
            tables: self.tables,
        })
    }
}

impl<'de> MapAccess<'de> for Entries<'_> {
    type Error = ProbeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, ProbeError> {
        match self.entries.get(self.next) {
            Some((key, _)) => seed.deserialize(key.into_deserializer()).map(Some),
            None => Ok(None),
        }
    }

    fn next_value_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<T::Value, ProbeError> {
        self.value(seed)
    }
}

impl<'de> SeqAccess<'de> for Entries<'_> {
    type Error = ProbeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, ProbeError> {
        if self.next >= self.entries.len() {
            return Ok(None);
        }
        self.value(seed).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schema_is_read_off_the_raw_structs() {
        let schema = Schema::of_file();
        assert_eq!(
            schema.keys(""),
            Some(
                &[
                    "server",
                    "admin",
                    "log",
                    "oidc",
                    "session",
                    "limits",
                    "telemetry",
                    "routes",
                    "features",
                    "tls"
                ][..]
            )
        );
        assert_eq!(schema.keys("server.tls"), Some(&["cert", "key"][..]));
        assert_eq!(schema.keys("tls"), Some(&["ca_file", "system_roots"][..]));
        assert_eq!(
            schema.keys("session.redis.sentinel"),
            Some(&["master", "nodes"][..])
        );
        assert_eq!(
            schema.keys("features.*"),
            Some(&["public", "beta", "role"][..])
        );
        assert!(
            schema
                .keys("routes[]")
                .is_some_and(|k| k.contains(&"upstream"))
        );
        // Maps and arrays of plain values are values, not tables.
        assert_eq!(schema.keys("oidc.extra_auth_params.*"), None);
        assert_eq!(schema.keys("routes[].require.*"), None);
        let leaves = schema.leaves();
        for leaf in [
            "server.listen",
            "server.tls.cert",
            "oidc.extra_auth_params",
            "session.redis.sentinel.nodes",
            "routes[].require",
            "features.*.role",
        ] {
            assert!(leaves.iter().any(|l| l == leaf), "{leaf} in {leaves:?}");
        }
        for table in [
            "server",
            "server.tls",
            "session.redis",
            "routes",
            "features",
        ] {
            assert!(!leaves.iter().any(|l| l == table), "{table} is a table");
        }
    }
}
