//! `outpost token add | list | revoke`: edits the bearer tokens file (format
//! in `crate::auth::tokens`). A running server re-reads it within seconds.
//!
//! Every edit writes a new file beside the old one (mode 0600) and renames
//! it into place, so the server never reads half a file; the new file is
//! created exclusively, so two edits at once cannot lose one another (the
//! second fails and says why). Comments and other lines are kept as they are.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::auth::Role;
use crate::auth::tokens::{self, TokenEntry};

/// What a new file starts with.
const HEADER: &str = "\
# Outpost bearer tokens: NAME ROLE FLAGS sha256:HEX (only hashes, never tokens).
# Edit with `outpost token add|list|revoke`; the server re-reads this file.
";

/// The file's lines (empty when it does not exist yet) and the entries they hold.
fn read(path: &Path) -> anyhow::Result<(Vec<String>, Vec<TokenEntry>)> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let entries =
        tokens::parse(&text).map_err(|e| anyhow::anyhow!("tokens file {}: {e}", path.display()))?;
    Ok((text.lines().map(str::to_string).collect(), entries))
}

/// Replaces `path` with `lines`, atomically, readable by the owner only.
fn write(path: &Path, lines: &[String]) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| {
            format!(
                "cannot create {} (another `outpost token` editing the file? if none runs, \
                 remove it)",
                tmp.display()
            )
        })?;
    let mut text = lines.join("\n");
    text.push('\n');
    let written = file
        .write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    Ok(())
}

/// Adds a credential `name` with a new random token to the file (created if
/// missing) and returns the token: the only time it exists outside the
/// client that receives it.
pub fn add(path: &Path, name: &str, role: Role, write_ac: bool) -> anyhow::Result<String> {
    if !tokens::valid_name(name) {
        anyhow::bail!("invalid name {name:?}: use 1 to 64 letters, digits, '.', '_', '-'");
    }
    if write_ac && role < Role::Write {
        anyhow::bail!("--write-ac needs --role write or execute");
    }
    let (mut lines, entries) = read(path)?;
    if entries.iter().any(|e| e.name == name) {
        anyhow::bail!(
            "{} already has a token named {name:?} (revoke it first to replace it)",
            path.display()
        );
    }
    let token = tokens::generate()?;
    let entry = TokenEntry {
        name: name.to_string(),
        role,
        write_ac,
        hash: tokens::hash(&token),
    };
    if lines.is_empty() {
        lines.extend(HEADER.lines().map(str::to_string));
    }
    lines.push(entry.to_line());
    write(path, &lines)?;
    Ok(token)
}

/// The credentials the file lists.
pub fn list(path: &Path) -> anyhow::Result<Vec<TokenEntry>> {
    if !path.exists() {
        anyhow::bail!(
            "{} does not exist (`outpost token add` creates it)",
            path.display()
        );
    }
    Ok(read(path)?.1)
}

/// Removes the credential `name`; its token stops working once the server
/// has re-read the file (within seconds).
pub fn revoke(path: &Path, name: &str) -> anyhow::Result<()> {
    let (lines, entries) = read(path)?;
    if !entries.iter().any(|e| e.name == name) {
        anyhow::bail!("{} has no token named {name:?}", path.display());
    }
    let kept: Vec<String> = lines
        .into_iter()
        .filter(|line| !matches!(tokens::parse_line(line), Ok(Some(e)) if e.name == name))
        .collect();
    write(path, &kept)
}

/// `outpost token add`: adds, then prints how clients use the token and, as
/// the last line of stdout and on its own, the token.
pub fn run_add(path: &Path, name: &str, role: Role, write_ac: bool) -> anyhow::Result<()> {
    let token = add(path, name, role, write_ac)?;
    println!(
        "added {name:?} (role {role}{}) to {}",
        if write_ac { ", write-ac" } else { "" },
        path.display()
    );
    println!("clients send it in a header:  authorization: Bearer <token>");
    println!("  Bazel: --remote_header=authorization=Bearer <token>");
    println!("this is the only time the token is shown:");
    println!("{token}");
    Ok(())
}

/// `outpost token list`: one credential per line, never a token.
pub fn run_list(path: &Path) -> anyhow::Result<()> {
    let entries = list(path)?;
    if entries.is_empty() {
        println!("no tokens in {}", path.display());
    }
    for e in entries {
        println!(
            "{:<24} {:<8} {}",
            e.name,
            e.role.as_str(),
            if e.write_ac { "write-ac" } else { "" }
        );
    }
    Ok(())
}

/// `outpost token revoke`.
pub fn run_revoke(path: &Path, name: &str) -> anyhow::Result<()> {
    revoke(path, name)?;
    println!(
        "revoked {name:?} in {} (a running server drops it within seconds)",
        path.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::tokens::Tokens;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn add_list_revoke_keep_the_file_valid_private_and_secret_free() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        let reader = add(&path, "reader", Role::Read, false).unwrap();
        let ci = add(&path, "ci", Role::Execute, true).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# Outpost bearer tokens"), "{text}");
        assert!(!text.contains(&reader) && !text.contains(&ci), "{text}");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let parsed = Tokens::parse(&text).unwrap();
        assert_eq!(&*parsed.lookup(&ci).unwrap().name, "ci");
        assert!(
            add(&path, "ci", Role::Read, false).is_err(),
            "duplicate name"
        );
        assert!(add(&path, "bad name", Role::Read, false).is_err());
        assert!(
            add(&path, "r2", Role::Read, true).is_err(),
            "write-ac needs write"
        );
        let names: Vec<String> = list(&path).unwrap().into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["reader", "ci"]);
        revoke(&path, "reader").unwrap();
        assert!(revoke(&path, "reader").is_err());
        let text = std::fs::read_to_string(&path).unwrap();
        let parsed = Tokens::parse(&text).unwrap();
        assert!(parsed.lookup(&reader).is_none());
        assert!(parsed.lookup(&ci).is_some());
        assert!(text.starts_with("# Outpost bearer tokens"), "comments kept");
        assert!(!dir.path().join("tokens.tmp").exists());
    }

    #[test]
    fn an_edit_in_progress_blocks_another() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(dir.path().join("tokens.tmp"), "").unwrap();
        let err = add(&path, "ci", Role::Read, false).unwrap_err();
        assert!(
            format!("{err:#}").contains("another `outpost token`"),
            "{err:#}"
        );
        assert!(!path.exists());
    }
}
