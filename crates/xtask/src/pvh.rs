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
const PVH_NOTE: usize = 18;

/// A compression a kernel payload may use.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Compressor {
    /// The payload's first bytes.
    magic: &'static [u8],
    /// The command that decompresses it.
    pub(crate) tool: &'static str,
    /// The Debian package the command comes in.
    pub(crate) package: &'static str,
    /// The command's arguments to decompress stdin to stdout.
    args: &'static [&'static str],
}

const COMPRESSORS: [Compressor; 4] = [
    Compressor {
        magic: &[0x02, 0x21, 0x4c, 0x18],
        tool: "lz4",
        package: "lz4",
        args: &["-dc"],
    },
    // The kernel's zstd frames use a window larger than zstd's default limit.
    Compressor {
        magic: &[0x28, 0xb5, 0x2f, 0xfd],
        tool: "zstd",
        package: "zstd",
        args: &["-dc", "--memory=2048MB"],
    },
    Compressor {
        magic: &[0xfd, b'7', b'z', b'X', b'Z', 0],
        tool: "xz",
        package: "xz-utils",
        args: &["-dc", "--single-stream"],
    },
    Compressor {
        magic: &[0x1f, 0x8b],
        tool: "gzip",
        package: "gzip",
        args: &["-dc"],
    },
];

/// The `N` bytes of `bytes` at `at`, if it holds them.
fn at<const N: usize>(bytes: &[u8], at: usize) -> Option<[u8; N]> {
    bytes.get(at..at.checked_add(N)?)?.try_into().ok()
}

/// The little-endian `u32` of `bytes` at `offset`, as a `usize`.
fn u32_at(bytes: &[u8], offset: usize) -> Option<usize> {
    at(bytes, offset).map(|b| u32::from_le_bytes(b) as usize)
}

/// The compressed payload of `bzimage` and how it is compressed.
pub(crate) fn payload(bzimage: &[u8]) -> Result<(&[u8], &'static Compressor), String> {
    if bzimage.get(HEADER_MAGIC..HEADER_MAGIC + 4) != Some(b"HdrS") {
        return Err("not a bzImage: no HdrS setup header".into());
    }
    let setup_sects = match bzimage.get(SETUP_SECTS) {
        Some(0) => 4, // the boot protocol's meaning of 0
        Some(n) => usize::from(*n),
        None => return Err("bzImage too short".into()),
    };
    let (Some(offset), Some(length)) = (
        u32_at(bzimage, PAYLOAD_OFFSET),
        u32_at(bzimage, PAYLOAD_LENGTH),
    ) else {
        return Err("bzImage too short for its payload fields".into());
    };
    let start = (setup_sects + 1) * 512 + offset;
    let payload = bzimage
        .get(start..start + length)
        .ok_or_else(|| format!("payload {start}+{length} lies past the bzImage's end"))?;
    let compressor = COMPRESSORS
        .iter()
        .find(|c| payload.starts_with(c.magic))
        .ok_or_else(|| {
            format!(
                "unknown payload compression (first bytes {:02x?})",
                &payload[..payload.len().min(6)]
            )
        })?;
    Ok((payload, compressor))
}

/// The uncompressed size the payload ends with.
fn stated_size(payload: &[u8]) -> Option<usize> {
    u32_at(payload, payload.len().checked_sub(4)?)
}

/// The `vmlinux` of a bzImage: its `payload`, decompressed with `compressor`'s tool
/// (which must be installed); see [`payload`].
pub(crate) fn vmlinux(payload: &[u8], compressor: &Compressor) -> Result<Vec<u8>, String> {
    let tool = compressor.tool;
    let mut child = Command::new(tool)
        .args(compressor.args)
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
    let u16_at = |offset: usize| at(elf, offset).map(|b| usize::from(u16::from_le_bytes(b)));
    let u64_at =
        |offset: usize| at(elf, offset).and_then(|b| usize::try_from(u64::from_le_bytes(b)).ok());
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    (0..phnum).any(|i| {
        let ph = phoff + i * phentsize;
        const PT_NOTE: usize = 4;
        if u32_at(elf, ph) != Some(PT_NOTE) {
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
fn notes(mut segment: &[u8]) -> impl Iterator<Item = (&[u8], usize)> {
    std::iter::from_fn(move || {
        let word = |offset: usize| u32_at(segment, offset);
        let (namesz, descsz, kind) = (word(0)?, word(4)?, word(8)?);
        let align = |n: usize| n.div_ceil(4) * 4;
        let name = segment.get(12..12 + namesz)?;
        let name = name.strip_suffix(&[0]).unwrap_or(name);
        let next = 12 + align(namesz) + align(descsz);
        segment = segment.get(next..).unwrap_or_default();
        Some((name, kind))
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
        let (payload, compressor) = payload(&image).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(compressor.tool, "zstd");
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
        for word in [4, 4, PVH_NOTE as u32] {
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
        let unpack = |image: Vec<u8>| {
            let (payload, compressor) = payload(&image)?;
            vmlinux(payload, compressor)
        };
        let back = unpack(bzimage(&gzip(&elf))).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, elf);

        let mut no_note = elf.clone();
        let kind_at = note_at as usize + 8;
        no_note[kind_at..kind_at + 4].copy_from_slice(&6u32.to_le_bytes());
        let err = unpack(bzimage(&gzip(&no_note))).err().unwrap_or_default();
        assert!(err.contains("no PVH entry note"), "{err}");
    }
}
