//! The adaptive prefetch decisions, as pure functions over counts: what
//! state a build invocation is in, and whether one of its outputs is worth
//! pulling across the link before anyone asks for it.
//!
//! Nothing here keeps state or takes a lock: [`super::learner`] keeps the
//! counts and asks these functions, so every rule is tested on its own.

use crate::config::{PrefetchConfig, PrefetchMode};

/// What an invocation has done so far, as counted by the learner.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Finished actions whose results were offered to prefetch.
    pub actions: u64,
    /// Outputs offered: output files and output directories (std streams and
    /// Tree blobs are not: clients read those anyway).
    pub offered: u64,
    /// Offered outputs a client read (each once; a directory once any file
    /// in it was read).
    pub read: u64,
    /// Output blobs prefetch chose to fetch.
    pub prefetched: u64,
    /// Output blobs prefetch left for the client.
    pub skipped: u64,
    /// Outputs a later action of the invocation took as input.
    pub consumed: u64,
}

/// Whether an invocation reads the outputs it is given, as far as known.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum State {
    /// Too early to tell: no client read yet, fewer than `learning_actions`
    /// finished actions.
    Learning,
    /// Reads at least `read_ratio` of its outputs: prefetch everything.
    Reading,
    /// Reads less: prefetch only what history says clients read.
    NotReading,
}

impl State {
    /// Every state, in gauge order.
    pub const ALL: [State; 3] = [State::Learning, State::Reading, State::NotReading];

    /// Lower-case name, for logs.
    pub fn name(self) -> &'static str {
        match self {
            State::Learning => "learning",
            State::Reading => "reading",
            State::NotReading => "not reading",
        }
    }
}

/// The state `counts` put an invocation in (recomputed on every change,
/// never sticky: an invocation that starts reading later becomes Reading).
pub fn state(counts: &Counts, config: &PrefetchConfig) -> State {
    if counts.read == 0 && counts.actions < config.learning_actions {
        return State::Learning;
    }
    if counts.offered == 0 {
        return State::Learning;
    }
    if counts.read * 100 >= config.read_percent * counts.offered {
        State::Reading
    } else {
        State::NotReading
    }
}

/// What an output blob is to the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Stdout or stderr: clients read them even without the bytes.
    Std,
    /// A Tree or Directory message of an output directory: Bazel reads every
    /// Tree (to know the directory's files) even with
    /// `--remote_download_minimal`, so it is metadata, not evidence.
    Metadata,
    /// An output file.
    File,
    /// A file inside an output directory (its reads credit the directory).
    DirFile,
}

/// One output blob prefetch could fetch, with what is known about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// What it is.
    pub kind: Kind,
    /// Its size in bytes.
    pub size: u64,
    /// Clients read its output path (same mnemonic) in earlier invocations.
    pub history_read: bool,
    /// A later action of the same invocation took it as input.
    pub consumed: bool,
}

/// Why prefetch left an output for the client (one counter each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// Over `max_blob_size` (every mode).
    TooLarge,
    /// Over `small_output_size` while the invocation is learning.
    Learning,
    /// The invocation does not read outputs and history does not say
    /// clients read this one.
    NotReading,
    /// A later action took it as input: the upstream needs it, the client
    /// does not.
    Input,
}

/// Whether to fetch `candidate` of an invocation in `state`: `Ok` to fetch,
/// or why not.
pub fn decide(config: &PrefetchConfig, state: State, candidate: &Candidate) -> Result<(), Skip> {
    if candidate.size > config.max_blob_size {
        return Err(Skip::TooLarge);
    }
    if config.mode == PrefetchMode::Always {
        return Ok(());
    }
    if matches!(candidate.kind, Kind::Std | Kind::Metadata) {
        return Ok(());
    }
    if candidate.consumed && state != State::Reading {
        return Err(Skip::Input);
    }
    match state {
        State::Reading => Ok(()),
        _ if candidate.history_read => Ok(()),
        State::Learning if candidate.size <= config.small_output_size => Ok(()),
        State::Learning => Err(Skip::Learning),
        State::NotReading => Err(Skip::NotReading),
    }
}

/// Read and offer counts of one output path (with its action mnemonic)
/// across invocations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PathCounts {
    /// Invocations that were offered this output.
    pub offered: u64,
    /// Invocations whose client read it.
    pub read: u64,
    /// Invocations in which a later action took it as input.
    pub consumed: u64,
}

/// Whether clients read an output path often enough, judging by `before`
/// (its counts before the current offer), to prefetch it for an invocation
/// that does not read in general: read at all, and in at least
/// `read_ratio` of the earlier offers.
pub fn history_reads(before: &PathCounts, config: &PrefetchConfig) -> bool {
    before.read > 0 && before.read * 100 >= config.read_percent * before.offered
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> PrefetchConfig {
        PrefetchConfig {
            learning_actions: 3,
            small_output_size: 100,
            max_blob_size: 10_000,
            read_percent: 50,
            ..PrefetchConfig::default()
        }
    }

    fn counts(actions: u64, offered: u64, read: u64) -> Counts {
        Counts {
            actions,
            offered,
            read,
            ..Counts::default()
        }
    }

    #[test]
    fn an_invocation_learns_until_it_reads_or_enough_actions_finished() {
        let c = config();
        assert_eq!(state(&counts(0, 0, 0), &c), State::Learning);
        assert_eq!(state(&counts(2, 6, 0), &c), State::Learning);
        assert_eq!(state(&counts(3, 9, 0), &c), State::NotReading);
        // A read ends learning at once, and the ratio decides.
        assert_eq!(state(&counts(1, 3, 2), &c), State::Reading);
        assert_eq!(state(&counts(1, 3, 1), &c), State::NotReading);
    }

    #[test]
    fn the_state_follows_the_ratio_both_ways() {
        let c = config();
        assert_eq!(state(&counts(10, 10, 5), &c), State::Reading, "exactly 50%");
        assert_eq!(state(&counts(10, 10, 4), &c), State::NotReading);
        assert_eq!(state(&counts(20, 20, 4), &c), State::NotReading);
        assert_eq!(state(&counts(20, 20, 10), &c), State::Reading, "not sticky");
        let zero = PrefetchConfig {
            read_percent: 0,
            ..c
        };
        assert_eq!(state(&counts(10, 10, 0), &zero), State::Reading);
    }

    fn candidate(kind: Kind, size: u64) -> Candidate {
        Candidate {
            kind,
            size,
            history_read: false,
            consumed: false,
        }
    }

    #[test]
    fn std_streams_and_trees_are_always_fetched_within_the_size_limit() {
        let c = config();
        for state in State::ALL {
            for kind in [Kind::Std, Kind::Metadata] {
                assert_eq!(decide(&c, state, &candidate(kind, 5000)), Ok(()));
                let consumed = Candidate {
                    consumed: true,
                    ..candidate(kind, 5000)
                };
                assert_eq!(decide(&c, state, &consumed), Ok(()));
                assert_eq!(
                    decide(&c, state, &candidate(kind, 10_001)),
                    Err(Skip::TooLarge)
                );
            }
        }
    }

    #[test]
    fn files_by_state() {
        let c = config();
        for kind in [Kind::File, Kind::DirFile] {
            let (small, large) = (candidate(kind, 100), candidate(kind, 101));
            assert_eq!(decide(&c, State::Learning, &small), Ok(()));
            assert_eq!(decide(&c, State::Learning, &large), Err(Skip::Learning));
            assert_eq!(decide(&c, State::Reading, &large), Ok(()));
            assert_eq!(decide(&c, State::NotReading, &small), Err(Skip::NotReading));
            assert_eq!(decide(&c, State::NotReading, &large), Err(Skip::NotReading));
            let known = Candidate {
                history_read: true,
                ..large
            };
            assert_eq!(decide(&c, State::NotReading, &known), Ok(()));
            assert_eq!(decide(&c, State::Learning, &known), Ok(()));
            let huge = candidate(kind, 10_001);
            assert_eq!(decide(&c, State::Reading, &huge), Err(Skip::TooLarge));
        }
    }

    #[test]
    fn an_output_taken_as_input_is_skipped_unless_the_invocation_reads() {
        let c = config();
        let input = Candidate {
            consumed: true,
            history_read: true,
            ..candidate(Kind::File, 10)
        };
        assert_eq!(decide(&c, State::Learning, &input), Err(Skip::Input));
        assert_eq!(decide(&c, State::NotReading, &input), Err(Skip::Input));
        assert_eq!(decide(&c, State::Reading, &input), Ok(()));
    }

    #[test]
    fn always_fetches_everything_under_the_limit() {
        let c = PrefetchConfig {
            mode: PrefetchMode::Always,
            ..config()
        };
        let input = Candidate {
            consumed: true,
            ..candidate(Kind::File, 5000)
        };
        assert_eq!(decide(&c, State::NotReading, &input), Ok(()));
        assert_eq!(
            decide(&c, State::Reading, &candidate(Kind::File, 10_001)),
            Err(Skip::TooLarge)
        );
    }

    #[test]
    fn history_needs_reads_in_enough_earlier_invocations() {
        let c = config();
        let h = |offered, read| PathCounts {
            offered,
            read,
            consumed: 0,
        };
        assert!(!history_reads(&h(0, 0), &c), "never seen");
        assert!(!history_reads(&h(4, 0), &c), "never read");
        assert!(history_reads(&h(1, 1), &c));
        assert!(history_reads(&h(4, 2), &c));
        assert!(!history_reads(&h(5, 2), &c));
    }
}
