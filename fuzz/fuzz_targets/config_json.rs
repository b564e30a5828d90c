//! The helper's stdin: podman's config JSON, validated into port specs.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(cfg) = rootlessport::Config::from_json(data) {
        let _ = cfg.check_required();
        // Every port expanded and checked, each listener's plan, then the child IP.
        let _ = cfg.check_ports();
    }
});
