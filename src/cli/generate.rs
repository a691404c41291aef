//! `outpost generate` (hidden): the man pages and shell completions that
//! packages install, generated from the binary's own flags so they never
//! drift from `--help`.

use std::path::Path;

use anyhow::Context;
use clap_complete::Shell;

/// Writes `outpost.1` and one page per visible subcommand (`outpost-serve.1`,
/// `outpost-token-add.1`, ...) into `dir`, creating it.
pub fn man_pages(command: clap::Command, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // Built once at the top, so subcommands get their display names
    // (`outpost-serve`); every page's footer names Outpost and its version.
    let mut command = command.disable_help_subcommand(true);
    command.build();
    let source = format!("outpost {}", env!("CARGO_PKG_VERSION"));
    write_pages(command, dir, &source)
        .with_context(|| format!("cannot write man pages to {}", dir.display()))
}

fn write_pages(command: clap::Command, dir: &Path, source: &str) -> std::io::Result<()> {
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub.clone(), dir, source)?;
    }
    clap_mangen::Man::new(command)
        // No date (the build would not be reproducible): roff's zero-width
        // `\&` keeps the slot, else the version would show as the date.
        .date("\\&")
        .source(source)
        .manual("Outpost Manual")
        .generate_to(dir)?;
    Ok(())
}

/// Writes the bash (`outpost.bash`), zsh (`_outpost`) and fish
/// (`outpost.fish`) completions into `dir`, creating it.
pub fn completions(mut command: clap::Command, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut command, "outpost", dir)
            .with_context(|| format!("cannot write {shell} completions to {}", dir.display()))?;
    }
    Ok(())
}
