#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Shared fixture for the validator tests; the cases live in one file per token kind.

mod access_tokens;
mod id_tokens;
mod logout_tokens;

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use jsonwebtoken::Algorithm;
use serde_json::{Value, json};

use super::*;
use crate::jose::testing::{
    FakeJwksFetcher, Forgery, ONE_OF_EACH, TestKey, TestSigner, id_token_claims,
    logout_token_claims,
};

const ISSUER: &str = "https://idp.example.com/realms/app";
const CLIENT: &str = "spa-bff";
const NONCE: &str = "n-0S6_WzA2Mj";
const NOW: u64 = 1_800_000_000;

struct Fixture {
    signer: TestSigner,
    fetcher: Arc<FakeJwksFetcher>,
    jwks: Jwks,
}

async fn fixture() -> Fixture {
    let signer = TestSigner::new();
    let fetcher = FakeJwksFetcher::new(signer.jwks_json(&ONE_OF_EACH));
    let jwks = Jwks::new(fetcher.clone(), Duration::from_secs(60));
    jwks.load().await.unwrap();
    Fixture {
        signer,
        fetcher,
        jwks,
    }
}

fn expect() -> Expect {
    Expect {
        issuer: ISSUER.to_owned(),
        audience: CLIENT.to_owned(),
        now: NOW,
        leeway: 60,
        max_iat_age: None,
    }
}

fn id_claims() -> Value {
    id_token_claims(ISSUER, CLIENT, NONCE, NOW)
}

fn with(mut claims: Value, name: &str, value: Value) -> Value {
    claims[name] = value;
    claims
}

fn without(mut claims: Value, name: &str) -> Value {
    claims.as_object_mut().unwrap().remove(name);
    claims
}

impl Fixture {
    fn rs256(&self, claims: &Value) -> String {
        self.signer.token(TestKey::Rsa1).sign(claims)
    }

    async fn id(&self, token: &str) -> Result<Claims, JoseError> {
        validate_id_token(&self.jwks, token, &expect(), NONCE).await
    }

    async fn id_claims_error(&self, claims: Value) -> JoseError {
        self.id(&self.rs256(&claims)).await.unwrap_err()
    }

    async fn logout(&self, claims: &Value) -> Result<LogoutToken, JoseError> {
        let token = self
            .signer
            .token(TestKey::Rsa1)
            .typ("logout+jwt")
            .sign(claims);
        validate_logout_token(&self.jwks, &token, &expect()).await
    }
}
