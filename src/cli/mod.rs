//! The client side of the `outpost` binary: commands that talk to a running
//! server or check a stopped one's store, and the formatting they share.
//! `main.rs` only parses flags and dispatches here.

pub mod doctor;
pub mod generate;
pub mod stats;
pub mod token;
pub mod verify;

/// `1536` → `"1.5 KiB"`: sizes for people, in log lines and reports.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A duration as people say it: `"850 ms"`, `"42 s"`, `"3 min 20 s"`,
/// `"5 h 07 min"`, `"2 d 03 h"`.
pub fn human_duration(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return "–".to_string();
    }
    if seconds < 1.0 {
        return format!("{:.0} ms", seconds * 1000.0);
    }
    if seconds < 10.0 {
        return format!("{seconds:.1} s");
    }
    let s = seconds.round() as u64;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {:02} s", s / 60, s % 60),
        3600..86400 => format!("{} h {:02} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {:02} h", s / 86400, s % 86400 / 3600),
    }
}

/// Milliseconds with sensible precision: `"0.42 ms"`, `"38 ms"`.
pub fn human_millis(ms: f64) -> String {
    if !ms.is_finite() || ms < 0.0 {
        "–".to_string()
    } else if ms < 10.0 {
        format!("{ms:.2} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_people_write_them() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(10 << 30), "10.0 GiB");
    }
}
