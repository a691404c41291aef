//! What the bench's blobs are made of: random bytes (nothing to compress,
//! the default) or slices of real build material for the compression runs
//! (issue 12): source text for sources (this repository's Rust sources and
//! docs) and machine code for outputs (the release `outpost` binary the
//! bench runs, an ELF executable with line tables, like a linked output).
//!
//! Every blob stays a pure function of (kind, seed, size): a 17-byte header
//! with the seed makes it unique, the rest is the corpus from an offset the
//! seed picks, wrapping around.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Context, ensure};

/// What a blob's bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataKind {
    /// Random bytes: incompressible.
    Random,
    /// Source text (compresses ~3×).
    Text,
    /// Machine code (compresses ~3–4× whole, less in small slices).
    Code,
}

/// The two corpora, loaded once.
struct Corpus {
    text: Vec<u8>,
    code: Vec<u8>,
}

static CORPUS: OnceLock<Corpus> = OnceLock::new();

/// Loads the corpora: the repository's sources and docs, and `binary`.
/// Call once before building a workload of `Text` / `Code` blobs.
pub fn load(binary: &Path) -> anyhow::Result<()> {
    if CORPUS.get().is_some() {
        return Ok(());
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut text = Vec::new();
    for dir in ["src", "docs", "tests", "crates/outpost-testkit/src"] {
        append_tree(&root.join(dir), &mut text)?;
    }
    let code = std::fs::read(binary)
        .with_context(|| format!("reading {} for the code corpus", binary.display()))?;
    ensure!(
        text.len() > 64 << 10 && code.len() > 1 << 20,
        "corpus too small"
    );
    let _ = CORPUS.set(Corpus { text, code });
    Ok(())
}

/// Appends every regular file under `dir` (sorted, so the corpus is stable).
fn append_tree(dir: &Path, out: &mut Vec<u8>) -> anyhow::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.path());
    for entry in entries {
        let path = entry.path();
        if path.is_dir() {
            append_tree(&path, out)?;
        } else {
            out.extend_from_slice(&std::fs::read(&path)?);
        }
    }
    Ok(())
}

/// The bytes of a `Text` or `Code` blob.
pub fn blob(kind: DataKind, seed: u64, size: usize) -> Vec<u8> {
    let corpus = CORPUS
        .get()
        .expect("corpus::load before building a compressible workload");
    let source = match kind {
        DataKind::Text => &corpus.text,
        DataKind::Code => &corpus.code,
        DataKind::Random => unreachable!("random blobs do not come from the corpus"),
    };
    let mut out = format!("{seed:016x}\n").into_bytes();
    out.truncate(size);
    let mut at = (seed % source.len() as u64) as usize;
    while out.len() < size {
        let take = (size - out.len()).min(source.len() - at);
        out.extend_from_slice(&source[at..at + take]);
        at = 0;
    }
    out
}
