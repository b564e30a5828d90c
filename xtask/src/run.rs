//! `cargo xtask run [-p SPEC]... [--network slirp4netns:OPTS] -- CMD ARGS`

use std::ffi::OsString;

use slirp_config::PortMapping;

use crate::session::{exit_code, Session, SessionSpec};

const USAGE: &str = "usage: cargo xtask run [-p [IP:]HOST:CONTAINER[/PROTO]]... [--network slirp4netns:OPTS] -- CMD [ARGS...]";

/// Parse the arguments; every error is one line, before anything starts.
pub fn parse(args: &[String]) -> Result<SessionSpec, String> {
    let mut ports = Vec::new();
    let mut network: Option<String> = None;
    let mut it = args.iter();
    let mut command: Vec<OsString> = Vec::new();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-p" | "--publish" => {
                let spec = it
                    .next()
                    .ok_or_else(|| format!("-p needs a value\n{USAGE}"))?;
                ports.push(parse_publish(spec)?);
            }
            "--network" => {
                network = Some(
                    it.next()
                        .ok_or_else(|| format!("--network needs a value\n{USAGE}"))?
                        .clone(),
                );
            }
            "--" => {
                command.extend(it.by_ref().map(OsString::from));
                break;
            }
            s if s.starts_with("-p") && s.len() > 2 => ports.push(parse_publish(&s[2..])?),
            s if s.starts_with("--network=") => network = Some(s["--network=".len()..].to_string()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
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
    let mut session = Session::start(&spec, &progress)?;
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
    let code = exit_code(status);
    progress(format!("command exited with status {code}; tearing down"));
    session.teardown().map_err(|e| format!("teardown: {e}"))?;
    Ok(code)
}
