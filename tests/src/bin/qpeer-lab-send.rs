//! `qpeer-lab-send`: sends raw UDP datagrams, for NAT lab tests that need packets no node would
//! send (forged or replayed probes) or plain traffic through a router under test.
//!
//! ```text
//! qpeer-lab-send --to ADDR... [--from BIND] [--hex HEX]... [--hex-file FILE] [--count N]
//!                [--interval-ms MS] [--listen-ms MS]
//! ```
//!
//! Each round sends every payload once, in order (the `--hex` ones, then one per non-empty
//! line of `--hex-file`), to every `--to` address (repeatable). `--count` rounds (default 1)
//! go `--interval-ms` apart (default 0). The socket binds `--from` (default `0.0.0.0:0`).
//! With `--listen-ms`, it then waits that long for datagrams and prints each one as
//! `[RECEIVED] <from> <hex>` (those that arrived while sending included). At the end it prints
//! `[SENT] <n> datagrams from <addr>` and exits 0, or prints the error on stderr and exits 1
//! (2 for bad usage).

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

const USAGE: &str = "usage: qpeer-lab-send --to ADDR... [--from BIND] [--hex HEX]... [--hex-file FILE] \
                     [--count N] [--interval-ms MS] [--listen-ms MS]";

/// What to send, and where.
struct Args {
    to: Vec<SocketAddr>,
    from: SocketAddr,
    payloads: Vec<Vec<u8>>,
    count: u64,
    interval: Duration,
    listen: Duration,
}

/// Bytes from hexadecimal text (either case, no separators).
fn parse_hex(text: &str) -> Result<Vec<u8>> {
    let text = text.trim();
    if !text.len().is_multiple_of(2) {
        bail!("odd number of hex digits ({})", text.len());
    }
    (0..text.len())
        .step_by(2)
        .map(|i| {
            let pair = text.get(i..i + 2).context("hex must be ASCII")?;
            u8::from_str_radix(pair, 16).with_context(|| format!("{pair:?} is not hex"))
        })
        .collect()
}

fn parse_args(mut argv: impl Iterator<Item = String>) -> Result<Args> {
    let mut to = Vec::new();
    let mut from: SocketAddr = ([0, 0, 0, 0], 0).into();
    let mut payloads = Vec::new();
    let mut hex_file: Option<PathBuf> = None;
    let mut count = 1u64;
    let mut interval_ms = 0u64;
    let mut listen_ms = 0u64;
    while let Some(flag) = argv.next() {
        let mut value = || argv.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--to" => to.push(value()?.parse().context("--to: not an IP:PORT")?),
            "--from" => from = value()?.parse().context("--from: not an IP:PORT")?,
            "--hex" => payloads.push(parse_hex(&value()?).context("--hex")?),
            "--hex-file" => hex_file = Some(PathBuf::from(value()?)),
            "--count" => count = value()?.parse().context("--count: not a number")?,
            "--interval-ms" => interval_ms = value()?.parse().context("--interval-ms: not a number")?,
            "--listen-ms" => listen_ms = value()?.parse().context("--listen-ms: not a number")?,
            "-h" | "--help" => bail!("{USAGE}"),
            other => bail!("unknown argument {other:?}"),
        }
    }
    if let Some(file) = hex_file {
        let text =
            std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
        for (number, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            payloads.push(parse_hex(line).with_context(|| format!("{}:{}", file.display(), number + 1))?);
        }
    }
    if to.is_empty() {
        bail!("--to is required");
    }
    if payloads.is_empty() {
        bail!("nothing to send: give --hex or --hex-file");
    }
    let (interval, listen) = (Duration::from_millis(interval_ms), Duration::from_millis(listen_ms));
    Ok(Args { to, from, payloads, count, interval, listen })
}

fn send(args: &Args) -> Result<()> {
    let socket = UdpSocket::bind(args.from).with_context(|| format!("cannot bind {}", args.from))?;
    let local = socket.local_addr()?;
    let mut sent = 0u64;
    for round in 0..args.count {
        if round > 0 && !args.interval.is_zero() {
            std::thread::sleep(args.interval);
        }
        for payload in &args.payloads {
            for to in &args.to {
                socket.send_to(payload, to).with_context(|| format!("cannot send to {to}"))?;
                sent += 1;
            }
        }
    }
    if !args.listen.is_zero() {
        receive(&socket, args.listen)?;
    }
    println!("[SENT] {sent} datagrams from {local}");
    Ok(())
}

/// Prints every datagram that arrives within `listen` as `[RECEIVED] <from> <hex>`.
fn receive(socket: &UdpSocket, listen: Duration) -> Result<()> {
    let deadline = Instant::now() + listen;
    let mut buf = vec![0u8; 65536];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        socket.set_read_timeout(Some(left))?;
        match socket.recv_from(&mut buf) {
            Ok((len, from)) => {
                let hex: String = buf[..len].iter().map(|b| format!("{b:02x}")).collect();
                println!("[RECEIVED] {from} {hex}");
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            // An ICMP error for an earlier datagram (say, port unreachable): not a datagram.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            Err(e) => return Err(e).context("cannot receive"),
        }
    }
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("error: {e:#}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match send(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
