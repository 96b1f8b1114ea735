//! Shell completions and man pages, generated from the clap definitions ([`super::Cli`]) so
//! that they say what `--help` says. `cargo xtask package` runs them through the binaries
//! (`stalltrace completions SHELL`, `stalltrace-gen-man DIR`) and ships the results.
use std::{
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use clap::CommandFactory as _;
use clap_complete::Shell;

use super::Cli;

/// Writes the completion script for `shell` to `out`.
pub fn completion(shell: Shell, out: &mut dyn Write) {
    clap_complete::generate(shell, &mut Cli::command(), "stalltrace", out);
}

/// Writes one man page per visible command into `dir` (`stalltrace.1`,
/// `stalltrace-daemon.1`, …) and returns their paths, sorted.
pub fn man_pages(dir: &Path) -> Result<Vec<PathBuf>> {
    clap_mangen::generate_to(Cli::command(), dir)
        .with_context(|| format!("writing man pages into {}", dir.display()))?;
    let mut pages: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "1"))
        .collect();
    pages.sort();
    Ok(pages)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn visible_subcommands() -> Vec<String> {
        Cli::command()
            .get_subcommands()
            .filter(|c| !c.is_hide_set())
            .map(|c| c.get_name().to_owned())
            .collect()
    }

    #[test]
    fn the_main_man_page_names_every_command_and_each_has_its_own() {
        let dir = std::env::temp_dir().join(format!("stalltrace-man-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pages = man_pages(&dir).unwrap();
        let main = std::fs::read_to_string(dir.join("stalltrace.1")).unwrap();
        for name in visible_subcommands() {
            // roff escapes hyphens: `generate\-man`.
            assert!(
                main.contains(&format!("stalltrace\\-{}", name.replace('-', "\\-")))
                    || main.contains(&name.replace('-', "\\-")),
                "stalltrace.1 does not mention `{name}`"
            );
            let page = dir.join(format!("stalltrace-{name}.1"));
            assert!(pages.contains(&page), "no page for `{name}`: {pages:?}");
        }
        // The daemon's page documents its flags and what --help adds after them.
        let daemon = std::fs::read_to_string(dir.join("stalltrace-daemon.1")).unwrap();
        for text in ["stall\\-after", "events\\-file", "SIGHUP"] {
            assert!(daemon.contains(text), "stalltrace-daemon.1 lacks {text}");
        }
        assert!(
            main.contains("Exit status"),
            "the exit codes are in stalltrace.1"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn completions_offer_every_command_in_each_shell() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut out = Vec::new();
            completion(shell, &mut out);
            let script = String::from_utf8(out).unwrap();
            for name in visible_subcommands() {
                assert!(script.contains(&name), "{shell}: no `{name}`");
            }
            assert!(script.contains("stall-after"), "{shell}: no daemon flags");
        }
    }
}
