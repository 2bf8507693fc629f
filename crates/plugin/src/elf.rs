//! What the loader checks of a file before `dlopen` sees it: that it is a whole ELF
//! shared object for this machine. `dlopen` maps a library's segments as its headers
//! describe them, and touching a segment that runs past the end of a truncated file
//! raises SIGBUS in the loading process — so a file whose headers point beyond its end
//! is refused here, with plain reads and no mapping.

use std::path::Path;

/// `ET_DYN`: a shared object.
const ET_DYN: u16 = 3;
/// `PT_LOAD`: a segment that is mapped.
const PT_LOAD: u32 = 1;
/// This machine's `e_machine`.
const MACHINE: u16 = if cfg!(target_arch = "x86_64") {
    62
} else if cfg!(target_arch = "aarch64") {
    183
} else if cfg!(target_arch = "riscv64") {
    243
} else {
    0
};

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// How much of a file is read: its ELF and program headers sit at its start.
const HEAD: u64 = 64 << 10;

/// Why a file of `len` bytes that begins with `bytes` is not a whole 64-bit
/// little-endian ELF shared object for this machine, if it is not.
pub(crate) fn problem(bytes: &[u8], len: u64) -> Option<String> {
    if bytes.get(..4) != Some(b"\x7fELF") {
        return Some("not an ELF file".into());
    }
    if bytes.get(4) != Some(&2) || bytes.get(5) != Some(&1) {
        return Some("not a 64-bit little-endian ELF file".into());
    }
    let short = || {
        Some(format!(
            "truncated: its ELF header does not fit in {len} bytes"
        ))
    };
    let Some(kind) = u16_at(bytes, 16) else {
        return short();
    };
    if kind != ET_DYN {
        return Some(format!("not a shared object (ELF type {kind})"));
    }
    let Some(machine) = u16_at(bytes, 18) else {
        return short();
    };
    if machine != MACHINE {
        return Some(format!(
            "built for another machine (ELF machine {machine}, this one is {MACHINE})"
        ));
    }
    let (Some(phoff), Some(shoff), Some(phentsize), Some(phnum), Some(shentsize), Some(shnum)) = (
        u64_at(bytes, 32),
        u64_at(bytes, 40),
        u16_at(bytes, 54),
        u16_at(bytes, 56),
        u16_at(bytes, 58),
        u16_at(bytes, 60),
    ) else {
        return short();
    };
    let table_end = |off: u64, size: u16, n: u16| off.checked_add(u64::from(size) * u64::from(n));
    match table_end(phoff, phentsize, phnum) {
        Some(end) if end <= len => {}
        _ => {
            return Some(format!(
                "truncated: its program headers run past its {len} bytes"
            ));
        }
    }
    if shnum > 0 {
        match table_end(shoff, shentsize, shnum) {
            Some(end) if end <= len => {}
            _ => {
                return Some(format!(
                    "truncated: its section headers run past its {len} bytes"
                ));
            }
        }
    }
    for i in 0..u64::from(phnum) {
        let at = usize::try_from(phoff + i * u64::from(phentsize)).ok()?;
        let (Some(kind), Some(offset), Some(filesz)) = (
            u32_at(bytes, at),
            u64_at(bytes, at + 8),
            u64_at(bytes, at + 32),
        ) else {
            return Some(format!(
                "its program headers are not within its first {HEAD} bytes"
            ));
        };
        if kind == PT_LOAD && offset.checked_add(filesz).is_none_or(|end| end > len) {
            return Some(format!(
                "truncated: a loadable segment ends at byte {}, the file has {len}",
                offset.saturating_add(filesz)
            ));
        }
    }
    None
}

/// [`problem`] of the file at `path` (its first 64 KiB are read).
pub(crate) fn file_problem(path: &Path) -> Option<String> {
    use std::io::Read;
    let read = std::fs::File::open(path).and_then(|f| {
        let len = f.metadata()?.len();
        let mut head = Vec::new();
        f.take(HEAD).read_to_end(&mut head)?;
        Ok((head, len))
    });
    match read {
        Ok((head, len)) => problem(&head, len),
        Err(e) => Some(format!("cannot read it: {e}")),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn this_test_binary_is_an_elf_file_but_not_a_shared_object_or_it_is_pie() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let len = me.len() as u64;
        // A PIE executable is ET_DYN too; either way its headers are whole.
        match problem(&me, len) {
            None => {}
            Some(p) => assert!(p.starts_with("not a shared object"), "{p}"),
        }
        let cut = &me[..4096];
        let p = problem(cut, 4096).unwrap();
        assert!(
            p.starts_with("truncated") || p.starts_with("not a shared object"),
            "{p}"
        );
        assert_eq!(problem(b"#!/bin/sh\n", 10).unwrap(), "not an ELF file");
        assert_eq!(
            problem(b"\x7fELF\x02\x01", 6).unwrap(),
            "truncated: its ELF header does not fit in 6 bytes"
        );
    }
}
