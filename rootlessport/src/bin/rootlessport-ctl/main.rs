//! `rootlessport-ctl`: list, add and remove the published ports of a running
//! container through its `rootlessport` helper's control socket
//! (`rootlessport::control`). `rootlessport-ctl --help` says how.

mod args;
mod locate;
mod output;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

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

/// Whether fd 1 was closed when the process started (`list >&-`). Rust's runtime
/// opens /dev/null on a closed standard fd before `main`, and writes there vanish
/// without an error, so this is looked at earlier, from an `.init_array` entry.
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

extern "C" fn note_closed_stdout() {
    use nix::fcntl::{fcntl, FcntlArg};
    let closed = fcntl(std::io::stdout(), FcntlArg::F_GETFD) == Err(nix::errno::Errno::EBADF);
    STDOUT_CLOSED.store(closed, Ordering::Relaxed);
}

// The C library calls the functions of `.init_array` before `main` (the runtime's
// fd clean-up included), with its arguments and environment set up; this one only
// asks the kernel about fd 1 and stores a flag, needing nothing else set up.
#[used]
#[link_section = ".init_array"]
static NOTE_CLOSED_STDOUT: extern "C" fn() = note_closed_stdout;

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
    let parsed = args::parse(std::env::args_os().skip(1)).map_err(|e| Failure {
        message: format!("{e} (see {ME} --help)"),
        status: 2,
    })?;
    if STDOUT_CLOSED.load(Ordering::Relaxed) {
        // Refused before any change: what it would print has nowhere to go.
        return Err(Failure::request(
            "stdout is closed: nothing was done (its output would be lost)".into(),
        ));
    }
    let written =
        |r: std::io::Result<()>| r.map_err(|e| Failure::request(format!("writing to stdout: {e}")));
    let cli = match parsed {
        Parsed::Help => return written(print(args::HELP)),
        Parsed::Version => return written(print(&format!("{ME} {}\n", env!("CARGO_PKG_VERSION")))),
        Parsed::Run(cli) => cli,
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
            .map_err(|e| helper.fail(format!("writing to stdout: {e}")))
        }
        Command::Add(mappings) => {
            let ports = control::add(&helper.socket, mappings)
                .map_err(|e| helper.change_error("add", mappings, e))?;
            print(&lines(&ports, output::added))
                .map_err(|e| helper.fail(format!("ports added, but writing to stdout failed: {e}")))
        }
        Command::Remove { mappings, close } => {
            let ports = control::remove(&helper.socket, mappings, *close)
                .map_err(|e| helper.change_error("remove", mappings, e))?;
            print(&lines(&ports, output::removed)).map_err(|e| {
                helper.fail(format!("ports removed, but writing to stdout failed: {e}"))
            })
        }
    }
}

fn lines(ports: &[PortStatus], line: fn(&PortStatus) -> String) -> String {
    ports.iter().map(|p| line(p) + "\n").collect()
}

/// Write `text` to stdout. A reader that went away (`| head -1`) is not an error.
fn print(text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// `WHO is not running (STATE)`: a container whose helper is not there to ask.
fn not_running(who: &str, state: &str) -> String {
    format!("{who} is not running ({state})")
}

/// The hint after a failed connection: why it may have failed.
fn connect_hint(source: &std::io::Error, container: bool) -> &'static str {
    if source.kind() == std::io::ErrorKind::PermissionDenied {
        " (only the user who runs the container may use its helper)"
    } else if container {
        " (is it running with podman's rootlessport port handler, from this project?)"
    } else {
        ""
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
        let found = locate::resolve_container(&podman, name).map_err(|e| {
            Failure::request(match e {
                locate::ResolveError::NoSuchContainer => format!("{quoted}: no such container"),
                locate::ResolveError::Podman(why) => format!("{quoted}: {why}"),
            })
        })?;
        let who = format!("{quoted} (ID {})", &found.id[..12]);
        if let Some(state) = found.state.as_deref() {
            if !locate::helper_runs_in(Some(state)) {
                return Err(Failure::request(not_running(&who, state)));
            }
        }
        let socket = locate::find_socket(&locate::ConfEnv::current(), &found.id).map_err(|e| {
            Failure::request(format!("{who}: reading podman's containers.conf: {e}"))
        })?;
        Ok(Helper {
            socket,
            who,
            container: true,
        })
    }

    /// A failure of this helper's request: `WHO: message`.
    fn fail(&self, message: String) -> Failure {
        Failure::request(format!("{}: {message}", self.who))
    }

    /// The message for a failed `what` request.
    fn error(&self, what: &str, e: ControlError) -> Failure {
        self.fail(match e {
            ControlError::Connect { path, source } if self.container => format!(
                "its port helper does not answer at {}: {source}{}",
                path.display(),
                connect_hint(&source, true)
            ),
            ControlError::Connect { source, .. } => {
                format!(
                    "no helper answers there: {source}{}",
                    connect_hint(&source, false)
                )
            }
            ControlError::Refused(text) => format!("{what}: {text}"),
            ControlError::BadReply(why) => format!(
                "{what}: the helper's reply is not understood ({why}): is it this \
                 project's rootlessport?"
            ),
            other => format!("{what}: {other}"),
        })
    }

    /// As [`Helper::error`]; a refusal names the ports asked for, as typed (the first
    /// few of a long batch).
    fn change_error(&self, what: &str, mappings: &[PortMapping], e: ControlError) -> Failure {
        match e {
            ControlError::Refused(text) => {
                self.fail(format!("{what} {}: {text}", output::spec_list(mappings)))
            }
            other => self.error(what, other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctl_state_and_connect_messages() {
        assert_eq!(
            not_running(r#"container "web" (ID 0123456789ab)"#, "exited"),
            r#"container "web" (ID 0123456789ab) is not running (exited)"#
        );
        let denied = std::io::Error::from_raw_os_error(nix::libc::EACCES);
        let missing = std::io::Error::from_raw_os_error(nix::libc::ENOENT);
        for container in [true, false] {
            assert_eq!(
                connect_hint(&denied, container),
                " (only the user who runs the container may use its helper)"
            );
        }
        assert!(connect_hint(&missing, true).contains("rootlessport port handler"));
        assert_eq!(connect_hint(&missing, false), "");
    }

    #[test]
    fn ctl_change_errors_start_with_the_container() {
        let helper = Helper {
            socket: "/nonexistent/rp/x".into(),
            who: r#"container "web" (ID 0123456789ab)"#.into(),
            container: true,
        };
        let m = |port: u16| PortMapping::new("", port, 80, 1, "tcp");
        let f = helper.change_error(
            "add",
            &[m(40030), m(40001), m(40031), m(40032)],
            ControlError::Refused("listen tcp 0.0.0.0:40001: bind: address already in use".into()),
        );
        assert_eq!(f.status, 1);
        assert_eq!(
            f.message,
            r#"container "web" (ID 0123456789ab): add 40030:80 40001:80 40031:80 ... (1 more): listen tcp 0.0.0.0:40001: bind: address already in use"#
        );
        // Through the library: nothing listens there.
        let f = match control::list(&helper.socket) {
            Err(e) => helper.error("list", e),
            Ok(p) => panic!("listed {p:?}"),
        };
        assert!(
            f.message.starts_with(r#"container "web" (ID 0123456789ab): its port helper does not answer at /nonexistent/rp/x: "#),
            "{}",
            f.message
        );
    }
}
