//! The port mapping podman hands to its port forwarders.

use serde::{Deserialize, Serialize};

/// One published port (or range), with podman's JSON field names.
///
/// Missing fields take their zero value, as Go's decoder does.
///
/// ```
/// let m: slirp_config::PortMapping = serde_json::from_str(
///     r#"{"host_ip":"","container_port":80,"host_port":8080,"range":2,"protocol":"tcp,udp"}"#,
/// ).unwrap();
/// assert_eq!(m.protocols().collect::<Vec<_>>(), ["tcp", "udp"]);
/// assert_eq!(m.count(), 2);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PortMapping {
    /// Host address to listen on; empty means every address.
    pub host_ip: String,
    pub container_port: u16,
    pub host_port: u16,
    /// Number of consecutive ports; 0 means 1.
    pub range: u16,
    /// `tcp`, `udp`, ... or a comma list of them; empty means `tcp`.
    pub protocol: String,
}

impl PortMapping {
    /// `range` ports from `host_ip:host_port` (`""`: every address) to
    /// `container_port`, over `protocol` (`tcp`, `udp`, `tcp,udp`, ...).
    pub fn new(
        host_ip: &str,
        host_port: u16,
        container_port: u16,
        range: u16,
        protocol: &str,
    ) -> Self {
        PortMapping {
            host_ip: host_ip.to_owned(),
            container_port,
            host_port,
            range,
            protocol: protocol.to_owned(),
        }
    }

    /// How many ports the mapping covers (`range` 0 counts as 1).
    pub fn count(&self) -> u16 {
        self.range.max(1)
    }

    /// The protocols of the comma list (`tcp` when empty).
    pub fn protocols(&self) -> impl Iterator<Item = &str> {
        let list = if self.protocol.is_empty() {
            "tcp"
        } else {
            &self.protocol
        };
        list.split(',')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn podman_json_roundtrip() {
        let json = r#"{"host_ip":"127.0.0.1","container_port":80,"host_port":18082,"range":1,"protocol":"tcp"}"#;
        let m: PortMapping = serde_json::from_str(json).unwrap();
        assert_eq!(
            m,
            PortMapping {
                host_ip: "127.0.0.1".into(),
                container_port: 80,
                host_port: 18082,
                range: 1,
                protocol: "tcp".into()
            }
        );
        assert_eq!(serde_json::to_string(&m).unwrap(), json);
    }

    #[test]
    fn zero_values() {
        let m: PortMapping = serde_json::from_str(r#"{"host_port":8080}"#).unwrap();
        assert_eq!(m.count(), 1);
        assert_eq!(m.protocols().collect::<Vec<_>>(), ["tcp"]);
        assert_eq!(m.host_ip, "");
        assert!(serde_json::from_str::<PortMapping>(r#"{"host_port":70000}"#).is_err());
        assert!(serde_json::from_str::<PortMapping>(r#"{"host_port":-1}"#).is_err());
    }
}
