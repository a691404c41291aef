//! Roles and the authenticated caller of one request.

use std::fmt;
use std::sync::Arc;

use serde::Deserialize;

/// What a credential may do. Each role includes the ones before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read the caches: Capabilities, FindMissingBlobs, reads, GetActionResult,
    /// GetTree, asset Fetch.
    Read,
    /// Read, and upload blobs (BatchUpdateBlobs, ByteStream Write,
    /// QueryWriteStatus) and push assets.
    Write,
    /// Write, and run actions (Execute, WaitExecution, Operations).
    Execute,
}

impl Role {
    /// The name used in files, flags and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Execute => "execute",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "read" => Ok(Role::Read),
            "write" => Ok(Role::Write),
            "execute" => Ok(Role::Execute),
            other => Err(format!(
                "unknown role {other:?} (expected read, write or execute)"
            )),
        }
    }
}

/// The caller of one request, once authenticated. The auth layer puts it in
/// the request's extensions; per-client limits and logs key on `name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The credential's name (never the secret), for logs, metrics and limits.
    pub name: Arc<str>,
    /// What it may do.
    pub role: Role,
    /// Whether it may also write action results (UpdateActionResult), which
    /// every other build then trusts.
    pub write_ac: bool,
}
