//! The report of a fleet run: what it writes as JSON, prints as a table and draws as a chart,
//! and how the reports of several loadtest processes merge into one.
//!
//! Latencies are kept as HDR histograms ([`Latency`]) whose recorded buckets travel in the
//! JSON, so a merged report has exact merged percentiles, not an average of percentiles.
//! Counts over time travel per wall-clock second ([`Second`]), so processes started a moment
//! apart line up.

use crate::chart::{self, LatencyCurve, Mark, Series};
use crate::procfs::{CpuTime, Memory};
use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// Largest value a latency histogram holds (larger ones are clamped to it), µs.
pub const MAX_LATENCY_US: u64 = 600_000_000;

/// A new latency histogram, µs, three significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("constant bounds are valid")
}

/// Record `micros` (clamped into the histogram's range).
pub fn record(histogram: &mut Histogram<u64>, micros: u64) {
    histogram.saturating_record(micros.clamp(1, MAX_LATENCY_US));
}

/// One latency distribution: its percentiles in milliseconds and the buckets to merge.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// `[value_us, count]` of every recorded bucket.
    pub buckets_us: Vec<(u64, u64)>,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Latency {
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1e3;
        Latency {
            count: h.len(),
            p50_ms: ms(0.5),
            p90_ms: ms(0.9),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: h.max() as f64 / 1e3,
            buckets_us: h
                .iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect(),
        }
    }

    pub fn histogram(&self) -> Histogram<u64> {
        let mut h = histogram();
        for &(value, count) in &self.buckets_us {
            let _ = h.record_n(value.clamp(1, MAX_LATENCY_US), count);
        }
        h
    }

    fn merged(parts: &[&Latency]) -> Latency {
        let mut h = histogram();
        for part in parts {
            let _ = h.add(part.histogram());
        }
        Latency::of(&h)
    }

    fn line(&self, name: &str) -> String {
        if self.count == 0 {
            return format!("  {name:<26} —\n");
        }
        format!(
            "  {name:<26} {:>9} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}\n",
            self.count, self.p50_ms, self.p90_ms, self.p99_ms, self.p999_ms, self.max_ms
        )
    }
}

/// Counts of one wall-clock second (each is what happened in that second, except
/// `connected`, the sockets open at its end).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Second {
    pub unix_s: u64,
    pub connected: u64,
    pub connects: u64,
    pub closes: u64,
    pub fixes: u64,
    pub nearby: u64,
    pub published: u64,
    pub delivered: u64,
}

impl Second {
    fn add(&mut self, other: &Second) {
        self.connected += other.connected;
        self.connects += other.connects;
        self.closes += other.closes;
        self.fixes += other.fixes;
        self.nearby += other.nearby;
        self.published += other.published;
        self.delivered += other.delivered;
    }
}

/// Delivery of one kind of notification: expected vs received, loss and duplicates apart.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Delivery {
    /// Publishes the API accepted.
    pub published: u64,
    pub publish_errors: u64,
    /// Sockets that should have received them (users: one device each; geo: the clients
    /// inside the area when it was sent; broadcast: the sockets connected at first receipt).
    pub expected: u64,
    /// Distinct (client, notification) pairs received.
    pub delivered: u64,
    /// `expected − delivered`, when positive.
    pub lost: u64,
    /// Copies received again by the same client.
    pub duplicates: u64,
    /// Publish → socket.
    pub latency: Latency,
}

impl Delivery {
    fn merged(parts: &[&Delivery]) -> Delivery {
        let sum = |f: fn(&Delivery) -> u64| parts.iter().map(|p| f(p)).sum::<u64>();
        let expected = sum(|d| d.expected);
        let delivered = sum(|d| d.delivered);
        Delivery {
            published: sum(|d| d.published),
            publish_errors: sum(|d| d.publish_errors),
            expected,
            delivered,
            lost: expected.saturating_sub(delivered),
            duplicates: sum(|d| d.duplicates),
            latency: Latency::merged(&parts.iter().map(|p| &p.latency).collect::<Vec<_>>()),
        }
    }

    fn is_empty(&self) -> bool {
        self.published == 0 && self.delivered == 0 && self.expected == 0
    }
}

/// How one broadcast reached the sockets of this process.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BroadcastReach {
    pub id: String,
    /// Sockets connected when the first copy arrived.
    pub expected: u64,
    pub reached: u64,
    /// Publish → the last socket reached, ms.
    pub last_ms: f64,
}

/// One gateway process, read from `/proc`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GatewayReport {
    pub pid: u32,
    pub before: Memory,
    /// After every client connected and the settle time passed.
    pub settled: Memory,
    pub end: Memory,
    pub rss_delta_kib: i64,
    /// CPU from the start of the run to its end.
    pub cpu: CpuTime,
    /// `cpu / seconds`.
    pub cores: f64,
}

/// The load client's own cost: a client bottleneck must not pass for a server one.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ClientCost {
    pub processes: u32,
    pub cpu: CpuTime,
    /// Mean cores busy over the run (sum over processes).
    pub cores: f64,
    pub rss_kib: u64,
    /// Of `cpu`: the publisher's thread.
    pub publisher_cpu: CpuTime,
}

/// An event on the time axis (a SIGTERM sent, the publishing phase).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Event {
    pub unix_ms: u64,
    pub label: String,
}

/// Everything a run measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    pub scenario: String,
    pub urls: Vec<String>,
    pub started_unix_ms: u64,
    pub seconds: f64,
    pub clients: u64,
    /// Clients that got a `welcome` at least once.
    pub connected: u64,
    /// Clients that never connected.
    pub failed: u64,
    pub failure_reasons: BTreeMap<String, u64>,
    /// Clients connected at the end of the run.
    pub connected_at_end: u64,
    /// First connect to the last client's first `welcome`, seconds.
    pub connect_seconds: f64,
    pub connect_rate_per_s: f64,
    /// TCP connect → `welcome`, every (re)connect.
    pub welcome: Latency,
    /// Closes the client did not ask for, by reason.
    pub closes: BTreeMap<String, u64>,
    /// Publishes the API or Redis refused, by reason.
    pub publish_error_reasons: BTreeMap<String, u64>,
    pub reconnects: u64,
    /// Close → `welcome` again.
    pub reconnect_gap: Latency,
    /// The drain's SIGTERM → each reconnected client's `welcome` (the spread of reconnects).
    pub reconnect_after_drain: Latency,
    pub fixes_sent: u64,
    /// Fixes the gateways counted (`geopush_fixes_total`, summed over them) during the
    /// measured phase, per second: every client of those gateways, not only this process's.
    pub fixes_accepted_per_s: Option<f64>,
    /// Fixes sent per second during the measured phase.
    pub fixes_per_s: f64,
    pub nearby_received: u64,
    /// A fix → the `nearby` it caused.
    pub fix_to_nearby: Latency,
    pub users: Delivery,
    pub geo: Delivery,
    pub broadcast: Delivery,
    pub broadcasts: Vec<BroadcastReach>,
    /// `error` frames from the gateway, by code.
    pub server_errors: BTreeMap<String, u64>,
    pub gateways: Vec<GatewayReport>,
    /// Gateway RSS growth per connected client (sum over the gateways given), bytes.
    pub gateway_rss_bytes_per_connection: Option<f64>,
    pub client: ClientCost,
    pub series: Vec<Second>,
    pub events: Vec<Event>,
}

impl Report {
    /// Merge the reports of several processes that ran one scenario side by side.
    pub fn merge(parts: &[Report]) -> anyhow::Result<Report> {
        let Some(first) = parts.first() else {
            bail!("nothing to merge");
        };
        if let Some(other) = parts.iter().find(|p| p.scenario != first.scenario) {
            bail!(
                "cannot merge a {:?} report with a {:?} one",
                first.scenario,
                other.scenario
            );
        }
        let sum = |f: fn(&Report) -> u64| parts.iter().map(f).sum::<u64>();
        let latency =
            |f: fn(&Report) -> &Latency| Latency::merged(&parts.iter().map(f).collect::<Vec<_>>());
        let delivery = |f: fn(&Report) -> &Delivery| {
            Delivery::merged(&parts.iter().map(f).collect::<Vec<_>>())
        };
        let counts = |f: fn(&Report) -> &BTreeMap<String, u64>| {
            let mut merged = BTreeMap::new();
            for part in parts {
                for (k, v) in f(part) {
                    *merged.entry(k.clone()).or_default() += v;
                }
            }
            merged
        };
        let started = parts.iter().map(|p| p.started_unix_ms).min().unwrap_or(0);
        let ended = parts
            .iter()
            .map(|p| p.started_unix_ms + (p.seconds * 1e3) as u64)
            .max()
            .unwrap_or(started);
        let mut urls: Vec<String> = parts.iter().flat_map(|p| p.urls.clone()).collect();
        urls.sort();
        urls.dedup();

        let mut broadcasts: BTreeMap<String, BroadcastReach> = BTreeMap::new();
        for reach in parts.iter().flat_map(|p| &p.broadcasts) {
            let merged = broadcasts
                .entry(reach.id.clone())
                .or_insert(BroadcastReach {
                    id: reach.id.clone(),
                    ..BroadcastReach::default()
                });
            merged.expected += reach.expected;
            merged.reached += reach.reached;
            merged.last_ms = merged.last_ms.max(reach.last_ms);
        }
        let mut broadcast = delivery(|p| &p.broadcast);
        broadcast.expected = broadcasts.values().map(|b| b.expected).sum();
        broadcast.lost = broadcast.expected.saturating_sub(broadcast.delivered);

        let mut seconds: BTreeMap<u64, Second> = BTreeMap::new();
        for second in parts.iter().flat_map(|p| &p.series) {
            seconds
                .entry(second.unix_s)
                .or_insert(Second {
                    unix_s: second.unix_s,
                    ..Second::default()
                })
                .add(second);
        }
        // The same gateway sampled by several processes counts once.
        let mut gateways: BTreeMap<u32, GatewayReport> = BTreeMap::new();
        for gateway in parts.iter().flat_map(|p| &p.gateways) {
            gateways
                .entry(gateway.pid)
                .or_insert_with(|| gateway.clone());
        }
        let gateways: Vec<GatewayReport> = gateways.into_values().collect();
        let connected = sum(|p| p.connected);
        let connect_seconds = parts.iter().map(|p| p.connect_seconds).fold(0.0, f64::max);
        let mut events: Vec<Event> = parts.iter().flat_map(|p| p.events.clone()).collect();
        events.sort_by_key(|e| e.unix_ms);
        events.dedup_by(|a, b| a.label == b.label && a.unix_ms.abs_diff(b.unix_ms) < 1_000);
        let fixes_sent = sum(|p| p.fixes_sent);
        Ok(Report {
            scenario: first.scenario.clone(),
            urls,
            started_unix_ms: started,
            seconds: (ended - started) as f64 / 1e3,
            clients: sum(|p| p.clients),
            connected,
            failed: sum(|p| p.failed),
            failure_reasons: counts(|p| &p.failure_reasons),
            connected_at_end: sum(|p| p.connected_at_end),
            connect_seconds,
            connect_rate_per_s: connected as f64 / connect_seconds.max(1e-9),
            welcome: latency(|p| &p.welcome),
            closes: counts(|p| &p.closes),
            publish_error_reasons: counts(|p| &p.publish_error_reasons),
            reconnects: sum(|p| p.reconnects),
            reconnect_gap: latency(|p| &p.reconnect_gap),
            reconnect_after_drain: latency(|p| &p.reconnect_after_drain),
            fixes_sent,
            fixes_per_s: parts.iter().map(|p| p.fixes_per_s).sum(),
            // Each process saw every client's fixes on the shared gateways: not a sum.
            fixes_accepted_per_s: parts
                .iter()
                .filter_map(|p| p.fixes_accepted_per_s)
                .reduce(f64::max),
            nearby_received: sum(|p| p.nearby_received),
            fix_to_nearby: latency(|p| &p.fix_to_nearby),
            users: delivery(|p| &p.users),
            geo: delivery(|p| &p.geo),
            broadcast,
            broadcasts: broadcasts.into_values().collect(),
            server_errors: counts(|p| &p.server_errors),
            gateway_rss_bytes_per_connection: rss_per_connection(&gateways, connected),
            gateways,
            client: ClientCost {
                processes: parts.iter().map(|p| p.client.processes.max(1)).sum(),
                cpu: parts
                    .iter()
                    .fold(CpuTime::default(), |acc, p| acc.plus(&p.client.cpu)),
                cores: parts.iter().map(|p| p.client.cores).sum(),
                rss_kib: parts.iter().map(|p| p.client.rss_kib).sum(),
                publisher_cpu: parts.iter().fold(CpuTime::default(), |acc, p| {
                    acc.plus(&p.client.publisher_cpu)
                }),
            },
            series: seconds.into_values().collect(),
            events,
        })
    }

    /// Read a JSON report.
    pub fn load(path: &Path) -> anyhow::Result<Report> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a geopush-loadtest report", path.display()))
    }

    /// Write the JSON report and, beside it or where asked, the chart.
    pub fn write(&self, json: Option<&Path>, svg: Option<&Path>) -> anyhow::Result<()> {
        if let Some(path) = json {
            let text = serde_json::to_string_pretty(self).context("serializing the report")?;
            std::fs::write(path, text + "\n")
                .with_context(|| format!("writing {}", path.display()))?;
        }
        if let Some(path) = svg {
            std::fs::write(path, self.chart())
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }

    /// The SVG chart: latency distributions and counts per second, with the events marked.
    pub fn chart(&self) -> String {
        let named = [
            ("welcome", &self.welcome),
            ("fix → nearby", &self.fix_to_nearby),
            ("user publish → socket", &self.users.latency),
            ("geo publish → socket", &self.geo.latency),
            ("broadcast publish → socket", &self.broadcast.latency),
            ("SIGTERM → reconnected", &self.reconnect_after_drain),
        ];
        let histograms: Vec<(&str, Histogram<u64>)> = named
            .iter()
            .filter(|(_, l)| l.count > 0)
            .map(|(name, l)| (*name, l.histogram()))
            .collect();
        let curves: Vec<LatencyCurve<'_>> = histograms
            .iter()
            .map(|(name, h)| LatencyCurve {
                name,
                histogram_us: h,
            })
            .collect();
        let start_s = self.started_unix_ms / 1_000;
        // A second's counts are drawn at its end (the gauge is read then).
        let x = |s: &Second| (s.unix_s + 1).saturating_sub(start_s) as f64;
        let line = |name: &str, unit: &str, f: fn(&Second) -> u64| Series {
            name: name.into(),
            unit: unit.into(),
            points: self.series.iter().map(|s| (x(s), f(s) as f64)).collect(),
        };
        let candidates = [
            line("fixes/s", "per second", |s| s.fixes),
            line("nearby/s", "per second", |s| s.nearby),
            line("published/s", "per second", |s| s.published),
            line("delivered/s", "per second", |s| s.delivered),
            line("connects/s", "per second", |s| s.connects),
            line("closes/s", "per second", |s| s.closes),
            line("connected", "sockets", |s| s.connected),
        ];
        let series: Vec<Series> = candidates
            .into_iter()
            .filter(|s| s.points.iter().any(|&(_, y)| y > 0.0))
            .collect();
        let marks: Vec<Mark> = self
            .events
            .iter()
            .map(|e| Mark {
                at_s: (e.unix_ms as f64 - (start_s * 1_000) as f64) / 1e3,
                label: e.label.clone(),
            })
            .collect();
        chart::report_svg(
            &format!(
                "geopush-loadtest {} — {} clients",
                self.scenario, self.clients
            ),
            &curves,
            &series,
            &marks,
        )
    }

    /// The human table printed at the end.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "geopush-loadtest {}: {} clients against {}",
            self.scenario,
            self.clients,
            self.urls.join(", ")
        );
        let _ = writeln!(
            out,
            "  connected     {} of {} ({} failed) in {:.1} s, {:.0}/s; {} at the end",
            self.connected,
            self.clients,
            self.failed,
            self.connect_seconds,
            self.connect_rate_per_s,
            self.connected_at_end
        );
        for (reason, n) in &self.failure_reasons {
            let _ = writeln!(out, "    failed: {n} × {reason}");
        }
        if self.reconnects > 0 || !self.closes.is_empty() {
            let _ = writeln!(out, "  reconnects    {}", self.reconnects);
        }
        for (reason, n) in &self.closes {
            let _ = writeln!(out, "    closed: {n} × {reason}");
        }
        if self.fixes_sent > 0 {
            let _ = writeln!(
                out,
                "  fixes         {} sent, {:.0}/s; {} nearby received",
                self.fixes_sent, self.fixes_per_s, self.nearby_received
            );
            if let Some(accepted) = self.fixes_accepted_per_s {
                let _ = writeln!(
                    out,
                    "                the gateways counted {accepted:.0} fixes/s (all their clients)"
                );
            }
        }
        for (name, d) in [
            ("user", &self.users),
            ("geo", &self.geo),
            ("broadcast", &self.broadcast),
        ] {
            if d.is_empty() {
                continue;
            }
            let _ = writeln!(
                out,
                "  {name:<13} {} published ({} errors); expected {}, delivered {}, lost {}, \
                 duplicates {}",
                d.published, d.publish_errors, d.expected, d.delivered, d.lost, d.duplicates
            );
        }
        if !self.broadcasts.is_empty() {
            let mut last: Vec<f64> = self.broadcasts.iter().map(|b| b.last_ms).collect();
            last.sort_by(f64::total_cmp);
            let reached: u64 = self.broadcasts.iter().map(|b| b.reached).sum();
            let _ = writeln!(
                out,
                "  broadcasts    {} reaching {} sockets; last socket after {:.1} ms median, \
                 {:.1} ms worst",
                self.broadcasts.len(),
                reached,
                last[last.len() / 2],
                last[last.len() - 1]
            );
        }
        let _ = writeln!(
            out,
            "  latency, ms                    count       p50       p90       p99     p99.9       max"
        );
        out += &self.welcome.line("TCP → welcome");
        for (name, l) in [
            ("fix → nearby", &self.fix_to_nearby),
            ("user publish → socket", &self.users.latency),
            ("geo publish → socket", &self.geo.latency),
            ("broadcast publish → socket", &self.broadcast.latency),
            ("close → welcome again", &self.reconnect_gap),
            ("SIGTERM → reconnected", &self.reconnect_after_drain),
        ] {
            if l.count > 0 {
                out += &l.line(name);
            }
        }
        for g in &self.gateways {
            let _ = writeln!(
                out,
                "  gateway {:<6} RSS {} → {} KiB settled ({:+} KiB), {} KiB at the end; \
                 {:.2} cores",
                g.pid,
                g.before.vm_rss_kib,
                g.settled.vm_rss_kib,
                g.rss_delta_kib,
                g.end.vm_rss_kib,
                g.cores
            );
        }
        if let Some(per) = self.gateway_rss_bytes_per_connection {
            let _ = writeln!(out, "  gateway RSS per connection: {per:.0} bytes");
        }
        let _ = writeln!(
            out,
            "  load client   {} process(es), {:.2} cores ({:.1} CPU-s of it publishing), RSS {} KiB",
            self.client.processes.max(1),
            self.client.cores,
            self.client.publisher_cpu.total_s(),
            self.client.rss_kib
        );
        for (reason, n) in &self.publish_error_reasons {
            let _ = writeln!(out, "  publish errors: {n} × {reason}");
        }
        for (code, n) in &self.server_errors {
            let _ = writeln!(out, "  server error frames: {n} × {code}");
        }
        out
    }
}

/// Gateway RSS growth per connection, bytes, when gateways were measured.
pub fn rss_per_connection(gateways: &[GatewayReport], connected: u64) -> Option<f64> {
    if gateways.is_empty() || connected == 0 {
        return None;
    }
    let delta: i64 = gateways.iter().map(|g| g.rss_delta_kib).sum();
    Some(delta as f64 * 1024.0 / connected as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn latency(values_us: &[u64]) -> Latency {
        let mut h = histogram();
        for &v in values_us {
            record(&mut h, v);
        }
        Latency::of(&h)
    }

    #[test]
    fn merged_percentiles_come_from_the_merged_buckets() {
        let a = latency(&(1..=900).map(|i| i * 1_000).collect::<Vec<_>>());
        let b = latency(&(901..=1_000).map(|i| i * 1_000).collect::<Vec<_>>());
        let merged = Latency::merged(&[&a, &b]);
        assert_eq!(merged.count, 1_000);
        assert!((merged.p99_ms - 990.0).abs() < 1.0, "{}", merged.p99_ms);
        assert!((merged.p50_ms - 500.0).abs() < 1.0, "{}", merged.p50_ms);
        // Through JSON and back, nothing changes.
        let again: Latency =
            serde_json::from_str(&serde_json::to_string(&merged).expect("json")).expect("parse");
        assert_eq!(Latency::of(&again.histogram()).p99_ms, merged.p99_ms);
    }

    #[test]
    fn reports_merge_by_second_broadcast_and_gateway() {
        let mut a = Report {
            scenario: "broadcast".into(),
            started_unix_ms: 10_000,
            seconds: 5.0,
            clients: 10,
            connected: 10,
            series: vec![Second {
                unix_s: 11,
                connected: 10,
                delivered: 3,
                ..Second::default()
            }],
            broadcasts: vec![BroadcastReach {
                id: "b1".into(),
                expected: 10,
                reached: 10,
                last_ms: 4.0,
            }],
            ..Report::default()
        };
        a.broadcast.delivered = 10;
        let mut b = a.clone();
        b.started_unix_ms = 10_500;
        b.broadcasts[0].reached = 9;
        b.broadcasts[0].last_ms = 7.5;
        b.broadcast.delivered = 9;
        let merged = Report::merge(&[a.clone(), b]).expect("merge");
        assert_eq!(merged.clients, 20);
        assert_eq!(merged.series.len(), 1);
        assert_eq!(merged.series[0].connected, 20);
        assert_eq!(merged.broadcasts.len(), 1);
        assert_eq!(merged.broadcasts[0].reached, 19);
        assert_eq!(merged.broadcasts[0].last_ms, 7.5);
        assert_eq!((merged.broadcast.expected, merged.broadcast.lost), (20, 1));
        assert_eq!(merged.seconds, 5.5);

        let mut other = a;
        other.scenario = "geo".into();
        assert!(Report::merge(&[merged, other]).is_err());
        assert!(Report::merge(&[]).is_err());
    }

    #[test]
    fn summary_and_chart_of_an_empty_report() {
        let report = Report {
            scenario: "connect".into(),
            ..Report::default()
        };
        assert!(report.summary().contains("connected     0 of 0"));
        assert!(report.chart().contains("<svg"));
    }
}
