//! `cargo xtask bench [--quick] [--rounds N] [--save-docs]`: our `rootlessport` side by
//! side with podman's, slirp4netns's own forwarder and no forwarder at all, on the same
//! servers in the same container netns, interleaved, median of the rounds, every
//! figure also as a ratio against podman's helper from the same run.
//!
//! - [`rig`]: the container netns, its servers and every forwarder in front of them;
//! - [`measure`]: one figure through one column (a client process, iperf3, `/proc`);
//! - [`figures`]: the figures and the interleaved rounds that measure them;
//! - [`report`]: the markdown table, the SVG chart of the ratios, the machine line.

mod figures;
mod measure;
mod report;
mod rig;

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
            Long("inner") => a.inner = true,
            other => {
                return Err(format!(
                    "bench: unknown argument {:?} (--quick, --rounds N, --save-docs)",
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
        let helper = crate::helper::release_helper()?;
        let mut again = vec!["bench".to_string()];
        again.extend(args.iter().cloned());
        again.push("--inner".into());
        let status = sys::rerun_in_private_netns(&again, &[("BENCH_OURS", helper.as_os_str())])?;
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

/// Inside the private namespaces: set up, measure, report.
fn inner_run(s: &Settings, save_docs: bool) -> Result<(), String> {
    crate::sys::raise_nofile_limit();
    let rig = rig::setup()?;
    let figures = figures::list(s);
    let res = figures::measure(&rig, s)?;
    let mut report = report::render(s, &figures, &res, rig.podman.is_some());
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
        let text = format!(
            "# Benchmarks\n\nOne full run of `cargo xtask bench`, kept as a reference; rerun it to compare.\n\n{}\n\n{report}",
            report::machine()
        );
        std::fs::write(docs.join("benchmarks.md"), text).map_err(|e| e.to_string())?;
        std::fs::write(docs.join("benchmarks.svg"), report::svg(&figures, &res))
            .map_err(|e| e.to_string())?;
        eprintln!("xtask bench: wrote docs/benchmarks.md");
    }
    drop(rig);
    Ok(())
}
