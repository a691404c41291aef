//! Bearer tokens and the file that lists them (`[auth] tokens_file`).
//!
//! The file holds one credential per line, never a token itself, only its
//! SHA-256:
//!
//! ```text
//! # NAME  ROLE     FLAGS     SHA-256 OF THE TOKEN
//! reader  read     -         sha256:9f86d081884c7d65...
//! ci      execute  write-ac  sha256:60303ae22b998861...
//! ```
//!
//! Fields are separated by spaces or tabs; `FLAGS` is `write-ac` or `-`;
//! blank lines and lines starting with `#` are ignored. Names are letters,
//! digits, `.`, `_` and `-` (no `:`, so none can pass for `local:...`).
//! Tokens are 32 random bytes, written as `opt_` + unpadded base64url: the
//! prefix makes a leaked token easy to recognise (and to scan for). A token
//! is looked up by its hash, so the file can be read without revealing any.

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine as _;
use sha2::{Digest, Sha256};

use super::role::{Principal, Role};

/// What every token starts with.
pub const TOKEN_PREFIX: &str = "opt_";

/// Longest credential name accepted.
const MAX_NAME: usize = 64;

/// One line of the tokens file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenEntry {
    /// The credential's name (logs, metrics, limits).
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// Whether it may write action results.
    pub write_ac: bool,
    /// SHA-256 of the token.
    pub hash: [u8; 32],
}

impl TokenEntry {
    /// The entry as a line of the file (without the newline).
    pub fn to_line(&self) -> String {
        format!(
            "{}\t{}\t{}\tsha256:{}",
            self.name,
            self.role,
            if self.write_ac { "write-ac" } else { "-" },
            hex::encode(self.hash)
        )
    }
}

/// A new random token: `opt_` + 32 random bytes in unpadded base64url.
pub fn generate() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| anyhow::anyhow!("cannot get random bytes for a token: {e}"))?;
    Ok(format!(
        "{TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    ))
}

/// The SHA-256 of a token, as the file stores it.
pub fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Whether `name` may name a credential: 1 to 64 of `[A-Za-z0-9._-]`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Parses one line: `Ok(None)` for blank lines and comments.
pub fn parse_line(line: &str) -> Result<Option<TokenEntry>, String> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let fields: Vec<&str> = line.split_whitespace().collect();
    let [name, role, flags, hash] = fields[..] else {
        return Err(format!(
            "expected 4 fields (NAME ROLE FLAGS sha256:HEX), found {}",
            fields.len()
        ));
    };
    if !valid_name(name) {
        return Err(format!(
            "invalid name {name:?} (1 to {MAX_NAME} letters, digits, '.', '_', '-')"
        ));
    }
    let role: Role = role.parse()?;
    let write_ac = match flags {
        "write-ac" => true,
        "-" => false,
        other => return Err(format!("unknown flags {other:?} (expected write-ac or -)")),
    };
    let hex_hash = hash
        .strip_prefix("sha256:")
        .ok_or_else(|| "the hash must start with sha256:".to_string())?;
    let mut hash = [0u8; 32];
    hex::decode_to_slice(hex_hash, &mut hash)
        .map_err(|_| "the hash must be 64 hex digits".to_string())?;
    Ok(Some(TokenEntry {
        name: name.to_string(),
        role,
        write_ac,
        hash,
    }))
}

/// Parses a whole file; the first bad line, a repeated name or a repeated
/// hash makes it an error (naming the line, never a secret).
pub fn parse(text: &str) -> Result<Vec<TokenEntry>, String> {
    let mut entries: Vec<TokenEntry> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let Some(entry) = parse_line(line).map_err(|e| format!("line {}: {e}", i + 1))? else {
            continue;
        };
        if entries.iter().any(|e| e.name == entry.name) {
            return Err(format!(
                "line {}: name {:?} appears twice",
                i + 1,
                entry.name
            ));
        }
        if entries.iter().any(|e| e.hash == entry.hash) {
            return Err(format!("line {}: the same token hash appears twice", i + 1));
        }
        entries.push(entry);
    }
    Ok(entries)
}

/// The tokens of one version of the file, by hash.
#[derive(Debug, Default)]
pub struct Tokens {
    by_hash: HashMap<[u8; 32], Principal>,
}

impl Tokens {
    /// Parses the file's text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let by_hash = parse(text)?
            .into_iter()
            .map(|e| {
                let principal = Principal {
                    name: Arc::from(e.name),
                    role: e.role,
                    write_ac: e.write_ac,
                };
                (e.hash, principal)
            })
            .collect();
        Ok(Tokens { by_hash })
    }

    /// The credential `token` belongs to, if it is listed.
    pub fn lookup(&self, token: &str) -> Option<&Principal> {
        self.by_hash.get(&hash(token))
    }

    /// How many tokens are listed.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// True when none is.
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_token_is_found_by_its_hash_only() {
        let token = generate().unwrap();
        assert!(token.starts_with(TOKEN_PREFIX));
        assert_eq!(token.len(), TOKEN_PREFIX.len() + 43);
        assert_ne!(token, generate().unwrap());
        let entry = TokenEntry {
            name: "ci".into(),
            role: Role::Execute,
            write_ac: true,
            hash: hash(&token),
        };
        let line = entry.to_line();
        assert!(!line.contains(&token[TOKEN_PREFIX.len()..]), "{line}");
        let text = format!("# comment\n\n{line}\n");
        let tokens = Tokens::parse(&text).unwrap();
        let who = tokens.lookup(&token).unwrap();
        assert_eq!(
            (&*who.name, who.role, who.write_ac),
            ("ci", Role::Execute, true)
        );
        assert!(tokens.lookup("opt_guess").is_none());
        assert_eq!(parse_line(&line).unwrap(), Some(entry));
    }

    #[test]
    fn bad_files_are_refused_with_the_line() {
        let h = format!("sha256:{}", "ab".repeat(32));
        let h2 = format!("sha256:{}", "cd".repeat(32));
        for (text, wanted) in [
            (format!("a read - {h} extra"), "line 1: expected 4 fields"),
            (format!("a reader - {h}"), "unknown role"),
            (format!("a read rw {h}"), "unknown flags"),
            ("a read - md5:00".to_string(), "sha256:"),
            ("a read - sha256:00".to_string(), "64 hex digits"),
            (format!("local:x read - {h}"), "invalid name"),
            (
                format!("a read - {h}\na write - {h2}"),
                "line 2: name \"a\"",
            ),
            (format!("a read - {h}\nb write - {h}"), "same token hash"),
        ] {
            let err = parse(&text).unwrap_err();
            assert!(err.contains(wanted), "{text}: {err}");
        }
    }
}
