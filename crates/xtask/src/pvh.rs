//! The uncompressed `vmlinux` of an x86 `bzImage`, which QEMU boots through PVH: no
//! real-mode setup, no in-guest decompression (measured here under TCG: 0.2–0.5 s less
//! per boot, `../shared/GUEST.md`).
//!
//! The bzImage's setup header says where its compressed payload is (`payload_offset`
//! and `payload_length`, boot protocol 2.08+); the payload's first bytes say how it is
//! compressed and its last four the uncompressed size. The payload goes through the
//! matching Debian tool (`lz4`, `zstd`, `xz` or `gzip`); the result must be an ELF of
//! exactly that size carrying the PVH entry note, or the image is refused.

use std::io::Write;
use std::process::{Command, Stdio};

/// Offsets in the bzImage's setup header (Documentation/arch/x86/boot.rst).
const SETUP_SECTS: usize = 0x1f1;
const HEADER_MAGIC: usize = 0x202;
const PAYLOAD_OFFSET: usize = 0x248;
const PAYLOAD_LENGTH: usize = 0x24c;

/// `XEN_ELFNOTE_PHYS32_ENTRY`: the note a PVH-bootable kernel carries.
const PVH_NOTE: u32 = 18;

/// The compressors a kernel payload may use: magic, the Debian package and tool, and
/// the tool's arguments to decompress stdin to stdout.
const COMPRESSORS: [(&[u8], &str, &[&str]); 4] = [
    (&[0x02, 0x21, 0x4c, 0x18], "lz4", &["-dc"]),
    // The kernel's zstd frames use a window larger than zstd's default limit.
    (
        &[0x28, 0xb5, 0x2f, 0xfd],
        "zstd",
        &["-dc", "--memory=2048MB"],
    ),
    (
        &[0xfd, b'7', b'z', b'X', b'Z', 0],
        "xz",
        &["-dc", "--single-stream"],
    ),
    (&[0x1f, 0x8b], "gzip", &["-dc"]),
];

/// The payload of `bzimage` and the tool (package name) that decompresses it.
pub(crate) fn payload(bzimage: &[u8]) -> Result<(&[u8], &'static str), String> {
    let u32_at = |at: usize| -> Option<u32> {
        let bytes = bzimage.get(at..at + 4)?;
        Some(u32::from_le_bytes(bytes.try_into().ok()?))
    };
    if bzimage.get(HEADER_MAGIC..HEADER_MAGIC + 4) != Some(b"HdrS") {
        return Err("not a bzImage: no HdrS setup header".into());
    }
    let setup_sects = match bzimage.get(SETUP_SECTS) {
        Some(0) => 4, // the boot protocol's meaning of 0
        Some(n) => usize::from(*n),
        None => return Err("bzImage too short".into()),
    };
    let (Some(offset), Some(length)) = (u32_at(PAYLOAD_OFFSET), u32_at(PAYLOAD_LENGTH)) else {
        return Err("bzImage too short for its payload fields".into());
    };
    let start = (setup_sects + 1) * 512 + offset as usize;
    let payload = bzimage
        .get(start..start + length as usize)
        .ok_or_else(|| format!("payload {start}+{length} lies past the bzImage's end"))?;
    let tool = COMPRESSORS
        .iter()
        .find(|(magic, _, _)| payload.starts_with(magic))
        .map(|(_, tool, _)| *tool)
        .ok_or_else(|| {
            format!(
                "unknown payload compression (first bytes {:02x?})",
                &payload[..payload.len().min(6)]
            )
        })?;
    Ok((payload, tool))
}

/// The uncompressed size the payload ends with.
fn stated_size(payload: &[u8]) -> Option<usize> {
    let tail = payload.get(payload.len().checked_sub(4)?..)?;
    Some(u32::from_le_bytes(tail.try_into().ok()?) as usize)
}

/// The `vmlinux` inside `bzimage`, decompressed with its tool (which must be installed).
pub(crate) fn vmlinux(bzimage: &[u8]) -> Result<Vec<u8>, String> {
    let (payload, tool) = payload(bzimage)?;
    let args = COMPRESSORS
        .iter()
        .find(|(_, t, _)| *t == tool)
        .map_or(&[][..], |(_, _, args)| *args);
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("run {tool}: {e}"))?;
    // Fed from a thread while the output is read here: both pipes stay drained.
    let mut stdin = child.stdin.take().ok_or("no stdin pipe")?;
    let input = payload.to_vec();
    let feeder = std::thread::spawn(move || {
        // The tool may stop reading at the end of its stream (the size trailer
        // follows): a broken pipe then is expected.
        let _ = stdin.write_all(&input);
    });
    let out = child
        .wait_with_output()
        .map_err(|e| format!("run {tool}: {e}"))?;
    let _ = feeder.join();
    // The tools complain about the size trailer after the stream (lz4's legacy frame,
    // gzip's "trailing garbage"), so their exit code says little: the size and the
    // ELF checks below are the test.
    let elf = out.stdout;
    let want = stated_size(payload).ok_or("payload too short")?;
    if elf.len() != want {
        return Err(format!(
            "{tool} gave {} bytes; the bzImage says {want}",
            elf.len()
        ));
    }
    if !elf.starts_with(b"\x7fELF\x02\x01") {
        return Err("the payload is not a 64-bit little-endian ELF".into());
    }
    if !has_pvh_note(&elf) {
        return Err("the kernel has no PVH entry note (CONFIG_PVH is off)".into());
    }
    Ok(elf)
}

/// Whether the ELF64 `elf` has a Xen note of type [`PVH_NOTE`] in a `PT_NOTE` segment.
fn has_pvh_note(elf: &[u8]) -> bool {
    let u16_at = |at: usize| {
        elf.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_le_bytes(elf.get(at..at + 4)?.try_into().ok()?))
    };
    let u64_at = |at: usize| -> Option<usize> {
        let v = u64::from_le_bytes(elf.get(at..at + 8)?.try_into().ok()?);
        usize::try_from(v).ok()
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..usize::from(phnum)).any(|i| {
        let ph = phoff + i * usize::from(phentsize);
        const PT_NOTE: u32 = 4;
        if u32_at(ph) != Some(PT_NOTE) {
            return false;
        }
        let (Some(offset), Some(size)) = (u64_at(ph + 8), u64_at(ph + 32)) else {
            return false;
        };
        notes(
            elf.get(offset..offset.saturating_add(size))
                .unwrap_or_default(),
        )
        .any(|(name, kind)| name == b"Xen" && kind == PVH_NOTE)
    })
}

/// The (name, type) of each note in a note segment.
fn notes(mut segment: &[u8]) -> impl Iterator<Item = (&[u8], u32)> {
    std::iter::from_fn(move || {
        let word = |at: usize| -> Option<usize> {
            Some(u32::from_le_bytes(segment.get(at..at + 4)?.try_into().ok()?) as usize)
        };
        let (namesz, descsz, kind) = (word(0)?, word(4)?, word(8)?);
        let align = |n: usize| n.div_ceil(4) * 4;
        let name = segment.get(12..12 + namesz)?;
        let name = name.strip_suffix(&[0]).unwrap_or(name);
        let next = 12 + align(namesz) + align(descsz);
        segment = segment.get(next..).unwrap_or_default();
        Some((name, kind as u32))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bzImage-shaped buffer: setup header fields, and `payload` where they say.
    fn bzimage(payload: &[u8]) -> Vec<u8> {
        let mut image = vec![0u8; 5 * 512];
        image[SETUP_SECTS] = 4;
        image[HEADER_MAGIC..HEADER_MAGIC + 4].copy_from_slice(b"HdrS");
        image[PAYLOAD_OFFSET..PAYLOAD_OFFSET + 4].copy_from_slice(&16u32.to_le_bytes());
        let length = u32::try_from(payload.len()).unwrap_or(u32::MAX);
        image[PAYLOAD_LENGTH..PAYLOAD_LENGTH + 4].copy_from_slice(&length.to_le_bytes());
        image.extend_from_slice(&[0; 16]);
        image.extend_from_slice(payload);
        image
    }

    #[test]
    fn the_payload_and_its_compressor_are_found_from_the_header() {
        let image = bzimage(&[0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3, 4]);
        let (payload, tool) = payload(&image).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(tool, "zstd");
        assert_eq!(payload.len(), 8);
        assert_eq!(
            stated_size(payload),
            Some(u32::from_le_bytes([1, 2, 3, 4]) as usize)
        );
    }

    #[test]
    fn what_is_not_a_bzimage_is_refused_by_name() {
        let err = |bytes: &[u8]| payload(bytes).err().unwrap_or_default();
        assert!(err(&[0; 100]).contains("no HdrS"));
        let mut image = bzimage(&[0x28, 0xb5, 0x2f, 0xfd]);
        image.truncate(image.len() - 2);
        assert!(err(&image).contains("past the bzImage's end"));
        assert!(err(&bzimage(b"plain text")).contains("unknown payload compression"));
    }

    #[test]
    fn a_gzip_payload_round_trips_and_needs_the_pvh_note() {
        // An ELF header with one PT_NOTE holding Xen note 18, gzipped as the kernel
        // build does (the uncompressed size appended).
        let mut elf = vec![0u8; 0x40 + 0x38];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&0x38u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        let note_at = elf.len() as u64;
        let mut note = Vec::new();
        for word in [4u32, 4, PVH_NOTE] {
            note.extend_from_slice(&word.to_le_bytes());
        }
        note.extend_from_slice(b"Xen\0");
        note.extend_from_slice(&[0; 4]);
        elf[0x40..0x44].copy_from_slice(&4u32.to_le_bytes()); // PT_NOTE
        elf[0x48..0x50].copy_from_slice(&note_at.to_le_bytes());
        elf[0x60..0x68].copy_from_slice(&(note.len() as u64).to_le_bytes());
        elf.extend_from_slice(&note);
        let gzip = |bytes: &[u8]| {
            let mut child = Command::new("gzip")
                .arg("-c")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("gzip: {e}"));
            let mut stdin = child.stdin.take().unwrap_or_else(|| panic!("stdin"));
            stdin.write_all(bytes).unwrap_or_else(|e| panic!("{e}"));
            drop(stdin);
            let mut out = child
                .wait_with_output()
                .unwrap_or_else(|e| panic!("{e}"))
                .stdout;
            out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            out
        };
        let back = vmlinux(&bzimage(&gzip(&elf))).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, elf);

        let mut no_note = elf.clone();
        let kind_at = note_at as usize + 8;
        no_note[kind_at..kind_at + 4].copy_from_slice(&6u32.to_le_bytes());
        let err = vmlinux(&bzimage(&gzip(&no_note))).err().unwrap_or_default();
        assert!(err.contains("no PVH entry note"), "{err}");
    }
}
