//! The command line, parsed with `lexopt` into a [`Cli`] (pure: no I/O).

use std::ffi::OsString;
use std::path::PathBuf;

use lexopt::Arg::{Long, Short, Value};
use slirp_config::{go_quote, ParsePublishError, PortMapping, Proto, Protocol, PublishSyntaxError};

/// The help text (`--help`, `-h`).
pub const HELP: &str = "\
rootlessport-ctl: list, add and remove the published ports of a running container,
through its rootlessport helper (this project's, which podman runs in place of its own).

Usage:
  rootlessport-ctl [--socket PATH | --container NAME|ID] [--podman PATH] COMMAND
  rootlessport-ctl --help | --version

Commands:
  list [--json]
      Every port the helper publishes, one line each: host IP:port, container port,
      protocol, when it was published, then what went through it: TCP connections
      open/total and bytes in (to the container) / out, UDP flows live/total and
      datagrams in/out, and refused connections (TCP) or port-unreachable errors (UDP).
      --json prints the helper's records as a JSON array instead.
  add [IP:]HOST:CONTAINER[/PROTO]...
      Publish more ports, in podman's -p syntax: PROTO tcp (the default), udp, tcp4,
      tcp6, udp4 or udp6 (the digit: IPv4 or IPv6 only, as list shows them), or a comma
      list of them (tcp,udp); ranges as 8000-8002:80-82; an IPv6 address in brackets
      ([::1]:8080:80). Prints one line per port published. Nothing is published when
      any of them fails.
  remove [--close] [IP:]HOST:CONTAINER[/PROTO]...
      Stop publishing ports, given as they were published. Prints one line per port
      removed, with its final counters. Connections already open keep going unless
      --close is given, which resets them. Connections kept are no longer listed and
      end only when their ends close them (a later remove --close of the port, added
      again, does not reach them).
  A request is limited to 64 KiB (about 700 mappings; use ranges for more).

Which helper:
  --container NAME|ID
      The helper of a podman container: the name, ID or ID prefix is resolved to the
      full ID with `podman container inspect` (the podman binary is --podman PATH, else
      $PODMAN, else podman from PATH; a full 64-hex ID works without podman). The
      socket is TMP/rp/ID, TMP being podman's engine tmp dir: [engine] tmp_dir of the
      containers.conf files podman reads (only $CONTAINERS_CONF when set), else
      /run/libpod for root and $XDG_RUNTIME_DIR/libpod/tmp for other users. When no
      socket is there, a listening socket ending in /rp/ID is looked up in
      /proc/net/unix (podman started with --tmpdir, say).
  --socket PATH
      The helper's control socket itself (TMP/rp/ID).
  One of the two is needed. Run it as the user who runs the container (the helper
  answers only its own user). A container podman reports as not running (created,
  exited, ...) is refused without asking its helper.

Changes last as long as the helper does. podman's own record of the container
(podman port, podman inspect) does not show them, and when the container restarts,
its new helper publishes podman's set of ports again.

Exit status: 0 success, 1 the request failed or its output could not be written
(message on stderr, saying whether an add or remove was made), 2 bad usage.
";

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// `--help`.
    Help,
    /// `--version`.
    Version,
    /// A command to run.
    Run(Cli),
}

/// A command and the helper it goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cli {
    /// Which helper.
    pub target: Target,
    /// `--podman PATH`, if given.
    pub podman: Option<PathBuf>,
    /// What to do.
    pub command: Command,
}

/// How the helper is found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `--socket PATH`.
    Socket(PathBuf),
    /// `--container NAME|ID`.
    Container(String),
}

/// The command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `list [--json]`.
    List {
        /// JSON output.
        json: bool,
    },
    /// `add SPEC...`.
    Add(Vec<PortMapping>),
    /// `remove [--close] SPEC...`.
    Remove {
        /// The mappings to remove.
        mappings: Vec<PortMapping>,
        /// Reset their live connections.
        close: bool,
    },
}

/// A usage error: one line, shown after `rootlessport-ctl: `.
pub type UsageError = String;

/// Parse the arguments after the program name.
///
/// # Errors
///
/// A one-line message naming the argument at fault.
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Parsed, UsageError> {
    let mut p = lexopt::Parser::from_args(args);
    let mut socket: Option<PathBuf> = None;
    let mut container: Option<String> = None;
    let mut podman: Option<PathBuf> = None;
    let mut command: Option<String> = None;
    let mut json = false;
    let mut close = false;
    let mut specs: Vec<String> = Vec::new();
    let value = |p: &mut lexopt::Parser, name: &str| -> Result<OsString, UsageError> {
        match p.value() {
            Ok(v) if !v.is_empty() => Ok(v),
            _ => Err(format!("{name} needs a value")),
        }
    };
    while let Some(arg) = p.next().map_err(|e| e.to_string())? {
        match arg {
            Short('h') | Long("help") => return Ok(Parsed::Help),
            Long("version") => return Ok(Parsed::Version),
            Long("socket") if command.is_none() => {
                socket = Some(value(&mut p, "--socket")?.into());
            }
            Long("container") if command.is_none() => {
                let v = value(&mut p, "--container")?;
                container = Some(
                    v.into_string()
                        .map_err(|v| format!("--container {v:?}: not UTF-8"))?,
                );
            }
            Long("podman") if command.is_none() => {
                podman = Some(value(&mut p, "--podman")?.into());
            }
            Long("json") if command.as_deref() == Some("list") => json = true,
            Long("close") if command.as_deref() == Some("remove") => close = true,
            Value(v) => {
                let v = v
                    .into_string()
                    .map_err(|v| format!("argument {v:?} is not UTF-8"))?;
                match command {
                    None => match v.as_str() {
                        "list" | "add" | "remove" => command = Some(v),
                        _ => {
                            return Err(format!(
                                "unknown command {v:?} (commands: list, add, remove)"
                            ))
                        }
                    },
                    Some(_) => specs.push(v),
                }
            }
            Long(name) => return Err(unknown(&format!("--{name}"), command.as_deref())),
            Short(c) => return Err(unknown(&format!("-{c}"), command.as_deref())),
        }
    }
    let target = match (socket, container) {
        (Some(_), Some(_)) => return Err("give --socket or --container, not both".into()),
        (Some(s), None) => Target::Socket(s),
        (None, Some(c)) => Target::Container(c),
        (None, None) => {
            return Err("which helper? give --socket PATH or --container NAME|ID".into())
        }
    };
    let Some(name) = command else {
        return Err("no command (list, add or remove)".into());
    };
    let mappings = || -> Result<Vec<PortMapping>, UsageError> {
        if specs.is_empty() {
            return Err(format!(
                "{name}: no port given ([IP:]HOST:CONTAINER[/PROTO])"
            ));
        }
        specs
            .iter()
            .map(|s| parse_spec(s).map_err(|e| format!("{name}: {}: {e}", go_quote(s))))
            .collect()
    };
    let command = match name.as_str() {
        "list" => match specs.first() {
            None => Command::List { json },
            Some(extra) => return Err(format!("list takes no argument, got {extra:?}")),
        },
        "add" => Command::Add(mappings()?),
        _ => Command::Remove {
            mappings: mappings()?,
            close,
        },
    };
    Ok(Parsed::Run(Cli {
        target,
        podman,
        command,
    }))
}

/// One port argument of `add` or `remove`: podman's `-p` syntax
/// (`PortMapping::from_str`), with the protocol names RootlessKit's port specs take
/// besides (`tcp4`, `tcp6`, `udp4`, `udp6`: one family only), which the helper
/// publishes and `list` shows. The mapping's `protocol` is the list as written (`tcp`
/// when there is none).
///
/// # Errors
///
/// Why `spec` is refused (without the spec itself): the protocol list first, then
/// what `PortMapping::from_str` finds. `sctp` is refused as before: the helper does
/// not carry it.
pub fn parse_spec(spec: &str) -> Result<PortMapping, String> {
    let (rest, protocol) = match spec.rsplit_once('/') {
        Some((rest, list)) => (rest, Some(list)),
        None => (spec, None),
    };
    if let Some(list) = protocol {
        for name in list.split(',') {
            if !matches!(
                name.parse::<Proto>(),
                Ok(Proto {
                    protocol: Protocol::Tcp | Protocol::Udp,
                    ..
                })
            ) {
                return Err(format!(
                    "protocol {} is not one of tcp, udp, tcp4, tcp6, udp4, udp6",
                    go_quote(name)
                ));
            }
        }
    }
    // A second `/` would be read as a protocol list by the parser below.
    if rest.contains('/') {
        return Err(PublishSyntaxError::Shape.to_string());
    }
    let mut mapping: PortMapping = rest
        .parse()
        .map_err(|e: ParsePublishError| e.reason().to_string())?;
    if let Some(list) = protocol {
        mapping.set_protocol(list);
    }
    Ok(mapping)
}

/// `unknown option --x`, with the command when there is one.
fn unknown(shown: &str, command: Option<&str>) -> UsageError {
    match command {
        None => format!("unknown option {shown}"),
        Some(c) => format!("unknown option {shown} for {c}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(args: &[&str]) -> Result<Parsed, UsageError> {
        parse(args.iter().map(OsString::from))
    }

    fn run(args: &[&str]) -> Cli {
        match parse_str(args) {
            Ok(Parsed::Run(cli)) => cli,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    #[test]
    fn ctl_commands_parse() {
        let cli = run(&["--container", "web", "list"]);
        assert_eq!(cli.target, Target::Container("web".into()));
        assert_eq!(cli.command, Command::List { json: false });
        assert_eq!(cli.podman, None);

        let cli = run(&[
            "--socket=/run/libpod/rp/abc",
            "--podman",
            "/opt/podman",
            "list",
            "--json",
        ]);
        assert_eq!(cli.target, Target::Socket("/run/libpod/rp/abc".into()));
        assert_eq!(cli.podman, Some(PathBuf::from("/opt/podman")));
        assert_eq!(cli.command, Command::List { json: true });

        let cli = run(&["--container", "web", "add", "8081:80", "[::1]:5353:53/udp"]);
        assert_eq!(
            cli.command,
            Command::Add(vec![
                PortMapping::new("", 8081, 80, 1, "tcp"),
                PortMapping::new("::1", 5353, 53, 1, "udp"),
            ])
        );

        let cli = run(&[
            "--container",
            "web",
            "remove",
            "--close",
            "127.0.0.1:8000-8001:80-81/tcp,udp",
        ]);
        assert_eq!(
            cli.command,
            Command::Remove {
                mappings: vec![PortMapping::new("127.0.0.1", 8000, 80, 2, "tcp,udp")],
                close: true
            }
        );
        // --close may come after the ports too.
        let cli = run(&["--container", "web", "remove", "8081:80", "--close"]);
        assert!(matches!(cli.command, Command::Remove { close: true, .. }));
    }

    #[test]
    fn ctl_specs_take_rootlesskit_protocols() {
        let ok = |s: &str| parse_spec(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(ok("8080:80"), PortMapping::new("", 8080, 80, 1, "tcp"));
        assert_eq!(
            ok("[::1]:40050:80/tcp6"),
            PortMapping::new("::1", 40050, 80, 1, "tcp6")
        );
        assert_eq!(
            ok("127.0.0.1:40051-40052:80-81/tcp4,udp4"),
            PortMapping::new("127.0.0.1", 40051, 80, 2, "tcp4,udp4")
        );
        assert_eq!(ok("53:53/udp6"), PortMapping::new("", 53, 53, 1, "udp6"));
        assert_eq!(
            ok("53:53/udp,tcp"),
            PortMapping::new("", 53, 53, 1, "udp,tcp")
        );
        // Written back as typed (`remove` takes what `list` and `add` print).
        assert_eq!(ok("[::1]:40050:80/tcp6").to_string(), "[::1]:40050:80/tcp6");

        let bad = |s: &str| parse_spec(s).unwrap_err();
        let not_one = |name: &str| {
            format!("protocol \"{name}\" is not one of tcp, udp, tcp4, tcp6, udp4, udp6")
        };
        for (spec, name) in [
            ("8080:80/sctp", "sctp"),
            ("8080:80/sctp4", "sctp4"),
            ("8080:80/tcp,sctp6", "sctp6"),
            ("8080:80/TCP", "TCP"),
            ("8080:80/tcp5", "tcp5"),
            ("8080:80/", ""),
            ("8080:80/tcp,", ""),
        ] {
            assert_eq!(bad(spec), not_one(name), "{spec}");
        }
        // The protocol is checked first, then the rest by podman's rules.
        assert_eq!(bad("x:80/tcp9"), not_one("tcp9"));
        assert_eq!(bad("x:80/tcp6"), r#""x" is not a port (1-65535)"#);
        assert_eq!(bad("1.2.3:8080:80/udp4"), r#""1.2.3" is not an IP address"#);
        assert_eq!(
            bad("8080-8081:80/tcp"),
            "host and container ranges differ in length"
        );
        assert_eq!(bad("80/80:80/tcp"), "expected [IP:]HOST:CONTAINER[/PROTO]");
        assert_eq!(bad("-1:80"), r#""" is not a port (1-65535)"#);
    }

    #[test]
    fn ctl_help_and_version_win() {
        assert_eq!(parse_str(&["--help"]), Ok(Parsed::Help));
        assert_eq!(parse_str(&["-h"]), Ok(Parsed::Help));
        assert_eq!(
            parse_str(&["--container", "x", "add", "-h"]),
            Ok(Parsed::Help)
        );
        assert_eq!(parse_str(&["--version"]), Ok(Parsed::Version));
    }

    #[test]
    fn ctl_usage_errors_name_the_argument() {
        let err = |args: &[&str]| parse_str(args).unwrap_err();
        assert_eq!(
            err(&[]),
            "which helper? give --socket PATH or --container NAME|ID"
        );
        assert_eq!(
            err(&["--container", "web"]),
            "no command (list, add or remove)"
        );
        assert_eq!(
            err(&["--container", "web", "frob"]),
            r#"unknown command "frob" (commands: list, add, remove)"#
        );
        assert_eq!(
            err(&["--socket", "/s", "--container", "web", "list"]),
            "give --socket or --container, not both"
        );
        assert_eq!(err(&["--container"]), "--container needs a value");
        assert_eq!(err(&["--container="]), "--container needs a value");
        assert_eq!(
            err(&["--container", "web", "add"]),
            "add: no port given ([IP:]HOST:CONTAINER[/PROTO])"
        );
        assert_eq!(
            err(&["--container", "web", "add", "8081:80", "80800:80"]),
            r#"add: "80800:80": "80800" is not a port (1-65535)"#
        );
        // After `--`, an argument that looks like an option is a port, named as typed.
        assert_eq!(
            err(&["--container", "web", "add", "--", "-1:80"]),
            r#"add: "-1:80": "" is not a port (1-65535)"#
        );
        assert_eq!(
            err(&["--container", "web", "remove", "8081:80/sctp"]),
            r#"remove: "8081:80/sctp": protocol "sctp" is not one of tcp, udp, tcp4, tcp6, udp4, udp6"#
        );
        assert_eq!(
            err(&["--container", "web", "list", "x"]),
            r#"list takes no argument, got "x""#
        );
        assert_eq!(
            err(&["--container", "web", "list", "--close"]),
            "unknown option --close for list"
        );
        assert_eq!(
            err(&["--container", "web", "add", "--json", "1:1"]),
            "unknown option --json for add"
        );
        assert_eq!(err(&["-x"]), "unknown option -x");
        assert_eq!(err(&["--json=yes", "list"]), "unknown option --json");
        assert_eq!(
            err(&["--container", "web", "list", "--json=yes"]),
            r#"unexpected argument for option '--json': "yes""#
        );
        // Options of the helper choice come before the command.
        assert_eq!(
            err(&["list", "--container", "web"]),
            "unknown option --container for list"
        );
    }

    #[test]
    fn ctl_help_documents_every_command_and_rule() {
        for word in [
            "list [--json]",
            "add [IP:]HOST:CONTAINER[/PROTO]",
            "remove [--close]",
            "--container NAME|ID",
            "--socket PATH",
            "--podman PATH",
            "$PODMAN",
            "podman container inspect",
            "tmp_dir",
            "$CONTAINERS_CONF",
            "/run/libpod",
            "$XDG_RUNTIME_DIR/libpod/tmp",
            "/proc/net/unix",
            "podman port",
            "restarts",
            "Exit status: 0 success, 1 the request failed or its output could not be written",
            "whether an add or remove was made",
            "tcp4",
            "udp6",
            "no longer listed",
            "does not reach them",
            "64 KiB",
            "not running",
        ] {
            assert!(HELP.contains(word), "help lacks {word:?}");
        }
        assert!(
            HELP.lines().all(|l| l.chars().count() <= 88),
            "a help line is too long"
        );
    }
}
