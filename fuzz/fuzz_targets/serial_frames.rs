//! The virtio-serial frame reader fed a peer's bytes in any pieces
//! (`vmkit_serial::fuzzing::frame_reader`: bounded, every byte accounted for, round
//! trips).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vmkit_serial::fuzzing::frame_reader(data);
});
