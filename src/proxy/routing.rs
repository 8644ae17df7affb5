//! Route table: prefix match, longest prefix wins. Compiled once per configuration.

use crate::config::RouteConfig;
use std::sync::Arc;

/// Routes sorted by descending prefix length, so the first match is the longest.
#[derive(Debug, Clone)]
pub struct RouteTable {
    routes: Vec<Arc<RouteConfig>>,
}

impl RouteTable {
    pub fn new(routes: &[RouteConfig]) -> Self {
        let mut routes: Vec<Arc<RouteConfig>> = routes.iter().cloned().map(Arc::new).collect();
        routes.sort_by(|a, b| b.path.len().cmp(&a.path.len()));
        RouteTable { routes }
    }

    pub fn find(&self, path: &str) -> Option<&Arc<RouteConfig>> {
        self.routes
            .iter()
            .find(|r| path.starts_with(r.path.as_str()))
    }
}

/// The path the upstream sees: with `strip_prefix`, the route's prefix is removed, keeping a
/// leading `/`.
pub fn upstream_path<'a>(route: &RouteConfig, path: &'a str) -> std::borrow::Cow<'a, str> {
    if !route.strip_prefix {
        return path.into();
    }
    let prefix = route.path.trim_end_matches('/');
    let rest = path.strip_prefix(prefix).unwrap_or(path);
    if rest.starts_with('/') {
        rest.into()
    } else {
        format!("/{rest}").into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AuthMode, Target, TokenMode};

    fn route(path: &str, strip: bool) -> RouteConfig {
        RouteConfig {
            path: path.into(),
            target: Target::Upstream(url::Url::parse("http://127.0.0.1:1").unwrap()),
            strip_prefix: strip,
            auth: AuthMode::None,
            token: TokenMode::None,
            csrf: false,
            resource: None,
            scopes: vec![],
            exchange: false,
            require: vec![],
            feature: None,
            timeout: None,
        }
    }

    #[test]
    fn longest_prefix_wins() {
        let table = RouteTable::new(&[
            route("/", false),
            route("/api/", false),
            route("/api/v2/", false),
        ]);
        assert_eq!(table.find("/api/v2/x").unwrap().path, "/api/v2/");
        assert_eq!(table.find("/api/x").unwrap().path, "/api/");
        assert_eq!(table.find("/other").unwrap().path, "/");
    }

    #[test]
    fn strip_prefix_keeps_a_leading_slash() {
        assert_eq!(upstream_path(&route("/api/", true), "/api/users"), "/users");
        assert_eq!(upstream_path(&route("/api/", true), "/api/"), "/");
        assert_eq!(
            upstream_path(&route("/api/", false), "/api/users"),
            "/api/users"
        );
    }
}
