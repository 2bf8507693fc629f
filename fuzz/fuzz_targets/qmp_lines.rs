//! QMP's line reader, message sorting and event building fed a QEMU's bytes
//! (`vmkit_qmp::fuzzing::qmp_lines`: the line limit holds, events keep their names).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    vmkit_qmp::fuzzing::qmp_lines(data);
});
