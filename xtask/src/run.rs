//! `cargo xtask run [-p SPEC]... [--network slirp4netns:OPTS] -- CMD ARGS`

use std::ffi::OsString;

use slirp_config::PortMapping;

use crate::args::{self, Long, Short, Value};
use crate::session::{exit_code, Session, SessionSpec};

const USAGE: &str = "usage: cargo xtask run [-p [IP:]HOST:CONTAINER[/PROTO]]... [--network slirp4netns:OPTS] -- CMD [ARGS...]";

/// Parse the arguments; every error is one line, before anything starts.
pub fn parse(args: &[String]) -> Result<SessionSpec, String> {
    let mut ports = Vec::new();
    let mut network: Option<String> = None;
    let mut command: Vec<OsString> = Vec::new();
    let mut p = args::parser(args);
    loop {
        // CMD starts after `--`; lexopt would read it as more of our arguments.
        if args::at_double_dash(&mut p) {
            command.extend(args::rest(&mut p)?.into_iter().map(OsString::from));
            break;
        }
        let Some(arg) = p.next().map_err(|e| e.to_string())? else {
            break;
        };
        match arg {
            Short('p') | Long("publish") => {
                let spec =
                    args::string(&mut p).ok_or_else(|| format!("-p needs a value\n{USAGE}"))?;
                ports.push(parse_publish(&spec)?);
            }
            Long("network") => {
                network = Some(
                    args::string(&mut p)
                        .ok_or_else(|| format!("--network needs a value\n{USAGE}"))?,
                );
            }
            // A word before `--`: the command lacks its `--`, so the usage helps.
            Value(_) => return Err(format!("unknown argument {:?}\n{USAGE}", args::shown(&arg))),
            _ => return Err(format!("unknown argument {:?}", args::shown(&arg))),
        }
    }
    if command.is_empty() {
        return Err(format!("no command given\n{USAGE}"));
    }
    let opts = match &network {
        Some(n) => slirp_config::parse_network(n).map_err(|e| e.to_string())?,
        None => Vec::new(),
    };
    let options = slirp_config::parse_options(opts).map_err(|e| e.to_string())?;
    // Checked now so that a bad port never starts anything.
    if options.is_slirp_host_forward {
        slirp_portfwd::plan(&ports).map_err(|e| e.to_string())?;
    } else {
        let helper_config = rootlessport::Config::default().with_mappings(ports.clone());
        helper_config.check_ports().map_err(|e| e.to_string())?;
    }
    Ok(SessionSpec {
        ports,
        options,
        command,
    })
}

/// One `-p` value, in slirp-config's words (`invalid -p "SPEC": ...`).
fn parse_publish(spec: &str) -> Result<PortMapping, String> {
    spec.parse()
        .map_err(|e: slirp_config::ParsePublishError| e.to_string())
}

pub fn run(args: &[String]) -> Result<i32, String> {
    let spec = parse(args)?;
    let progress = |line: String| eprintln!("[run] {line}");
    // From here a stop signal ends in a teardown, whenever it comes.
    crate::session::catch_stop_signals()?;
    let mut session = Session::start(&spec, &progress)?;
    let watch = session.watch_for_deaths(move |line| eprintln!("[run] {line}"))?;
    // Checked last before the go: one that came during start-up, when no command was
    // there to get it, ends the run here.
    if let Some(sig) = crate::session::stop_signal_before_start() {
        drop(watch);
        progress(format!(
            "signal {sig} before the command started; tearing down"
        ));
        session.teardown().map_err(|e| format!("teardown: {e}"))?;
        return Ok(128 + sig);
    }
    progress(format!(
        "running {}",
        spec.command
            .iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    ));
    session.go();
    let status = session.wait();
    drop(watch);
    let code = exit_code(status);
    progress(format!("command exited with status {code}; tearing down"));
    for line in session.exited_early() {
        progress(line);
    }
    session.teardown().map_err(|e| format!("teardown: {e}"))?;
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::{parse, USAGE};

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    fn err(a: &[&str]) -> String {
        match parse(&args(a)) {
            Ok(_) => panic!("{a:?} parsed"),
            Err(e) => e,
        }
    }

    #[test]
    fn ports_network_and_command() {
        for head in [
            &["-p", "8080:80", "--network", "slirp4netns:mtu=1500"][..],
            &["-p8080:80", "--network=slirp4netns:mtu=1500"],
            &["--publish", "8080:80", "--network", "slirp4netns:mtu=1500"],
        ] {
            let line = [head, &["--", "sh", "-c", "x"]].concat();
            let spec = parse(&args(&line)).unwrap();
            assert_eq!(spec.ports.len(), 1, "{line:?}");
            assert_eq!(spec.ports[0].host_port, 8080);
            assert_eq!(spec.ports[0].container_port, 80);
            assert_eq!(spec.options.mtu, 1500);
            assert_eq!(spec.command, ["sh", "-c", "x"], "{line:?}");
        }
        // Everything after `--` is the command's, flags and `--` included.
        let spec = parse(&args(&["--", "-p", "--", "--network"])).unwrap();
        assert_eq!(spec.command, ["-p", "--", "--network"]);
        assert!(spec.ports.is_empty());
    }

    #[test]
    fn errors_as_before() {
        // The texts tests/tests/main_job.rs expects after `xtask run: `.
        for (line, want) in [
            (
                &["-p", "80", "--", "true"][..],
                r#"invalid -p "80": expected [IP:]HOST:CONTAINER[/PROTO]"#,
            ),
            (
                &["-p", "8080:80/sctp", "--", "true"],
                r#"invalid -p "8080:80/sctp": protocol "sctp" is not tcp or udp"#,
            ),
            (
                &["--network", "bridge", "--", "true"],
                r#"network mode "bridge" is not slirp4netns (expected "slirp4netns" or "slirp4netns:OPTIONS")"#,
            ),
            (
                &["-p", "8080:80", "-p", "8080:81", "--", "true"],
                "conflict with ID 1",
            ),
        ] {
            assert_eq!(err(line), want, "{line:?}");
        }
        assert_eq!(
            err(&["-p", "8080:80"]),
            format!("no command given\n{USAGE}")
        );
        assert_eq!(err(&["-p"]), format!("-p needs a value\n{USAGE}"));
        assert_eq!(
            err(&["--network"]),
            format!("--network needs a value\n{USAGE}")
        );
        assert_eq!(
            err(&["true"]),
            format!("unknown argument \"true\"\n{USAGE}")
        );
    }

    #[test]
    fn an_unknown_flag_is_one_line_naming_it() {
        assert_eq!(
            err(&["--frob", "--", "true"]),
            r#"unknown argument "--frob""#
        );
        assert_eq!(err(&["-x", "--", "true"]), r#"unknown argument "-x""#);
        assert_eq!(
            err(&["--frob=1", "--", "true"]),
            r#"unknown argument "--frob""#
        );
    }
}
