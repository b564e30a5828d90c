//! The helper's stdin: podman's config JSON, validated into port specs.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(cfg) = rootlessport::Config::from_json(data) {
        let _ = cfg.check_required();
        let _ = rootlessport::config::parse_child_ip(&cfg.child_ip);
        if let Ok(specs) = rootlessport::config::plan_ports(&cfg.mappings) {
            for s in &specs {
                let _ = s.listen_plan();
            }
        }
    }
});
