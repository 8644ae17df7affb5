#![allow(clippy::unwrap_used)]

use super::*;

#[tokio::test]
async fn valid_rs256_id_token_is_accepted() {
    let f = fixture().await;
    let claims = f.id(&f.rs256(&id_claims())).await.unwrap();
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["sid"], "session-1");
}

#[tokio::test]
async fn valid_es256_id_token_is_accepted() {
    let f = fixture().await;
    let token = f.signer.token(TestKey::EcP256).sign(&id_claims());
    assert_eq!(f.id(&token).await.unwrap()["sub"], "alice");
}

#[tokio::test]
async fn valid_eddsa_id_token_is_accepted() {
    let f = fixture().await;
    let eddsa = f.signer.token(TestKey::Ed25519).sign(&id_claims());
    assert!(f.id(&eddsa).await.is_ok());
}

#[tokio::test]
async fn ps256_id_token_is_accepted_only_by_a_key_not_pinned_to_another_alg() {
    let f = fixture().await;
    let ps256 = f
        .signer
        .token(TestKey::Rsa1)
        .alg(Algorithm::PS256)
        .sign(&id_claims());
    assert_eq!(
        f.id(&ps256).await.unwrap_err(),
        JoseError::UnknownKey,
        "the JWK says alg RS256"
    );
    let mut jwk = f.signer.jwk(TestKey::Rsa1, "rsa-1");
    jwk.as_object_mut().unwrap().remove("alg");
    f.fetcher
        .set(serde_json::to_vec(&json!({ "keys": [jwk] })).unwrap());
    let jwks = Jwks::new(f.fetcher.clone(), Duration::from_secs(60));
    jwks.load().await.unwrap();
    assert!(
        validate_id_token(&jwks, &ps256, &expect(), NONCE)
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn id_token_with_a_bad_signature_is_rejected() {
    let f = fixture().await;
    for key in [TestKey::Rsa1, TestKey::EcP256, TestKey::Ed25519] {
        let token = f
            .signer
            .token(key)
            .forge(Forgery::BadSignature)
            .sign(&id_claims());
        assert_eq!(
            f.id(&token).await.unwrap_err(),
            JoseError::BadSignature,
            "{key:?}"
        );
    }
}

#[tokio::test]
async fn id_token_signed_by_another_key_under_a_known_kid_is_rejected() {
    let f = fixture().await;
    let token = f
        .signer
        .token(TestKey::Rsa2)
        .kid("rsa-1")
        .sign(&id_claims());
    assert_eq!(f.id(&token).await.unwrap_err(), JoseError::BadSignature);
}

#[tokio::test]
async fn id_token_with_alg_none_is_rejected_before_any_key_lookup() {
    let f = fixture().await;
    for kid in [Some("rsa-1"), Some("unknown"), None] {
        let builder = f.signer.token(TestKey::Rsa1).forge(Forgery::AlgNone);
        let builder = match kid {
            Some(kid) => builder.kid(kid),
            None => builder.no_kid(),
        };
        let token = builder.sign(&id_claims());
        assert_eq!(
            f.id(&token).await.unwrap_err(),
            JoseError::UnsupportedAlgorithm
        );
    }
    assert_eq!(
        f.fetcher.fetches(),
        1,
        "a forged alg must not trigger a JWKS refetch"
    );
}

#[tokio::test]
async fn id_token_signed_hs256_with_the_client_secret_is_rejected() {
    let f = fixture().await;
    let secret = b"the-client-secret-from-the-config".to_vec();
    let token = f
        .signer
        .token(TestKey::Rsa1)
        .forge(Forgery::Hs256WithSecret(secret))
        .sign(&id_claims());
    assert_eq!(
        f.id(&token).await.unwrap_err(),
        JoseError::UnsupportedAlgorithm
    );
}

#[tokio::test]
async fn id_token_signed_hs256_keyed_with_the_rsa_public_key_is_rejected() {
    let f = fixture().await;
    let token = f
        .signer
        .token(TestKey::Rsa1)
        .forge(Forgery::Hs256WithPublicKeyPem)
        .sign(&id_claims());
    assert_eq!(
        f.id(&token).await.unwrap_err(),
        JoseError::UnsupportedAlgorithm
    );
    assert_eq!(f.fetcher.fetches(), 1);
}

#[tokio::test]
async fn id_token_from_another_issuer_is_rejected() {
    let f = fixture().await;
    let claims = with(
        id_claims(),
        "iss",
        json!("https://evil.example.com/realms/app"),
    );
    assert_eq!(f.id_claims_error(claims).await, JoseError::WrongIssuer);
    assert_eq!(
        f.id_claims_error(without(id_claims(), "iss")).await,
        JoseError::MissingClaim("iss")
    );
}

/// OpenID Connect Core §3.1.3.7 step 2: exactly the issuer; a trailing `/` more is another one.
#[tokio::test]
async fn id_token_issuer_with_a_trailing_slash_more_is_refused() {
    let f = fixture().await;
    let claims = with(id_claims(), "iss", json!(format!("{ISSUER}/")));
    assert_eq!(f.id_claims_error(claims).await, JoseError::WrongIssuer);
}

#[tokio::test]
async fn id_token_for_another_audience_is_rejected() {
    let f = fixture().await;
    let claims = with(id_claims(), "aud", json!("other-client"));
    assert_eq!(f.id_claims_error(claims).await, JoseError::WrongAudience);
    let claims = with(id_claims(), "aud", json!(["other-client", "third"]));
    assert_eq!(f.id_claims_error(claims).await, JoseError::WrongAudience);
}

#[tokio::test]
async fn id_token_with_several_audiences_and_no_azp_is_rejected() {
    let f = fixture().await;
    let claims = with(
        id_claims(),
        "aud",
        json!([CLIENT, "https://api.example.com"]),
    );
    assert_eq!(f.id_claims_error(claims).await, JoseError::MissingAzp);
}

#[tokio::test]
async fn id_token_with_several_audiences_and_our_azp_is_accepted() {
    let f = fixture().await;
    let claims = with(
        id_claims(),
        "aud",
        json!([CLIENT, "https://api.example.com"]),
    );
    let claims = with(claims, "azp", json!(CLIENT));
    assert!(f.id(&f.rs256(&claims)).await.is_ok());
}

#[tokio::test]
async fn id_token_whose_azp_is_another_client_is_rejected() {
    let f = fixture().await;
    let claims = with(id_claims(), "azp", json!("other-client"));
    assert_eq!(f.id_claims_error(claims).await, JoseError::WrongAzp);
    let claims = with(id_claims(), "aud", json!([CLIENT, "other-client"]));
    let claims = with(claims, "azp", json!("other-client"));
    assert_eq!(f.id_claims_error(claims).await, JoseError::WrongAzp);
}

#[tokio::test]
async fn id_token_without_a_nonce_is_rejected() {
    let f = fixture().await;
    let claims = without(id_claims(), "nonce");
    assert_eq!(
        f.id_claims_error(claims).await,
        JoseError::MissingClaim("nonce")
    );
}

#[tokio::test]
async fn id_token_with_another_nonce_is_rejected() {
    let f = fixture().await;
    let claims = with(id_claims(), "nonce", json!("n-0S6_WzA2Mk"));
    assert_eq!(f.id_claims_error(claims).await, JoseError::NonceMismatch);
    let empty = validate_id_token(&f.jwks, &f.rs256(&id_claims()), &expect(), "").await;
    assert_eq!(
        empty.unwrap_err(),
        JoseError::NonceMismatch,
        "an empty expected nonce never matches"
    );
}

#[tokio::test]
async fn expired_id_token_is_rejected_but_the_leeway_is_honoured() {
    let f = fixture().await;
    let claims = with(id_claims(), "exp", json!(NOW - 61));
    assert_eq!(f.id_claims_error(claims).await, JoseError::Expired);
    let claims = with(id_claims(), "exp", json!(NOW - 59));
    assert!(f.id(&f.rs256(&claims)).await.is_ok());
    assert_eq!(
        f.id_claims_error(without(id_claims(), "exp")).await,
        JoseError::MissingClaim("exp")
    );
}

#[tokio::test]
async fn id_token_issued_in_the_future_is_rejected() {
    let f = fixture().await;
    let claims = with(id_claims(), "iat", json!(NOW + 61));
    assert_eq!(f.id_claims_error(claims).await, JoseError::IssuedInFuture);
    assert_eq!(
        f.id_claims_error(without(id_claims(), "iat")).await,
        JoseError::MissingClaim("iat")
    );
}

#[tokio::test]
async fn id_token_without_a_subject_is_rejected() {
    let f = fixture().await;
    assert_eq!(
        f.id_claims_error(without(id_claims(), "sub")).await,
        JoseError::MissingClaim("sub")
    );
    let claims = with(id_claims(), "sub", json!(""));
    assert_eq!(
        f.id_claims_error(claims).await,
        JoseError::MissingClaim("sub")
    );
}

#[tokio::test]
async fn a_subject_longer_than_255_ascii_characters_is_rejected() {
    let f = fixture().await;
    let longest = with(id_claims(), "sub", json!("a".repeat(255)));
    assert!(f.id(&f.rs256(&longest)).await.is_ok());
    for bad in ["a".repeat(256), "ålice".to_owned()] {
        let claims = with(id_claims(), "sub", json!(bad));
        assert_eq!(
            f.id_claims_error(claims).await,
            JoseError::BadClaimType("sub")
        );
    }
}

/// The example of OpenID Connect Core, Appendix A.3 (RS256).
const SPEC_ACCESS_TOKEN: &str = "jHkWEdUXMU1BwAsC4vtUsZwnNvTIxEl0z9K3vx5KF0Y";
const SPEC_AT_HASH: &str = "77QmUPtjPfzWtF2AnpK9RQ";

#[test]
fn at_hash_is_checked_when_present_with_the_hash_of_the_alg() {
    let f = TestSigner::new();
    let rs256 = |claims: &Value| f.token(TestKey::Rsa1).sign(claims);
    let with_hash = |hash: &str| with(id_claims(), "at_hash", json!(hash));
    let check = |token: &str, claims: &Value, access: &str| {
        check_at_hash(token, claims.as_object().unwrap(), access)
    };
    let c = with_hash(SPEC_AT_HASH);
    assert_eq!(check(&rs256(&c), &c, SPEC_ACCESS_TOKEN), Ok(()));
    assert_eq!(
        check(&rs256(&c), &c, "another-access-token"),
        Err(JoseError::AtHashMismatch)
    );
    // No at_hash: nothing to check (it is optional in the code flow).
    assert_eq!(
        check(&rs256(&id_claims()), &id_claims(), "anything"),
        Ok(())
    );
    let c = with(id_claims(), "at_hash", json!(7));
    assert_eq!(
        check(&rs256(&c), &c, SPEC_ACCESS_TOKEN),
        Err(JoseError::BadClaimType("at_hash"))
    );
    // EdDSA (Ed25519) hashes with SHA-512: the SHA-256 half does not match.
    let c = with_hash(SPEC_AT_HASH);
    let eddsa = f.token(TestKey::Ed25519).sign(&c);
    assert_eq!(
        check(&eddsa, &c, SPEC_ACCESS_TOKEN),
        Err(JoseError::AtHashMismatch)
    );
    let digest = sha2::Sha512::digest(SPEC_ACCESS_TOKEN.as_bytes());
    let c = with_hash(&URL_SAFE_NO_PAD.encode(&digest[..32]));
    let eddsa = f.token(TestKey::Ed25519).sign(&c);
    assert_eq!(check(&eddsa, &c, SPEC_ACCESS_TOKEN), Ok(()));
}

#[tokio::test]
async fn garbage_instead_of_a_token_is_malformed() {
    let f = fixture().await;
    for token in ["", "not-a-jwt", "a.b.c", "a.b.c.d.e"] {
        assert_eq!(f.id(token).await.unwrap_err(), JoseError::Malformed);
    }
    let array_payload = f
        .signer
        .token(TestKey::Rsa1)
        .sign(&json!(["not", "an", "object"]));
    assert_eq!(
        f.id(&array_payload).await.unwrap_err(),
        JoseError::Malformed
    );
}

#[tokio::test]
async fn refreshed_id_token_may_omit_the_nonce_but_not_change_the_subject() {
    let f = fixture().await;
    let original = f.id(&f.rs256(&id_claims())).await.unwrap();
    let refresh = |claims: Value| {
        let token = f.rs256(&claims);
        let original = original.clone();
        let jwks = &f.jwks;
        async move { validate_refreshed_id_token(jwks, &token, &expect(), &original).await }
    };
    assert!(refresh(without(id_claims(), "nonce")).await.is_ok());
    assert!(refresh(id_claims()).await.is_ok());
    let other_nonce = with(id_claims(), "nonce", json!("other"));
    assert_eq!(
        refresh(other_nonce).await.unwrap_err(),
        JoseError::NonceMismatch
    );
    let other_sub = with(without(id_claims(), "nonce"), "sub", json!("mallory"));
    assert_eq!(
        refresh(other_sub).await.unwrap_err(),
        JoseError::SubjectChanged
    );
}

#[tokio::test]
async fn refreshed_id_token_must_repeat_the_original_issuer_and_audiences() {
    let f = fixture().await;
    let original = f.id(&f.rs256(&id_claims())).await.unwrap();
    let refresh = |claims: Value, original: Claims| {
        let token = f.rs256(&claims);
        let jwks = &f.jwks;
        async move { validate_refreshed_id_token(jwks, &token, &expect(), &original).await }
    };
    // Another audience besides ours (with azp) passes the login checks, not this one.
    let more_audiences = with(
        with(
            without(id_claims(), "nonce"),
            "aud",
            json!([CLIENT, "other"]),
        ),
        "azp",
        json!(CLIENT),
    );
    assert_eq!(
        refresh(more_audiences, original.clone()).await.unwrap_err(),
        JoseError::WrongAudience
    );
    // The same single audience as an array is the same set.
    let as_array = with(without(id_claims(), "nonce"), "aud", json!([CLIENT]));
    assert!(refresh(as_array, original.clone()).await.is_ok());
    // A session from another issuer (the configuration changed since the login).
    let mut earlier = original.clone();
    earlier.insert("iss".into(), json!("https://old-idp.example.com"));
    assert_eq!(
        refresh(without(id_claims(), "nonce"), earlier)
            .await
            .unwrap_err(),
        JoseError::SubjectChanged
    );
    // Claims without `iss` (as a session stores them) never match: pass the ID token's own.
    let mut stripped = original.clone();
    stripped.remove("iss");
    assert_eq!(
        refresh(id_claims(), stripped).await.unwrap_err(),
        JoseError::SubjectChanged
    );
}

#[tokio::test]
async fn error_texts_never_contain_the_token_or_claim_values() {
    let f = fixture().await;
    let secret_looking = "s3cr3t-claim-value";
    let claims = json!({"iss": secret_looking, "aud": secret_looking, "sub": secret_looking,
        "nonce": secret_looking, "iat": NOW, "exp": NOW + 60});
    let token = f.rs256(&claims);
    let mut texts = Vec::new();
    texts.push(f.id(&token).await.unwrap_err().to_string());
    let aud_ok = with(
        with(claims.clone(), "aud", json!(CLIENT)),
        "iss",
        json!(ISSUER),
    );
    texts.push(f.id(&f.rs256(&aud_ok)).await.unwrap_err().to_string());
    texts.push(f.id(&format!("{token}x")).await.unwrap_err().to_string());
    let unknown = f
        .signer
        .token(TestKey::Rsa2)
        .kid(secret_looking)
        .sign(&claims);
    texts.push(f.id(&unknown).await.unwrap_err().to_string());
    for text in texts {
        assert!(
            !text.contains(secret_looking) && !text.contains(&token),
            "{text}"
        );
    }
}

#[tokio::test]
async fn unknown_kid_is_accepted_after_exactly_one_refetch_when_the_key_rotates_in() {
    let f = fixture().await;
    assert_eq!(f.fetcher.fetches(), 1);
    let rotated = f.signer.token(TestKey::Rsa2).sign(&id_claims());
    f.fetcher.set(
        f.signer
            .jwks_json(&[(TestKey::Rsa1, "rsa-1"), (TestKey::Rsa2, "rsa-2")]),
    );
    assert_eq!(f.id(&rotated).await.unwrap()["sub"], "alice");
    assert_eq!(f.fetcher.fetches(), 2);
    assert!(f.id(&rotated).await.is_ok());
    assert_eq!(f.fetcher.fetches(), 2, "a known key needs no fetch");
}

#[tokio::test]
async fn unknown_kid_that_stays_unknown_is_rejected_after_one_refetch() {
    let f = fixture().await;
    let token = f.signer.token(TestKey::Rsa2).sign(&id_claims());
    assert_eq!(f.id(&token).await.unwrap_err(), JoseError::UnknownKey);
    assert_eq!(f.id(&token).await.unwrap_err(), JoseError::UnknownKey);
    assert_eq!(f.fetcher.fetches(), 2);
}

#[tokio::test]
async fn a_flood_of_100_unknown_kids_causes_at_most_one_refetch_within_the_interval() {
    let f = fixture().await;
    let tokens: Vec<String> = (0..100)
        .map(|i| {
            f.signer
                .token(TestKey::Rsa1)
                .kid(&format!("bogus-{i}"))
                .sign(&id_claims())
        })
        .collect();
    let concurrent = join_all(tokens[..50].iter().map(|token| f.id(token))).await;
    for token in &tokens[50..] {
        assert_eq!(f.id(token).await.unwrap_err(), JoseError::UnknownKey);
    }
    assert!(
        concurrent
            .iter()
            .all(|r| r.as_ref().unwrap_err() == &JoseError::UnknownKey)
    );
    assert_eq!(f.fetcher.fetches(), 2, "the initial load plus one refetch");
    assert!(
        f.id(&f.rs256(&id_claims())).await.is_ok(),
        "known keys keep working"
    );
}
