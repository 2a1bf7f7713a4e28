//! The congestion controller of peer connections: a delivery-rate model in the manner of
//! BBR (v1), written for how quinn sends.
//!
//! quinn paces every connection at 1.25 × window / smoothed RTT, whatever the controller,
//! so a controller here only chooses the window. This one sizes it from a model of the
//! path: the bottleneck rate (the highest delivery rate measured over the last
//! [`BW_WINDOW_ROUNDS`] round trips) times the propagation delay (the lowest RTT seen in
//! the last [`MIN_RTT_WINDOW`]). Random loss does not move the model, so a lossy long link
//! stays full; a queue does not grow past about one path's worth, since the window is twice
//! the model's bytes in flight.
//!
//! Why not quinn's own `Bbr`: it enters PROBE_RTT on the first ACK that is not
//! application-limited (a min RTT never probed counts as expired), so every connection
//! starts with some 200 ms + 1 RTT at a fraction of its start-up window; and its bandwidth
//! samples are the rate between two consecutive ACKs, which ACK bursts inflate tenfold, so
//! its window never limits and the flow-control window becomes the queue
//! (docs/PERFORMANCE.md, "Long and lossy links").
//!
//! Delivery rate samples follow draft-cheng-iccrg-delivery-rate-estimation: each send
//! records how much had been delivered by then, and an ACK of that packet gives the bytes
//! delivered in between over the longer of the send and ACK intervals (never shorter than
//! the min RTT, which bounds what ACK compression can fake).

use std::any::Any;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{Controller, ControllerFactory, ControllerMetrics};

/// First window: quinn's own BBR default (200 packets of 1200 bytes), paced over the RTT.
pub const DEFAULT_INITIAL_WINDOW: u64 = 200 * 1200;
/// Delivery rate samples count for this many round trips, and at most [`BW_WINDOW_TIME`]:
/// a queue that stretches round trips must not keep a faster path's rate alive for long
/// (the path layer can move a session to a slower path at any time).
pub const BW_WINDOW_ROUNDS: u64 = 10;
pub const BW_WINDOW_TIME: Duration = Duration::from_secs(2);
/// The min RTT is re-measured (PROBE_RTT) when no lower sample came for this long.
pub const MIN_RTT_WINDOW: Duration = Duration::from_secs(10);
/// The RTT a window is sized for at least (see `bdp`).
pub const MIN_WINDOW_RTT: Duration = Duration::from_millis(10);
/// PROBE_RTT holds the window down for at least this long, and at least one round trip.
const PROBE_RTT_TIME: Duration = Duration::from_millis(200);
/// Window during start-up, in model bytes in flight: `2 / ln 2`, the least gain that still
/// doubles the delivery rate each round trip.
const STARTUP_GAIN: f64 = 2.885;
/// Window in steady state: room for delayed and aggregated ACKs, at most one path's worth
/// of queue.
const CRUISE_GAIN: f64 = 2.0;
/// Window during PROBE_RTT: low enough to empty the bottleneck's queue.
const PROBE_RTT_GAIN: f64 = 0.5;
/// Start-up ends when the rate did not grow by a quarter in three round trips in a row.
const FULL_BW_GROWTH: f64 = 1.25;
const FULL_BW_ROUNDS: u8 = 3;
/// Send records kept at most: one per distinct send time (a GSO batch shares one), dropped
/// once acknowledged or passed by a later acknowledgement; at 56 bytes each, under 1 MiB
/// per connection. Past it the oldest go, and their ACKs give no rate sample.
const MAX_SEND_RECORDS: usize = 1 << 14;

/// Builds [`RateController`]s: give it to `TransportConfig::congestion_controller_factory`.
#[derive(Debug, Clone)]
pub struct RateControllerConfig {
    initial_window: u64,
}

impl RateControllerConfig {
    /// The window before anything is measured, in bytes.
    pub fn initial_window(&mut self, bytes: u64) -> &mut Self {
        self.initial_window = bytes;
        self
    }
}

impl Default for RateControllerConfig {
    fn default() -> Self {
        Self { initial_window: DEFAULT_INITIAL_WINDOW }
    }
}

impl ControllerFactory for RateControllerConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(RateController::new(self.initial_window, current_mtu, now))
    }
}

/// What the controller is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Doubling each round trip until the delivery rate stops growing.
    Startup,
    /// Emptying the queue start-up built, down to one path's worth in flight.
    Drain,
    /// Steady state at the measured rate.
    Cruise,
    /// Window held low for a moment to measure the path's RTT without a queue.
    ProbeRtt,
}

/// What one send knew: how much had been delivered when it left.
#[derive(Debug, Clone, Copy)]
struct SendRecord {
    sent: Instant,
    delivered: u64,
    delivered_time: Instant,
    first_sent_time: Instant,
}

/// Highest value over the last [`BW_WINDOW_ROUNDS`] rounds and [`BW_WINDOW_TIME`] (a
/// monotonic queue: each entry is higher than every later one).
#[derive(Debug, Clone, Default)]
struct WindowedMax {
    entries: VecDeque<(u64, Instant, u64)>,
}

impl WindowedMax {
    fn update(&mut self, round: u64, now: Instant, value: u64) {
        while self.entries.back().is_some_and(|&(_, _, v)| v <= value) {
            self.entries.pop_back();
        }
        self.entries.push_back((round, now, value));
        self.expire(round, now);
    }

    fn expire(&mut self, round: u64, now: Instant) {
        let old = |&(r, at, _): &(u64, Instant, u64)| {
            r + BW_WINDOW_ROUNDS <= round || now.saturating_duration_since(at) >= BW_WINDOW_TIME
        };
        while self.entries.front().is_some_and(old) {
            self.entries.pop_front();
        }
    }

    fn get(&self) -> u64 {
        self.entries.front().map_or(0, |&(_, _, v)| v)
    }

    fn reset(&mut self) {
        self.entries.clear();
    }
}

/// The controller: see the module documentation.
#[derive(Debug, Clone)]
pub struct RateController {
    initial_window: u64,
    mtu: u64,
    window: u64,
    phase: Phase,
    /// Bytes acknowledged so far, and when the last of them was.
    delivered: u64,
    delivered_time: Instant,
    /// Send time of the newest packet acknowledged (start of the next sends' intervals).
    first_sent_time: Instant,
    /// Nothing was in flight after the last ACK: the next send starts fresh intervals.
    pipe_empty: bool,
    records: VecDeque<SendRecord>,
    /// This ACK frame's newest acknowledged send, bytes and lowest RTT sample.
    batch_newest: Option<SendRecord>,
    batch_acked: u64,
    batch_rtt: Option<Duration>,
    max_bw: WindowedMax,
    min_rtt: Option<Duration>,
    min_rtt_stamp: Instant,
    /// Lowest RTT sample during the current PROBE_RTT: the min RTT when it ends.
    probe_min_rtt: Option<Duration>,
    round: u64,
    next_round_delivered: u64,
    full_bw: u64,
    full_bw_rounds: u8,
    filled_pipe: bool,
    /// PROBE_RTT ends at this time, once a round trip has also passed.
    probe_rtt_done: Option<Instant>,
    probe_rtt_round_done: bool,
}

impl RateController {
    pub fn new(initial_window: u64, mtu: u16, now: Instant) -> Self {
        let mtu = u64::from(mtu);
        let initial_window = initial_window.max(min_window(mtu));
        Self {
            initial_window,
            mtu,
            window: initial_window,
            phase: Phase::Startup,
            delivered: 0,
            delivered_time: now,
            first_sent_time: now,
            pipe_empty: true,
            records: VecDeque::new(),
            batch_newest: None,
            batch_acked: 0,
            batch_rtt: None,
            max_bw: WindowedMax::default(),
            min_rtt: None,
            min_rtt_stamp: now,
            probe_min_rtt: None,
            round: 0,
            next_round_delivered: 0,
            full_bw: 0,
            full_bw_rounds: 0,
            filled_pipe: false,
            probe_rtt_done: None,
            probe_rtt_round_done: false,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The bottleneck rate the model believes in, bytes per second (0 before a sample).
    pub fn bandwidth(&self) -> u64 {
        self.max_bw.get()
    }

    pub fn min_rtt(&self) -> Option<Duration> {
        self.min_rtt
    }

    /// The model's bytes in flight times `gain`; `None` before both estimates exist.
    fn bdp(&self, gain: f64) -> Option<u64> {
        let (bw, rtt) = (self.max_bw.get(), self.min_rtt?);
        if bw == 0 {
            return None;
        }
        // A short path's window still covers the receiver's ACK delay and a scheduler's
        // time slice: sized for its 0.1 ms alone, a loopback or LAN window stalls the
        // sender whenever the receiving process waits a millisecond.
        let rtt = rtt.max(MIN_WINDOW_RTT);
        Some((bw as f64 * rtt.as_secs_f64() * gain) as u64)
    }

    fn target(&self, gain: f64) -> u64 {
        self.bdp(gain).map_or(self.initial_window, |bdp| bdp.max(min_window(self.mtu)))
    }

    /// A packet left at `now`.
    fn sent(&mut self, now: Instant) {
        if self.pipe_empty {
            // After idle, intervals start now: the idle time was not the path's.
            self.first_sent_time = now;
            self.delivered_time = now;
            self.pipe_empty = false;
        }
        if self.records.back().is_some_and(|r| r.sent == now) {
            return; // Same instant, same delivery state: one record serves both.
        }
        if self.records.len() == MAX_SEND_RECORDS {
            self.records.pop_front();
        }
        self.records.push_back(SendRecord {
            sent: now,
            delivered: self.delivered,
            delivered_time: self.delivered_time,
            first_sent_time: self.first_sent_time,
        });
    }

    /// `bytes` sent at `sent` were acknowledged at `now`.
    fn acked(&mut self, now: Instant, sent: Instant, bytes: u64) {
        self.delivered += bytes;
        self.delivered_time = now;
        self.batch_acked += bytes;
        let sample = now.saturating_duration_since(sent);
        self.batch_rtt = Some(self.batch_rtt.map_or(sample, |r| r.min(sample)));
        let at = self.records.partition_point(|r| r.sent < sent);
        if let Some(record) = self.records.get(at).filter(|r| r.sent == sent) {
            if self.batch_newest.is_none_or(|newest| newest.sent < record.sent) {
                self.batch_newest = Some(*record);
            }
        }
    }

    /// The end of one ACK frame: update the model, then the phase and the window.
    fn end_acks(&mut self, now: Instant, in_flight: u64, app_limited: bool) {
        self.pipe_empty = in_flight == 0;
        if self.batch_acked == 0 {
            return;
        }
        let acked = std::mem::take(&mut self.batch_acked);
        // Only a lower sample replaces the min RTT; a stale one is re-measured by PROBE_RTT,
        // never replaced by a sample taken over a standing queue (which would size the
        // window for the queue, and grow it).
        let min_rtt_expired = now.saturating_duration_since(self.min_rtt_stamp) > MIN_RTT_WINDOW;
        if let Some(rtt) = self.batch_rtt.take() {
            if self.min_rtt.is_none_or(|min| rtt <= min) {
                self.min_rtt = Some(rtt);
                self.min_rtt_stamp = now;
            }
            if self.phase == Phase::ProbeRtt {
                self.probe_min_rtt = Some(self.probe_min_rtt.map_or(rtt, |min| min.min(rtt)));
            }
        }
        let mut round_start = false;
        if let Some(record) = self.batch_newest.take() {
            self.first_sent_time = record.sent;
            while self.records.front().is_some_and(|r| r.sent <= record.sent) {
                self.records.pop_front();
            }
            if record.delivered >= self.next_round_delivered {
                self.next_round_delivered = self.delivered;
                self.round += 1;
                round_start = true;
                self.max_bw.expire(self.round, now);
            }
            let send_elapsed = record.sent.saturating_duration_since(record.first_sent_time);
            let ack_elapsed = now.saturating_duration_since(record.delivered_time);
            let interval = send_elapsed.max(ack_elapsed);
            let long_enough = self.min_rtt.is_some_and(|min| interval >= min);
            if long_enough && !interval.is_zero() {
                let rate = ((self.delivered - record.delivered) as f64 / interval.as_secs_f64()) as u64;
                // An application-limited sample says little about the path, unless it is
                // higher than what we know.
                if !app_limited || rate > self.max_bw.get() {
                    self.max_bw.update(self.round, now, rate);
                }
            }
        }
        if round_start && self.phase == Phase::Startup && !app_limited {
            self.check_full_bandwidth();
        }
        self.update_phase(now, in_flight, round_start, min_rtt_expired);
        self.update_window(acked);
    }

    fn check_full_bandwidth(&mut self) {
        let bw = self.max_bw.get();
        if bw as f64 >= self.full_bw as f64 * FULL_BW_GROWTH {
            self.full_bw = bw;
            self.full_bw_rounds = 0;
            return;
        }
        self.full_bw_rounds += 1;
        if self.full_bw_rounds >= FULL_BW_ROUNDS {
            self.filled_pipe = true;
            self.phase = Phase::Drain;
        }
    }

    fn update_phase(&mut self, now: Instant, in_flight: u64, round_start: bool, min_rtt_expired: bool) {
        if self.phase == Phase::Drain && in_flight <= self.target(1.0) {
            self.phase = Phase::Cruise;
        }
        if min_rtt_expired && self.phase != Phase::ProbeRtt && self.min_rtt.is_some() {
            self.phase = Phase::ProbeRtt;
            self.probe_rtt_done = None;
            self.probe_min_rtt = None;
        }
        if self.phase != Phase::ProbeRtt {
            return;
        }
        match self.probe_rtt_done {
            None if in_flight <= self.target(PROBE_RTT_GAIN) => {
                self.probe_rtt_done = Some(now + PROBE_RTT_TIME);
                self.probe_rtt_round_done = false;
                self.next_round_delivered = self.delivered;
            }
            None => {}
            Some(done) => {
                self.probe_rtt_round_done |= round_start;
                if self.probe_rtt_round_done && now >= done {
                    // The queue was empty for a round trip: the lowest RTT since is the
                    // path's, also when it is longer than before (a new path).
                    self.min_rtt = self.probe_min_rtt.take().or(self.min_rtt);
                    self.min_rtt_stamp = now;
                    self.phase = if self.filled_pipe { Phase::Cruise } else { Phase::Startup };
                }
            }
        }
    }

    fn update_window(&mut self, acked: u64) {
        let gain = match self.phase {
            Phase::Startup => STARTUP_GAIN,
            Phase::Drain | Phase::Cruise | Phase::ProbeRtt => CRUISE_GAIN,
        };
        let target = self.target(gain);
        self.window = if self.filled_pipe {
            // Grow toward the target as ACKs come back; fall to it at once.
            target.min(self.window + acked)
        } else if self.window < target || self.delivered < self.initial_window {
            self.window + acked
        } else {
            self.window
        };
        self.window = self.window.max(min_window(self.mtu));
    }

    /// Every packet in flight was lost for a while: the path is not what the model says
    /// (the path layer may have moved the session), so measure it again from the start.
    fn persistent_congestion(&mut self) {
        self.max_bw.reset();
        self.full_bw = 0;
        self.full_bw_rounds = 0;
        self.filled_pipe = false;
        self.phase = Phase::Startup;
        self.window = min_window(self.mtu);
    }
}

fn min_window(mtu: u64) -> u64 {
    4 * mtu
}

impl Controller for RateController {
    fn on_sent(&mut self, now: Instant, _bytes: u64, _last_packet_number: u64) {
        self.sent(now);
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        _app_limited: bool,
        _rtt: &quinn_proto::RttEstimator,
    ) {
        self.acked(now, sent, bytes);
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        _largest_packet_num_acked: Option<u64>,
    ) {
        self.end_acks(now, in_flight, app_limited);
    }

    fn on_congestion_event(
        &mut self,
        _now: Instant,
        _sent: Instant,
        is_persistent_congestion: bool,
        _lost_bytes: u64,
    ) {
        if is_persistent_congestion {
            self.persistent_congestion();
        }
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.mtu = u64::from(new_mtu);
        self.window = self.window.max(min_window(self.mtu));
    }

    fn window(&self) -> u64 {
        match self.phase {
            Phase::Startup | Phase::Cruise => self.window,
            Phase::Drain => self.window.min(self.target(1.0)),
            Phase::ProbeRtt => self.window.min(self.target(PROBE_RTT_GAIN)),
        }
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut metrics = ControllerMetrics::default();
        metrics.congestion_window = self.window();
        metrics.pacing_rate = Some(self.max_bw.get().saturating_mul(8));
        metrics
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        self.initial_window
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MTU: u64 = 1200;

    /// A bottleneck (its rate in bytes/s given to [`simulate`] over time) with a FIFO of
    /// `buffer` bytes, `rtt` of propagation, random `loss`; the receiver acknowledges every
    /// packet at once. Time moves in 100 µs steps; the sender paces as quinn does (1.25 ×
    /// window / RTT).
    struct Link {
        rtt: Duration,
        buffer: u64,
        loss: f64,
    }

    #[derive(Default)]
    struct Run {
        /// Bytes that reached the receiver, per 100 ms.
        delivered: Vec<u64>,
        /// Largest queue at the bottleneck, per 100 ms, in bytes.
        queue: Vec<u64>,
        phases: Vec<Phase>,
    }

    const STEP: Duration = Duration::from_micros(100);

    /// Runs `controller` over the link for `seconds`; `rate_at` may change the rate.
    fn simulate(link: &Link, seconds: u64, rate_at: impl Fn(Duration) -> f64) -> (Run, RateController) {
        let start = Instant::now();
        let mut cc = RateController::new(DEFAULT_INITIAL_WINDOW, MTU as u16, start);
        let mut run = Run::default();
        let mut queue: VecDeque<Instant> = VecDeque::new(); // send times of queued packets
        let mut arriving: VecDeque<(Instant, Instant)> = VecDeque::new(); // (ack at, sent)
        let mut losses: VecDeque<Instant> = VecDeque::new(); // when the sender learns
        let (mut in_flight, mut tokens, mut credit) = (0u64, 0f64, 0f64);
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut random = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 11) as f64 / (1u64 << 53) as f64
        };
        let (mut slot_bytes, mut slot_queue) = (0u64, 0u64);
        let steps = seconds * 10_000;
        for step in 0..steps {
            let now = start + STEP * step as u32;
            let elapsed = now - start;
            // ACKs that arrive now, as one frame.
            let mut any = false;
            while arriving.front().is_some_and(|&(at, _)| at <= now) {
                let (_, sent) = arriving.pop_front().unwrap();
                cc.acked(now, sent, MTU);
                in_flight -= MTU;
                any = true;
            }
            while losses.front().is_some_and(|&at| at <= now) {
                losses.pop_front();
                in_flight -= MTU;
                cc.on_congestion_event(now, now, false, MTU);
            }
            if any {
                cc.end_acks(now, in_flight, false);
            }
            // The bottleneck forwards what its rate allows this step.
            credit += rate_at(elapsed) * STEP.as_secs_f64();
            while credit >= MTU as f64 {
                let Some(sent) = queue.pop_front() else {
                    credit = credit.min(MTU as f64);
                    break;
                };
                credit -= MTU as f64;
                slot_bytes += MTU;
                arriving.push_back((now + link.rtt, sent));
            }
            // The sender, paced.
            let srtt = cc.min_rtt().unwrap_or(link.rtt).max(Duration::from_millis(1));
            tokens = (tokens + 1.25 * cc.window() as f64 * STEP.as_secs_f64() / srtt.as_secs_f64())
                .min(cc.window() as f64 / 4.0 + MTU as f64);
            while in_flight + MTU <= cc.window() && tokens >= MTU as f64 {
                tokens -= MTU as f64;
                cc.sent(now);
                in_flight += MTU;
                let queued = queue.len() as u64 * MTU;
                if random() < link.loss || queued + MTU > link.buffer {
                    losses.push_back(now + link.rtt + link.rtt / 8);
                } else {
                    queue.push_back(now);
                }
            }
            slot_queue = slot_queue.max(queue.len() as u64 * MTU);
            if (step + 1) % 1000 == 0 {
                run.delivered.push(std::mem::take(&mut slot_bytes));
                run.queue.push(std::mem::take(&mut slot_queue));
                run.phases.push(cc.phase());
            }
        }
        (run, cc)
    }

    /// Share of `rate` delivered over 100 ms slots `from..to`.
    fn share(run: &Run, from: usize, to: usize, rate: f64) -> f64 {
        let bytes: u64 = run.delivered[from..to].iter().sum();
        bytes as f64 / (rate * (to - from) as f64 / 10.0)
    }

    const MBIT: f64 = 1e6 / 8.0;

    #[test]
    fn fills_a_long_fat_link_soon_and_keeps_the_queue_near_one_path() {
        let rate = 100.0 * MBIT;
        let link = Link { rtt: Duration::from_millis(100), buffer: 4 << 20, loss: 0.0 };
        let (run, cc) = simulate(&link, 8, |_| rate);
        let bdp = rate * 0.1;
        assert!(share(&run, 10, 80, rate) > 0.97, "{:?}", run.delivered);
        // Start-up: from 240 kB to the 1.25 MB path in well under a second.
        assert!(share(&run, 5, 10, rate) > 0.9, "{:?}", run.delivered);
        let worst = *run.queue[20..].iter().max().unwrap() as f64;
        assert!(worst < 1.3 * bdp, "queue {worst} bytes for a {bdp}-byte path");
        assert_eq!(cc.phase(), Phase::Cruise);
        let bw = cc.bandwidth() as f64;
        assert!((0.95 * rate..1.1 * rate).contains(&bw), "bandwidth {bw} for {rate}");
    }

    #[test]
    fn random_loss_does_not_empty_the_link() {
        let rate = 100.0 * MBIT;
        let link = Link { rtt: Duration::from_millis(100), buffer: 4 << 20, loss: 0.01 };
        let (run, _) = simulate(&link, 8, |_| rate);
        assert!(share(&run, 10, 80, rate) > 0.9, "{:?}", run.delivered);
    }

    #[test]
    fn a_slower_path_drains_the_queue_within_seconds() {
        // The path layer moves a session from a 100 Mbit/s path to a 10 Mbit/s one.
        let (fast, slow) = (100.0 * MBIT, 10.0 * MBIT);
        let link = Link { rtt: Duration::from_millis(50), buffer: 8 << 20, loss: 0.0 };
        let at = |t: Duration| if t < Duration::from_secs(4) { fast } else { slow };
        let (run, cc) = simulate(&link, 12, at);
        let slow_bdp = slow * 0.05;
        let late = *run.queue[100..].iter().max().unwrap() as f64;
        assert!(late < 2.5 * slow_bdp, "queue {late} bytes for a {slow_bdp}-byte path: {:?}", run.queue);
        assert!(share(&run, 80, 120, slow) > 0.9, "{:?}", run.delivered);
        assert!((cc.bandwidth() as f64) < 1.2 * slow, "bandwidth {}", cc.bandwidth());
    }

    #[test]
    fn probe_rtt_keeps_the_min_rtt_true_under_a_standing_queue() {
        let rate = 50.0 * MBIT;
        let rtt = Duration::from_millis(40);
        let link = Link { rtt, buffer: 4 << 20, loss: 0.0 };
        let (run, cc) = simulate(&link, 25, |_| rate);
        assert!(run.phases.contains(&Phase::ProbeRtt), "{:?}", run.phases);
        let min = cc.min_rtt().unwrap();
        assert!(min < rtt + Duration::from_millis(5), "min rtt {min:?} on a {rtt:?} path");
        // Two PROBE_RTTs of ~0.25 s in 25 s cost a few percent at most.
        assert!(share(&run, 20, 250, rate) > 0.94, "{:?}", run.delivered);
    }

    #[test]
    fn windowed_max_forgets_after_its_window() {
        let now = Instant::now();
        let mut max = WindowedMax::default();
        max.update(1, now, 100);
        max.update(2, now, 50);
        assert_eq!(max.get(), 100);
        max.expire(1 + BW_WINDOW_ROUNDS, now);
        assert_eq!(max.get(), 50);
        max.update(20, now, 10);
        assert_eq!(max.get(), 10);
        // However few rounds passed, a sample older than the time window is gone.
        max.update(21, now + BW_WINDOW_TIME / 2, 5);
        max.expire(22, now + BW_WINDOW_TIME);
        assert_eq!(max.get(), 5);
    }
}
