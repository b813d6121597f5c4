//! Client tokens for tests: HS256 with the test secret, RS256/ES256 with the committed
//! test-only keys in `tests/fixtures/`, and hand-built hostile tokens (`alg: none`).

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

/// The HMAC secret every in-process test gateway is configured with.
pub const TEST_SECRET: &str = "geopush-test-secret";

/// The kid of `fixtures/rsa-public.pem` in `fixtures/jwks.json`.
pub const RSA_KID: &str = "test-rsa-1";
/// The kid of `fixtures/ec-public.pem` in `fixtures/jwks.json`.
pub const EC_KID: &str = "test-ec-1";

/// Path of a file in `tests/fixtures/`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// Read a fixture as text.
pub fn fixture_text(name: &str) -> anyhow::Result<String> {
    let path = fixture(name);
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// Unix seconds now.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Unix seconds now, with the fraction.
pub fn now_unix_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Unix milliseconds now.
pub fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Claims of a test token; `None` fields are left out of the token.
#[derive(Clone, Debug, Serialize)]
pub struct TestClaims {
    pub sub: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub did: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

impl TestClaims {
    /// A user's claims valid for `ttl_seconds` from now.
    pub fn new(sub: &str, ttl_seconds: u64) -> TestClaims {
        let now = now_unix();
        TestClaims {
            sub: sub.into(),
            did: None,
            exp: Some(now + ttl_seconds),
            nbf: None,
            iat: Some(now),
            iss: None,
            aud: None,
        }
    }

    pub fn did(mut self, did: &str) -> TestClaims {
        self.did = Some(did.into());
        self
    }

    pub fn exp(mut self, exp: u64) -> TestClaims {
        self.exp = Some(exp);
        self
    }

    pub fn nbf(mut self, nbf: u64) -> TestClaims {
        self.nbf = Some(nbf);
        self
    }

    pub fn iss(mut self, iss: &str) -> TestClaims {
        self.iss = Some(iss.into());
        self
    }

    pub fn aud(mut self, aud: &str) -> TestClaims {
        self.aud = Some(aud.into());
        self
    }
}

/// An HS256 token for `sub` signed with [`TEST_SECRET`], valid for an hour.
pub fn user_token(sub: &str) -> anyhow::Result<String> {
    geopush_gateway::auth::mint_hs256(TEST_SECRET, sub, None, 3600).context("minting HS256")
}

/// An HS256 token for `sub` on device `did` signed with [`TEST_SECRET`], valid for an hour.
pub fn device_token(sub: &str, did: &str) -> anyhow::Result<String> {
    geopush_gateway::auth::mint_hs256(TEST_SECRET, sub, Some(did), 3600).context("minting HS256")
}

/// Sign claims with an HMAC secret (HS256).
pub fn sign_hs256(secret: &[u8], claims: &TestClaims) -> anyhow::Result<String> {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .context("signing HS256")
}

/// Sign claims RS256 with the PEM private key in fixture `key_file`, with an optional kid.
pub fn sign_rs256(
    key_file: &str,
    kid: Option<&str>,
    claims: &TestClaims,
) -> anyhow::Result<String> {
    let pem = fixture_text(key_file)?;
    let key = EncodingKey::from_rsa_pem(pem.as_bytes()).context("RSA private key")?;
    let mut header = Header::new(Algorithm::RS256);
    header.kid = kid.map(Into::into);
    jsonwebtoken::encode(&header, claims, &key).context("signing RS256")
}

/// Sign claims ES256 with the PKCS#8 PEM private key in fixture `key_file`.
pub fn sign_es256(
    key_file: &str,
    kid: Option<&str>,
    claims: &TestClaims,
) -> anyhow::Result<String> {
    let pem = fixture_text(key_file)?;
    let key = EncodingKey::from_ec_pem(pem.as_bytes()).context("EC private key")?;
    let mut header = Header::new(Algorithm::ES256);
    header.kid = kid.map(Into::into);
    jsonwebtoken::encode(&header, claims, &key).context("signing ES256")
}

/// An unsigned token: header `{"alg":"none","typ":"JWT"}`, the claims, an empty signature.
pub fn unsigned_alg_none(claims: &TestClaims) -> anyhow::Result<String> {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims)?);
    Ok(format!("{header}.{payload}."))
}
