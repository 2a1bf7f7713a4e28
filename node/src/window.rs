//! Receive-window tuning of a peer connection.
//!
//! A fixed window has to be large enough for the longest, fastest path (1 Gbit/s × 100 ms
//! needs 12.5 MB in flight, more while losses are repaired), but quinn buffers up to the
//! whole window whenever the application reads slower than the peer sends: a receiver
//! writing to a slow disk, or on loopback, would hold it all, and quinn's reassembly may keep
//! up to 1.5 times more than that allocated (it shares packet buffers instead of copying).
//! So, as TCP's receive-buffer auto-tuning does, the connection window starts at
//! [`MIN_CONNECTION_WINDOW`] and follows what the path actually carries: [`WINDOW_PER_RTT`]
//! times the most bytes received in one round trip over the last [`HISTORY`] samples, between
//! that floor and [`CONNECTION_WINDOW`]. A window-limited sender's round trips grow it by
//! that factor each round trip, faster than a congestion controller's start-up (BBR's 2.89);
//! a sender limited by our reading keeps it small.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::transport::CONNECTION_WINDOW;

/// Where a connection's receive window starts and the least it is tuned to: loopback and
/// LAN paths (and the first round trips of any path) need no more.
pub const MIN_CONNECTION_WINDOW: u32 = 8 << 20;
/// Window kept per byte received in one round trip: room for the congestion controller to
/// grow, for the data held behind a loss until it is repaired, and for the sample's lag.
pub const WINDOW_PER_RTT: u64 = 4;
/// Samples (one per round trip, at least [`MIN_TICK`] apart) over which the busiest round
/// trip is remembered, so that the window shrinks only after a lull, not at each loss.
pub const HISTORY: usize = 32;
/// Shortest sampling interval: on loopback a round trip is tens of microseconds, too
/// short to count bytes over.
pub const MIN_TICK: Duration = Duration::from_millis(10);
/// The least round trip a sample is scaled to, so that a misread microsecond RTT cannot
/// starve a fast path (the floor window covers 8 GB/s at this RTT anyway).
pub const MIN_RTT: Duration = Duration::from_millis(1);
/// Longest sampling interval, so that a path whose RTT is misread still gets tuned.
pub const MAX_TICK: Duration = Duration::from_millis(500);

const _: () = assert!(MIN_CONNECTION_WINDOW <= CONNECTION_WINDOW);

/// The pure part: turns (bytes received, interval, round-trip time) samples into windows.
#[derive(Debug)]
pub struct WindowTuner {
    /// Bytes received per round trip, newest last, at most [`HISTORY`].
    per_rtt: VecDeque<u64>,
    window: u64,
}

impl Default for WindowTuner {
    fn default() -> Self {
        Self::new()
    }
}

impl WindowTuner {
    pub fn new() -> Self {
        Self { per_rtt: VecDeque::with_capacity(HISTORY), window: MIN_CONNECTION_WINDOW.into() }
    }

    /// The window in force.
    #[cfg(test)]
    pub fn window(&self) -> u64 {
        self.window
    }

    /// How long to wait before the next sample: one round trip, within [`MIN_TICK`] and
    /// [`MAX_TICK`].
    pub fn tick(rtt: Duration) -> Duration {
        rtt.clamp(MIN_TICK, MAX_TICK)
    }

    /// Records that `bytes` arrived in `interval` on a path whose round trip is `rtt`
    /// (quinn's minimum RTT: queueing must not inflate the window). Returns the new
    /// window when it changes by more than an eighth, so that the peer is not sent a flow
    /// control update for every wobble.
    pub fn on_sample(&mut self, bytes: u64, interval: Duration, rtt: Duration) -> Option<u64> {
        if interval.is_zero() {
            return None;
        }
        let rtt = rtt.max(MIN_RTT);
        let per_rtt = (u128::from(bytes) * rtt.as_nanos() / interval.as_nanos()).min(u128::from(u64::MAX));
        if self.per_rtt.len() == HISTORY {
            self.per_rtt.pop_front();
        }
        self.per_rtt.push_back(per_rtt as u64);
        let busiest = self.per_rtt.iter().copied().max().unwrap_or(0);
        let target = busiest
            .saturating_mul(WINDOW_PER_RTT)
            .clamp(MIN_CONNECTION_WINDOW.into(), CONNECTION_WINDOW.into());
        let grows = target > self.window;
        let change = target.abs_diff(self.window);
        // Growth always applies (a window-limited sender waits for it); a shrink only when
        // it is worth a flow control update.
        if change == 0 || (!grows && change <= self.window / 8) {
            return None;
        }
        self.window = target;
        Some(target)
    }
}

/// Tunes `connection`'s receive window until it closes.
pub(crate) async fn tune_receive_window(connection: quinn::Connection) {
    let mut tuner = WindowTuner::new();
    let mut received = connection.stats().udp_rx.bytes;
    let mut sampled_at = Instant::now();
    loop {
        let rtt = connection.min_rtt();
        tokio::select! {
            _ = connection.closed() => return,
            _ = tokio::time::sleep(WindowTuner::tick(rtt)) => {}
        }
        let now_received = connection.stats().udp_rx.bytes;
        let now = Instant::now();
        let bytes = now_received.saturating_sub(received);
        if let Some(window) = tuner.on_sample(bytes, now - sampled_at, connection.min_rtt()) {
            tracing::debug!(window, "receive window tuned");
            if let Ok(window) = quinn::VarInt::from_u64(window) {
                connection.set_receive_window(window);
            }
        }
        (received, sampled_at) = (now_received, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const RTT: Duration = Duration::from_millis(100);

    #[test]
    fn starts_at_the_floor_and_stays_there_on_a_fast_short_path() {
        let mut tuner = WindowTuner::new();
        assert_eq!(tuner.window(), u64::from(MIN_CONNECTION_WINDOW));
        // 1 GB/s on loopback (RTT 50 µs, counted as MIN_RTT): 1 MB per round trip.
        for _ in 0..100 {
            assert_eq!(tuner.on_sample(10_000_000, MIN_TICK, Duration::from_micros(50)), None);
        }
        assert_eq!(tuner.window(), u64::from(MIN_CONNECTION_WINDOW));
    }

    #[test]
    fn a_window_limited_sender_grows_it_to_the_cap_within_a_few_round_trips() {
        let mut tuner = WindowTuner::new();
        let mut round_trips = 0;
        while tuner.window() < u64::from(CONNECTION_WINDOW) {
            // The sender fills the window every round trip.
            let window = tuner.window();
            let grown = tuner.on_sample(window, RTT, RTT);
            assert!(grown.is_some_and(|w| w > window), "round trip {round_trips}: {grown:?}");
            round_trips += 1;
        }
        assert!(round_trips <= 2, "{round_trips}");
        assert_eq!(tuner.on_sample(u64::MAX / 2, RTT, RTT), None, "capped");
    }

    #[test]
    fn follows_the_rate_times_the_round_trip() {
        let mut tuner = WindowTuner::new();
        // 50 Mbit/s over 100 ms: 625 kB per round trip → the floor.
        assert_eq!(tuner.on_sample(625_000, RTT, RTT), None);
        // 400 Mbit/s over 100 ms, sampled over half a round trip: 5 MB per round trip.
        assert_eq!(tuner.on_sample(2_500_000, RTT / 2, RTT), Some(20_000_000));
    }

    #[test]
    fn shrinks_only_after_a_lull_of_the_whole_history() {
        let mut tuner = WindowTuner::new();
        assert_eq!(tuner.on_sample(6 * MIB, RTT, RTT), Some(24 * MIB));
        for sample in 1..HISTORY {
            assert_eq!(tuner.on_sample(0, RTT, RTT), None, "sample {sample}");
        }
        assert_eq!(tuner.on_sample(0, RTT, RTT), Some(MIN_CONNECTION_WINDOW.into()));
    }

    #[test]
    fn ignores_empty_intervals_and_small_shrinks() {
        let mut tuner = WindowTuner::new();
        assert_eq!(tuner.on_sample(MIB, Duration::ZERO, RTT), None);
        assert_eq!(tuner.on_sample(4 * MIB, RTT, RTT), Some(16 * MIB));
        for _ in 0..HISTORY {
            tuner.on_sample(3_900_000, RTT, RTT);
        }
        assert_eq!(tuner.window(), 16 * MIB, "a shrink of less than an eighth is not sent");
    }

    #[test]
    fn the_tick_is_one_round_trip_within_bounds() {
        assert_eq!(WindowTuner::tick(Duration::from_micros(30)), MIN_TICK);
        assert_eq!(WindowTuner::tick(RTT), RTT);
        assert_eq!(WindowTuner::tick(Duration::from_secs(3)), MAX_TICK);
    }
}
