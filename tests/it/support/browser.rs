//! A scripted browser: a cookie jar (all hosts are 127.0.0.1, as in a real browser where
//! cookies ignore ports), redirects followed by hand, and the provider's login form.

use super::Reply;
use bytes::Bytes;
use http_body_util::Full;
use std::collections::BTreeMap;

#[derive(Default, Clone)]
pub struct Browser {
    pub jar: BTreeMap<String, String>,
}

impl Browser {
    fn cookie_header(&self) -> String {
        self.jar
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn absorb(&mut self, reply: &Reply) {
        for value in reply.headers.get_all("set-cookie") {
            let text = value.to_str().unwrap();
            let (pair, attrs) = text.split_once(';').unwrap_or((text, ""));
            let (name, val) = pair.split_once('=').unwrap();
            let attrs = attrs.to_ascii_lowercase();
            if attrs.contains("max-age=0")
                || (attrs.contains("expires=thu, 01 jan 1970") && !attrs.contains("max-age="))
                || val.is_empty()
            {
                self.jar.remove(name.trim());
            } else {
                self.jar.insert(name.trim().to_string(), val.to_string());
            }
        }
    }

    pub async fn request(
        &mut self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<String>,
    ) -> Reply {
        let mut builder = http::Request::builder().method(method).uri(url);
        if !self.jar.is_empty() {
            builder = builder.header("cookie", self.cookie_header());
        }
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let body = match body {
            Some(b) => {
                builder = builder.header("content-type", "application/x-www-form-urlencoded");
                Full::new(Bytes::from(b))
            }
            None => Full::new(Bytes::new()),
        };
        let reply = super::send(builder.body(body).unwrap()).await;
        self.absorb(&reply);
        reply
    }

    pub async fn get(&mut self, url: &str, headers: &[(&str, &str)]) -> Reply {
        self.request("GET", url, headers, None).await
    }

    /// The signed-in user's claims from `/bff/user` at the proxy `base`, which must answer 200.
    pub async fn user(&mut self, base: &str) -> serde_json::Value {
        let me = self
            .get(&format!("{base}/bff/user"), &[("x-csrf", "1")])
            .await;
        assert_eq!(me.status, 200, "{}", me.text());
        me.json()
    }

    /// Follows redirects (resolving relative locations against `base`) until a non-redirect or
    /// a location starting with `stop_at`. Returns the last reply and the URL it came from.
    pub async fn follow(&mut self, mut url: String, stop_at: &str) -> (Reply, String) {
        for _ in 0..20 {
            if url.starts_with(stop_at) {
                let reply = self.get(&url, &[("accept", "text/html")]).await;
                return (reply, url);
            }
            let reply = self.get(&url, &[("accept", "text/html")]).await;
            if !(300..400).contains(&reply.status) {
                return (reply, url);
            }
            let location = reply.header("location").unwrap().to_string();
            url = absolute(&url, &location);
        }
        panic!("too many redirects");
    }

    /// Opens `/bff/login?returnUrl=…` at the proxy `base` as a navigation.
    pub async fn start_login(&mut self, base: &str, return_url: &str) -> Reply {
        self.get(
            &format!("{base}/bff/login?returnUrl={}", urlencode(return_url)),
            &[("accept", "text/html")],
        )
        .await
    }

    /// Logs in at the proxy `base` as `user`, returning the proxy's final callback reply.
    pub async fn login(
        &mut self,
        base: &str,
        user: &str,
        password: &str,
        return_url: &str,
    ) -> Reply {
        let start = self.start_login(base, return_url).await;
        assert_eq!(
            start.status,
            302,
            "login must redirect to the provider: {}",
            start.text()
        );
        let auth_url = start.header("location").unwrap().to_string();
        let (form, form_url) = self.follow(auth_url, "\u{0}").await;
        assert_eq!(
            form.status, 200,
            "expected the provider's login form at {form_url}"
        );
        let body = format!("login={}&password={}", urlencode(user), urlencode(password));
        let posted = self.post_login_form(&form_url, body).await;
        let next = absolute(&form_url, posted.header("location").unwrap());
        let callback = self.back_at(base, next, None).await;
        self.get(&callback, &[("accept", "text/html")]).await
    }

    /// Stops at the provider's redirect back to the proxy and returns the callback URL unvisited
    /// (the provider may skip its form when it already has a session: single sign-on).
    pub async fn login_until_callback(
        &mut self,
        base: &str,
        user: &str,
        return_url: &str,
    ) -> String {
        let start = self.start_login(base, return_url).await;
        let url = start.header("location").unwrap().to_string();
        let form = format!("login={user}&password={user}");
        self.back_at(base, url, Some(&form)).await
    }

    /// Follows redirects from `url` until one points back at `base`, and returns that location
    /// unvisited. The provider's login form on the way (a page under `/interaction/`) is posted
    /// with `form` (`login=…&password=…`) when given; any other page fails the test.
    pub async fn back_at(&mut self, base: &str, mut url: String, form: Option<&str>) -> String {
        let from = url.clone();
        for _ in 0..20 {
            if url.starts_with(base) {
                return url;
            }
            let reply = self.get(&url, &[("accept", "text/html")]).await;
            if let Some(form) =
                form.filter(|_| reply.status == 200 && url.contains("/interaction/"))
            {
                let posted = self.post_login_form(&url, form.to_string()).await;
                url = absolute(&url, posted.header("location").unwrap());
                continue;
            }
            assert!(
                (300..400).contains(&reply.status),
                "stuck at the provider: {url} (after {from}) answered {}: {}",
                reply.status,
                reply.text()
            );
            url = absolute(&url, reply.header("location").unwrap());
        }
        panic!("the provider never sent the browser back to {base}");
    }

    /// Posts `body` to the provider's login form shown at `form_url`; the provider must answer
    /// with a redirect.
    pub async fn post_login_form(&mut self, form_url: &str, body: String) -> Reply {
        self.post_interaction(form_url, "login", body).await
    }

    /// Posts `body` to `action` (`login`, `abort`) of the provider's interaction whose page is
    /// `form_url`; the provider must answer with a redirect.
    pub async fn post_interaction(&mut self, form_url: &str, action: &str, body: String) -> Reply {
        let uid = form_url
            .rsplit('/')
            .next()
            .unwrap()
            .split('?')
            .next()
            .unwrap()
            .to_string();
        let origin = form_url.split("/interaction/").next().unwrap().to_string();
        let posted = self
            .request(
                "POST",
                &format!("{origin}/interaction/{uid}/{action}"),
                &[],
                Some(body),
            )
            .await;
        assert!(
            (300..400).contains(&posted.status),
            "{action} form POST gave {}: {}",
            posted.status,
            posted.text()
        );
        posted
    }
}

pub fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

pub fn absolute(current: &str, location: &str) -> String {
    url::Url::parse(current)
        .unwrap()
        .join(location)
        .unwrap()
        .to_string()
}
