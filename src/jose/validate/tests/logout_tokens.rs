#![allow(clippy::unwrap_used)]

use super::*;

fn logout_claims() -> Value {
    logout_token_claims(ISSUER, CLIENT, NOW)
}

#[tokio::test]
async fn valid_logout_token_is_accepted() {
    let f = fixture().await;
    let token = f.logout(&logout_claims()).await.unwrap();
    let want = LogoutToken {
        sub: Some("alice".to_owned()),
        sid: Some("session-1".to_owned()),
        jti: "logout-1".to_owned(),
        iat: NOW,
    };
    assert_eq!(token, want);
}

#[tokio::test]
async fn logout_token_without_typ_or_with_only_sid_is_accepted() {
    let f = fixture().await;
    let token = f
        .signer
        .token(TestKey::EcP256)
        .no_typ()
        .sign(&without(logout_claims(), "sub"));
    let logout = validate_logout_token(&f.jwks, &token, &expect())
        .await
        .unwrap();
    assert_eq!(
        (logout.sub, logout.sid.as_deref()),
        (None, Some("session-1"))
    );
}

#[tokio::test]
async fn logout_token_with_a_bad_signature_is_rejected() {
    let f = fixture().await;
    let token = f
        .signer
        .token(TestKey::Rsa1)
        .typ("logout+jwt")
        .forge(Forgery::BadSignature);
    let token = token.sign(&logout_claims());
    let err = validate_logout_token(&f.jwks, &token, &expect())
        .await
        .unwrap_err();
    assert_eq!(err, JoseError::BadSignature);
}

#[tokio::test]
async fn logout_token_from_another_issuer_or_for_another_audience_is_rejected() {
    let f = fixture().await;
    let claims = with(logout_claims(), "iss", json!("https://evil.example.com"));
    assert_eq!(f.logout(&claims).await.unwrap_err(), JoseError::WrongIssuer);
    let claims = with(logout_claims(), "aud", json!("other-client"));
    assert_eq!(
        f.logout(&claims).await.unwrap_err(),
        JoseError::WrongAudience
    );
}

#[tokio::test]
async fn logout_token_without_the_backchannel_event_is_rejected() {
    let f = fixture().await;
    let missing = without(logout_claims(), "events");
    assert_eq!(
        f.logout(&missing).await.unwrap_err(),
        JoseError::NotALogoutToken
    );
    let other_event = with(
        logout_claims(),
        "events",
        json!({"http://example.com/other": {}}),
    );
    assert_eq!(
        f.logout(&other_event).await.unwrap_err(),
        JoseError::NotALogoutToken
    );
    let not_object = with(
        logout_claims(),
        "events",
        json!({ BACKCHANNEL_LOGOUT_EVENT: "yes" }),
    );
    assert_eq!(
        f.logout(&not_object).await.unwrap_err(),
        JoseError::NotALogoutToken
    );
}

#[tokio::test]
async fn logout_token_with_a_nonce_is_rejected() {
    let f = fixture().await;
    let claims = with(logout_claims(), "nonce", json!(NONCE));
    assert_eq!(
        f.logout(&claims).await.unwrap_err(),
        JoseError::UnexpectedClaim("nonce")
    );
}

#[tokio::test]
async fn logout_token_with_neither_sid_nor_sub_is_rejected() {
    let f = fixture().await;
    let claims = without(without(logout_claims(), "sid"), "sub");
    assert_eq!(
        f.logout(&claims).await.unwrap_err(),
        JoseError::MissingClaim("sub or sid")
    );
}

#[tokio::test]
async fn stale_logout_token_is_rejected() {
    let f = fixture().await;
    let limit = DEFAULT_LOGOUT_MAX_IAT_AGE + 60;
    assert!(
        f.logout(&with(logout_claims(), "iat", json!(NOW - limit)))
            .await
            .is_ok()
    );
    let stale = with(logout_claims(), "iat", json!(NOW - limit - 1));
    assert_eq!(
        f.logout(&stale).await.unwrap_err(),
        JoseError::IssuedTooLongAgo
    );
    let token = f
        .signer
        .token(TestKey::Rsa1)
        .sign(&with(logout_claims(), "iat", json!(NOW - 200)));
    let strict = Expect {
        max_iat_age: Some(100),
        ..expect()
    };
    let err = validate_logout_token(&f.jwks, &token, &strict)
        .await
        .unwrap_err();
    assert_eq!(
        err,
        JoseError::NotALogoutToken,
        "typ JWT is refused before anything else"
    );
    let token = f.signer.token(TestKey::Rsa1).no_typ();
    let token = token.sign(&with(logout_claims(), "iat", json!(NOW - 200)));
    let err = validate_logout_token(&f.jwks, &token, &strict)
        .await
        .unwrap_err();
    assert_eq!(err, JoseError::IssuedTooLongAgo);
}

#[tokio::test]
async fn logout_token_issued_in_the_future_is_rejected() {
    let f = fixture().await;
    let claims = with(logout_claims(), "iat", json!(NOW + 61));
    assert_eq!(
        f.logout(&claims).await.unwrap_err(),
        JoseError::IssuedInFuture
    );
    let missing = without(logout_claims(), "iat");
    assert_eq!(
        f.logout(&missing).await.unwrap_err(),
        JoseError::MissingClaim("iat")
    );
}

#[tokio::test]
async fn logout_token_without_a_jti_is_rejected() {
    let f = fixture().await;
    let claims = without(logout_claims(), "jti");
    assert_eq!(
        f.logout(&claims).await.unwrap_err(),
        JoseError::MissingClaim("jti")
    );
}

#[tokio::test]
async fn logout_token_with_a_wrong_typ_is_rejected() {
    let f = fixture().await;
    for typ in ["JWT", "at+jwt", "logout"] {
        let token = f
            .signer
            .token(TestKey::Rsa1)
            .typ(typ)
            .sign(&logout_claims());
        let err = validate_logout_token(&f.jwks, &token, &expect())
            .await
            .unwrap_err();
        assert_eq!(err, JoseError::NotALogoutToken, "{typ}");
    }
    let token = f
        .signer
        .token(TestKey::Rsa1)
        .typ("application/logout+JWT")
        .sign(&logout_claims());
    assert!(
        validate_logout_token(&f.jwks, &token, &expect())
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn expired_logout_token_is_rejected() {
    let f = fixture().await;
    let claims = with(logout_claims(), "exp", json!(NOW - 61));
    assert_eq!(f.logout(&claims).await.unwrap_err(), JoseError::Expired);
}

#[tokio::test]
async fn an_id_token_is_not_a_logout_token() {
    let f = fixture().await;
    let token = f.signer.token(TestKey::Rsa1).no_typ().sign(&id_claims());
    let err = validate_logout_token(&f.jwks, &token, &expect())
        .await
        .unwrap_err();
    assert_eq!(err, JoseError::NotALogoutToken);
}

/// A token stays acceptable while its `iat` is at most the maximum age plus the leeway ago, and
/// its `iat` may lie up to the leeway in the future (the provider's clock runs ahead): its `jti`
/// must be remembered until even such a token is too old, or a replay is taken.
#[tokio::test]
async fn the_replay_cache_remembers_a_jti_until_its_token_is_too_old_to_take() {
    let f = fixture().await;
    for leeway in [0, 1, 60, 120, 600] {
        let claims = with(logout_claims(), "iat", json!(NOW + leeway));
        let token = f
            .signer
            .token(TestKey::Rsa1)
            .typ("logout+jwt")
            .sign(&claims);
        let at = |now| Expect {
            now,
            leeway,
            max_iat_age: Some(DEFAULT_LOGOUT_MAX_IAT_AGE),
            ..expect()
        };
        assert!(
            validate_logout_token(&f.jwks, &token, &at(NOW))
                .await
                .is_ok()
        );
        let forgotten = NOW + crate::jose::logout_replay_ttl(leeway).as_secs();
        assert_eq!(
            validate_logout_token(&f.jwks, &token, &at(forgotten)).await,
            Err(JoseError::IssuedTooLongAgo),
            "leeway {leeway}: the token is taken again once its jti is forgotten"
        );
    }
}
