//! SIGINT and SIGTERM: a clean stop instead of the default instant death.
//!
//! [`install`] replaces the default handlers for the commands that stop cleanly (`listen`,
//! `send`, `ping`, `peers`): from then on a signal is remembered, so one that arrives while
//! the node is still starting is not lost. [`until_stopped`] runs a command until it ends or
//! a signal comes, whichever is first; the caller then shuts its node down (peers see a
//! clean close, a receiver keeps its `.part` files) and exits with [`Stop::exit_code`]:
//! 130 for SIGINT, 143 for SIGTERM, as a shell reports a process killed by them. A second
//! signal while stopping ends the process at once with the same code.

use std::future::Future;
use std::process::ExitCode;
use std::sync::OnceLock;

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

/// The signal that asked this process to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGINT (Ctrl-C).
    Interrupt,
    /// SIGTERM (`kill`, `systemctl stop`).
    Terminate,
}

impl Stop {
    pub fn name(self) -> &'static str {
        match self {
            Stop::Interrupt => "SIGINT",
            Stop::Terminate => "SIGTERM",
        }
    }

    /// 128 + the signal number.
    pub fn code(self) -> u8 {
        match self {
            Stop::Interrupt => 130,
            Stop::Terminate => 143,
        }
    }

    pub fn exit_code(self) -> ExitCode {
        ExitCode::from(self.code())
    }
}

/// A command stopped by a signal; `hint` says how to go on (`send`: run it again to resume).
#[derive(Debug, thiserror::Error)]
#[error("stopped by {}{}", signal.name(), hint.as_deref().map(|h| format!("; {h}")).unwrap_or_default())]
pub struct Interrupted {
    pub signal: Stop,
    pub hint: Option<String>,
}

static STOPPED: OnceLock<watch::Receiver<Option<Stop>>> = OnceLock::new();

/// Catches SIGINT and SIGTERM from now on (idempotent). Needs a Tokio runtime.
pub fn install() -> Result<()> {
    if STOPPED.get().is_some() {
        return Ok(());
    }
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot catch SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot catch SIGTERM")?;
    let (tell, told) = watch::channel(None);
    if STOPPED.set(told).is_err() {
        return Ok(());
    }
    tokio::spawn(async move {
        loop {
            let stop = tokio::select! {
                _ = interrupt.recv() => Stop::Interrupt,
                _ = terminate.recv() => Stop::Terminate,
            };
            if tell.borrow().is_some() {
                // Asked twice: the clean stop is taking too long for the user.
                std::process::exit(i32::from(stop.code()));
            }
            let _ = tell.send(Some(stop));
        }
    });
    Ok(())
}

/// Resolves with the first signal caught since [`install`] (never without it).
pub async fn stopped() -> Stop {
    let Some(told) = STOPPED.get() else { return std::future::pending().await };
    let mut told = told.clone();
    loop {
        if let Some(stop) = *told.borrow_and_update() {
            return stop;
        }
        if told.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Runs `work` until it ends or a signal is caught: then an [`Interrupted`] error.
pub async fn until_stopped<T>(work: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::select! {
        result = work => result,
        signal = stopped() => Err(Interrupted { signal, hint: None }.into()),
    }
}

/// Adds `hint` to an [`Interrupted`] error; other errors pass unchanged.
pub fn with_hint(error: anyhow::Error, hint: impl FnOnce() -> String) -> anyhow::Error {
    match error.downcast::<Interrupted>() {
        Ok(interrupted) => Interrupted { hint: Some(hint()), ..interrupted }.into(),
        Err(error) => error,
    }
}

/// This process's command line as one could type it again (`qpeer send ID 'my file'`).
pub fn command_line() -> String {
    let mut words = vec!["qpeer".to_string()];
    words.extend(std::env::args().skip(1).map(|arg| shell_quote(&arg)));
    words.join(" ")
}

fn shell_quote(word: &str) -> String {
    let plain =
        !word.is_empty() && word.chars().all(|c| c.is_ascii_alphanumeric() || "@%+=:,./_-[]".contains(c));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_quoted_only_when_a_shell_needs_it() {
        assert_eq!(shell_quote("a1b2@127.0.0.1:4433"), "a1b2@127.0.0.1:4433");
        assert_eq!(shell_quote("my file"), "'my file'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn an_interrupted_send_says_how_to_resume() {
        let error = with_hint(Interrupted { signal: Stop::Interrupt, hint: None }.into(), || {
            "run the same command again to resume: qpeer send X f".into()
        });
        assert_eq!(
            error.to_string(),
            "stopped by SIGINT; run the same command again to resume: qpeer send X f"
        );
        assert_eq!(Stop::Terminate.code(), 143);
    }
}
