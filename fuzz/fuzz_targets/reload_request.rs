//! Messages on the reload socket: podman's reloads and our control requests.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The helper's decoders, reachable in `cargo fuzz` builds (`--cfg fuzzing`) only.
    let _ = rootlessport::fuzzing::parse_request(data);
    let _ = rootlessport::fuzzing::parse_control_request(data);
});
