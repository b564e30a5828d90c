//! Messages on the reload socket.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The helper's decoder, reachable in `cargo fuzz` builds (`--cfg fuzzing`) only.
    let _ = rootlessport::fuzzing::parse_request(data);
});
