//! `cargo xtask <command>`: the project's build and test orchestration, in plain Rust.
//!
//! - `demo`: the whole stack in one command (the README's main job).
//! - `run [-p SPEC]... [--network slirp4netns:OPTS] -- CMD`: CMD with rootless networking.
//! - `itest [FILTER...]`: every test. `cargo test --workspace`, then each test
//!   binary's `#[ignore]`d tests (the ones that need namespaces or system programs)
//!   inside fresh network and mount namespaces.
//! - `podman-e2e`: a real podman runs containers with our `rootlessport`.
//! - `podman-e2e-rootless`: the same, rootless, as an unprivileged user.
//! - `bench`, `fuzz`, `soak`: the benchmark, libFuzzer, and churn with leak checks.
//! - `ns-exec -- PROGRAM ARGS...` (internal): run PROGRAM in the namespace set up by
//!   `unshare`, with loopback up and a private `/run/netns`.
//!
//! The command's arguments are read with `lexopt` (see [`args`]); `help` lists them all.

use std::process::ExitCode;

use args::{Long, Short, Value};

mod args;
mod bench;
mod demo;
mod e2e;
mod echo;
mod fuzz;
mod helper;
mod itest;
mod loadgen;
mod nsexec;
mod run;
mod session;
mod soak;
mod sys;
mod testuser;
mod workspace;

const USAGE: &str = "usage: cargo xtask <command>

commands:
  demo                the whole stack in one go: an HTTP server in a fresh namespace
                      behind slirp4netns and rootlessport, fetched over IPv4 and IPv6
  run [-p [IP:]HOST:CONTAINER[/PROTO]]... [--network slirp4netns:OPTS] -- CMD ARGS
                      run CMD in a fresh user+network+mount namespace with slirp4netns
                      networking and the given ports published; exits with CMD's status
  itest [FILTER...]   run every test: unit and crate tests, the namespaced integration
                      tests (installs slirp4netns/iproute2 when root), podman end-to-end,
                      fuzz, soak, bench smoke; ITEST_SKIP_PODMAN=1, ITEST_SKIP_FUZZ=1,
                      ITEST_SKIP_SOAK=1, ITEST_SKIP_BENCH=1 leave those last out. With a
                      FILTER, only tests whose names contain it (none matched: failure)
  bench [--quick] [--rounds N] [--baseline PATH] [--save-docs]
                      our rootlessport side by side with podman's, pasta, slirp4netns,
                      direct loopback and optionally another build of ours; report in
                      target/bench/ (and docs/ with --save-docs)
  fuzz [--seconds N] [TARGET...]
                      libFuzzer on the config JSON, slirp4netns options, API replies
                      and reload requests (installs cargo-fuzz when missing)
  soak [--minutes N | --seconds S]
                      steady connection and UDP-flow churn through our rootlessport;
                      its fd count and RSS must stay flat (slopes reported)
  podman-e2e          podman 4.x runs containers with our release rootlessport
                      (installs podman, runc, busybox-static when root)
  podman-e2e-rootless rootless podman 4.x (as an unprivileged user; as root, the user
                      rootless-net-test, created on demand) with our release rootlessport:
                      slirp4netns and bridge networks, restarts, kills, network connect
  help                this list

internal, run by the commands above:
  ns-exec -- CMD...   run CMD inside a namespace prepared for tests
  ns-child -- CMD...  become CMD inside the namespaces of `run` and `demo`, once set up
  echo-server [--plain] [--exit-after N] --tcp P,P --udp P,P
                      the TCP/UDP echo server used inside containers
  http-server PORT    the demo's HTTP server
  bench-client MODE ADDR N [N]
                      one load generator of the bench (conn, pingpong, udp, hold, udpflows)
  reload-send TMPDIR CONTAINER_ID CHILD_IP
                      one reload request to a running rootlessport
  bind-probe PORT     bind and listen on [::]:PORT (SO_REUSEADDR, as servers do) over and
                      over until stdin closes (a test's other server; it spins a core);
                      prints `probing`, then how many tries found the port in use";

fn main() -> ExitCode {
    let mut p = lexopt::Parser::from_env();
    let command = match p.next() {
        Ok(Some(Value(command))) => command.to_string_lossy().into_owned(),
        Ok(Some(Short('h') | Long("help"))) => "help".to_owned(),
        Ok(Some(flag)) => {
            let flag = args::shown(&flag);
            return fail(format!(
                "unknown argument {flag:?} (cargo xtask help lists the commands)"
            ));
        }
        Ok(None) => return fail(USAGE.to_owned()),
        Err(e) => return fail(e.to_string()),
    };
    let args = match args::rest(&mut p) {
        Ok(args) => args,
        Err(e) => return fail(e),
    };
    // `cargo xtask run --help` and the like: the commands and their options.
    if matches!(args.first().map(String::as_str), Some("--help" | "-h")) {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let result = match command.as_str() {
        "itest" => itest::run(&args),
        "ns-exec" => nsexec::run(&args),
        "podman-e2e" => e2e::rootful::run(&args),
        "podman-e2e-rootless" => e2e::rootless::run(&args),
        "echo-server" => echo::run(&args),
        "demo" => demo::run(&args),
        "bench" => bench::run(&args),
        "bench-client" => loadgen::run(&args),
        "soak" => soak::run(&args),
        "fuzz" => fuzz::run(&args),
        "bind-probe" => bind_probe(&args),
        // One reload request, for tests that send it as another user.
        "reload-send" => match args.get(..3) {
            Some([dir, id, ip]) => rootlessport::reload::reload(dir.as_ref(), id, ip)
                .map(|()| println!("OK"))
                .map_err(|e| e.to_string()),
            _ => Err("usage: xtask reload-send TMPDIR CONTAINER_ID CHILD_IP".into()),
        },
        "http-server" => demo::http_server(&args),
        "ns-child" => session::ns_child(&args),
        "run" => match run::run(&args) {
            Ok(code) => return ExitCode::from(code.clamp(0, 255) as u8),
            Err(e) => {
                eprintln!("xtask run: {e}");
                return ExitCode::from(125);
            }
        },
        "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => Err(format!("unknown command {other:?}\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

fn fail(e: String) -> ExitCode {
    eprintln!("xtask: {e}");
    ExitCode::FAILURE
}

/// `bind-probe PORT`: another server trying to take a port, in a process of its own
/// (a test's thread would share its sockets with every child the test forks). Prints
/// `probing` once it has started, then, once stdin closes, `IN_USE TRIES`.
fn bind_probe(args: &[String]) -> Result<(), String> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let port: u16 = match args {
        [port] => match port.parse() {
            Ok(0) | Err(_) => return Err(format!("bind-probe: bad port {port:?} (1-65535)")),
            Ok(p) => p,
        },
        _ => return Err("usage: xtask bind-probe PORT".into()),
    };
    let say = |line: String| {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}")
            .and_then(|()| out.flush())
            .map_err(|e| format!("bind-probe: stdout: {e}"))
    };
    static CLOSED: AtomicBool = AtomicBool::new(false);
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        CLOSED.store(true, Ordering::Relaxed);
    });
    say("probing".to_owned())?;
    let (mut in_use, mut tries) = (0u64, 0u64);
    while !CLOSED.load(Ordering::Relaxed) {
        tries += 1;
        // std's listener sets SO_REUSEADDR, as Go's and ours do.
        match std::net::TcpListener::bind((std::net::Ipv6Addr::UNSPECIFIED, port)) {
            Ok(listener) => drop(listener),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => in_use += 1,
            Err(e) => return Err(format!("bind-probe: [::]:{port}: {e}")),
        }
    }
    say(format!("{in_use} {tries}"))
}

#[cfg(test)]
mod tests {
    type Run = fn(&[String]) -> Result<(), String>;

    /// Each command refuses an unknown flag or a bad value before it does anything, in
    /// one line; the texts that were there before lexopt are unchanged.
    #[test]
    fn bad_arguments_fail_first_in_one_line() {
        use crate::{bench, demo, e2e, echo, fuzz, loadgen, soak};
        let cases: &[(Run, &[&str], &str)] = &[
            (
                demo::run,
                &["--frob"],
                r#"demo: unknown argument "--frob" (try --download-mib N)"#,
            ),
            (
                demo::run,
                &["--download-mib"],
                "--download-mib needs a number",
            ),
            (
                demo::run,
                &["--download-mib", "x"],
                r#"bad --download-mib "x""#,
            ),
            (
                bench::run,
                &["--frob"],
                r#"bench: unknown argument "--frob" (--quick, --rounds N, --baseline PATH, --save-docs)"#,
            ),
            (bench::run, &["--rounds"], "bench: --rounds needs a number"),
            (
                bench::run,
                &["--quick=1"],
                r#"bench: unexpected argument for option '--quick': "1""#,
            ),
            (
                soak::run,
                &["--frob"],
                r#"soak: unknown argument "--frob" (--minutes N or --seconds S)"#,
            ),
            (soak::run, &["--seconds"], "soak: a number must follow"),
            (soak::run, &["--minutes", "x"], "soak: a number must follow"),
            (soak::run, &["--seconds", "9"], "soak: at least 10 seconds"),
            (
                fuzz::run,
                &["--frob"],
                r#"fuzz: unknown argument "--frob"; targets: config_json, slirp_options, api_reply, reload_request"#,
            ),
            (
                fuzz::run,
                &["--seconds", "x"],
                "fuzz: --seconds needs a number",
            ),
            (
                echo::run,
                &["--frob"],
                r#"echo-server: unknown argument "--frob""#,
            ),
            (
                echo::run,
                &["--tcp"],
                "echo-server: a port list must follow",
            ),
            (echo::run, &["--tcp", "7,x"], r#"echo-server: bad port "x""#),
            (
                echo::run,
                &["--exit-after", "x"],
                "echo-server: --exit-after N",
            ),
            (
                loadgen::run,
                &["--frob"],
                r#"bench-client: unknown argument "--frob""#,
            ),
            (loadgen::run, &["conn"], "bench-client: missing ADDR"),
            (
                loadgen::run,
                &["conn", "127.0.0.1:7", "x"],
                "bench-client: bad COUNT",
            ),
            (
                loadgen::run,
                &["frob", "127.0.0.1:7"],
                r#"bench-client: unknown mode "frob""#,
            ),
            (
                e2e::rootful::run,
                &["--frob"],
                r#"podman-e2e: unknown argument "--frob""#,
            ),
        ];
        for (run, args, want) in cases {
            let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            assert_eq!(run(&args).err().as_deref(), Some(*want), "{args:?}");
        }
    }
}
