//! Who may call the backend API: API keys configured as SHA-256 hashes with scopes, or a
//! service JWT with a `scope` claim (DESIGN §5).
//!
//! `GEOPUSH_API_KEYS="name:<sha256 hex of the key>:scope+scope,…"`. The key itself is never
//! configured or stored; a request's `Authorization: Bearer <key>` is hashed and compared
//! with every configured hash. A bearer that looks like a JWT (three dot-separated parts) is
//! verified as a service token with the process's token keys instead.

use crate::auth::TokenVerifier;
use crate::config::ConfigError;
use sha2::{Digest, Sha256};
use std::fmt;

/// What a caller may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Publish notifications and read their status.
    Publish,
    /// Manage and query places.
    Places,
    /// Everything.
    Admin,
}

impl Scope {
    pub fn parse(text: &str) -> Option<Scope> {
        match text {
            "publish" => Some(Scope::Publish),
            "places" => Some(Scope::Places),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Publish => "publish",
            Scope::Places => "places",
            Scope::Admin => "admin",
        }
    }
}

/// The SHA-256 of an API key, lower-case hex: what `GEOPUSH_API_KEYS` holds.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// One configured key.
#[derive(Clone)]
struct ApiKey {
    name: String,
    sha256: [u8; 32],
    scopes: Vec<Scope>,
}

/// Why a request was not let in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Denied {
    /// No credentials, or credentials that match nothing: 401.
    Unauthenticated(&'static str),
    /// Known caller without the scope: 403.
    MissingScope { caller: String, scope: Scope },
}

/// A caller that was let in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The key's name, or the service token's `sub`.
    pub name: String,
    scopes: Vec<Scope>,
}

/// The configured API keys and service-token verifier.
pub struct ApiAuth {
    keys: Vec<ApiKey>,
    service_tokens: TokenVerifier,
}

impl fmt::Debug for ApiAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.keys.iter().map(|k| k.name.as_str()).collect();
        f.debug_struct("ApiAuth").field("keys", &names).finish()
    }
}

fn bad_keys(reason: String) -> ConfigError {
    ConfigError {
        field: "api_keys",
        reason,
    }
}

/// Parse `name:<sha256 hex>:scope+scope,…`.
fn parse_keys(text: &str) -> Result<Vec<ApiKey>, ConfigError> {
    let mut keys = Vec::new();
    for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let mut parts = entry.splitn(3, ':');
        let (Some(name), Some(hash), Some(scopes)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad_keys(format!(
                "entry {:?} is not name:sha256:scopes",
                entry.split(':').next().unwrap_or_default()
            )));
        };
        let mut sha256 = [0u8; 32];
        hex::decode_to_slice(hash, &mut sha256)
            .map_err(|_| bad_keys(format!("key {name:?}: the hash must be 64 hex digits")))?;
        let scopes = scopes
            .split('+')
            .map(|s| {
                Scope::parse(s).ok_or_else(|| {
                    bad_keys(format!(
                        "key {name:?}: unknown scope {s:?} (publish, places, admin)"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if name.is_empty() {
            return Err(bad_keys("a key needs a name".into()));
        }
        keys.push(ApiKey {
            name: name.to_owned(),
            sha256,
            scopes,
        });
    }
    if keys.is_empty() {
        return Err(bad_keys("no keys given".into()));
    }
    Ok(keys)
}

impl ApiAuth {
    /// From the configured entries, or (`None`) the development key with every scope.
    pub fn new(
        entries: Option<&str>,
        service_tokens: TokenVerifier,
    ) -> Result<ApiAuth, ConfigError> {
        let keys = match entries {
            Some(text) => parse_keys(text)?,
            None => parse_keys(&format!(
                "dev:{}:admin",
                hash_key(crate::config::DEV_API_KEY)
            ))?,
        };
        Ok(ApiAuth {
            keys,
            service_tokens,
        })
    }

    /// Check an `Authorization` header for a scope.
    pub fn authorize(&self, header: Option<&str>, scope: Scope) -> Result<Caller, Denied> {
        let header = header.ok_or(Denied::Unauthenticated("missing Authorization header"))?;
        let (scheme, credential) = header.split_once(' ').ok_or(Denied::Unauthenticated(
            "expected Authorization: Bearer <key>",
        ))?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(Denied::Unauthenticated(
                "expected Authorization: Bearer <key>",
            ));
        }
        let credential = credential.trim();
        let caller = if credential.split('.').count() == 3 {
            let claims = self
                .service_tokens
                .verify(credential)
                .map_err(|_| Denied::Unauthenticated("invalid service token"))?;
            let scopes = claims
                .scope
                .as_deref()
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(Scope::parse)
                .collect();
            Caller {
                name: claims.sub,
                scopes,
            }
        } else {
            let digest: [u8; 32] = Sha256::digest(credential.as_bytes()).into();
            let key = self
                .keys
                .iter()
                .find(|k| k.sha256 == digest)
                .ok_or(Denied::Unauthenticated("unknown API key"))?;
            Caller {
                name: key.name.clone(),
                scopes: key.scopes.clone(),
            }
        };
        if caller.scopes.contains(&scope) || caller.scopes.contains(&Scope::Admin) {
            Ok(caller)
        } else {
            Err(Denied::MissingScope {
                caller: caller.name,
                scope,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn verifier() -> TokenVerifier {
        let mut config = crate::Config::defaults();
        config.tokens.jwt_secret = Some(Secret::new("service-secret"));
        TokenVerifier::from_config(&config.tokens).expect("verifier")
    }

    #[test]
    fn keys_are_matched_by_hash_and_scoped() {
        let entries = format!(
            "pub:{}:publish,ops:{}:places+publish",
            hash_key("k-publish"),
            hash_key("k-ops")
        );
        let auth = ApiAuth::new(Some(&entries), verifier()).expect("keys");
        assert_eq!(
            auth.authorize(Some("Bearer k-publish"), Scope::Publish)
                .map(|c| c.name),
            Ok("pub".to_owned())
        );
        assert!(matches!(
            auth.authorize(Some("Bearer k-publish"), Scope::Places),
            Err(Denied::MissingScope { .. })
        ));
        assert!(auth.authorize(Some("bearer k-ops"), Scope::Places).is_ok());
        assert!(matches!(
            auth.authorize(Some("Bearer nope"), Scope::Publish),
            Err(Denied::Unauthenticated(_))
        ));
        assert!(matches!(
            auth.authorize(None, Scope::Publish),
            Err(Denied::Unauthenticated(_))
        ));
        assert!(matches!(
            auth.authorize(Some("Basic abc"), Scope::Publish),
            Err(Denied::Unauthenticated(_))
        ));
    }

    #[test]
    fn service_tokens_carry_scopes() {
        let auth = ApiAuth::new(None, verifier()).expect("keys");
        let token =
            crate::auth::mint_hs256_scoped("service-secret", "billing", None, Some("publish"), 60)
                .expect("token");
        let header = format!("Bearer {token}");
        assert!(auth.authorize(Some(&header), Scope::Publish).is_ok());
        assert!(matches!(
            auth.authorize(Some(&header), Scope::Places),
            Err(Denied::MissingScope { .. })
        ));
        let client = crate::auth::mint_hs256("service-secret", "alice", None, 60).expect("token");
        assert!(matches!(
            auth.authorize(Some(&format!("Bearer {client}")), Scope::Publish),
            Err(Denied::MissingScope { .. })
        ));
        let forged =
            crate::auth::mint_hs256_scoped("wrong", "x", None, Some("admin"), 60).expect("token");
        assert!(matches!(
            auth.authorize(Some(&format!("Bearer {forged}")), Scope::Publish),
            Err(Denied::Unauthenticated(_))
        ));
    }

    #[test]
    fn bad_entries_are_refused() {
        for bad in [
            "x",
            "a:b:publish",
            &format!("a:{}:root", hash_key("k")),
            &format!(":{}:publish", hash_key("k")),
            "",
        ] {
            assert!(parse_keys(bad).is_err(), "{bad:?}");
        }
    }
}
