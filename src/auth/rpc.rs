//! The one table of what each RPC needs: a role, and for UpdateActionResult
//! also `write-ac`. It covers every method `server.rs` serves; a path it does
//! not know is allowed to any authenticated caller (tonic answers
//! UNIMPLEMENTED).

use super::role::{Principal, Role};

/// What one RPC asks of its caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Need {
    /// The least role that may call it.
    pub role: Role,
    /// Whether the credential must also have `write-ac`.
    pub write_ac: bool,
}

const READ: Need = Need {
    role: Role::Read,
    write_ac: false,
};
const WRITE: Need = Need {
    role: Role::Write,
    write_ac: false,
};
const EXECUTE: Need = Need {
    role: Role::Execute,
    write_ac: false,
};
const WRITE_AC: Need = Need {
    role: Role::Write,
    write_ac: true,
};

/// What the gRPC `path` (`/package.Service/Method`) needs; None for a path
/// no service here serves.
pub fn need(path: &str) -> Option<Need> {
    const REAPI: &str = "/build.bazel.remote.execution.v2.";
    let need = if let Some(rest) = path.strip_prefix(REAPI) {
        match rest {
            "Capabilities/GetCapabilities"
            | "ContentAddressableStorage/FindMissingBlobs"
            | "ContentAddressableStorage/BatchReadBlobs"
            | "ContentAddressableStorage/GetTree"
            | "ContentAddressableStorage/SplitBlob"
            | "ContentAddressableStorage/GetChunkMapping"
            | "ActionCache/GetActionResult" => READ,
            "ContentAddressableStorage/BatchUpdateBlobs"
            | "ContentAddressableStorage/SpliceBlob"
            | "ContentAddressableStorage/RegisterChunkMapping" => WRITE,
            "ActionCache/UpdateActionResult" => WRITE_AC,
            "Execution/Execute" | "Execution/WaitExecution" => EXECUTE,
            _ => return None,
        }
    } else {
        match path {
            "/google.bytestream.ByteStream/Read" => READ,
            "/google.bytestream.ByteStream/Write"
            | "/google.bytestream.ByteStream/QueryWriteStatus" => WRITE,
            "/build.bazel.remote.asset.v1.Fetch/FetchBlob"
            | "/build.bazel.remote.asset.v1.Fetch/FetchDirectory" => READ,
            "/build.bazel.remote.asset.v1.Push/PushBlob"
            | "/build.bazel.remote.asset.v1.Push/PushDirectory" => WRITE,
            // A log stream is created to be written (ByteStream Write).
            "/build.bazel.remote.logstream.v1.LogStreamService/CreateLogStream" => WRITE,
            "/outpost.admin.v1.Admin/GetStats" => READ,
            p if p.starts_with("/google.longrunning.Operations/") => EXECUTE,
            _ => return None,
        }
    };
    Some(need)
}

/// The method's short name for messages: `/a.b.Service/Method` → `Method`.
fn method_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Ok when `principal` may call `path`; otherwise the PERMISSION_DENIED
/// message (names the credential, its role and what is missing).
pub fn check(principal: &Principal, path: &str) -> Result<(), String> {
    let Some(need) = need(path) else {
        return Ok(());
    };
    let role_ok = principal.role >= need.role;
    let ac_ok = !need.write_ac || principal.write_ac;
    if role_ok && ac_ok {
        return Ok(());
    }
    let missing = match (role_ok, ac_ok) {
        (false, false) => format!("role {} and write-ac", need.role),
        (false, true) => format!("role {}", need.role),
        _ => "write-ac".to_string(),
    };
    Err(format!(
        "credential '{}' has role {}{}; {} needs {missing}",
        principal.name,
        principal.role,
        if principal.write_ac {
            " with write-ac"
        } else {
            ""
        },
        method_name(path)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(role: Role, write_ac: bool) -> Principal {
        Principal {
            name: "reader".into(),
            role,
            write_ac,
        }
    }

    #[test]
    fn roles_include_the_ones_below_and_write_ac_is_extra() {
        let fmb = "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs";
        let upload = "/google.bytestream.ByteStream/Write";
        let exec = "/build.bazel.remote.execution.v2.Execution/Execute";
        let ops = "/google.longrunning.Operations/GetOperation";
        let uar = "/build.bazel.remote.execution.v2.ActionCache/UpdateActionResult";
        let read = who(Role::Read, false);
        assert!(check(&read, fmb).is_ok());
        assert!(check(&read, upload).is_err());
        assert!(check(&who(Role::Write, false), upload).is_ok());
        assert!(check(&who(Role::Write, false), exec).is_err());
        assert!(check(&who(Role::Execute, false), exec).is_ok());
        assert!(check(&who(Role::Execute, false), ops).is_ok());
        assert!(check(&who(Role::Execute, false), uar).is_err());
        assert!(check(&who(Role::Write, true), uar).is_ok());
        assert_eq!(
            check(&who(Role::Execute, false), uar).unwrap_err(),
            "credential 'reader' has role execute; UpdateActionResult needs write-ac"
        );
        assert_eq!(
            check(&read, uar).unwrap_err(),
            "credential 'reader' has role read; UpdateActionResult needs role write and write-ac"
        );
        assert_eq!(
            check(&read, upload).unwrap_err(),
            "credential 'reader' has role read; Write needs role write"
        );
        // Unknown paths: tonic answers UNIMPLEMENTED to anyone authenticated.
        assert!(check(&read, "/grpc.health.v1.Health/Check").is_ok());
    }
}
