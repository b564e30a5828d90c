//! The bench's report: the markdown table of medians and ratios, the cost of keeping
//! client addresses, the SVG chart of the ratios, and the machine line of the docs copy.

use std::process::Command;

use super::figures::{Better, Figure, Results};
use super::rig::Col;
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
    res.get(&(key.to_string(), c))
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

fn ratio(res: &Results, f: &Figure) -> Option<f64> {
    let ours = get(res, &f.key, Col::Ours)?;
    let podman = get(res, &f.key, Col::Podman)?;
    if podman == 0.0 {
        return None;
    }
    Some(ours / podman)
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

pub(super) fn render(s: &Settings, figures: &[Figure], res: &Results, podman: bool) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "Median of {} round(s){}; ratio = ours / podman's helper, same run.{}\n\n",
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
    out.push_str(
        "| figure | unit | direct | podman | slirp4netns | ours | ours/podman | target | |\n",
    );
    out.push_str("|---|---|---:|---:|---:|---:|---:|---:|---|\n");
    for f in figures {
        let r = ratio(res, f);
        let target = match (f.target, f.better) {
            (Some(t), Better::Higher) => format!(">= {t}"),
            (Some(t), Better::Lower) => format!("<= {t}"),
            _ => String::new(),
        };
        let podman_cell = if podman {
            fmt(get(res, &f.key, Col::Podman))
        } else {
            "not installed".into()
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            f.label,
            f.unit,
            fmt(get(res, &f.key, Col::Direct)),
            podman_cell,
            fmt(get(res, &f.key, Col::Slirp)),
            fmt(get(res, &f.key, Col::Ours)),
            r.map(|r| format!("{r:.2}x")).unwrap_or_else(|| "—".into()),
            target,
            verdict(f, r),
        ));
    }
    for key in ["tcp_up", "tcp_down"] {
        if let (Some(o), Some(d)) = (get(res, key, Col::Ours), get(res, key, Col::Direct)) {
            out.push_str(&format!(
                "\nOur {key} is {:.0}% of direct loopback.",
                100.0 * o / d
            ));
        }
    }
    out.push_str("\n\nslirp4netns runs with host loopback allowed (with it disabled it drops UDP replies to loopback clients); its RSS is that of slirp4netns itself.\n");
    out
}

/// A bar per figure: how many times better than podman's helper ours is (ratio for
/// higher-is-better figures, 1/ratio otherwise), on a log scale, with the target.
pub(super) fn svg(figures: &[Figure], res: &Results) -> String {
    let rows: Vec<(&Figure, f64, Option<f64>)> = figures
        .iter()
        .filter_map(|f| {
            let r = ratio(res, f)?;
            let (good, target) = match f.better {
                Better::Higher => (r, f.target),
                Better::Lower => (1.0 / r, f.target.map(|t| 1.0 / t)),
            };
            Some((f, good, target))
        })
        .collect();
    let (w, left, row_h) = (900.0, 330.0, 26.0);
    let h = 60.0 + row_h * rows.len() as f64;
    // log2 scale from 1/4x to 16x.
    let x = |v: f64| left + (v.clamp(0.25, 16.0).log2() + 2.0) / 6.0 * (w - left - 70.0);
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n");
    s.push_str("<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n");
    s.push_str("<text x=\"10\" y=\"20\" font-size=\"14\">our rootlessport vs podman's (times better, log scale; | = target)</text>\n");
    for v in [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0] {
        let xv = x(v);
        s.push_str(&format!(
            "<line x1=\"{xv:.1}\" y1=\"35\" x2=\"{xv:.1}\" y2=\"{:.1}\" stroke=\"{}\"/>\n",
            h - 15.0,
            if v == 1.0 { "black" } else { "#ddd" }
        ));
        s.push_str(&format!(
            "<text x=\"{xv:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#555\">{v}x</text>\n",
            h - 2.0
        ));
    }
    for (i, (f, good, target)) in rows.iter().enumerate() {
        let y = 45.0 + row_h * i as f64;
        let (x0, x1) = (x(1.0), x(*good));
        let color = if *good >= 1.0 { "#2a9d8f" } else { "#e76f51" };
        s.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
            left - 8.0,
            y + 13.0,
            xml(&f.label)
        ));
        s.push_str(&format!(
            "<rect x=\"{:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{color}\"/>\n",
            x0.min(x1),
            (x1 - x0).abs().max(1.0),
            row_h - 8.0
        ));
        s.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\">{good:.2}x</text>\n",
            x0.max(x1) + 4.0,
            y + 13.0
        ));
        if let Some(t) = target {
            let xt = x(*t);
            s.push_str(&format!("<line x1=\"{xt:.1}\" y1=\"{:.1}\" x2=\"{xt:.1}\" y2=\"{:.1}\" stroke=\"black\" stroke-width=\"2\"/>\n", y - 2.0, y + row_h - 6.0));
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
        "Run on {date}: {cores} cores ({cpu}), {mem} GiB, Linux {}, shared machine; podman 4.3.1's helper from Debian, slirp4netns 1.2.0, iperf3 from Debian. Every column runs on the same servers in the same network namespace; the client runs on the host side (for the direct column, inside the namespace).",
        kernel.trim()
    )
}
