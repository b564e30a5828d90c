//! `cargo xtask <command>`: the project's build and test orchestration, in plain Rust.
//!
//! - `demo`: the whole stack in one command (the README's main job).
//! - `run [-p SPEC]... [--network slirp4netns:OPTS] -- CMD`: CMD with rootless networking.
//! - `itest [FILTER...]`: every test. `cargo test --workspace`, then each test
//!   binary's `#[ignore]`d tests (the ones that need namespaces or system programs)
//!   inside fresh network and mount namespaces.
//! - `podman-e2e`: a real podman runs containers with our `rootlessport`.
//! - `podman-e2e-rootless`: the same, rootless, as an unprivileged user.
//! - `ns-exec -- PROGRAM ARGS...` (internal): run PROGRAM in the namespace set up by
//!   `unshare`, with loopback up and a private `/run/netns`.

use std::process::ExitCode;

mod bench;
mod demo;
mod e2e;
mod e2e_rootless;
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
  itest [FILTER...]   run every test: unit and crate tests, then the namespaced
                      integration tests (installs slirp4netns/iproute2 when root)
  bench [--quick] [--rounds N] [--save-docs]
                      our rootlessport side by side with podman's, slirp4netns and
                      direct loopback; report in target/bench/ (and docs/ with --save-docs)
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
  ns-exec -- CMD...   (internal) run CMD inside a namespace prepared for tests
  echo-server --tcp P,P --udp P,P
                      (internal) the TCP/UDP echo server used inside containers";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("itest") => itest::run(&args[1..]),
        Some("ns-exec") => nsexec::run(&args[1..]),
        Some("podman-e2e") => e2e::run(&args[1..]),
        Some("podman-e2e-rootless") => e2e_rootless::run(&args[1..]),
        Some("echo-server") => echo::run(&args[1..]),
        Some("demo") => demo::run(&args[1..]),
        Some("bench") => bench::run(&args[1..]),
        Some("bench-client") => loadgen::run(&args[1..]),
        Some("soak") => soak::run(&args[1..]),
        Some("fuzz") => fuzz::run(&args[1..]),
        // (internal) one reload request, for tests that send it as another user.
        Some("reload-send") => match args.get(1..4) {
            Some([dir, id, ip]) => rootlessport::reload::reload(dir.as_ref(), id, ip)
                .map(|()| println!("OK"))
                .map_err(|e| e.to_string()),
            _ => Err("usage: xtask reload-send TMPDIR CONTAINER_ID CHILD_IP".into()),
        },
        Some("http-server") => demo::http_server(&args[1..]),
        Some("ns-child") => session::ns_child(&args[1..]),
        Some("run") => match run::run(&args[1..]) {
            Ok(code) => return ExitCode::from(code.clamp(0, 255) as u8),
            Err(e) => {
                eprintln!("xtask run: {e}");
                return ExitCode::from(125);
            }
        },
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(format!("unknown command {other:?}\n{USAGE}")),
        None => Err(USAGE.to_owned()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}
