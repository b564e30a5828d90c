//! What the bench measures: every figure with its unit, which way is better and the
//! target ratio against podman's helper, and the rounds that measure them, each figure
//! on every column in turn.

use std::collections::BTreeMap;

use super::measure::{
    iperf, iperf_at, latencies, num, percentile, ports_figures, rss_mb, rss_with_conns,
    short_conns, short_conns_at, udp_flows_at,
};
use super::rig::{addr, client, forwarder_pid, veth_where, Col, Rig, COLS, VETH_KEPT, VETH_PLAIN};
use super::Settings;

#[derive(Clone, Copy, PartialEq)]
pub(super) enum Better {
    Higher,
    Lower,
}

pub(super) struct Figure {
    pub key: String,
    pub label: String,
    pub unit: &'static str,
    pub better: Better,
    /// The ratio against podman's helper that issue 6 asks for.
    pub target: Option<f64>,
}

/// Every measured value of a figure (its key) on a column, one per round.
pub(super) type Results = BTreeMap<(String, Col), Vec<f64>>;

/// The figures of the main table, in its order.
pub(super) fn list(s: &Settings) -> Vec<Figure> {
    let mut figures: Vec<Figure> = Vec::new();
    let mut fig =
        |key: &str, label: String, unit: &'static str, better: Better, target: Option<f64>| {
            figures.push(Figure {
                key: key.into(),
                label,
                unit,
                better,
                target,
            });
        };
    fig(
        "tcp_up",
        "TCP throughput, host to container (iperf3, 1 stream)".into(),
        "Gbit/s",
        Better::Higher,
        Some(1.15),
    );
    fig(
        "tcp_down",
        "TCP throughput, container to host (iperf3 -R)".into(),
        "Gbit/s",
        Better::Higher,
        Some(1.15),
    );
    fig(
        "conn_rate",
        "short connections, 2 clients".into(),
        "conn/s",
        Better::Higher,
        Some(2.5),
    );
    fig(
        "conn_p50",
        "connection latency p50".into(),
        "us",
        Better::Lower,
        Some(0.4),
    );
    fig(
        "conn_p99",
        "connection latency p99".into(),
        "us",
        Better::Lower,
        None,
    );
    fig(
        "pp_p50",
        "1-byte ping-pong latency p50".into(),
        "us",
        Better::Lower,
        Some(0.8),
    );
    fig(
        "pp_p99",
        "1-byte ping-pong latency p99".into(),
        "us",
        Better::Lower,
        None,
    );
    fig(
        "udp_pps",
        format!("UDP echo replies at {}/s offered", s.udp_rate),
        "pkt/s",
        Better::Higher,
        None,
    );
    fig(
        "udp_loss",
        format!("UDP loss at {}/s offered", s.udp_rate),
        "%",
        Better::Lower,
        None,
    );
    fig(
        "rss_idle",
        "RSS of the forwarder, idle".into(),
        "MB",
        Better::Lower,
        Some(0.2),
    );
    fig(
        "rss_conns",
        format!("RSS with {} open connections", s.hold),
        "MB",
        Better::Lower,
        None,
    );
    for &n in &s.port_counts {
        let big = n >= 10000;
        fig(
            &format!("ports{n}_ready"),
            format!("{n} published ports: time to ready"),
            "ms",
            Better::Lower,
            big.then_some(0.33),
        );
        fig(
            &format!("ports{n}_rss"),
            format!("{n} published ports: RSS"),
            "MB",
            Better::Lower,
            big.then_some(0.25),
        );
        fig(
            &format!("ports{n}_exit"),
            format!("{n} published ports: time to exit"),
            "ms",
            Better::Lower,
            big.then_some(0.5),
        );
    }
    figures
}

/// Measure every figure on every column `s.rounds` times, interleaved, and the cost of
/// keeping client addresses on the veth pair.
pub(super) fn measure(rig: &Rig, s: &Settings) -> Result<Results, String> {
    let mut res: Results = BTreeMap::new();
    let mut put = |k: &str, c: Col, v: f64| res.entry((k.to_string(), c)).or_default().push(v);
    let has = |c: Col| c != Col::Podman || rig.podman.is_some();
    for round in 1..=s.rounds {
        eprintln!("xtask bench: round {round} of {}", s.rounds);
        for c in COLS.iter().copied().filter(|c| has(*c)) {
            put("tcp_up", c, iperf(rig, c, false, s.iperf_secs)?);
        }
        for c in COLS.iter().copied().filter(|c| has(*c)) {
            put("tcp_down", c, iperf(rig, c, true, s.iperf_secs)?);
        }
        for c in COLS.iter().copied().filter(|c| has(*c)) {
            let (rate, p50, p99) = short_conns(rig, c, s.conns)?;
            put("conn_rate", c, rate);
            put("conn_p50", c, p50);
            put("conn_p99", c, p99);
        }
        for c in COLS.iter().copied().filter(|c| has(*c)) {
            let line = client(rig, c, &["pingpong", &addr(c, false), &s.pings.to_string()])?;
            let lat = latencies(&line);
            put("pp_p50", c, percentile(&lat, 0.5));
            put("pp_p99", c, percentile(&lat, 0.99));
        }
        for c in COLS.iter().copied().filter(|c| has(*c)) {
            let line = client(
                rig,
                c,
                &[
                    "udp",
                    &addr(c, false),
                    &s.udp_rate.to_string(),
                    &s.udp_secs.to_string(),
                ],
            )?;
            let sent: f64 = num(&line, "sent").unwrap_or(0.0);
            let got: f64 = num(&line, "received").unwrap_or(0.0);
            put("udp_pps", c, got / s.udp_secs as f64);
            put(
                "udp_loss",
                c,
                if sent > 0.0 {
                    100.0 * (1.0 - got / sent)
                } else {
                    f64::NAN
                },
            );
        }
        for c in COLS
            .iter()
            .copied()
            .filter(|c| has(*c) && *c != Col::Direct)
        {
            put("rss_idle", c, rss_mb(forwarder_pid(rig, c).unwrap_or(0)));
            put("rss_conns", c, rss_with_conns(rig, c, s.hold)?);
        }
        for &n in &s.port_counts {
            let mut bins = vec![(Col::Ours, rig.ours_bin.clone())];
            if let Some(p) = &rig.podman_bin {
                bins.insert(0, (Col::Podman, p.clone()));
            }
            for (c, bin) in bins {
                let (ready, rss, exit) = ports_figures(rig, &bin, n)?;
                put(&format!("ports{n}_ready"), c, ready);
                put(&format!("ports{n}_rss"), c, rss);
                put(&format!("ports{n}_exit"), c, exit);
            }
        }
        // The cost of keeping client addresses: a client on a veth pair, our helper
        // with and without it, interleaved.
        for (tag, ports) in [("kept", VETH_KEPT), ("plain", VETH_PLAIN)] {
            let w = veth_where(rig, ports);
            put(
                &format!("veth_tcp_{tag}"),
                Col::Ours,
                iperf_at(&w, false, s.iperf_secs)?,
            );
            put(
                &format!("veth_conn_{tag}"),
                Col::Ours,
                short_conns_at(&w, s.conns)?.0,
            );
            put(
                &format!("veth_udpflow_{tag}"),
                Col::Ours,
                udp_flows_at(&w, s.conns)?,
            );
        }
    }
    Ok(res)
}
