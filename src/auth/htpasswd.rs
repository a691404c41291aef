//! HTTP basic credentials (`authorization: Basic ...`) checked against an
//! htpasswd file of bcrypt entries (`htpasswd -B`), the format bazel-remote
//! users already have: `user:$2y$...` per line, `#` comments.
//!
//! Every user gets `[auth] htpasswd_role`; users listed in
//! `htpasswd_write_ac` may also write action results.
//!
//! bcrypt takes tens of milliseconds by design, far too long for every call,
//! so a successful check is remembered: keyed by the SHA-256 of a random key
//! (made per file version, never stored) and the header value, so the cache
//! holds no password and no hash an attacker could test guesses against
//! offline. A new version of the file starts with an empty cache; the cache
//! is bounded (least recently used entries go).

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use lru::LruCache;
use sha2::{Digest, Sha256};

use super::role::{Principal, Role};

/// Successful checks remembered per file version.
const CACHE_ENTRIES: usize = 1024;

/// How a user of the file is given a role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HtpasswdRoles {
    /// The role of every user.
    pub role: Role,
    /// Users who may also write action results.
    pub write_ac: Vec<String>,
}

impl Default for HtpasswdRoles {
    /// Read only, nobody writes action results: safe until configured.
    fn default() -> Self {
        HtpasswdRoles {
            role: Role::Read,
            write_ac: Vec::new(),
        }
    }
}

/// One version of the htpasswd file, and the checks it has seen succeed.
pub struct Htpasswd {
    /// bcrypt hash by user.
    users: HashMap<String, String>,
    roles: HtpasswdRoles,
    /// Random per version: the cache keys mean nothing outside this process.
    cache_key: [u8; 32],
    cache: Mutex<LruCache<[u8; 32], Principal>>,
}

impl Htpasswd {
    /// Parses the file's text; a line that is not `user:<bcrypt hash>` makes
    /// the whole file an error (naming the line, not the hash).
    pub fn parse(text: &str, roles: HtpasswdRoles) -> Result<Self, String> {
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let n = i + 1;
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| format!("line {n}: expected user:hash"))?;
            if user.is_empty() {
                return Err(format!("line {n}: empty user name"));
            }
            let bcrypt = ["$2a$", "$2b$", "$2x$", "$2y$"]
                .iter()
                .any(|p| hash.starts_with(p));
            if !bcrypt || hash.len() != 60 {
                return Err(format!(
                    "line {n} ({user}): not a bcrypt hash; only bcrypt entries are \
                     supported (create them with `htpasswd -B`)"
                ));
            }
            if users.insert(user.to_string(), hash.to_string()).is_some() {
                return Err(format!("line {n}: user {user:?} appears twice"));
            }
        }
        let mut cache_key = [0u8; 32];
        getrandom::fill(&mut cache_key).map_err(|e| format!("no random bytes: {e}"))?;
        Ok(Htpasswd {
            users,
            roles,
            cache_key,
            cache: Mutex::new(LruCache::new(
                NonZeroUsize::new(CACHE_ENTRIES).expect("not zero"),
            )),
        })
    }

    /// How many users the file lists.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// True when it lists none.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    fn cache_slot(&self, header: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.cache_key);
        h.update(header);
        h.finalize().into()
    }

    /// The credential of an `authorization` header value this version has
    /// already verified.
    pub fn cached(&self, header: &[u8]) -> Option<Principal> {
        let slot = self.cache_slot(header);
        self.cache.lock().expect("not poisoned").get(&slot).cloned()
    }

    /// Checks `user`'s `password` with bcrypt (slow: run it off the async
    /// threads) and, when right, remembers `header` as verified.
    pub fn verify(&self, header: &[u8], user: &str, password: &str) -> Option<Principal> {
        let hash = self.users.get(user)?;
        if !bcrypt::verify(password, hash).unwrap_or(false) {
            return None;
        }
        let principal = Principal {
            name: Arc::from(user),
            role: self.roles.role,
            write_ac: self.roles.write_ac.iter().any(|u| u == user),
        };
        let slot = self.cache_slot(header);
        self.cache
            .lock()
            .expect("not poisoned")
            .put(slot, principal.clone());
        Some(principal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bcrypt_users_get_the_configured_role_and_successes_are_cached() {
        // Cost 4: the lowest bcrypt allows, to keep the test fast.
        let alice = bcrypt::hash_with_result("wonderland", 4).unwrap();
        let text = format!(
            "# team\nalice:{}\nci:{}\n",
            alice.format_for_version(bcrypt::Version::TwoY),
            bcrypt::hash("pipeline", 4).unwrap()
        );
        let roles = HtpasswdRoles {
            role: Role::Execute,
            write_ac: vec!["ci".into()],
        };
        let file = Htpasswd::parse(&text, roles).unwrap();
        assert_eq!(file.len(), 2);
        assert!(file.cached(b"Basic x").is_none());
        assert!(file.verify(b"Basic x", "alice", "wrong").is_none());
        assert!(file.verify(b"Basic x", "mallory", "wonderland").is_none());
        assert!(file.cached(b"Basic x").is_none(), "failures are not cached");
        let who = file.verify(b"Basic a", "alice", "wonderland").unwrap();
        assert_eq!(
            (&*who.name, who.role, who.write_ac),
            ("alice", Role::Execute, false)
        );
        assert_eq!(file.cached(b"Basic a"), Some(who));
        assert!(file.cached(b"Basic b").is_none());
        assert!(file.verify(b"Basic c", "ci", "pipeline").unwrap().write_ac);
    }

    #[test]
    fn only_bcrypt_lines_are_accepted() {
        let roles = HtpasswdRoles::default;
        for (text, wanted) in [
            ("alice:$apr1$abc$def", "not a bcrypt hash"),
            ("alice:{SHA}abc=", "not a bcrypt hash"),
            ("alice", "expected user:hash"),
            (
                ":$2y$05$abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyzabc",
                "empty user",
            ),
        ] {
            let err = Htpasswd::parse(text, roles()).err().unwrap();
            assert!(err.contains(wanted), "{text}: {err}");
            assert!(!err.contains("$apr1$abc"), "{err}");
        }
    }
}
