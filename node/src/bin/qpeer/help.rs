//! The parts of the command line generated from its clap definitions: the program name and
//! version (`qpeer X.Y.Z`), examples under each command's `--help`, shell completions
//! (`qpeer completions`) and the man page (`qpeer man`).

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use clap::{CommandFactory, FromArgMatches};

use crate::cli::Cli;

/// Examples shown after each command's `--help` (a command missing here has none).
const EXAMPLES: &[(&str, &str)] = &[
    ("id", "Examples:\n  qpeer id\n  qpeer id --home /tmp/alice"),
    ("listen", "Examples:\n  qpeer listen                                         # reachable: answers pings, refuses files\n  qpeer listen --out ~/inbox --accept-from <SENDER_ID> # receive from one sender\n  qpeer listen --out ~/inbox --accept-any              # receive from anyone\n  qpeer listen --tracker <ID>@203.0.113.5:4433 --name laptop"),
    ("send", "Examples:\n  qpeer send <RECEIVER_ID> notes.txt                   # one file\n  qpeer send <RECEIVER_ID> photos/ notes.txt           # a directory and a file\n  qpeer send bob notes.txt                             # bob: an alias (`qpeer alias bob <ID>`)\n  qpeer send --relay-only <RECEIVER_ID> big.iso        # always through the tracker's relay\n\nInterrupted (Ctrl-C: exit 130, SIGTERM: 143)? Run the same command again: it resumes."),
    ("ping", "Examples:\n  qpeer ping <NODE_ID>                                 # 4 pings, 1 s apart\n  qpeer ping -c 10 -i 0.2 <NODE_ID>\n  qpeer ping --no-relay <NODE_ID>                      # only a direct path"),
    ("peers", "Examples:\n  qpeer peers\n  qpeer peers --tracker <ID>@203.0.113.5:4433"),
    ("alias", "Examples:\n  qpeer alias bob <NODE_ID>\n  qpeer alias                                          # list them\n  qpeer alias --remove bob"),
    ("status", "Examples:\n  qpeer status\n  qpeer status --home /tmp/bob"),
    ("netcheck", "Examples:\n  qpeer netcheck\n  qpeer netcheck --json\n  qpeer netcheck --tracker <ID>@203.0.113.5:4433"),
    ("completions", "Examples:\n  qpeer completions bash > ~/.local/share/bash-completion/completions/qpeer\n  qpeer completions zsh > ~/.zfunc/_qpeer\n  qpeer completions fish > ~/.config/fish/completions/qpeer.fish"),
    ("man", "Examples:\n  qpeer man > ~/.local/share/man/man1/qpeer.1 && man qpeer\n  qpeer man --dir ~/.local/share/man/man1              # qpeer.1 and qpeer-<command>.1"),
];

/// The `qpeer` command: the derived definitions, named `qpeer`, with the examples.
pub fn command() -> clap::Command {
    let mut command = Cli::command()
        .name("qpeer")
        .bin_name("qpeer")
        .about("Direct, end-to-end encrypted QUIC file transfer between machines behind home NATs");
    for (name, examples) in EXAMPLES {
        if command.find_subcommand(name).is_some() {
            command = command.mut_subcommand(name, |sub| sub.after_help(*examples));
        }
    }
    command
}

/// Parses the command line; a usage error prints one message and exits 2 (clap's own).
pub fn parse() -> Cli {
    let matches = command().get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// `qpeer completions SHELL`: the completion script on stdout.
pub fn completions(shell: clap_complete::Shell) -> Result<()> {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut command(), "qpeer", &mut out);
    write_stdout(&out)
}

/// `qpeer man`: qpeer(1) in roff on stdout; with `dir`, qpeer.1 and one page per command
/// (qpeer-send.1, ...) written there.
pub fn man(dir: Option<&Path>) -> Result<()> {
    let command = command();
    match dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            clap_mangen::generate_to(command, dir)
                .with_context(|| format!("cannot write the man pages into {}", dir.display()))?;
            Ok(())
        }
        None => {
            let mut out = Vec::new();
            clap_mangen::Man::new(command).render(&mut out)?;
            write_stdout(&out)
        }
    }
}

/// A closed stdout (`qpeer man | head`) is not an error worth a message.
fn write_stdout(bytes: &[u8]) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("cannot write to stdout"),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_example_names_a_command_and_the_definitions_are_consistent() {
        let command = command();
        command.clone().debug_assert();
        for (name, _) in EXAMPLES {
            assert!(command.find_subcommand(name).is_some(), "examples for a missing command {name}");
        }
        assert_eq!(command.get_name(), "qpeer");
        assert!(command.render_version().starts_with("qpeer "), "{}", command.render_version());
    }
}
