//! Client token verification (JWT) and development token minting.
//!
//! One key source is configured: an HMAC secret (HS256/384/512), a PEM public key (RS256 or
//! ES256) or a JWKS file (the token's `kid` picks the key). The algorithm a token may use is
//! fixed by the key, never taken from the token: `alg: none` and algorithm confusion fail.

use crate::config::{DEV_JWT_SECRET, TokenKeys};
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};
use thiserror::Error;

/// The device id used when a token has no `did` claim.
pub const DEFAULT_DEVICE: &str = "default";

/// Why a token was refused. Shown to the client in the 401 body and logged at debug level.
#[derive(Debug, Error)]
pub enum AuthError {
    #[error("missing token: send Authorization: Bearer <jwt> or ?access_token=<jwt>")]
    Missing,
    #[error("token has no key id (kid) and the key set needs one")]
    MissingKid,
    #[error("unknown key id {0:?}")]
    UnknownKid(String),
    #[error("invalid token: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
    #[error("token subject (sub) must be 1..=128 bytes")]
    BadSubject,
}

/// Failure to build a verifier from configuration.
#[derive(Debug, Error)]
pub enum KeyError {
    #[error("cannot read {what}: {source}")]
    Read {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("bad key in {what}: {reason}")]
    Bad { what: String, reason: String },
}

/// The claims geopush reads.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// The device id; [`DEFAULT_DEVICE`] when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub did: Option<String>,
    /// Expiry, Unix seconds.
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Space-separated API scopes of a service token (`publish places admin`); client
    /// tokens have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
}

impl Claims {
    pub fn device(&self) -> &str {
        self.did.as_deref().unwrap_or(DEFAULT_DEVICE)
    }
}

struct KeyWithAlgorithm {
    key: DecodingKey,
    algorithm: Algorithm,
}

enum Keys {
    Single(KeyWithAlgorithm),
    ByKid(HashMap<String, KeyWithAlgorithm>),
}

/// Verifies client tokens against the configured key.
pub struct TokenVerifier {
    keys: Keys,
    validation: Validation,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn bad(what: &str, reason: impl ToString) -> KeyError {
    KeyError::Bad {
        what: what.into(),
        reason: reason.to_string(),
    }
}

impl TokenVerifier {
    /// Build the verifier from configuration. With no key configured, the development
    /// secret is used (the caller warns).
    pub fn from_config(config: &TokenKeys) -> Result<TokenVerifier, KeyError> {
        let keys = if let Some(pem) = &config.jwt_public_key {
            let text = if pem.trim_start().starts_with("-----BEGIN") {
                pem.clone()
            } else {
                std::fs::read_to_string(pem).map_err(|source| KeyError::Read {
                    what: pem.clone(),
                    source,
                })?
            };
            Keys::Single(pem_key(&text)?)
        } else if let Some(path) = &config.jwks_file {
            let what = path.display().to_string();
            let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
                what: what.clone(),
                source,
            })?;
            Keys::ByKid(jwks_keys(&text, &what)?)
        } else {
            let secret = config
                .jwt_secret
                .as_ref()
                .map(|s| s.expose())
                .unwrap_or(DEV_JWT_SECRET);
            Keys::Single(KeyWithAlgorithm {
                key: DecodingKey::from_secret(secret.as_bytes()),
                algorithm: Algorithm::HS256,
            })
        };
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = config.jwt_leeway_seconds;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        if let Some(iss) = &config.jwt_issuer {
            validation.set_issuer(&[iss]);
            validation.required_spec_claims.insert("iss".into());
        }
        match &config.jwt_audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                validation.required_spec_claims.insert("aud".into());
            }
            None => validation.validate_aud = false,
        }
        Ok(TokenVerifier { keys, validation })
    }

    /// Verify a token and return its claims.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        let header = jsonwebtoken::decode_header(token)?;
        let chosen = match &self.keys {
            Keys::Single(k) => k,
            Keys::ByKid(map) => {
                let kid = header.kid.as_deref().ok_or(AuthError::MissingKid)?;
                map.get(kid)
                    .ok_or_else(|| AuthError::UnknownKid(kid.chars().take(64).collect()))?
            }
        };
        let mut validation = self.validation.clone();
        // HMAC secrets accept the HS family; asymmetric keys exactly their algorithm.
        validation.algorithms = match chosen.algorithm {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                vec![Algorithm::HS256, Algorithm::HS384, Algorithm::HS512]
            }
            other => vec![other],
        };
        let data = jsonwebtoken::decode::<Claims>(token, &chosen.key, &validation)?;
        let claims = data.claims;
        if claims.sub.is_empty() || claims.sub.len() > 128 {
            return Err(AuthError::BadSubject);
        }
        Ok(claims)
    }

    /// Seconds until the token's `exp` (negative when already past).
    pub fn seconds_left(claims: &Claims) -> i64 {
        let exp = i64::try_from(claims.exp).unwrap_or(i64::MAX);
        exp.saturating_sub(now_unix() as i64)
    }
}

fn pem_key(text: &str) -> Result<KeyWithAlgorithm, KeyError> {
    if let Ok(key) = DecodingKey::from_rsa_pem(text.as_bytes()) {
        return Ok(KeyWithAlgorithm {
            key,
            algorithm: Algorithm::RS256,
        });
    }
    DecodingKey::from_ec_pem(text.as_bytes())
        .map(|key| KeyWithAlgorithm {
            key,
            algorithm: Algorithm::ES256,
        })
        .map_err(|e| {
            bad(
                "GEOPUSH_JWT_PUBLIC_KEY",
                format!("not an RSA or EC public key in PEM: {e}"),
            )
        })
}

fn jwks_keys(text: &str, what: &str) -> Result<HashMap<String, KeyWithAlgorithm>, KeyError> {
    let set: JwkSet = serde_json::from_str(text).map_err(|e| bad(what, e))?;
    let mut keys = HashMap::new();
    for jwk in &set.keys {
        let kid = jwk
            .common
            .key_id
            .clone()
            .ok_or_else(|| bad(what, "every key needs a kid"))?;
        let algorithm = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
            _ => {
                return Err(bad(
                    what,
                    format!("key {kid}: only RSA and EC keys are supported"),
                ));
            }
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| bad(what, format!("key {kid}: {e}")))?;
        keys.insert(kid, KeyWithAlgorithm { key, algorithm });
    }
    if keys.is_empty() {
        return Err(bad(what, "no keys"));
    }
    Ok(keys)
}

/// Mint an HS256 token for development and tests.
pub fn mint_hs256(
    secret: &str,
    sub: &str,
    did: Option<&str>,
    ttl_seconds: u64,
) -> Result<String, jsonwebtoken::errors::Error> {
    mint_hs256_scoped(secret, sub, did, None, ttl_seconds)
}

/// [`mint_hs256`] with a `scope` claim: a service token for the backend API.
pub fn mint_hs256_scoped(
    secret: &str,
    sub: &str,
    did: Option<&str>,
    scope: Option<&str>,
    ttl_seconds: u64,
) -> Result<String, jsonwebtoken::errors::Error> {
    let now = now_unix();
    let claims = Claims {
        sub: sub.into(),
        did: did.map(Into::into),
        exp: now + ttl_seconds,
        nbf: None,
        iat: Some(now),
        scope: scope.map(Into::into),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn verifier(secret: &str) -> TokenVerifier {
        let mut config = crate::Config::defaults();
        config.tokens.jwt_secret = Some(Secret::new(secret));
        TokenVerifier::from_config(&config.tokens).expect("verifier")
    }

    #[test]
    fn minted_token_verifies_and_carries_the_device() {
        let token = mint_hs256("s3cret", "alice", Some("phone"), 60).expect("mint");
        let claims = verifier("s3cret").verify(&token).expect("valid");
        assert_eq!((claims.sub.as_str(), claims.device()), ("alice", "phone"));
        let token = mint_hs256("s3cret", "bob", None, 60).expect("mint");
        assert_eq!(
            verifier("s3cret").verify(&token).expect("valid").device(),
            DEFAULT_DEVICE
        );
    }

    #[test]
    fn wrong_key_and_alg_none_fail() {
        let token = mint_hs256("other", "alice", None, 60).expect("mint");
        assert!(verifier("s3cret").verify(&token).is_err());
        // {"alg":"none"} . {"sub":"alice","exp":9999999999} . (no signature)
        let none =
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhbGljZSIsImV4cCI6OTk5OTk5OTk5OX0.";
        assert!(verifier("s3cret").verify(none).is_err());
        assert!(verifier("s3cret").verify("not-a-token").is_err());
    }
}
