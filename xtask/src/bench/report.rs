//! The bench's report: the markdown table of medians and ratios, the cost of keeping
//! client addresses, the SVG chart of the ratios, and the machine line of the docs copy.

use std::process::Command;

use super::figures::{applies, Better, Figure, Results, NO_REPLIES};
use super::rig::{Col, PEERS};
use super::Settings;

fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

fn get(res: &Results, key: &str, c: Col) -> Option<f64> {
    res.values
        .get(&(key.to_string(), c))
        .map(|v| median(v))
        .filter(|x| !x.is_nan())
}

fn fmt(x: Option<f64>) -> String {
    match x {
        None => "—".into(),
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) if v >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.2}"),
    }
}

/// `a / b`, 1 when both are 0 (the same: no loss through either), none when only
/// `b` is.
fn div(a: f64, b: f64) -> Option<f64> {
    match (a == 0.0, b == 0.0) {
        (true, true) => Some(1.0),
        (false, true) => None,
        _ => Some(a / b),
    }
}

/// `a / b` for a figure, when both columns have it.
fn ratio_of(res: &Results, key: &str, a: Col, b: Col) -> Option<f64> {
    div(get(res, key, a)?, get(res, key, b)?)
}

fn ratio(res: &Results, f: &Figure) -> Option<f64> {
    ratio_of(res, &f.key, Col::Ours, Col::Podman)
}

/// The best of the other forwarders on a figure (the highest or the lowest value, as
/// the figure goes), with its value.
fn best_peer(res: &Results, f: &Figure) -> Option<(Col, f64)> {
    PEERS
        .iter()
        .filter_map(|&c| get(res, &f.key, c).map(|v| (c, v)))
        .reduce(|a, b| {
            let b_better = match f.better {
                Better::Higher => b.1 > a.1,
                Better::Lower => b.1 < a.1,
            };
            if b_better {
                b
            } else {
                a
            }
        })
}

/// Ours against the best peer: (ratio, the peer).
fn vs_best_peer(res: &Results, f: &Figure) -> Option<(f64, Col)> {
    let (peer, v) = best_peer(res, f)?;
    Some((div(get(res, &f.key, Col::Ours)?, v)?, peer))
}

/// Ours against the limit, the same figure with no forwarder.
fn vs_limit(res: &Results, f: &Figure) -> Option<f64> {
    ratio_of(res, &f.key, Col::Ours, Col::Direct)
}

fn short(c: Col) -> &'static str {
    match c {
        Col::Direct => "direct",
        Col::Podman => "podman",
        Col::Pasta => "pasta",
        Col::Slirp => "slirp4netns",
        Col::Ours => "ours",
        Col::Baseline => "ours (baseline)",
    }
}

fn times(r: Option<f64>) -> String {
    r.map(|r| format!("{r:.2}x")).unwrap_or_else(|| "—".into())
}

/// The figures a column should have and has not: `label (column)` each.
pub(super) fn missing(figures: &[Figure], res: &Results, present: &[Col]) -> Vec<String> {
    let mut out = Vec::new();
    for f in figures {
        for &c in present.iter().filter(|c| applies(&f.key, **c)) {
            let noted = res.notes.contains_key(&(f.key.clone(), c));
            if get(res, &f.key, c).is_none() && !noted {
                out.push(format!("{} ({})", f.label, short(c)));
            }
        }
    }
    out
}

fn verdict(f: &Figure, r: Option<f64>) -> &'static str {
    match (f.target, r) {
        (Some(t), Some(r)) => match f.better {
            Better::Higher if r >= t => "met",
            Better::Lower if r <= t => "met",
            _ => "NOT met",
        },
        _ => "",
    }
}

pub(super) fn render_source_cost(res: &Results) -> String {
    let cell = |k: &str| get(res, k, Col::Ours);
    let mut out = String::from(
        "\nCost of keeping client addresses (our helper, client on a veth pair, container address 10.0.3.100):\n\n| figure | unit | kept | not kept | kept / not kept |\n|---|---|---:|---:|---:|\n",
    );
    for (key, label, unit) in [
        ("veth_tcp", "TCP throughput, host to container", "Gbit/s"),
        ("veth_conn", "short connections, 2 clients", "conn/s"),
        (
            "veth_udpflow",
            "new UDP flows (fresh source port, 1 query each), 1 client",
            "flows/s",
        ),
    ] {
        let (k, p) = (cell(&format!("{key}_kept")), cell(&format!("{key}_plain")));
        let r = match (k, p) {
            (Some(k), Some(p)) if p > 0.0 => format!("{:.2}x", k / p),
            _ => "—".into(),
        };
        out.push_str(&format!(
            "| {label} | {unit} | {} | {} | {r} |\n",
            fmt(k),
            fmt(p)
        ));
    }
    out
}

/// The main table: a column per forwarder (`present`, the baseline only when given),
/// then ours against the limit, the best peer, podman's helper (with the target) and
/// the baseline.
pub(super) fn render(s: &Settings, figures: &[Figure], res: &Results, present: &[Col]) -> String {
    let podman = present.contains(&Col::Podman);
    let baseline = present.contains(&Col::Baseline);
    let mut cols = vec![Col::Direct, Col::Podman, Col::Pasta, Col::Slirp, Col::Ours];
    if baseline {
        cols.push(Col::Baseline);
    }
    let mut out = String::new();
    out.push_str(&format!(
        "Median of {} round(s){}. Ratios are ours / another column of the same run: the limit is the same figure with no forwarder (the client inside the container netns; for the time to ready with N published ports, a process that only makes the N listeners, see below), the best peer the best of podman's helper, pasta and slirp4netns on that figure. The target column judges ours/podman (an earlier issue's targets); issue 15's targets, against the limit and the best peer, and what bounds each are under \"What bounds each target\" in docs/benchmarks.md (kept in docs/performance-analysis.md).{}\n\n",
        s.rounds,
        if s.quick {
            " (quick mode: short runs, not for conclusions)"
        } else {
            ""
        },
        if podman {
            ""
        } else {
            " podman's helper: not installed."
        }
    ));
    let mut head = vec!["figure", "unit"];
    head.extend(cols.iter().map(|&c| {
        if c == Col::Direct {
            "direct (limit)"
        } else {
            short(c)
        }
    }));
    head.extend(["ours/limit", "ours/best peer", "ours/podman", "target", ""]);
    if baseline {
        head.push("ours/baseline");
    }
    out.push_str(&format!("| {} |\n", head.join(" | ")));
    let align: Vec<&str> = head
        .iter()
        .enumerate()
        .map(|(i, h)| if i < 2 || h.is_empty() { "---" } else { "---:" })
        .collect();
    out.push_str(&format!("|{}|\n", align.join("|")));
    for f in figures {
        let r = ratio(res, f);
        let target = match (f.target, f.better) {
            (Some(t), Better::Higher) => format!(">= {t}"),
            (Some(t), Better::Lower) => format!("<= {t}"),
            _ => String::new(),
        };
        let mut row = vec![f.label.clone(), f.unit.to_string()];
        row.extend(cols.iter().map(|&c| {
            if c == Col::Podman && !podman {
                "not installed".into()
            } else if let Some(note) = res.notes.get(&(f.key.clone(), c)) {
                note.to_string()
            } else {
                fmt(get(res, &f.key, c))
            }
        }));
        row.push(times(vs_limit(res, f)));
        row.push(match vs_best_peer(res, f) {
            Some((r, peer)) => format!("{r:.2}x ({})", short(peer)),
            None => "—".into(),
        });
        row.push(times(r));
        row.push(target);
        row.push(verdict(f, r).into());
        if baseline {
            row.push(times(ratio_of(res, &f.key, Col::Ours, Col::Baseline)));
        }
        out.push_str(&format!("| {} |\n", row.join(" | ")));
    }
    for key in ["tcp_up", "tcp_down"] {
        if let (Some(o), Some(d)) = (get(res, key, Col::Ours), get(res, key, Col::Direct)) {
            out.push_str(&format!(
                "\nOur {key} is {:.0}% of direct loopback.",
                100.0 * o / d
            ));
        }
    }
    out.push_str("\n\nslirp4netns runs with host loopback allowed (with it disabled it drops UDP replies to loopback clients); its RSS is that of slirp4netns itself. ");
    out.push_str("pasta runs as podman 5 runs it (`--config-net`, `-t`/`-u` per mapping, `--dns-forward 169.254.0.1`, `-T none -U none --no-map-gw --quiet --netns PATH`; here also `--runas 0:0`), into a netns of its own with the same servers, as `--config-net` gives that netns pasta's interface, addresses and routes; its published-ports time to exit is from the removal of the netns, which pasta notices by polling. ");
    if res.notes.values().any(|n| *n == NO_REPLIES) {
        out.push_str("\"no replies\": not one UDP reply came back through that forwarder. pasta from Debian's passt 0.0~git20230309 does this here: the echo server receives the datagrams and answers, the answers never reach the client, both over loopback (spliced) and over pasta's tap. ");
    }
    out.push_str("Forwarder CPU is user + system time of all its processes (podman's helper and its child) while the figure ran, from `/proc/PID/stat`, in 10 ms ticks. ");
    out.push_str("Time to ready runs from the forwarder's spawn, its config or arguments made before, to its ready signal (the helpers' ready byte; pasta's first process exiting); its limit is `listen-floor` (xtask's second binary, built as the helper is): a process that reads the same config without decoding it, makes the same N listening TCP sockets (dual-stack, `SO_REUSEADDR`, each in an epoll set, with as many threads as our helper) and does nothing else, started and timed as our helper is. Every published-ports start, in every column, comes right after an untimed start of the same forwarder with the same ports.\n");
    out
}

/// A figure of the chart: ours vs the limit, ours vs the best peer (and which).
type ChartRow<'a> = (&'a Figure, Option<f64>, Option<(f64, Col)>);

/// Two bars per figure: how many times better ours is than the limit (no forwarder)
/// and than the best peer (the ratio for higher-is-better figures, 1/ratio otherwise),
/// on a log scale; a figure the limit does not have gets the second bar only.
pub(super) fn svg(figures: &[Figure], res: &Results) -> String {
    let good = |f: &Figure, r: f64| match f.better {
        Better::Higher => r,
        Better::Lower => 1.0 / r,
    };
    let rows: Vec<ChartRow> = figures
        .iter()
        .filter_map(|f| {
            let limit = vs_limit(res, f).map(|r| good(f, r));
            let peer = vs_best_peer(res, f).map(|(r, c)| (good(f, r), c));
            (limit.is_some() || peer.is_some()).then_some((f, limit, peer))
        })
        .collect();
    let (w, left, row_h, bar_h) = (980.0, 380.0, 34.0, 12.0);
    let h = 80.0 + row_h * rows.len() as f64;
    // log2 scale from 1/16x to 16x.
    let x = |v: f64| left + (v.clamp(1.0 / 16.0, 16.0).log2() + 4.0) / 8.0 * (w - left - 150.0);
    let (limit_color, peer_good, peer_bad) = ("#8d99ae", "#2a9d8f", "#e76f51");
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n");
    s.push_str("<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n");
    s.push_str("<text x=\"10\" y=\"20\" font-size=\"14\">our rootlessport: times better than the limit and than the best peer (log scale; right of 1x is better)</text>\n");
    s.push_str(&format!("<rect x=\"10\" y=\"30\" width=\"12\" height=\"12\" fill=\"{limit_color}\"/><text x=\"28\" y=\"40\">vs the limit (no forwarder)</text>\n"));
    s.push_str(&format!("<rect x=\"220\" y=\"30\" width=\"12\" height=\"12\" fill=\"{peer_good}\"/><rect x=\"234\" y=\"30\" width=\"12\" height=\"12\" fill=\"{peer_bad}\"/><text x=\"252\" y=\"40\">vs the best of podman's helper, pasta, slirp4netns (named)</text>\n"));
    for v in [1.0 / 16.0, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0] {
        let xv = x(v);
        s.push_str(&format!(
            "<line x1=\"{xv:.1}\" y1=\"55\" x2=\"{xv:.1}\" y2=\"{:.1}\" stroke=\"{}\"/>\n",
            h - 15.0,
            if v == 1.0 { "black" } else { "#ddd" }
        ));
        let label = if v < 1.0 {
            format!("1/{}", 1.0 / v)
        } else {
            format!("{v}")
        };
        s.push_str(&format!(
            "<text x=\"{xv:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#555\">{label}x</text>\n",
            h - 2.0
        ));
    }
    for (i, (f, limit, peer)) in rows.iter().enumerate() {
        let y = 62.0 + row_h * i as f64;
        s.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
            left - 8.0,
            y + bar_h + 3.0,
            xml(&f.label)
        ));
        let bars = [
            limit.map(|v| (v, limit_color, String::from("limit"))),
            peer.map(|(v, c)| {
                (
                    v,
                    if v >= 1.0 { peer_good } else { peer_bad },
                    short(c).to_string(),
                )
            }),
        ];
        for (j, bar) in bars.iter().enumerate() {
            let Some((v, color, name)) = bar else {
                continue;
            };
            let yb = y + j as f64 * (bar_h + 1.0);
            let (x0, x1) = (x(1.0), x(*v));
            s.push_str(&format!(
                "<rect x=\"{:.1}\" y=\"{yb:.1}\" width=\"{:.1}\" height=\"{bar_h:.1}\" fill=\"{color}\"/>\n",
                x0.min(x1),
                (x1 - x0).abs().max(1.0),
            ));
            s.push_str(&format!(
                "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\">{v:.2}x {}</text>\n",
                x0.max(x1) + 4.0,
                yb + bar_h - 2.0,
                xml(name)
            ));
        }
    }
    s.push_str("</svg>\n");
    s
}

fn xml(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

pub(super) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string())
        })
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb / 1024 / 1024)
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let date = Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    format!(
        "Run on {date}: {cores} cores ({cpu}), {mem} GiB, Linux {}, shared machine; podman 4.3.1's helper from Debian, pasta from Debian's passt, slirp4netns 1.2.0, iperf3 from Debian. Every column runs on the same servers in the same network namespace (pasta: the same servers in a namespace of its own); the client runs on the host side (for the direct column, inside the namespace).",
        kernel.trim()
    )
}

/// Check a report's main table for what the bench's smoke test relies on: the columns
/// of every forwarder (the baseline when `baseline`), and in every row a figure for
/// ours, pasta (or pasta's "no replies" note) and the baseline, and both ratios: against the best peer always,
/// against the limit wherever the limit has the figure. The CPU rows must be there.
///
/// # Errors
///
/// The first thing missing, in one line naming the row and column.
pub(crate) fn check_report(text: &str, baseline: bool) -> Result<(), String> {
    let cells = |line: &str| -> Vec<String> {
        line.trim()
            .trim_matches('|')
            .split('|')
            .map(|c| c.trim().to_string())
            .collect()
    };
    let mut lines = text.lines().skip_while(|l| !l.starts_with("| figure |"));
    let head = cells(
        lines
            .next()
            .ok_or("report: no table (no `| figure |` line)")?,
    );
    let col = |name: &str| {
        head.iter()
            .position(|h| h == name)
            .ok_or_else(|| format!("report: no column {name:?}"))
    };
    let mut need = vec!["ours", "pasta"];
    if baseline {
        need.push("ours (baseline)");
    }
    let need: Vec<(&str, usize)> = need
        .into_iter()
        .map(|n| col(n).map(|i| (n, i)))
        .collect::<Result<_, _>>()?;
    let peers: Vec<usize> = ["podman", "pasta", "slirp4netns"]
        .iter()
        .filter_map(|n| col(n).ok())
        .collect();
    let (direct, limit, peer) = (
        col("direct (limit)")?,
        col("ours/limit")?,
        col("ours/best peer")?,
    );
    let mut rows = 0;
    let mut cpu_rows = 0;
    for line in lines.skip(1).take_while(|l| l.starts_with('|')) {
        let row = cells(line);
        let figure = row.first().cloned().unwrap_or_default();
        let number = |i: usize| row.get(i).and_then(|c| c.parse::<f64>().ok());
        let is_forwarder_figure = figure.starts_with("forwarder CPU") || figure.starts_with("RSS");
        for &(name, i) in &need {
            let noted = name == "pasta" && row.get(i).is_some_and(|c| c == NO_REPLIES);
            if number(i).is_none() && !noted {
                return Err(format!("report: row {figure:?} has no figure for {name}"));
            }
        }
        // A ratio is missing only where its denominator is 0 and ours is not.
        let zero = |i: usize| number(i) == Some(0.0);
        let peer_zero = peers.iter().any(|&i| zero(i));
        if row.get(peer).is_none_or(|c| !c.ends_with(')')) && !peer_zero {
            return Err(format!(
                "report: row {figure:?} has no ours/best peer ratio"
            ));
        }
        if number(direct).is_some()
            && row.get(limit).is_none_or(|c| !c.ends_with('x'))
            && !zero(direct)
        {
            return Err(format!("report: row {figure:?} has no ours/limit ratio"));
        }
        if is_forwarder_figure && number(direct).is_some() {
            return Err(format!(
                "report: row {figure:?} has a figure for no forwarder"
            ));
        }
        rows += 1;
        cpu_rows += usize::from(figure.starts_with("forwarder CPU"));
    }
    if cpu_rows != 3 {
        return Err(format!("report: {cpu_rows} forwarder CPU rows, expected 3"));
    }
    if rows < 10 {
        return Err(format!("report: only {rows} rows"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::figures::list;
    use crate::bench::rig::COLS;

    fn settings() -> Settings {
        Settings {
            quick: true,
            rounds: 1,
            iperf_secs: 1,
            conns: 1,
            pings: 1,
            udp_rate: 1,
            udp_secs: 1,
            hold: 1,
            port_counts: vec![1],
        }
    }

    /// Every figure a column should have, each column's value distinct.
    fn full(figures: &[Figure]) -> Results {
        let mut res = Results::default();
        for f in figures {
            for (i, &c) in COLS.iter().enumerate() {
                if applies(&f.key, c) {
                    res.put(&f.key, c, 1.0 + i as f64);
                }
            }
        }
        res
    }

    #[test]
    fn a_full_run_renders_a_complete_table() {
        let s = settings();
        let figures = list(&s);
        let res = full(&figures);
        assert!(missing(&figures, &res, &COLS).is_empty());
        let text = render(&s, &figures, &res, &COLS);
        check_report(&text, true).unwrap();
        // The row of the figure whose label starts with `label`, checked to hold `cells`.
        let has = |label: &str, cells: &str| {
            let row = text.lines().find(|l| l.starts_with(label)).unwrap();
            assert!(row.contains(cells), "{row}");
            row
        };
        // Lower is better for the CPU rows: the best peer is podman's helper (2.0),
        // the limit has no figure.
        has(
            "| forwarder CPU per 1000",
            "| — | 2.00 | 3.00 | 4.00 | 5.00 | 6.00 | — | 2.50x (podman) |",
        );
        // Higher is better for throughput: the best peer is slirp4netns (4.0).
        let row = has(
            "| TCP throughput, host",
            "| 5.00x | 1.25x (slirp4netns) | 2.50x |",
        );
        assert!(row.ends_with("| 0.83x |"), "{row}");
        // Starting with published ports: the time to ready has a limit (the listeners
        // alone), the RSS has none; slirp4netns has neither (its ports come later).
        has(
            "| 1 published port: time to ready",
            "| 1.00 | 2.00 | 3.00 | — | 5.00 | 6.00 | 5.00x | 2.50x (podman) |",
        );
        has(
            "| 1 published port: RSS",
            "| — | 2.00 | 3.00 | — | 5.00 | 6.00 | — |",
        );
        assert!(svg(&figures, &res).contains("1.25x slirp4netns"));
        // No loss anywhere: ours is the same as the others, not undefined.
        let mut res = full(&figures);
        for c in COLS {
            res.values.insert(("udp_loss".to_string(), c), vec![0.0]);
        }
        let text = render(&s, &figures, &res, &COLS);
        let row = text.lines().find(|l| l.starts_with("| UDP loss")).unwrap();
        assert!(row.contains("| 1.00x | 1.00x (podman) | 1.00x |"), "{row}");
        check_report(&text, true).unwrap();
    }

    /// pasta's UDP cells may say it gave no replies; ours may not.
    #[test]
    fn no_replies_is_said_in_the_cell() {
        let s = settings();
        let figures = list(&s);
        let mut res = full(&figures);
        for c in [Col::Pasta, Col::Ours] {
            res.values.remove(&("udp_pps".to_string(), c));
            res.notes.insert(("udp_pps".to_string(), c), NO_REPLIES);
        }
        assert!(missing(&figures, &res, &COLS).is_empty());
        let text = render(&s, &figures, &res, &COLS);
        assert!(text.contains("\"no replies\": not one UDP reply"));
        assert_eq!(
            check_report(&text, true).unwrap_err(),
            "report: row \"UDP echo replies at 1/s offered\" has no figure for ours"
        );
        res.notes.remove(&("udp_pps".to_string(), Col::Ours));
        res.put("udp_pps", Col::Ours, 5.0);
        let text = render(&s, &figures, &res, &COLS);
        check_report(&text, true).unwrap();
    }

    #[test]
    fn a_missing_figure_is_named() {
        let s = settings();
        let figures = list(&s);
        let mut res = full(&figures);
        res.values.remove(&("cpu_up".to_string(), Col::Pasta));
        assert_eq!(
            missing(&figures, &res, &COLS),
            ["forwarder CPU per GB, host to container (over the iperf3 run) (pasta)"]
        );
        let text = render(&s, &figures, &res, &COLS);
        assert_eq!(
            check_report(&text, true).unwrap_err(),
            "report: row \"forwarder CPU per GB, host to container (over the iperf3 run)\" has no figure for pasta"
        );
        // Without the baseline column, asking for it fails; not asking passes.
        let present: Vec<Col> = COLS.into_iter().filter(|c| *c != Col::Baseline).collect();
        let res = full(&figures);
        let text = render(&s, &figures, &res, &present);
        assert_eq!(
            check_report(&text, true).unwrap_err(),
            "report: no column \"ours (baseline)\""
        );
        check_report(&text, false).unwrap();
        assert_eq!(
            check_report("nothing", false).unwrap_err(),
            "report: no table (no `| figure |` line)"
        );
    }
}
