//! `cargo xtask itest`: the one command that runs every test.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::sys;
use crate::workspace::cargo;

/// Set for tests running inside the namespaces this harness made.
pub const HARNESS_ENV: &str = "ROOTLESS_NET_ITEST";

#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
    failures: Vec<String>,
}

impl Tally {
    /// Print the failures and the `itest: N passed, N failed` line. With `filters`, a
    /// run in which no test name contained any of them fails too (a misspelt filter
    /// would pass green otherwise).
    fn finish(&self, filters: Option<&[&String]>) -> Result<(), String> {
        for f in &self.failures {
            eprintln!("xtask: FAILED: {f}");
        }
        println!("itest: {} passed, {} failed", self.passed, self.failed);
        if let Some(filters) = filters.filter(|_| self.passed + self.failed == 0) {
            let named: Vec<String> = filters.iter().map(|f| format!("{f:?}")).collect();
            return Err(format!("no test name contains {}", named.join(" or ")));
        }
        if self.failed == 0 && self.failures.is_empty() {
            Ok(())
        } else {
            Err(format!("{} test(s) failed", self.failed))
        }
    }

    /// Read libtest's `test result: ok. 3 passed; 1 failed; ...` line.
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(kind), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match kind {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                _ => {}
            }
        }
    }
}

/// Leaves out libtest's report of a test binary in which no test ran: `running 0
/// tests` with the blank line before it, the blank and `successes:` lines up to its
/// `test result:` line (`--show-output` prints empty sections), that line and the blank
/// line after. Anything else in between (a binary that died before its result, a
/// test's output that happens to read `running 0 tests`) shows the lines held back and
/// ends the leaving out. A filtered run has such a report for every
/// binary the filter names no test of.
#[derive(Default)]
struct EmptyRuns {
    /// Blank lines held back until the next line shows whether one opens such a report.
    blanks: usize,
    /// Inside such a report: the blank lines held back before `running 0 tests` (0 or
    /// 1), and the lines since.
    skipping: Option<(usize, Vec<&'static str>)>,
    /// Just after one: its closing blank line is left out too.
    closing: bool,
}

impl EmptyRuns {
    /// The lines to print, in order, now that `line` came.
    fn pass<'a>(&mut self, line: &'a str) -> Vec<&'a str> {
        if let Some((_, held)) = self.skipping.as_mut() {
            if let Some(empty) = ["", "successes:"].into_iter().find(|e| *e == line) {
                held.push(empty);
                return Vec::new();
            }
            let (before, held) = self.skipping.take().unwrap_or_default();
            if line.starts_with("test result: ") {
                self.closing = true;
                return Vec::new();
            }
            // Not an empty report after all: everything held back, then the line.
            let mut out = vec![""; before];
            out.push("running 0 tests");
            out.extend(held);
            out.push(line);
            return out;
        }
        if line.is_empty() {
            if !std::mem::take(&mut self.closing) {
                self.blanks += 1;
            }
            return Vec::new();
        }
        self.closing = false;
        let blanks = std::mem::take(&mut self.blanks);
        if line == "running 0 tests" {
            self.skipping = Some((blanks.min(1), Vec::new()));
            return vec![""; blanks.saturating_sub(1)];
        }
        let mut out = vec![""; blanks];
        out.push(line);
        out
    }

    /// The lines still held back once the output has ended (a report cut short by a
    /// binary that died after `running 0 tests` is shown).
    fn finish(self) -> Vec<&'static str> {
        let mut out = vec![""; self.blanks];
        if let Some((before, held)) = self.skipping {
            out.extend(std::iter::repeat_n("", before));
            out.push("running 0 tests");
            out.extend(held);
        }
        out
    }
}

/// Run `cmd`, echoing its stdout (less the reports of binaries that ran no test, see
/// [`EmptyRuns`]) while counting libtest results. A run that fails
/// without printing any result (a build error, a crash) counts as one failure.
fn run_counted(label: &str, cmd: &mut Command, tally: &mut Tally) -> Result<(), String> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {label}: {e}"))?;
    let failed_before = tally.failed;
    if let Some(out) = child.stdout.take() {
        let stdout = std::io::stdout();
        let mut empty = EmptyRuns::default();
        for line in BufReader::new(out).lines() {
            let line = line.map_err(|e| format!("reading output of {label}: {e}"))?;
            tally.add_line(&line);
            let mut lock = stdout.lock();
            for shown in empty.pass(&line) {
                let _ = writeln!(lock, "{shown}");
            }
            let _ = lock.flush();
        }
        for shown in empty.finish() {
            let _ = writeln!(stdout.lock(), "{shown}");
        }
    }
    let status = child
        .wait()
        .map_err(|e| format!("waiting for {label}: {e}"))?;
    if !status.success() {
        if tally.failed == failed_before {
            tally.failed += 1;
        }
        tally.failures.push(format!("{label} ({status})"));
    }
    Ok(())
}

/// Run `xtask ARGS` and count it as one test: passed when it exits 0.
fn run_smoke(me: &Path, args: &[&str], tally: &mut Tally) -> Result<(), String> {
    let label = args.join(" ");
    eprintln!("xtask: {label}");
    let status = Command::new(me)
        .args(args)
        .status()
        .map_err(|e| format!("cannot start {label}: {e}"))?;
    if status.success() {
        tally.passed += 1;
        println!("ok - {label}");
    } else {
        tally.failed += 1;
        tally.failures.push(format!("{label} ({status})"));
    }
    Ok(())
}

/// `bench --quick`, with our release helper as its baseline too (so the baseline column
/// is exercised), counted as one test: passed when it exits 0 and the report it wrote
/// has every column and row filled in ([`crate::bench::check_report`]).
fn bench_smoke(me: &Path, tally: &mut Tally) -> Result<(), String> {
    let report = crate::workspace::workspace_root().join("target/bench/report.md");
    let _ = std::fs::remove_file(&report);
    let ours = crate::helper::release_helper()?;
    let ours = ours.display().to_string();
    let before = tally.failed;
    run_smoke(me, &["bench", "--quick", "--baseline", &ours], tally)?;
    if tally.failed > before {
        return Ok(());
    }
    let checked = std::fs::read_to_string(&report)
        .map_err(|e| format!("report: cannot read {}: {e}", report.display()))
        .and_then(|text| crate::bench::check_report(&text, true));
    if let Err(e) = checked {
        eprintln!("xtask: {e}");
        tally.passed -= 1;
        tally.failed += 1;
        tally.failures.push(format!("bench --quick report: {e}"));
    }
    Ok(())
}

/// Run a command that ends with the plain `N passed, N failed` line, and count it.
fn run_counted_plain(label: &str, cmd: &mut Command, tally: &mut Tally) -> Result<(), String> {
    let mut plain = Tally::default();
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {label}: {e}"))?;
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line.map_err(|e| format!("reading output of {label}: {e}"))?;
            if let Some(rest) = line.strip_prefix(&format!("{label}: ")) {
                plain.add_line(&format!("test result: {}", rest.replace(',', ";")));
            }
            println!("{line}");
        }
    }
    let status = child
        .wait()
        .map_err(|e| format!("waiting for {label}: {e}"))?;
    tally.passed += plain.passed;
    tally.failed += plain.failed;
    // A run that counted nothing has tested nothing: that is a failure too.
    if !status.success() || plain.passed + plain.failed == 0 {
        if plain.failed == 0 {
            tally.failed += 1;
        }
        tally.failures.push(format!("{label} ({status})"));
    }
    Ok(())
}

/// Test executables of the workspace that hold `#[ignore]`d (namespaced) tests,
/// with the package directory each must run in.
fn namespaced_binaries() -> Result<Vec<(PathBuf, PathBuf)>, String> {
    let out = cargo()
        .args([
            "test",
            "--workspace",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !out.status.success() {
        return Err("building the test binaries failed".into());
    }
    let mut bins = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
            continue;
        }
        let (Some(exe), Some(manifest)) =
            (msg["executable"].as_str(), msg["manifest_path"].as_str())
        else {
            continue;
        };
        let dir = Path::new(manifest)
            .parent()
            .unwrap_or(Path::new("."))
            .to_path_buf();
        if has_ignored_tests(Path::new(exe))? {
            bins.push((PathBuf::from(exe), dir));
        }
    }
    Ok(bins)
}

fn has_ignored_tests(exe: &Path) -> Result<bool, String> {
    let out = Command::new(exe)
        .args(["--list", "--ignored", "--format", "terse"])
        .output()
        .map_err(|e| format!("cannot list tests of {}: {e}", exe.display()))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.ends_with(": test")))
}

/// Test executables whose namespaced tests also run as an unprivileged user.
const RUN_ROOTLESS: &[&str] = &["main_job", "rootless"];
/// Test executables whose tests run only as an unprivileged user.
const ROOTLESS_ONLY: &[&str] = &["rootless"];

/// A test executable's name without cargo's hash (`main_job-0123abcd` -> `main_job`).
fn test_name(exe: &Path) -> String {
    let name = exe
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match name.rsplit_once('-') {
        Some((stem, _)) => stem.to_owned(),
        None => name,
    }
}

/// Who runs the rootless tests, and how.
struct RootlessRunner {
    user: String,
    test_user: Option<crate::testuser::TestUser>,
}

impl RootlessRunner {
    fn command(&self, program: &Path) -> Command {
        match &self.test_user {
            Some(u) => u.command(program),
            None => Command::new(program),
        }
    }
}

/// As root: the test user (created on demand). Otherwise the current user, if it can
/// make user namespaces and use `/dev/net/tun`; else one line saying why not.
fn rootless_runner() -> Result<RootlessRunner, String> {
    if sys::is_root() {
        let u = crate::testuser::ensure_test_user()?;
        return Ok(RootlessRunner {
            user: u.name.clone(),
            test_user: Some(u),
        });
    }
    crate::testuser::current_user_can_make_namespaces()?;
    Ok(RootlessRunner {
        user: std::env::var("USER").unwrap_or_else(|_| nix::unistd::getuid().to_string()),
        test_user: None,
    })
}

pub fn run(args: &[String]) -> Result<(), String> {
    let filters: Vec<&String> = args.iter().filter(|a| a.as_str() != "--").collect();
    sys::ensure(sys::ITEST_NEEDS)?;
    let mut tally = Tally::default();
    if let Some(bin) = std::env::var_os("ROOTLESSPORT_BIN") {
        // It is for `run` and `demo`; the tests drive this checkout's own build. Taken
        // out of this process's environment (no thread runs yet), so that no command
        // started from here (tests, podman-e2e, soak, bench) sees it.
        eprintln!(
            "xtask: ROOTLESSPORT_BIN={} is left out: itest tests this checkout's binaries",
            Path::new(&bin).display()
        );
        std::env::remove_var("ROOTLESSPORT_BIN");
    }

    eprintln!("xtask: cargo test --workspace");
    run_counted(
        "cargo test --workspace",
        cargo()
            .args(["test", "--workspace", "--no-fail-fast", "--"])
            .args(&filters),
        &mut tally,
    )?;

    // The namespaced tests drive the real binaries, and the examples (`engine`).
    let status = cargo()
        .args([
            "build",
            "--workspace",
            "--bins",
            "--examples",
            "--exclude",
            "xtask",
        ])
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err("building the workspace binaries and examples failed".into());
    }
    let bins = namespaced_binaries()?;
    let unshare = sys::find_in_path("unshare").ok_or("unshare not found")?;
    let me = std::env::current_exe().map_err(|e| format!("cannot find xtask itself: {e}"))?;
    for (exe, dir) in &bins {
        let name = test_name(exe);
        if ROOTLESS_ONLY.contains(&name.as_str()) {
            continue;
        }
        eprintln!("xtask: namespaced tests of {name}");
        let mut cmd = Command::new(&unshare);
        if !sys::is_root() {
            cmd.args(["--user", "--map-root-user"]);
        }
        cmd.args(["--net", "--mount", "--propagation", "private", "--"])
            .arg(&me)
            .args(["ns-exec", "--"])
            .arg(exe)
            .args(["--ignored", "--show-output"])
            .args(&filters)
            .current_dir(dir)
            .env(HARNESS_ENV, "1");
        run_counted(&format!("namespaced tests of {name}"), &mut cmd, &mut tally)?;
    }

    // The same stack with no privilege at all: as a test user when we are root (made
    // on demand, as a distribution sets one up), else as ourselves.
    let rootless = rootless_runner();
    match &rootless {
        Ok(runner) => {
            for (exe, dir) in &bins {
                let name = test_name(exe);
                if !RUN_ROOTLESS.contains(&name.as_str()) {
                    continue;
                }
                eprintln!(
                    "xtask: tests of {name} as unprivileged user {}",
                    runner.user
                );
                let mut cmd = runner.command(exe);
                cmd.args(["--ignored", "--show-output"])
                    .args(&filters)
                    .current_dir(dir)
                    .env(HARNESS_ENV, "rootless");
                run_counted(&format!("rootless tests of {name}"), &mut cmd, &mut tally)?;
            }
        }
        Err(why) => eprintln!(
            "xtask: rootless tests skipped ({}): {why}",
            RUN_ROOTLESS.join(", ")
        ),
    }

    if !filters.is_empty() {
        // Only the tests whose names contain a filter: the rest is not named by one.
        eprintln!(
            "xtask: podman-e2e, fuzz, soak and the bench smoke run left out (a test filter was given)"
        );
        return tally.finish(Some(&filters));
    }
    if std::env::var_os("ITEST_SKIP_PODMAN").is_some() {
        eprintln!("xtask: podman-e2e and podman-e2e-rootless skipped (ITEST_SKIP_PODMAN)");
    } else if crate::e2e::available() && sys::is_root() {
        eprintln!("xtask: podman-e2e");
        let mut cmd = Command::new(&me);
        cmd.arg("podman-e2e");
        run_counted_plain("podman-e2e", &mut cmd, &mut tally)?;
    } else {
        eprintln!("xtask: podman-e2e skipped (needs root with podman installed or installable)");
    }
    if std::env::var_os("ITEST_SKIP_PODMAN").is_none() && crate::e2e::available() {
        // Rootless podman needs more than our stack: subordinate ids and newuidmap.
        let podman_ready = match &rootless {
            Ok(_) if !sys::is_root() => crate::testuser::current_user_can_go_rootless(),
            other => other.as_ref().map(|_| ()).map_err(String::clone),
        };
        match podman_ready {
            Ok(()) => {
                eprintln!("xtask: podman-e2e-rootless");
                let mut cmd = Command::new(&me);
                cmd.arg("podman-e2e-rootless");
                run_counted_plain("podman-e2e-rootless", &mut cmd, &mut tally)?;
            }
            Err(why) => eprintln!("xtask: podman-e2e-rootless skipped: {why}"),
        }
    }

    // Every fuzz target for a few seconds.
    if std::env::var_os("ITEST_SKIP_FUZZ").is_none() {
        eprintln!("xtask: fuzz --seconds 10");
        let mut cmd = Command::new(&me);
        cmd.args(["fuzz", "--seconds", "10"]);
        run_counted_plain("fuzz", &mut cmd, &mut tally)?;
    }

    // Churn for a minute (fd count and RSS must stay flat), and the bench must not rot:
    // a short run, no ratio checks, but every column and row filled in.
    if std::env::var_os("ITEST_SKIP_SOAK").is_none() {
        run_smoke(&me, &["soak", "--seconds", "60"], &mut tally)?;
    }
    if std::env::var_os("ITEST_SKIP_BENCH").is_none() {
        bench_smoke(&me, &mut tally)?;
    }

    tally.finish(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A binary that ran no test leaves nothing; one that ran some is shown whole, its
    /// blank lines included.
    #[test]
    fn reports_of_binaries_that_ran_no_test_are_left_out() {
        let out = "\nrunning 0 tests\n\ntest result: ok. 0 passed; 0 failed; 0 ignored; \
                   0 measured; 12 filtered out; finished in 0.00s\n\n\nrunning 1 test\n\
                   test a ... ok\n---- a stdout ----\n\nhello\n\n\
                   test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; \
                   3 filtered out; finished in 0.01s\n\n\nrunning 0 tests\n\n\
                   test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; \
                   1 filtered out; finished in 0.00s\n\n\nrunning 0 tests\n\nsuccesses:\n\n\
                   successes:\n\ntest result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; \
                   2 filtered out; finished in 0.00s\n\n";
        let mut empty = EmptyRuns::default();
        let mut shown: Vec<&str> = out.lines().flat_map(|l| empty.pass(l)).collect();
        shown.extend(empty.finish());
        assert_eq!(
            shown.join("\n"),
            "\nrunning 1 test\ntest a ... ok\n---- a stdout ----\n\nhello\n\n\
             test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 3 filtered out; \
             finished in 0.01s\n"
        );
    }

    /// A report that is not empty after all is shown whole: a test's output reading
    /// `running 0 tests`, or a binary that died after that line, before its result (the
    /// next binary's failure must still show).
    #[test]
    fn a_running_0_tests_line_that_is_not_an_empty_report_is_shown() {
        let show = |out: &str| {
            let mut empty = EmptyRuns::default();
            let mut shown: Vec<&str> = out.lines().flat_map(|l| empty.pass(l)).collect();
            shown.extend(empty.finish());
            shown.join("\n")
        };
        let nested = "\nrunning 1 test\ntest a ... FAILED\n\nfailures:\n\n---- a stdout ----\n\
                      child said:\n\nrunning 0 tests\n\npanicked at x\n\nfailures:\n    a\n\n\
                      test result: FAILED. 0 passed; 1 failed; 0 ignored\n";
        assert_eq!(
            show(nested),
            "\nrunning 1 test\ntest a ... FAILED\n\nfailures:\n\n---- a stdout ----\n\
             child said:\n\nrunning 0 tests\n\npanicked at x\n\nfailures:\n    a\n\n\
             test result: FAILED. 0 passed; 1 failed; 0 ignored"
        );
        let died = "\nrunning 0 tests\n\nrunning 1 test\ntest b2 ... FAILED\n\
                    test result: FAILED. 0 passed; 1 failed; 0 ignored\n\nrunning 0 tests\n\n\
                    successes:\n\nsuccesses:\n\ntest b3 ... FAILED\n";
        assert_eq!(
            show(died),
            "\nrunning 0 tests\n\nrunning 1 test\ntest b2 ... FAILED\n\
             test result: FAILED. 0 passed; 1 failed; 0 ignored\n\nrunning 0 tests\n\n\
             successes:\n\nsuccesses:\n\ntest b3 ... FAILED"
        );
        // Cut short by the end of the output: shown too.
        assert_eq!(
            show("\nrunning 0 tests\n\nsuccesses:\n"),
            "\nrunning 0 tests\n\nsuccesses:"
        );
    }
}
