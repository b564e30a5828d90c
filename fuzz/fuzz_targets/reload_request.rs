//! Messages on the reload socket.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = rootlessport::reload::parse_request(data);
});
