//! `cargo xtask fuzz [--seconds N] [TARGET...]`: libFuzzer (cargo-fuzz) on everything
//! the helpers read from outside: the rootlessport config JSON, slirp4netns option and
//! network strings, slirp4netns API replies, reload requests. New inputs go to
//! `target/fuzz-corpus/`; the seed corpora in `fuzz/corpus/` are read too. A crash, a
//! hang (5 s per input) or more than 512 MB of memory fails the run.

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use crate::args::{self, Long, Value};
use crate::workspace::{cargo, workspace_root};

pub const TARGETS: &[&str] = &[
    "config_json",
    "slirp_options",
    "api_reply",
    "reload_request",
];

fn ensure_cargo_fuzz() -> Result<(), String> {
    let ok = cargo()
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        return Ok(());
    }
    eprintln!("xtask fuzz: installing cargo-fuzz");
    let status = cargo()
        .args(["install", "--quiet", "--locked", "cargo-fuzz"])
        .status()
        .map_err(|e| format!("cannot run cargo install: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err("installing cargo-fuzz failed (cargo install cargo-fuzz)".into())
    }
}

pub fn run(args: &[String]) -> Result<(), String> {
    let mut seconds: u64 = 60;
    let mut targets: Vec<String> = Vec::new();
    let mut p = args::parser(args);
    while let Some(arg) = args::next(&mut p, "fuzz")? {
        match arg {
            Long("seconds") => {
                seconds = args::number(&mut p).ok_or("fuzz: --seconds needs a number")?
            }
            Value(t) if TARGETS.iter().any(|k| t == *k) => targets.push(args::utf8(t)?),
            other => {
                return Err(format!(
                    "fuzz: unknown argument {:?}; targets: {}",
                    args::shown(&other),
                    TARGETS.join(", ")
                ))
            }
        }
    }
    if targets.is_empty() {
        targets = TARGETS.iter().map(|t| t.to_string()).collect();
    }
    ensure_cargo_fuzz()?;
    let root = workspace_root();
    let fuzz_dir = root.join("fuzz");
    let mut total_runs = 0u64;
    let mut failed = Vec::new();
    for t in &targets {
        let work = root.join("target/fuzz-corpus").join(t);
        std::fs::create_dir_all(&work).map_err(|e| format!("creating {}: {e}", work.display()))?;
        let seeds = fuzz_dir.join("corpus").join(t);
        // Stable Rust: no sanitizer (coverage instrumentation only); overflow checks on.
        let mut child = cargo()
            .current_dir(&fuzz_dir)
            .args(["fuzz", "run", "-s", "none", "-O", "-a", t])
            .arg(&work)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .args([
                "-rss_limit_mb=512",
                "-malloc_limit_mb=512",
                "-timeout=5",
                "-max_len=65536",
                "-print_final_stats=1",
            ])
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run cargo fuzz: {e}"))?;
        let mut runs = 0u64;
        if let Some(err) = child.stderr.take() {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if let Some(n) = line.strip_prefix("stat::number_of_executed_units:") {
                    runs = n.trim().parse().unwrap_or(0);
                }
                if line.contains("ERROR")
                    || line.contains("panicked")
                    || line.starts_with("Done ")
                    || line.contains("SUMMARY")
                {
                    eprintln!("  {t}: {line}");
                }
            }
        }
        let status = child.wait().map_err(|e| e.to_string())?;
        total_runs += runs;
        if status.success() {
            println!("ok - fuzz {t}: {runs} executions in {seconds} s, no crash, hang or leak");
        } else {
            println!("FAILED - fuzz {t} ({status}); the input is in fuzz/artifacts/{t}/");
            failed.push(t.clone());
        }
    }
    println!(
        "fuzz: {} passed, {} failed ({} executions)",
        targets.len() - failed.len(),
        failed.len(),
        total_runs
    );
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("fuzz targets failed: {}", failed.join(", ")))
    }
}
