//! The container ID as a file name: podman names the helpers' files after it
//! (`TMPDIR/slirp4netns-<ID>.log`, `TMPDIR/<ID>.net`, `TMPDIR/rootlessport-<ID>.log`),
//! so it must be one plain name, never a path.

/// The longest container ID [`check_container_id`] accepts, in bytes: room for the
/// longest file name built from it (`rootlessport-<ID>.log`) within the 255 bytes of a
/// name. podman's IDs are 64 hex digits.
pub const MAX_CONTAINER_ID_LEN: usize = 200;

/// Why a container ID cannot name a file. The Display texts follow `invalid container
/// id "ID": `.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadContainerId {
    /// The empty string.
    #[error("it is empty")]
    Empty,
    /// A `/` anywhere: it would name a path.
    #[error("it contains '/'")]
    Slash,
    /// A NUL byte anywhere: no file name can hold one.
    #[error("it contains a NUL byte")]
    Nul,
    /// `.` or `..`.
    #[error("it is a relative directory name")]
    DotDir,
    /// Longer than [`MAX_CONTAINER_ID_LEN`] bytes.
    #[error("it is longer than 200 bytes")]
    TooLong,
}

/// Check that `id` can name the helpers' files: not empty, no `/`, no NUL, not `.` or
/// `..`, at most [`MAX_CONTAINER_ID_LEN`] bytes.
///
/// ```
/// use slirp_config::{check_container_id, BadContainerId};
/// assert_eq!(check_container_id("3f2a9c"), Ok(()));
/// assert_eq!(check_container_id("../x"), Err(BadContainerId::Slash));
/// ```
///
/// # Errors
///
/// The first rule `id` breaks, in the order above.
pub fn check_container_id(id: &str) -> Result<(), BadContainerId> {
    if id.is_empty() {
        Err(BadContainerId::Empty)
    } else if id.contains('/') {
        Err(BadContainerId::Slash)
    } else if id.contains('\0') {
        Err(BadContainerId::Nul)
    } else if id == "." || id == ".." {
        Err(BadContainerId::DotDir)
    } else if id.len() > MAX_CONTAINER_ID_LEN {
        Err(BadContainerId::TooLong)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_in_order() {
        assert_eq!(check_container_id(""), Err(BadContainerId::Empty));
        assert_eq!(check_container_id("a/\0"), Err(BadContainerId::Slash));
        assert_eq!(check_container_id("a\0"), Err(BadContainerId::Nul));
        assert_eq!(check_container_id("."), Err(BadContainerId::DotDir));
        assert_eq!(check_container_id(".."), Err(BadContainerId::DotDir));
        assert_eq!(check_container_id("..."), Ok(()));
        assert_eq!(check_container_id(&"a".repeat(200)), Ok(()));
        assert_eq!(
            check_container_id(&"a".repeat(201)),
            Err(BadContainerId::TooLong)
        );
        assert_eq!(
            BadContainerId::TooLong.to_string(),
            "it is longer than 200 bytes"
        );
    }
}
