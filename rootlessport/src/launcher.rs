//! Starting the helper from an engine (podman's `setupRootlessPortMappingViaRLK`): the
//! config on stdin, the exit pipe as fd 3 and the ready pipe as fd 4, readiness and
//! death awaited together under a deadline, the helper's one-line error reported as
//! `rootlessport <line>`.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use slirp_spawn::process::{Helper, HelperCommand, LogFile, NotReady};

use crate::config::Config;
use slirp_config::go_quote as q;

/// How long [`Launcher::start`] waits for readiness unless told otherwise (10 s): the
/// one default of every helper, slirp-spawn's.
pub use slirp_spawn::process::DEFAULT_READY_TIMEOUT;

/// Errors of starting the helper, in podman's words (its
/// `setupRootlessPortMappingViaRLK` and `waitForSync`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LaunchError {
    /// The helper said what was wrong (its stdout line, an [`crate::Error`]'s text).
    #[error("rootlessport {0}")]
    Reported(String),
    /// The helper could not be started (no such binary, no permission, ...).
    #[error("failed to start rootlessport process: {0}")]
    Spawn(#[source] io::Error),
    /// The helper exited before ready without a word on stdout: its log (stderr).
    #[error("rootlessport failed: {}", q(.0))]
    Failed(String),
    /// The helper was killed by a signal before ready.
    #[error("rootlessport killed by signal")]
    KilledBySignal,
    /// The helper closed its ready fd without writing to it: its log.
    #[error("rootlessport closed its ready fd without signalling readiness: {}", q(.0))]
    ClosedWithoutReady(String),
    /// The helper was not ready within [`Launcher::ready_timeout`] (it is killed).
    #[error("rootlessport did not become ready within {}s: {}", .timeout.as_secs_f64(), q(.log))]
    Timeout {
        /// The deadline it missed.
        timeout: Duration,
        /// Its log so far.
        log: String,
    },
    /// Setting up the launch failed (pipes, log files, the user namespace).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

/// Where the helper binary is and how long it may take to get ready. Made with
/// [`Launcher::new`]; set the other fields as needed (more may come).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Launcher {
    /// The `rootlessport` executable.
    pub binary: PathBuf,
    /// How long [`Launcher::start`] waits for readiness; default
    /// [`DEFAULT_READY_TIMEOUT`] (10 s).
    pub ready_timeout: Duration,
    /// Run the helper inside this user namespace (a rootless engine's own), so that it
    /// may enter the container netns that namespace owns.
    pub userns: Option<PathBuf>,
}

impl LaunchError {
    /// The OS error behind the failure, when there is one an engine may want to tell
    /// apart (`EADDRINUSE` from `EACCES` for a host port, say): the cause of
    /// [`LaunchError::Spawn`] and [`LaunchError::Io`], or, for
    /// [`LaunchError::Reported`], the errno whose text ends the helper's line (the line
    /// crossed a process boundary as text, in Go's words: `bind: address already in
    /// use`).
    pub fn errno(&self) -> Option<i32> {
        match self {
            LaunchError::Spawn(e) | LaunchError::Io { source: e, .. } => e.raw_os_error(),
            LaunchError::Reported(line) => REPORTED_ERRNOS.iter().copied().find(|&code| {
                line.ends_with(&crate::helper::errno_text(&io::Error::from_raw_os_error(
                    code,
                )))
            }),
            _ => None,
        }
    }
}

/// The errnos a helper's one-line report can end with (binding, namespaces, files).
const REPORTED_ERRNOS: &[i32] = &[
    libc::EADDRINUSE,
    libc::EADDRNOTAVAIL,
    libc::EACCES,
    libc::EPERM,
    libc::EAFNOSUPPORT,
    libc::EINVAL,
    libc::ENOENT,
    libc::EMFILE,
    libc::ENFILE,
    libc::ENOMEM,
    libc::ENOSPC,
    libc::ENODEV,
];

impl Launcher {
    /// A launcher of `binary`, with the default timeout and no user namespace.
    pub fn new(binary: impl Into<PathBuf>) -> Self {
        Launcher {
            binary: binary.into(),
            ready_timeout: DEFAULT_READY_TIMEOUT,
            userns: None,
        }
    }

    /// Start the helper for `config` (its `ExitFD`/`ReadyFD` are set to 3 and 4 here)
    /// with `exit_fd`, the read end of the pipe whose write end the container's monitor
    /// holds: the helper exits when that closes. Returns once every port is served.
    ///
    /// # Errors
    ///
    /// [`LaunchError::Reported`] with the helper's own line (`rootlessport listen tcp
    /// 0.0.0.0:8080: bind: address already in use`; [`LaunchError::errno`] recovers the
    /// errno); [`LaunchError::Spawn`] when it cannot be run; [`LaunchError::Failed`],
    /// [`LaunchError::KilledBySignal`], [`LaunchError::ClosedWithoutReady`] or
    /// [`LaunchError::Timeout`] when it never got ready; [`LaunchError::Io`] when the
    /// pipes, log files or user namespace could not be set up. The helper is killed and
    /// reaped first.
    pub fn start(&self, config: &Config, exit_fd: OwnedFd) -> Result<RootlessPort, LaunchError> {
        let started = Instant::now();
        let mut config = config.clone();
        config.exit_fd = slirp_config::EXIT_FD;
        config.ready_fd = slirp_config::READY_FD;
        let json = serde_json::to_vec(&config).map_err(|e| LaunchError::Io {
            what: "encoding the config",
            source: e.into(),
        })?;
        let io = |what| move |source| LaunchError::Io { what, source };
        let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| io("creating the ready pipe")(e.into()))?;
        // stdout is for the human-readable error, stderr is the debug log.
        let stdout =
            LogFile::anonymous("rootlessport-stdout").map_err(io("creating its stdout"))?;
        let stderr = stderr_log(&config).map_err(io("creating its log file"))?;
        let mut cmd = HelperCommand::new(&self.binary);
        if let Some(userns) = &self.userns {
            let fd = std::fs::File::open(userns).map_err(io("opening the user namespace"))?;
            cmd = cmd.join_userns(fd.into());
        }
        // From here on the time is the helper's: its exec, start-up and binding (the
        // config is encoded and written to its stdin file already).
        let spawned = Instant::now();
        let mut helper = cmd
            .stdin_bytes(json)
            .leak_fd(exit_fd, slirp_config::EXIT_FD)
            .leak_fd(ready_w, slirp_config::READY_FD)
            .stdout_log(&stdout)
            .map_err(io("sharing its stdout"))?
            .stderr_log(&stderr)
            .map_err(io("sharing its log"))?
            .spawn()
            .map_err(LaunchError::Spawn)?;
        let why = match helper.await_ready(&ready_r, started + self.ready_timeout) {
            Ok(_) => {
                return Ok(RootlessPort {
                    helper,
                    startup: spawned.elapsed(),
                })
            }
            Err(why) => why,
        };
        // The helper is killed and reaped by now, so its output is complete.
        let err = match why {
            NotReady::Wait(source) => {
                return Err(LaunchError::Io {
                    what: "waiting for rootlessport",
                    source,
                })
            }
            NotReady::Exited(_) => LaunchError::Failed(stderr.contents()),
            NotReady::Signalled(_) => LaunchError::KilledBySignal,
            NotReady::ClosedWithoutReady => LaunchError::ClosedWithoutReady(stderr.contents()),
            NotReady::TimedOut => LaunchError::Timeout {
                timeout: self.ready_timeout,
                log: stderr.contents(),
            },
        };
        // Its stdout line, when it wrote one, says what was wrong in its own words.
        let said = stdout.contents();
        let said = said.trim_end_matches('\n');
        Err(if said.is_empty() {
            err
        } else {
            LaunchError::Reported(said.to_owned())
        })
    }
}

fn stderr_log(config: &Config) -> io::Result<LogFile> {
    let id_ok = slirp_config::check_container_id(&config.container_id).is_ok();
    if config.tmp_dir.is_empty() || !id_ok {
        return LogFile::anonymous("rootlessport-log");
    }
    LogFile::create_unlinked(
        Path::new(&config.tmp_dir),
        &format!("rootlessport-{}.log", config.container_id),
    )
}

/// A running, ready helper. Dropping it kills the helper; [`RootlessPort::release`]
/// lets it run until its exit fd closes, reaped in the background.
#[derive(Debug)]
pub struct RootlessPort {
    helper: Helper,
    startup: Duration,
}

impl RootlessPort {
    /// How long the helper took from being spawned to its ready byte: its exec,
    /// start-up and every listener bound (not the caller's encoding of the config,
    /// which [`Launcher::start`] does first). For logs and benchmarks.
    pub fn startup_time(&self) -> Duration {
        self.startup
    }

    /// The helper's process id.
    pub fn pid(&self) -> u32 {
        self.helper.pid()
    }

    /// A pidfd for the helper, readable once it has exited.
    ///
    /// `None` on kernels without `pidfd_open` (before 5.3), or when it failed; the
    /// helper works the same, its death is then polled for.
    pub fn pidfd(&self) -> Option<BorrowedFd<'_>> {
        self.helper.pidfd()
    }

    /// Wait up to `timeout` for the helper to exit (after its exit fd closed), and reap
    /// it: its status, or `None` if it still runs.
    ///
    /// # Errors
    ///
    /// `poll` or `waitpid` failing.
    pub fn wait_timeout(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        self.helper.wait_timeout(timeout)
    }

    /// SIGTERM, then SIGKILL after `grace`; always reaps. Its status (that of its own
    /// exit when it had exited already).
    ///
    /// # Errors
    ///
    /// Signalling or waiting failing; the helper is still killed and reaped when the
    /// handle drops.
    pub fn stop(mut self, grace: Duration) -> io::Result<ExitStatus> {
        if let Some(s) = self.helper.try_wait()? {
            return Ok(s);
        }
        self.helper.signal(libc::SIGTERM)?;
        match self.helper.wait_timeout(grace)? {
            Some(s) => Ok(s),
            None => self.helper.kill(),
        }
    }

    /// Let it run on; the shared reaper reaps it when it exits. Returns its pid.
    pub fn release(mut self) -> u32 {
        self.helper.hand_to_reaper()
    }
}

#[cfg(test)]
mod errno_tests {
    use super::*;

    #[test]
    fn a_reported_line_gives_back_its_errno() {
        let e =
            LaunchError::Reported("listen tcp 0.0.0.0:8080: bind: address already in use".into());
        assert_eq!(e.errno(), Some(libc::EADDRINUSE));
        let e = LaunchError::Reported("listen tcp 0.0.0.0:80: bind: permission denied".into());
        assert_eq!(e.errno(), Some(libc::EACCES));
        let e = LaunchError::Reported("invalid ContainerID \"a/b\"".into());
        assert_eq!(e.errno(), None);
        let e = LaunchError::Spawn(io::Error::from_raw_os_error(libc::ENOENT));
        assert_eq!(e.errno(), Some(libc::ENOENT));
        assert_eq!(LaunchError::KilledBySignal.errno(), None);
    }
}
