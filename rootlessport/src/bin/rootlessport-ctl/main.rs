//! `rootlessport-ctl`: list, add and remove the published ports of a running
//! container through its `rootlessport` helper's control socket
//! (`rootlessport::control`). `rootlessport-ctl --help` says how.

mod args;
mod locate;
mod output;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use args::{Cli, Command, Parsed, Target};
use rootlessport::control::{self, ControlError, PortStatus};
use slirp_config::PortMapping;

/// The program name in messages.
const ME: &str = "rootlessport-ctl";

/// A failure: the message (one line) and the exit status.
struct Failure {
    message: String,
    status: u8,
}

impl Failure {
    fn request(message: String) -> Failure {
        Failure { message, status: 1 }
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            // One line, whatever the causes hold.
            let _ = writeln!(std::io::stderr(), "{ME}: {}", f.message.replace('\n', " "));
            ExitCode::from(f.status)
        }
    }
}

fn run() -> Result<(), Failure> {
    let cli = match args::parse(std::env::args_os().skip(1)) {
        Ok(Parsed::Help) => return print(args::HELP),
        Ok(Parsed::Version) => return print(&format!("{ME} {}\n", env!("CARGO_PKG_VERSION"))),
        Ok(Parsed::Run(cli)) => cli,
        Err(e) => {
            return Err(Failure {
                message: format!("{e} (see {ME} --help)"),
                status: 2,
            })
        }
    };
    let helper = Helper::find(&cli)?;
    match &cli.command {
        Command::List { json } => {
            let ports = control::list(&helper.socket).map_err(|e| helper.error("list", e))?;
            print(&if *json {
                output::json(&ports)
            } else {
                output::table(&ports)
            })
        }
        Command::Add(mappings) => {
            let ports = control::add(&helper.socket, mappings)
                .map_err(|e| helper.change_error("add", mappings, e))?;
            print(&lines(&ports, output::added))
        }
        Command::Remove { mappings, close } => {
            let ports = control::remove(&helper.socket, mappings, *close)
                .map_err(|e| helper.change_error("remove", mappings, e))?;
            print(&lines(&ports, output::removed))
        }
    }
}

fn lines(ports: &[PortStatus], line: fn(&PortStatus) -> String) -> String {
    ports.iter().map(|p| line(p) + "\n").collect()
}

/// Write `text` to stdout. A reader that went away (`| head -1`) is not an error.
fn print(text: &str) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Failure::request(format!("writing to stdout: {e}"))),
    }
}

/// The helper a command goes to, and how to name it in messages.
struct Helper {
    socket: PathBuf,
    /// `container "web" (ID 0123456789ab)` or `socket /path`.
    who: String,
    /// Found from a container (a missing helper is then worded for podman users).
    container: bool,
}

impl Helper {
    fn find(cli: &Cli) -> Result<Helper, Failure> {
        let name = match &cli.target {
            Target::Socket(path) => {
                return Ok(Helper {
                    socket: path.clone(),
                    who: format!("socket {}", path.display()),
                    container: false,
                })
            }
            Target::Container(name) => name,
        };
        let quoted = format!("container {}", slirp_config::go_quote(name));
        let podman = cli
            .podman
            .clone()
            .or_else(|| {
                std::env::var_os("PODMAN")
                    .filter(|p| !p.is_empty())
                    .map(PathBuf::from)
            })
            .unwrap_or_else(|| PathBuf::from("podman"));
        let id = locate::resolve_container(&podman, name).map_err(|e| {
            Failure::request(match e {
                locate::ResolveError::NoSuchContainer => format!("{quoted}: no such container"),
                locate::ResolveError::Podman(why) => format!("{quoted}: {why}"),
            })
        })?;
        let socket = locate::find_socket(&locate::ConfEnv::current(), &id).map_err(|e| {
            Failure::request(format!("{quoted}: reading podman's containers.conf: {e}"))
        })?;
        Ok(Helper {
            socket,
            who: format!("{quoted} (ID {})", &id[..12]),
            container: true,
        })
    }

    /// The message for a failed `what` request.
    fn error(&self, what: &str, e: ControlError) -> Failure {
        let who = &self.who;
        Failure::request(match e {
            ControlError::Connect { path, source } if self.container => format!(
                "{who}: its port helper does not answer at {}: {source} (is it running with \
                 podman's rootlessport port handler, from this project?)",
                path.display()
            ),
            ControlError::Connect { source, .. } => {
                format!("{who}: no helper answers there: {source}")
            }
            ControlError::Refused(text) => format!("{who}: {what}: {text}"),
            ControlError::BadReply(why) => format!(
                "{who}: {what}: the helper's reply is not understood ({why}): is it this \
                 project's rootlessport?"
            ),
            other => format!("{who}: {what}: {other}"),
        })
    }

    /// As [`Helper::error`]; a refusal names the ports asked for, as typed.
    fn change_error(&self, what: &str, mappings: &[PortMapping], e: ControlError) -> Failure {
        match e {
            ControlError::Refused(text) => {
                let specs: Vec<String> = mappings.iter().map(short_spec).collect();
                Failure::request(format!("{what} {}: {text}", specs.join(" ")))
            }
            other => self.error(what, other),
        }
    }
}

/// A mapping in `-p` syntax, without the default `/tcp`.
fn short_spec(m: &PortMapping) -> String {
    let s = m.to_string();
    match s.strip_suffix("/tcp") {
        Some(short) => short.to_owned(),
        None => s,
    }
}
