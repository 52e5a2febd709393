//! The member against a hostile machine: its ledger file on a tmpfs that fills up. The real
//! `master` and `member` binaries over loopback TCP; the tmpfs is mounted for the test (we run as
//! root here and in CI) and unmounted at the end, also when the test fails.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ledger_member::paths::LedgerPaths;
use ledger_member::state::SyncState;
use ledger_proto::pb;
use ledger_testkit::client::{all_policies as ledger, info, insert};
use ledger_testkit::{Master, Member, wait_until};

/// A tmpfs mounted on a temporary directory; unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`64k`) or fails the test, loudly, with the reason.
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("running mount");
        assert!(
            output.status.success(),
            "this test needs root to mount a tmpfs (it does not skip): `mount -t tmpfs -o size={size} tmpfs {}` failed with {}: {}",
            dir.path().display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn resize(&self, size: &str) {
        let output = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.path())
            .output()
            .expect("running mount");
        assert!(
            output.status.success(),
            "remounting the tmpfs with size={size} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(self.path())
            .status()
            .is_ok_and(|s| s.success())
            || Command::new("umount")
                .arg("-l")
                .arg(self.path())
                .status()
                .is_ok_and(|s| s.success());
        if !unmounted {
            eprintln!("could not unmount the tmpfs at {}", self.path().display());
        }
    }
}

/// What the member has on disk, checked: the state record is intact, the recorded part of the
/// file is exactly the master's first policies up to the recorded seq, every line of it valid.
/// Returns the recorded state and the file's length.
fn check_not_torn(file: &Path, master_ledger: &[pb::Policy]) -> (SyncState, u64) {
    let paths = LedgerPaths::new(file);
    // The record and the file are read in the order the member writes them (file first, record
    // after): read the record first, so the file is at least as long as it says.
    let state = SyncState::load(&paths)
        .unwrap_or_else(|e| panic!("the state record is unreadable or damaged: {e}"))
        .unwrap_or(SyncState::EMPTY);
    let bytes = std::fs::read(file).unwrap_or_default();
    assert!(
        bytes.len() as u64 >= state.len,
        "the file ({} bytes) is shorter than its record ({state:?})",
        bytes.len()
    );
    let recorded = std::str::from_utf8(&bytes[..state.len as usize])
        .unwrap_or_else(|e| panic!("the recorded part is not UTF-8: {e}"));
    let expected: String = master_ledger
        .iter()
        .filter(|p| p.seq <= state.seq)
        .map(|p| format!("{}\n", p.json))
        .collect();
    assert!(
        recorded == expected,
        "the recorded part of the file ({} bytes) is not the master's ledger up to seq {} ({} bytes)",
        recorded.len(),
        state.seq,
        expected.len()
    );
    for line in recorded.lines() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("a line is not JSON ({e}): {line:?}"));
        ledger_anylog::policy::parse_stored(line).expect("a valid policy line");
    }
    // Past the record there may be lines written but not recorded yet: they must be whole
    // lines of valid policies too, never a torn one.
    let tail = &bytes[state.len as usize..];
    let tail = std::str::from_utf8(tail).unwrap_or_else(|e| {
        panic!(
            "the {} bytes past the record are not UTF-8 ({e}): a torn line",
            tail.len()
        )
    });
    assert!(
        tail.is_empty() || tail.ends_with('\n'),
        "the file ends with a torn line: {} bytes past the record ({state:?}), the last line {:?}...",
        tail.len(),
        &tail[tail.rfind('\n').map_or(0, |at| at + 1)..][..60.min(tail.len())]
    );
    for line in tail.lines() {
        ledger_anylog::policy::parse_stored(line)
            .unwrap_or_else(|e| panic!("an unrecorded line is not a valid policy ({e}): {line:?}"));
    }
    (state, bytes.len() as u64)
}

fn padded(n: usize) -> String {
    format!(
        r#"{{"operator": {{"name": "op{n}", "company": "Acme", "padding": "{}"}}}}"#,
        "x".repeat(2000)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_never_tears_the_file_and_the_member_converges_after() {
    let started = Instant::now();
    let master_dir = tempfile::tempdir().unwrap();
    let master = Master::start(master_dir.path(), &[]);
    let mut client = master.client().await;
    for n in 0..3 {
        insert(&mut client, &padded(n)).await.unwrap();
    }
    // Declared before the member: dropped (unmounted) after the member is killed.
    let tmpfs = Tmpfs::mount("64k");
    let member = Member::start(
        tmpfs.path(),
        &[master.addr.to_string()],
        &["--retry-min", "100ms", "--retry-max", "1s"],
    );
    member.wait_for_log(30, "caught up with master").await;
    let file: PathBuf = member.file.clone();

    // Insert until the member's writes fail for want of space, checking the file each time.
    let failure = "writing the ledger file failed";
    let mut inserted = 3;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !member.run_logs().contains(failure) {
        assert!(
            inserted < 200 && Instant::now() < deadline,
            "{inserted} policies of 2 KB did not fill a 64 KiB tmpfs"
        );
        insert(&mut client, &padded(inserted)).await.unwrap();
        inserted += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
        check_not_torn(&file, &ledger(&mut client).await);
    }
    let logs = member.run_logs();
    assert!(
        logs.contains("No space left on device") || logs.contains("os error 28"),
        "the failure is ENOSPC:\n{logs}"
    );
    // The master keeps accepting while the member cannot write.
    for _ in 0..5 {
        insert(&mut client, &padded(inserted)).await.unwrap();
        inserted += 1;
    }
    // While the disk stays full the member keeps retrying, and its file is never torn: the
    // recorded part is the master's ledger, and past it there are only whole, valid lines (a
    // write cut short by ENOSPC must not leave half a line where EdgeLake reads).
    let master_ledger = ledger(&mut client).await;
    let head = info(&mut client).await;
    let watch_until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < watch_until {
        let (state, _) = check_not_torn(&file, &master_ledger);
        assert!(
            state.seq < head.head_seq,
            "the member cannot hold everything"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let retries = member.run_logs().matches(failure).count()
        + member
            .run_logs()
            .matches("cannot reopen the ledger file")
            .count();
    assert!(retries >= 2, "the member retries while the disk is full");

    // Room again: the member converges by itself.
    tmpfs.resize("4m");
    let what = "the member's file to equal the master's ledger after the disk has room";
    let member_ref = &member;
    wait_until(60, what, || {
        let mut client = client.clone();
        let file = file.clone();
        async move {
            let info = info(&mut client).await;
            member_ref.file_md5() == Some(info.digest)
                && SyncState::load(&LedgerPaths::new(&file))
                    .ok()
                    .flatten()
                    .map(|s| s.seq)
                    == Some(info.head_seq)
        }
    })
    .await;
    let (state, len) = check_not_torn(&file, &ledger(&mut client).await);
    assert_eq!(state.len, len);
    assert_eq!(state.seq, head.head_seq);
    // And it follows new changes again.
    insert(&mut client, &padded(inserted)).await.unwrap();
    wait_until(30, "the member to follow a new insert", || async {
        let info = info(&mut master.client().await).await;
        member.file_md5() == Some(info.digest)
    })
    .await;
    drop(member);
    drop(tmpfs);
    eprintln!("disk full: {inserted} inserts, {:?}", started.elapsed());
}
