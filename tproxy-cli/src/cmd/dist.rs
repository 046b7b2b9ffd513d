//! Shell completions (bash, zsh, fish) and man pages, generated from the
//! clap definition: what a package installs beside the binary. Written by
//! `cargo xtask dist`.
use std::{
    io,
    path::{Path, PathBuf},
};

use clap::CommandFactory as _;
use clap_complete::Shell;

use crate::cmd::Cli;

const BIN: &str = "tproxy";

/// Writes `tproxy.bash`, `_tproxy` (zsh) and `tproxy.fish` into `dir`.
pub fn write_completions(dir: &Path) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    [Shell::Bash, Shell::Zsh, Shell::Fish]
        .into_iter()
        .map(|shell| clap_complete::generate_to(shell, &mut Cli::command(), BIN, dir))
        .collect()
}

/// Writes `tproxy.1` and a `tproxy-<subcommand>.1` for each subcommand
/// into `dir`.
pub fn write_man(dir: &Path) -> io::Result<Vec<PathBuf>> {
    fn pages(cmd: clap::Command, dir: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
        out.push(clap_mangen::Man::new(cmd.clone()).generate_to(dir)?);
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            pages(sub.clone(), dir, out)?;
        }
        Ok(())
    }
    std::fs::create_dir_all(dir)?;
    // Built first: subcommands get their display names (`tproxy-stats`),
    // which name their pages. `help` is clap's, not a page of ours.
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let mut out = Vec::new();
    pages(cmd, dir, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subcommands() -> Vec<String> {
        let names: Vec<String> = Cli::command()
            .get_subcommands()
            .map(|s| s.get_name().to_string())
            .collect();
        assert!(!names.is_empty());
        names
    }

    fn read(p: &Path) -> String {
        let text = std::fs::read_to_string(p).unwrap();
        assert!(!text.trim().is_empty(), "{} is empty", p.display());
        text
    }

    #[test]
    fn completions_for_three_shells_know_every_subcommand() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_completions(dir.path()).unwrap();
        let mut names: Vec<String> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["_tproxy", "tproxy.bash", "tproxy.fish"]);
        for f in &files {
            let text = read(f);
            for sub in subcommands() {
                assert!(text.contains(&sub), "{} lacks {sub}", f.display());
            }
            for flag in ["config", "ports", "log-format", "drain-timeout"] {
                assert!(text.contains(flag), "{} lacks {flag}", f.display());
            }
        }
    }

    #[test]
    fn man_pages_for_the_command_and_each_subcommand() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_man(dir.path()).unwrap();
        let main = read(&dir.path().join("tproxy.1"));
        assert!(main.contains(".TH tproxy 1"), "{main}");
        // roff escapes '-' as "\-".
        assert!(main.contains(r"\-\-config"), "{main}");
        let subs = subcommands();
        for sub in &subs {
            assert!(main.contains(sub.as_str()), "tproxy.1 does not name {sub}");
            let page = read(&dir.path().join(format!("tproxy-{sub}.1")));
            assert!(page.contains(&format!(".TH tproxy-{sub} 1")), "{page}");
        }
        assert_eq!(files.len(), 1 + subs.len(), "{files:?}");
    }
}
