//! The resolved `[prefetch]` settings: how hard Outpost pulls finished
//! actions' outputs into the local store ahead of the client, and how the
//! adaptive mode decides whether a build invocation reads them at all.

use serde::Deserialize;

use super::defaults;
use super::file::PrefetchSection;

/// What prefetch fetches: the `mode` key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrefetchMode {
    /// Learn per build invocation whether the client reads outputs, and
    /// prefetch large outputs only for invocations that do (or for output
    /// paths clients read in earlier invocations). Stdout/stderr and Trees
    /// always.
    #[default]
    Adaptive,
    /// Every output up to `max_blob_size`, read or not (the behaviour before
    /// adaptive prefetch: best for clients that download every output).
    Always,
    /// No prefetch (the same as `enabled = false`).
    Off,
}

/// The resolved prefetch settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrefetchConfig {
    /// Prefetch at all: false when `enabled = false` or `mode = "off"`.
    pub enabled: bool,
    /// What to prefetch (never `Off` when `enabled`).
    pub mode: PrefetchMode,
    /// Size limit per blob, in every mode.
    pub max_blob_size: u64,
    /// Bytes in flight across all prefetches.
    pub max_bytes_in_flight: u64,
    /// Parsed for compatibility, not applied: a group's transfers start at
    /// once and `max_bytes_in_flight` bounds them.
    pub parallel_fetches: usize,
    /// Queue length in actions.
    pub queue_depth: usize,
    /// Adaptive: size limit of file outputs while an invocation is learning.
    pub small_output_size: u64,
    /// Adaptive: finished actions without a client read before an
    /// invocation is judged by its read ratio.
    pub learning_actions: u64,
    /// Adaptive: an invocation reading at least this percentage of the
    /// outputs it was offered keeps full prefetch (`read_ratio` × 100).
    pub read_percent: u64,
}

impl PrefetchConfig {
    /// Applies the defaults (see [`defaults`]); limits are at least 1, the
    /// ratio is clamped to 0..=1.
    pub fn resolve(section: PrefetchSection) -> Self {
        let mode = section.mode.unwrap_or(defaults::PREFETCH_MODE);
        let ratio = section
            .read_ratio
            .unwrap_or(defaults::PREFETCH_READ_RATIO)
            .clamp(0.0, 1.0);
        PrefetchConfig {
            enabled: section.enabled.unwrap_or(defaults::PREFETCH_ENABLED)
                && mode != PrefetchMode::Off,
            mode,
            max_blob_size: section
                .max_blob_size
                .map_or(defaults::PREFETCH_MAX_BLOB_SIZE, |b| b.0),
            max_bytes_in_flight: section
                .max_bytes_in_flight
                .map_or(defaults::PREFETCH_MAX_BYTES_IN_FLIGHT, |b| b.0.max(1)),
            parallel_fetches: section
                .parallel_fetches
                .unwrap_or(defaults::PREFETCH_PARALLEL_FETCHES)
                .max(1),
            queue_depth: section
                .queue_depth
                .unwrap_or(defaults::PREFETCH_QUEUE_DEPTH)
                .max(1),
            small_output_size: section
                .small_output_size
                .map_or(defaults::PREFETCH_SMALL_OUTPUT_SIZE, |b| b.0),
            learning_actions: section
                .learning_actions
                .unwrap_or(defaults::PREFETCH_LEARNING_ACTIONS),
            read_percent: (ratio * 100.0).round() as u64,
        }
    }
}

impl Default for PrefetchConfig {
    fn default() -> Self {
        PrefetchConfig::resolve(PrefetchSection::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> PrefetchConfig {
        let file: super::super::FileConfig = toml::from_str(text).unwrap();
        PrefetchConfig::resolve(file.prefetch)
    }

    #[test]
    fn adaptive_is_the_default_and_off_disables() {
        let c = PrefetchConfig::default();
        assert!(c.enabled);
        assert_eq!(c.mode, PrefetchMode::Adaptive);
        assert_eq!(c.read_percent, 25);
        assert!(!parse("[prefetch]\nmode = \"off\"\n").enabled);
        assert!(!parse("[prefetch]\nenabled = false\nmode = \"always\"\n").enabled);
        let always = parse("[prefetch]\nmode = \"always\"\nread_ratio = 7.0\n");
        assert_eq!((always.enabled, always.mode), (true, PrefetchMode::Always));
        assert_eq!(always.read_percent, 100, "clamped to 1");
    }

    #[test]
    fn unknown_modes_are_refused() {
        let bad: Result<super::super::FileConfig, _> =
            toml::from_str("[prefetch]\nmode = \"sometimes\"\n");
        assert!(bad.is_err());
    }
}
