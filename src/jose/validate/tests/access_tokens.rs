#![allow(clippy::unwrap_used)]

use super::*;

const API: &str = "https://api.example.com";

fn access_claims(aud: Value) -> Value {
    json!({"iss": ISSUER, "aud": aud, "sub": "alice", "client_id": CLIENT, "scope": "api.read",
        "iat": NOW, "exp": NOW + 300})
}

fn api_expect() -> Expect {
    Expect {
        audience: API.to_owned(),
        ..expect()
    }
}

#[tokio::test]
async fn access_token_for_the_expected_audience_is_accepted() {
    let f = fixture().await;
    for aud in [json!(API), json!(["other", API])] {
        let token = f
            .signer
            .token(TestKey::Rsa1)
            .typ("at+jwt")
            .sign(&access_claims(aud));
        let claims = validate_access_token(&f.jwks, &token, &api_expect())
            .await
            .unwrap();
        assert_eq!(claims["scope"], "api.read");
    }
}

#[tokio::test]
async fn access_token_for_another_audience_is_rejected() {
    let f = fixture().await;
    let token = f.rs256(&access_claims(json!("https://other-api.example.com")));
    let err = validate_access_token(&f.jwks, &token, &api_expect())
        .await
        .unwrap_err();
    assert_eq!(err, JoseError::WrongAudience);
    let id_token = f.rs256(&id_claims());
    let err = validate_access_token(&f.jwks, &id_token, &api_expect())
        .await
        .unwrap_err();
    assert_eq!(
        err,
        JoseError::WrongAudience,
        "an ID token is no API credential"
    );
}

#[tokio::test]
async fn access_token_expiry_and_not_before_are_checked() {
    let f = fixture().await;
    let cases = [
        (
            with(access_claims(json!(API)), "exp", json!(NOW - 61)),
            JoseError::Expired,
        ),
        (
            without(access_claims(json!(API)), "exp"),
            JoseError::MissingClaim("exp"),
        ),
        (
            with(access_claims(json!(API)), "nbf", json!(NOW + 61)),
            JoseError::NotYetValid,
        ),
        (
            with(access_claims(json!(API)), "iss", json!("https://evil")),
            JoseError::WrongIssuer,
        ),
    ];
    for (claims, want) in cases {
        let token = f.rs256(&claims);
        let err = validate_access_token(&f.jwks, &token, &api_expect())
            .await
            .unwrap_err();
        assert_eq!(err, want);
    }
}

#[tokio::test]
async fn access_token_with_a_forged_algorithm_is_rejected() {
    let f = fixture().await;
    for forgery in [Forgery::AlgNone, Forgery::Hs256WithPublicKeyPem] {
        let token = f
            .signer
            .token(TestKey::Rsa1)
            .forge(forgery)
            .sign(&access_claims(json!(API)));
        let err = validate_access_token(&f.jwks, &token, &api_expect())
            .await
            .unwrap_err();
        assert_eq!(err, JoseError::UnsupportedAlgorithm);
    }
}
