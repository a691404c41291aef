//! Bench knobs: numbers and lists from environment variables, and where the
//! `outpost` binary is.

use std::io;
use std::path::PathBuf;
use std::str::FromStr;

/// `name` parsed as a `T`, or `default` when it is not set.
fn number<T: FromStr>(name: &str, default: T) -> io::Result<T> {
    Ok(opt(name)?.unwrap_or(default))
}

/// `name` parsed as a `T`, or `None` when it is not set.
fn opt<T: FromStr>(name: &str) -> io::Result<Option<T>> {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.trim().parse().map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{name}={v:?} is not a number"),
                )
            })
        })
        .transpose()
}

/// A `u64` knob.
pub fn env_u64(name: &str, default: u64) -> io::Result<u64> {
    number(name, default)
}

/// A `usize` knob.
pub fn env_usize(name: &str, default: usize) -> io::Result<usize> {
    number(name, default)
}

/// A `usize` knob without a default.
pub fn env_opt(name: &str) -> io::Result<Option<usize>> {
    opt(name)
}

/// A comma-separated list of `usize`, or `default` when it is not set.
pub fn env_list(name: &str, default: &[usize]) -> io::Result<Vec<usize>> {
    match std::env::var(name) {
        Ok(v) => v
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| {
                s.trim().parse().map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("{name}={v:?}: {s:?} is not a number"),
                    )
                })
            })
            .collect(),
        Err(_) => Ok(default.to_vec()),
    }
}

/// The server binary: `$var` if set, else `built` (a bench's
/// `option_env!("CARGO_BIN_EXE_outpost")`), else
/// `$CARGO_TARGET_DIR/release/outpost` (default `target/`).
pub fn server_binary(var: &str, built: Option<&str>) -> PathBuf {
    if let Some(path) = std::env::var_os(var) {
        return PathBuf::from(path);
    }
    match built {
        Some(path) => PathBuf::from(path),
        None => std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("target"))
            .join("release")
            .join("outpost"),
    }
}
