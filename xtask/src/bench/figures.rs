//! What the bench measures: every figure with its unit, which way is better and the
//! target ratio against podman's helper, and the rounds that measure them, each figure
//! on every column in turn.

use std::collections::BTreeMap;

use super::measure::{
    iperf, iperf_at, latencies, num, pasta_ports_figures, percentile, ports_figures, rss_mb,
    rss_with_conns, short_conns, short_conns_at, udp_flows_at, with_cpu,
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

/// What the rounds measured.
#[derive(Default)]
pub(super) struct Results {
    /// Every measured value of a figure (its key) on a column, one per round.
    pub values: BTreeMap<(String, Col), Vec<f64>>,
    /// Why a column has no value for a figure it should have, shown in its cell.
    pub notes: BTreeMap<(String, Col), &'static str>,
}

/// The cell of a forwarder through which not one UDP reply came back.
pub(super) const NO_REPLIES: &str = "no replies";

impl Results {
    pub(super) fn put(&mut self, key: &str, c: Col, v: f64) {
        self.values.entry((key.to_string(), c)).or_default().push(v);
    }
}

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
        "cpu_up",
        "forwarder CPU per GB, host to container (over the iperf3 run)".into(),
        "CPU ms/GB",
        Better::Lower,
        None,
    );
    fig(
        "cpu_down",
        "forwarder CPU per GB, container to host (over iperf3 -R)".into(),
        "CPU ms/GB",
        Better::Lower,
        None,
    );
    fig(
        "cpu_conn",
        "forwarder CPU per 1000 short connections".into(),
        "CPU ms",
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
        let ports = if n == 1 { "port" } else { "ports" };
        fig(
            &format!("ports{n}_ready"),
            format!("{n} published {ports}: time to ready"),
            "ms",
            Better::Lower,
            big.then_some(0.33),
        );
        fig(
            &format!("ports{n}_rss"),
            format!("{n} published {ports}: RSS"),
            "MB",
            Better::Lower,
            big.then_some(0.25),
        );
        fig(
            &format!("ports{n}_exit"),
            format!("{n} published {ports}: time to exit"),
            "ms",
            Better::Lower,
            big.then_some(0.5),
        );
    }
    figures
}

/// Whether the published-ports figures are measured for column `c`: every forwarder
/// that is started with its ports (not slirp4netns, whose ports are added one by one
/// through its API socket, nor the column without a forwarder).
pub(super) fn has_ports_figures(c: Col) -> bool {
    !matches!(c, Col::Direct | Col::Slirp)
}

/// Whether figure `key` exists for column `c` (a figure of a forwarder's process or of
/// starting one has no value without a forwarder). The exception: the time to ready
/// with N published ports has a limit, the time to make those N listeners and nothing
/// else (`listen-floor`, see [`Rig::floor_bin`]).
pub(super) fn applies(key: &str, c: Col) -> bool {
    let of_forwarder = key.starts_with("cpu_") || key.starts_with("rss_");
    let of_start = key.starts_with("ports");
    let limit_of_ready = c == Col::Direct && of_start && key.ends_with("_ready");
    limit_of_ready || !(of_forwarder && c == Col::Direct || of_start && !has_ports_figures(c))
}

/// Measure every figure on every column `s.rounds` times, interleaved, and the cost of
/// keeping client addresses on the veth pair.
pub(super) fn measure(rig: &Rig, s: &Settings) -> Result<Results, String> {
    let mut res = Results::default();
    let has = |c: Col| rig.has(c);
    for round in 1..=s.rounds {
        eprintln!("xtask bench: round {round} of {}", s.rounds);
        for (key, cpu_key, reverse) in [("tcp_up", "cpu_up", false), ("tcp_down", "cpu_down", true)]
        {
            for c in COLS.iter().copied().filter(|c| has(*c)) {
                let (t, cpu) = with_cpu(rig, c, || iperf(rig, c, reverse, s.iperf_secs))?;
                res.put(key, c, t.gbit_s);
                if let Some(cpu) = cpu {
                    res.put(cpu_key, c, 1000.0 * cpu / (t.bytes / 1e9));
                }
            }
        }
        for c in COLS.iter().copied().filter(|c| has(*c)) {
            let (conns, cpu) = with_cpu(rig, c, || short_conns(rig, c, s.conns))?;
            res.put("conn_rate", c, conns.rate);
            res.put("conn_p50", c, conns.p50);
            res.put("conn_p99", c, conns.p99);
            if let Some(cpu) = cpu {
                res.put("cpu_conn", c, 1000.0 * cpu / (conns.done as f64 / 1000.0));
            }
        }
        for c in COLS.iter().copied().filter(|c| has(*c)) {
            let line = client(rig, c, &["pingpong", &addr(c, false), &s.pings.to_string()])?;
            let lat = latencies(&line);
            res.put("pp_p50", c, percentile(&lat, 0.5));
            res.put("pp_p99", c, percentile(&lat, 0.99));
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
            if c == Col::Pasta && got == 0.0 && sent > 0.0 {
                // Not a rate: pasta does not answer at all here (see the report's note);
                // for any other forwarder that is a figure, and a bad one.
                for key in ["udp_pps", "udp_loss"] {
                    res.notes.insert((key.to_string(), c), NO_REPLIES);
                }
                continue;
            }
            res.put("udp_pps", c, got / s.udp_secs as f64);
            res.put(
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
            res.put("rss_idle", c, rss_mb(forwarder_pid(rig, c).unwrap_or(0)));
            res.put("rss_conns", c, rss_with_conns(rig, c, s.hold)?);
        }
        for &n in &s.port_counts {
            for c in COLS
                .iter()
                .copied()
                .filter(|c| has(*c) && (has_ports_figures(*c) || *c == Col::Direct))
            {
                // Each start right after an untimed one of the same forwarder with the
                // same ports, for every column alike: each then starts from the state its
                // own previous run left, not from what the figure before it left (a
                // client's connections torn down, another forwarder's exit, idleness).
                let bin = match c {
                    Col::Direct => Some(rig.floor_bin.as_path()),
                    _ => rig.helper_bin(c),
                };
                let start = || match bin {
                    Some(bin) => ports_figures(rig, bin, n),
                    None => pasta_ports_figures(&rig.pasta_bin, n),
                };
                start()?;
                let (ready, rss, exit) = start()?;
                res.put(&format!("ports{n}_ready"), c, ready);
                // The floor has a time to ready only.
                if c != Col::Direct {
                    res.put(&format!("ports{n}_rss"), c, rss);
                    res.put(&format!("ports{n}_exit"), c, exit);
                }
            }
        }
        // The cost of keeping client addresses: a client on a veth pair, our helper
        // with and without it, interleaved.
        for (tag, ports) in [("kept", VETH_KEPT), ("plain", VETH_PLAIN)] {
            let w = veth_where(rig, ports);
            res.put(
                &format!("veth_tcp_{tag}"),
                Col::Ours,
                iperf_at(&w, false, s.iperf_secs)?.gbit_s,
            );
            res.put(
                &format!("veth_conn_{tag}"),
                Col::Ours,
                short_conns_at(&w, s.conns)?.rate,
            );
            res.put(
                &format!("veth_udpflow_{tag}"),
                Col::Ours,
                udp_flows_at(&w, s.conns)?,
            );
        }
    }
    Ok(res)
}
