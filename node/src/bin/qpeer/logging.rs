//! Diagnostics on stderr: `RUST_LOG` (default `warn`), colour only on a terminal.
//!
//! The node library logs its fatal tracker errors (a wrong pinned tracker id, this NodeId
//! registered elsewhere) at ERROR as well as returning them; `qpeer` prints those errors
//! itself, once, so they are left out here.

use std::io::IsTerminal;

use tracing_subscriber::filter::{filter_fn, EnvFilter};
use tracing_subscriber::prelude::*;

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let printed_anyway = filter_fn(|meta| {
        !(*meta.level() == tracing::Level::ERROR && meta.target() == "qpeer_node::tracker_link")
    });
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_filter(filter)
        .with_filter(printed_anyway);
    tracing_subscriber::registry().with(layer).init();
}
