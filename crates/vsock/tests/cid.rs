//! The CID allocator under contention: threads in one process, and two processes
//! sharing one lock dir.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test file: a failed step should panic

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmkit_vsock::{CidAllocator, CidOptions};

/// Allocates and releases `rounds` times; each held CID is marked by creating
/// `<markers>/<cid>` exclusively, so a CID held twice at once (by anyone sharing the
/// marker dir) shows up as a failed create. Returns how many times that happened.
fn churn(cids: &CidAllocator, markers: &Path, rounds: usize) -> usize {
    let mut doubles = 0;
    let mut done = 0;
    while done < rounds {
        let Ok(lease) = cids.allocate() else {
            std::thread::yield_now(); // all busy right now: someone else holds them
            continue;
        };
        doubles += churn_one(markers, lease.cid());
        drop(lease);
        done += 1;
    }
    doubles
}

#[test]
fn no_duplicate_among_10000_allocations_from_8_threads() {
    let markers = tempfile::tempdir().unwrap();
    let locks = tempfile::tempdir().unwrap();
    let cids = CidAllocator::new(CidOptions {
        range: 3..=20, // few CIDs for 8 threads: they must contend
        cooldown: Duration::ZERO,
        lock_dir: Some(locks.path().into()),
    })
    .unwrap();
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (cids, markers, seen) = (cids.clone(), markers.path().to_owned(), seen.clone());
            std::thread::spawn(move || {
                let mut doubles = 0;
                for _ in 0..1250 {
                    let lease = loop {
                        match cids.allocate() {
                            Ok(lease) => break lease,
                            Err(_) => std::thread::yield_now(),
                        }
                    };
                    assert!((3..=20).contains(&lease.cid()));
                    seen.lock().unwrap().insert(lease.cid());
                    doubles += churn_one(&markers, lease.cid());
                }
                doubles
            })
        })
        .collect();
    let doubles: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(doubles, 0, "a CID was held twice at once");
    assert_eq!(cids.leased(), 0, "every lease was released");
    assert!(
        seen.lock().unwrap().len() > 8,
        "the threads should have spread over the range"
    );
}

/// Marks `cid` held for a moment; 1 if someone else already had it marked.
fn churn_one(markers: &Path, cid: u32) -> usize {
    let marker = markers.join(cid.to_string());
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&marker)
    {
        Ok(_) => {
            std::thread::yield_now();
            std::fs::remove_file(&marker).unwrap();
            0
        }
        Err(_) => 1,
    }
}

const CHILD_ENV: &str = "VMKIT_CID_TEST_CHILD";

/// The second process of `two_processes_never_hold_the_same_cid` (a no-op otherwise).
#[test]
fn cid_child_process() {
    let Ok(dirs) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (locks, markers) = dirs.split_once('|').unwrap();
    let doubles = churn(&allocator(Path::new(locks)), Path::new(markers), 3000);
    println!("CHILD_DOUBLES={doubles}");
}

fn allocator(locks: &Path) -> CidAllocator {
    CidAllocator::new(CidOptions {
        range: 3..=6,
        cooldown: Duration::ZERO,
        lock_dir: Some(locks.into()),
    })
    .unwrap()
}

#[test]
fn two_processes_never_hold_the_same_cid() {
    let locks = tempfile::tempdir().unwrap();
    let markers = tempfile::tempdir().unwrap();
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "cid_child_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            CHILD_ENV,
            format!("{}|{}", locks.path().display(), markers.path().display()),
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let ours = churn(&allocator(locks.path()), markers.path(), 3000);
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    let theirs: usize = stdout
        .lines()
        .find_map(|l| l.split_once("CHILD_DOUBLES=").map(|(_, n)| n))
        .unwrap_or_else(|| panic!("the child did not report: {stdout}"))
        .parse()
        .unwrap();
    assert_eq!(
        (ours, theirs),
        (0, 0),
        "a CID was held by both processes at once"
    );
}

#[test]
fn a_process_that_dies_holding_a_cid_leaks_nothing() {
    let locks = tempfile::tempdir().unwrap();
    let cids = allocator(locks.path());
    // Hold CID 3 in a child that is then killed: its flock dies with it. (`exec` makes
    // the locked fd the sleeping process's own, so nothing else keeps it open.)
    let lock = locks.path().join("3.lock");
    let mut child = Command::new("sh")
        .args(["-c", "exec 9>>\"$0\" && flock -x 9 && exec sleep 30"])
        .arg(&lock)
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let held: Vec<u32> = (0..3).map(|_| cids.allocate().unwrap().cid()).collect();
    assert!(
        !held.contains(&3),
        "CID 3 is locked by another process: {held:?}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let all: Vec<_> = (0..4).map(|_| cids.allocate().unwrap()).collect();
    let mut got: Vec<u32> = all.iter().map(|l| l.cid()).collect();
    got.sort_unstable();
    assert_eq!(got, [3, 4, 5, 6]);
}
