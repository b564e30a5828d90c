//! `cargo xtask bench [--quick] [--rounds N] [--baseline PATH] [--save-docs]`: our
//! `rootlessport` side by side with podman's, pasta (as podman 5 runs it),
//! slirp4netns's own forwarder and no forwarder at all, on the same servers,
//! interleaved, median of the rounds, every figure also as a ratio of ours against the
//! limit (no forwarder), the best peer and podman's helper, from the same run; and the
//! CPU each forwarder spends per GB moved and per 1,000 connections.
//!
//! `--baseline PATH` adds a column for another build of ours, measured exactly like
//! ours, with a ratio ours/baseline: how a change to ours shows what it costs. Build
//! the baseline like the bench builds ours (static, non-PIE), from a worktree at the
//! commit before the change:
//!
//! ```sh
//! git worktree add /tmp/base COMMIT~1 && cd /tmp/base
//! RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static" \
//!     cargo build --release -p rootlessport --bin rootlessport --target x86_64-unknown-linux-gnu
//! cd - && cargo xtask bench --baseline /tmp/base/target/x86_64-unknown-linux-gnu/release/rootlessport
//! ```
//!
//! - [`rig`]: the container netns, its servers and every forwarder in front of them;
//! - [`measure`]: one figure through one column (a client process, iperf3, `/proc`);
//! - [`figures`]: the figures and the interleaved rounds that measure them;
//! - [`report`]: the markdown table, the SVG chart of the ratios, the machine line.

mod figures;
mod measure;
mod report;
mod rig;

use std::path::{Path, PathBuf};

use crate::args::{self, Long};
use crate::sys::{self, Need};
use crate::workspace::workspace_root;

/// How long and how hard each figure is measured (`--quick` or the full run).
struct Settings {
    quick: bool,
    rounds: usize,
    iperf_secs: u64,
    conns: u64,
    pings: u64,
    udp_rate: u64,
    udp_secs: u64,
    hold: u64,
    port_counts: Vec<u32>,
}

const BENCH_NEEDS: &[Need] = &[
    Need {
        program: "iperf3",
        package: "iperf3",
    },
    Need {
        program: "slirp4netns",
        package: "slirp4netns",
    },
    Need {
        program: "pasta",
        package: "passt",
    },
    Need {
        program: "nsenter",
        package: "util-linux",
    },
    Need {
        program: "unshare",
        package: "util-linux",
    },
    Need {
        program: "ip",
        package: "iproute2",
    },
];

/// What the command line asked for.
#[derive(Default)]
struct Args {
    quick: bool,
    rounds: Option<usize>,
    save_docs: bool,
    /// Another `rootlessport` to measure beside ours.
    baseline: Option<PathBuf>,
    /// Set on the run inside the private namespaces.
    inner: bool,
}

fn parse(args: &[String]) -> Result<Args, String> {
    let mut a = Args::default();
    let mut p = args::parser(args);
    while let Some(arg) = args::next(&mut p, "bench")? {
        match arg {
            Long("quick") => a.quick = true,
            Long("rounds") => {
                a.rounds = Some(args::number(&mut p).ok_or("bench: --rounds needs a number")?)
            }
            Long("save-docs") => a.save_docs = true,
            Long("baseline") => {
                a.baseline = Some(
                    args::string(&mut p)
                        .ok_or("bench: --baseline needs the path of a rootlessport binary")?
                        .into(),
                )
            }
            Long("inner") => a.inner = true,
            other => {
                return Err(format!(
                "bench: unknown argument {:?} (--quick, --rounds N, --baseline PATH, --save-docs)",
                args::shown(&other)
            ))
            }
        }
    }
    Ok(a)
}

pub fn run(args: &[String]) -> Result<(), String> {
    let a = parse(args)?;
    if !a.inner {
        sys::ensure(BENCH_NEEDS)?;
        if rig::podman_helper().is_none()
            && sys::is_root()
            && sys::find_in_path("apt-get").is_some()
        {
            eprintln!("xtask bench: installing podman for the reference column");
            if let Err(e) = sys::apt_install(&["podman"]) {
                eprintln!("xtask bench: podman not installed ({e}); its column says so");
            }
        }
        let baseline = a.baseline.as_deref().map(checked_binary).transpose()?;
        let helper = crate::helper::release_helper()?;
        let floor = crate::helper::release_floor()?;
        let mut again = vec!["bench".to_string()];
        again.extend(args.iter().cloned());
        again.push("--inner".into());
        let mut env = vec![
            ("BENCH_OURS", helper.as_os_str()),
            ("BENCH_FLOOR", floor.as_os_str()),
        ];
        if let Some(b) = &baseline {
            env.push(("BENCH_BASELINE", b.as_os_str()));
        }
        let status = sys::rerun_in_private_netns(&again, &env)?;
        return if status.success() {
            Ok(())
        } else {
            Err("bench failed".into())
        };
    }
    let quick = a.quick;
    let rounds = a.rounds.unwrap_or(if quick { 1 } else { 3 });
    let settings = if quick {
        Settings {
            quick,
            rounds,
            iperf_secs: 1,
            conns: 200,
            pings: 500,
            udp_rate: 2000,
            udp_secs: 1,
            hold: 100,
            port_counts: vec![1, 100],
        }
    } else {
        Settings {
            quick,
            rounds,
            iperf_secs: 4,
            conns: 2000,
            pings: 5000,
            udp_rate: 20000,
            udp_secs: 2,
            hold: 1000,
            port_counts: vec![1, 1000, 10000],
        }
    };
    inner_run(&settings, a.save_docs)
}

/// The `--baseline` binary as an absolute path, once it is known to be an executable
/// file.
fn checked_binary(path: &Path) -> Result<PathBuf, String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("bench: --baseline {}: {e}", path.display()))?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(format!(
            "bench: --baseline {}: not an executable file",
            path.display()
        ));
    }
    std::fs::canonicalize(path).map_err(|e| format!("bench: --baseline {}: {e}", path.display()))
}

pub(crate) use report::check_report;

/// The body of performance-analysis.md's section on what bounds each issue-15 target
/// (the measurements that bound the targets a run does not meet), to be kept with the
/// dated run; `None` if it has no such section.
fn bounds_section(analysis: &str) -> Option<String> {
    let start = analysis.find("\n## What bounds each issue-15 target here\n")? + 1;
    let body = &analysis[start..];
    let body = &body[body.find('\n')? + 1..];
    let end = body.find("\n## ").map_or(body.len(), |e| e + 1);
    Some(body[..end].trim().to_owned())
}

/// Inside the private namespaces: set up, measure, report.
fn inner_run(s: &Settings, save_docs: bool) -> Result<(), String> {
    // The benchmark's clients hold thousands of sockets.
    rootlessport::helper::raise_nofile_limit();
    let rig = rig::setup()?;
    let figures = figures::list(s);
    let res = figures::measure(&rig, s)?;
    let present: Vec<rig::Col> = rig::COLS.into_iter().filter(|c| rig.has(*c)).collect();
    let missing = report::missing(&figures, &res, &present);
    if !missing.is_empty() {
        return Err(format!("bench: no figure for {}", missing.join(", ")));
    }
    let mut report = report::render(s, &figures, &res, &present);
    report.push_str(&report::render_source_cost(&res));
    println!("{report}");
    let out = workspace_root().join("target/bench");
    std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
    std::fs::write(out.join("report.md"), &report).map_err(|e| e.to_string())?;
    std::fs::write(out.join("ratios.svg"), report::svg(&figures, &res))
        .map_err(|e| e.to_string())?;
    eprintln!("xtask bench: wrote target/bench/report.md and target/bench/ratios.svg");
    if save_docs {
        let docs = workspace_root().join("docs");
        std::fs::create_dir_all(&docs).map_err(|e| e.to_string())?;
        let mut text = format!(
            "# Benchmarks\n\nOne full run of `cargo xtask bench`, kept as a reference; rerun it to compare. \
             Where the time and memory go, and what bounds each figure on this machine: \
             [performance-analysis.md](performance-analysis.md).\n\n{}\n\n{report}",
            report::machine()
        );
        if let Some(bounds) = std::fs::read_to_string(docs.join("performance-analysis.md"))
            .ok()
            .and_then(|analysis| bounds_section(&analysis))
        {
            text.push_str(&format!(
                "\n## What bounds each target (kept in performance-analysis.md; \"section N\" is one of its sections)\n\n{bounds}\n"
            ));
        }
        std::fs::write(docs.join("benchmarks.md"), text).map_err(|e| e.to_string())?;
        std::fs::write(docs.join("benchmarks.svg"), report::svg(&figures, &res))
            .map_err(|e| e.to_string())?;
        eprintln!("xtask bench: wrote docs/benchmarks.md");
    }
    drop(rig);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::bounds_section;

    #[test]
    fn the_bounds_section_is_taken_whole_and_alone() {
        let analysis = "# A\n\n## 14. Start-up\n\ntext\n\n## What bounds each issue-15 target here\n\nWhere a target...\n\n| target | state |\n|---|---|\n| x | y |\n\n## Next design changes\n\n1. more\n";
        assert_eq!(
            bounds_section(analysis).as_deref(),
            Some("Where a target...\n\n| target | state |\n|---|---|\n| x | y |")
        );
        let last = "# A\n\n## What bounds each issue-15 target here\n\n| t |\n";
        assert_eq!(bounds_section(last).as_deref(), Some("| t |"));
        assert_eq!(bounds_section("# A\n\n## Other\n\ntext\n"), None);
    }
}
