//! What expo guarantees when things go wrong: full disks, file-size limits, unwritable
//! output directories, signals and SIGKILL mid-run, inputs truncated or rewritten under the
//! memory map, outputs that overlap the inputs, and symlinked checkpoints.
//!
//! In every failure the output path is untouched (absent, or its previous content under
//! `--force`) and no temporary directory is left behind, except after SIGKILL, where the
//! next run removes it.
//!
//! Mid-run tests use a 256 MiB checkpoint made of sparse files (instant to create), wait
//! until the run's temporary directory holds its output shard, and freeze the process with
//! SIGSTOP before acting, so that nothing depends on timing.

use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::common::{
    self, extrapolate, list_dir, list_tree, small_pair, snapshot, Dtype, Scratch, Tensor,
};

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// Writes `model.safetensors` in `dir` with `tensors` f32 tensors of `rows` × 1024, all
/// zero, as a sparse file. Returns the file.
fn sparse_checkpoint(dir: &Path, tensors: usize, rows: u64) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    let size = rows * 1024 * 4;
    let mut header = String::from("{");
    for i in 0..tensors as u64 {
        if i > 0 {
            header.push(',');
        }
        header.push_str(&format!(
            r#""layers.{i}.weight":{{"dtype":"F32","shape":[{rows},1024],"data_offsets":[{},{}]}}"#,
            i * size,
            (i + 1) * size
        ));
    }
    header.push('}');
    while !header.len().is_multiple_of(8) {
        header.push(' ');
    }
    let path = dir.join("model.safetensors");
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    fs::write(&path, &bytes).unwrap();
    let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(bytes.len() as u64 + tensors as u64 * size)
        .unwrap();
    // Written long ago, like a real download: a change during the run always moves the
    // modification time, however coarse the file system's clock.
    f.set_modified(std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000))
        .unwrap();
    fs::write(dir.join("config.json"), "{\"model_type\": \"llama\"}\n").unwrap();
    path
}

/// A large pair in `s`: `sft/` and `aligned/`, 256 MiB each (a debug build takes several
/// seconds over it, so a run is reliably caught in the middle). Returns the aligned file.
fn large_pair(s: &Scratch) -> PathBuf {
    sparse_checkpoint(&s.path("sft"), 4, 16 * 1024);
    sparse_checkpoint(&s.path("aligned"), 4, 16 * 1024)
}

/// A 64 MiB pair, for a test whose run goes to the end.
fn medium_pair(s: &Scratch) -> PathBuf {
    sparse_checkpoint(&s.path("sft"), 2, 8 * 1024);
    sparse_checkpoint(&s.path("aligned"), 2, 8 * 1024)
}

fn extrapolate_args(sft: &Path, aligned: &Path, out: &Path) -> Vec<std::ffi::OsString> {
    [
        OsStr::new("extrapolate"),
        OsStr::new("--sft"),
        sft.as_os_str(),
        OsStr::new("--aligned"),
        aligned.as_os_str(),
        OsStr::new("--alpha"),
        OsStr::new("0.5"),
        OsStr::new("--output"),
        out.as_os_str(),
        OsStr::new("--threads"),
        OsStr::new("1"),
    ]
    .iter()
    .map(|s| s.to_os_string())
    .collect()
}

fn expo_command(args: &[std::ffi::OsString]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_expo"));
    cmd.args(args)
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// Waits for a child, with a generous deadline so that a hang fails instead of blocking
/// the suite. Returns its status and stderr.
fn finish(mut child: Child) -> (ExitStatus, String) {
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        stderr.read_to_string(&mut s).unwrap();
        s
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("expo did not finish within 120 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    (status, reader.join().unwrap())
}

fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill({}, {sig})", child.id());
}

/// Waits until the child's temporary directory in `parent` holds an output shard (the
/// long part of the run has begun), then freezes the child with SIGSTOP and returns the
/// temporary directory. The output itself must not exist yet.
fn stop_mid_run(child: &mut Child, parent: &Path, out: &Path) -> PathBuf {
    let started = Instant::now();
    // `.expo-tmp-<name>-<pid>-<random>`.
    let wanted = format!(
        ".expo-tmp-{}-{}-",
        out.file_name().unwrap().to_string_lossy(),
        child.id()
    );
    loop {
        let staging = list_dir(parent)
            .into_iter()
            .find(|n| n.starts_with(&wanted))
            .map(|n| parent.join(n));
        if let Some(staging) = staging.filter(|s| s.join("model.safetensors").exists()) {
            signal(child, libc::SIGSTOP);
            // The run must still be in progress: nothing committed yet.
            assert!(
                staging.is_dir(),
                "the run finished before it could be interrupted; use a larger input"
            );
            return staging;
        }
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("expo exited ({status}) before writing its output:\n{err}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no temporary directory appeared in {}",
            parent.display()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A previous output at `out`, for `--force` runs.
fn previous_output(out: &Path) -> Vec<(String, Vec<u8>)> {
    fs::create_dir_all(out.join("sub")).unwrap();
    fs::write(out.join("model.safetensors"), b"previous weights").unwrap();
    fs::write(out.join("sub/notes.txt"), b"keep me").unwrap();
    snapshot(out)
}

// ---------------------------------------------------------------------------------------
// Signals
// ---------------------------------------------------------------------------------------

#[test]
fn sigint_mid_run_exits_130_and_leaves_nothing() {
    let s = Scratch::new();
    large_pair(&s);
    let out = s.out("result");
    let mut child = expo_command(&extrapolate_args(&s.path("sft"), &s.path("aligned"), &out))
        .spawn()
        .unwrap();
    stop_mid_run(&mut child, &s.outputs(), &out);
    signal(&child, libc::SIGINT);
    signal(&child, libc::SIGCONT);
    let (status, stderr) = finish(child);
    assert_eq!(status.code(), Some(130), "{status}\n{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    s.assert_no_output();
}

#[test]
fn sigterm_mid_run_under_force_keeps_the_previous_output() {
    let s = Scratch::new();
    large_pair(&s);
    let out = s.out("result");
    let before = previous_output(&out);
    let mut args = extrapolate_args(&s.path("sft"), &s.path("aligned"), &out);
    args.push("--force".into());
    let mut child = expo_command(&args).spawn().unwrap();
    stop_mid_run(&mut child, &s.outputs(), &out);
    signal(&child, libc::SIGTERM);
    signal(&child, libc::SIGCONT);
    let (status, stderr) = finish(child);
    assert_eq!(status.code(), Some(130), "{status}\n{stderr}");
    assert_eq!(snapshot(&out), before, "the previous output changed");
    assert_eq!(list_dir(&s.outputs()), vec!["result"]);
    common::assert_no_staging(&s.outputs());
}

#[test]
fn after_sigkill_the_next_run_removes_the_stale_temporary_directory_and_nothing_else() {
    let s = Scratch::new();
    large_pair(&s);
    let out = s.out("result");
    let mut child = expo_command(&extrapolate_args(&s.path("sft"), &s.path("aligned"), &out))
        .spawn()
        .unwrap();
    let staging = stop_mid_run(&mut child, &s.outputs(), &out);
    signal(&child, libc::SIGKILL);
    let (status, _) = finish(child);
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    // What SIGKILL leaves: the marked temporary directory, and no output.
    assert!(staging.join(".expo-staging").is_file());
    assert!(!out.exists());

    // Things that look similar but are not a dead expo run's: never removed.
    let outputs = s.outputs();
    let unmarked = outputs.join(".expo-tmp-unmarked-2147483646");
    fs::create_dir(&unmarked).unwrap();
    fs::write(unmarked.join("data"), "user data").unwrap();
    let alive = outputs.join(format!(".expo-tmp-alive-{}", std::process::id()));
    fs::create_dir(&alive).unwrap();
    fs::write(
        alive.join(".expo-staging"),
        format!("{}\n", std::process::id()),
    )
    .unwrap();
    // A live run's, whatever its pid says (another container's, say): its marker is locked.
    let locked = outputs.join(".expo-tmp-locked-1-0123456789abcdef");
    fs::create_dir(&locked).unwrap();
    fs::write(locked.join(".expo-staging"), "expo-staging 1\n").unwrap();
    let lock = fs::File::open(locked.join(".expo-staging")).unwrap();
    // SAFETY: flock takes no pointers; the descriptor is `lock`'s, open for the call.
    let rc = unsafe { libc::flock(std::os::unix::io::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) };
    assert_eq!(rc, 0);
    let file = outputs.join(".expo-tmp-file-2147483646");
    fs::write(&file, "a file").unwrap();
    let elsewhere = s.path("elsewhere-2147483646");
    fs::create_dir(&elsewhere).unwrap();
    fs::write(elsewhere.join(".expo-staging"), "2147483646\n").unwrap();
    let link = outputs.join(".expo-tmp-link-2147483646");
    symlink(&elsewhere, &link).unwrap();

    // The next run in the same directory (here with small inputs) cleans up and succeeds.
    let small = Scratch::new();
    small_pair(&small, 7);
    let second = s.out("second");
    let done = extrapolate(&small.path("sft"), &small.path("aligned"), "0.5", &second).assert_ok();
    assert!(
        done.stderr.contains(&format!(
            "warning: removed {}, left behind by an expo run that was killed",
            staging.display()
        )),
        "{}",
        done.stderr
    );
    assert!(!staging.exists());
    assert!(second.join("model.safetensors").is_file());
    assert!(unmarked.join("data").is_file());
    assert!(alive.join(".expo-staging").is_file());
    assert!(locked.join(".expo-staging").is_file());
    drop(lock);
    assert!(file.is_file());
    assert!(link.exists() && elsewhere.join(".expo-staging").is_file());
}

// ---------------------------------------------------------------------------------------
// Inputs changing under the map
// ---------------------------------------------------------------------------------------

#[test]
fn an_input_truncated_mid_run_is_a_clear_error_and_leaves_nothing() {
    let s = Scratch::new();
    let aligned = large_pair(&s);
    let out = s.out("result");
    let mut child = expo_command(&extrapolate_args(&s.path("sft"), &s.path("aligned"), &out))
        .spawn()
        .unwrap();
    stop_mid_run(&mut child, &s.outputs(), &out);
    // What an interrupted download or a careless `cp` over the file would do.
    fs::OpenOptions::new()
        .write(true)
        .open(&aligned)
        .unwrap()
        .set_len(4096)
        .unwrap();
    signal(&child, libc::SIGCONT);
    let (status, stderr) = finish(child);
    assert_eq!(
        status.signal(),
        None,
        "expo died by a signal: {status}\n{stderr}"
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{} was truncated while expo was reading it",
            aligned.display()
        )) || stderr.contains(&format!(
            "{} changed size while expo was reading it",
            aligned.display()
        )),
        "{stderr}"
    );
    // No figure from a read that failed.
    assert!(!stderr.contains("‖θ1 − θ0‖/‖θ0‖"), "{stderr}");
    s.assert_no_output();
}

#[test]
fn an_input_rewritten_in_place_mid_run_is_detected() {
    let s = Scratch::new();
    let aligned = medium_pair(&s);
    let out = s.out("result");
    let mut child = expo_command(&extrapolate_args(&s.path("sft"), &s.path("aligned"), &out))
        .spawn()
        .unwrap();
    stop_mid_run(&mut child, &s.outputs(), &out);
    // Same size, new bytes (a tool "fixing" weights in place).
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(&aligned).unwrap();
        f.write_all_at(&[0x7f; 64], 40 << 20).unwrap();
        f.sync_all().unwrap();
    }
    signal(&child, libc::SIGCONT);
    let (status, stderr) = finish(child);
    assert_eq!(status.code(), Some(1), "{status}\n{stderr}");
    assert!(
        stderr.contains(&format!(
            "{} was modified while expo was reading it",
            aligned.display()
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("‖θ1 − θ0‖/‖θ0‖"), "{stderr}");
    s.assert_no_output();
}

// ---------------------------------------------------------------------------------------
// Failures while writing
// ---------------------------------------------------------------------------------------

/// Runs expo with a file-size limit (`ulimit -f`) of `limit` bytes. SIGXFSZ keeps its
/// default action (terminate), as in a shell: expo itself must ignore it.
fn run_with_fsize_limit(args: &[std::ffi::OsString], limit: u64) -> (ExitStatus, String) {
    let mut cmd = expo_command(args);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::signal(libc::SIGXFSZ, libc::SIG_DFL);
            Ok(())
        });
    }
    finish(cmd.spawn().unwrap())
}

#[test]
fn a_file_size_limit_is_an_error_not_a_crash() {
    let s = Scratch::new();
    // 4 MiB of weights, far above the 256 KiB limit.
    sparse_checkpoint(&s.path("sft"), 4, 256);
    sparse_checkpoint(&s.path("aligned"), 4, 256);
    let out = s.out("result");
    let (status, stderr) = run_with_fsize_limit(
        &extrapolate_args(&s.path("sft"), &s.path("aligned"), &out),
        256 << 10,
    );
    assert_eq!(
        status.signal(),
        None,
        "killed by a signal: {status}\n{stderr}"
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the file-size limit is exceeded")
            && stderr.contains(&*out.to_string_lossy()),
        "{stderr}"
    );
    s.assert_no_output();

    // Under --force, the previous output survives.
    let before = previous_output(&out);
    let mut args = extrapolate_args(&s.path("sft"), &s.path("aligned"), &out);
    args.push("--force".into());
    let (status, stderr) = run_with_fsize_limit(&args, 256 << 10);
    assert_eq!(status.code(), Some(1), "{status}\n{stderr}");
    assert_eq!(snapshot(&out), before);
    common::assert_no_staging(&s.outputs());
}

/// A small tmpfs mounted for the life of the value (unmounted lazily on drop).
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` at `path`, or explains why it cannot.
    fn mount(path: &Path, size: &str) -> Result<Tmpfs, String> {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        fs::create_dir_all(path).unwrap();
        let target = CString::new(path.as_os_str().as_bytes()).unwrap();
        let opts = CString::new(format!("size={size},mode=0755")).unwrap();
        // SAFETY: valid NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                opts.as_ptr().cast(),
            )
        };
        if rc != 0 {
            return Err(format!(
                "cannot mount a tmpfs ({}): skipping",
                std::io::Error::last_os_error()
            ));
        }
        Ok(Tmpfs {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let target = CString::new(self.path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid path; MNT_DETACH never blocks.
        unsafe {
            libc::umount2(target.as_ptr(), libc::MNT_DETACH);
        }
    }
}

#[test]
fn a_full_disk_is_an_error_and_leaves_nothing() {
    let s = Scratch::new();
    let disk = match Tmpfs::mount(&s.path("small-disk"), "1m") {
        Ok(d) => d,
        Err(why) => {
            eprintln!("{why}");
            return;
        }
    };
    // Weights larger than the disk: the output shard does not fit.
    sparse_checkpoint(&s.path("sft"), 2, 256);
    sparse_checkpoint(&s.path("aligned"), 2, 256);
    let out = disk.path.join("result");
    let (status, stderr) = finish(
        expo_command(&extrapolate_args(&s.path("sft"), &s.path("aligned"), &out))
            .spawn()
            .unwrap(),
    );
    assert_eq!(status.code(), Some(1), "{status}\n{stderr}");
    assert!(
        stderr.contains("the disk is full") && stderr.contains(&*out.to_string_lossy()),
        "{stderr}"
    );
    assert_eq!(list_dir(&disk.path), Vec::<String>::new());

    // Weights that fit, but a side file that does not: same outcome, under --force the
    // previous output survives.
    small_pair(&s, 7);
    fs::write(
        s.path("aligned").join("tokenizer.json"),
        vec![b'x'; 2 << 20],
    )
    .unwrap();
    let before = previous_output(&out);
    let mut args = extrapolate_args(&s.path("sft"), &s.path("aligned"), &out);
    args.push("--force".into());
    let (status, stderr) = finish(expo_command(&args).spawn().unwrap());
    assert_eq!(status.code(), Some(1), "{status}\n{stderr}");
    assert!(
        stderr.contains("tokenizer.json") && stderr.contains("No space left on device"),
        "{stderr}"
    );
    assert_eq!(snapshot(&out), before);
    assert_eq!(list_dir(&disk.path), vec!["result"]);
}

#[test]
fn an_unwritable_output_directory_is_an_error_and_leaves_nothing() {
    let s = Scratch::new();
    small_pair(&s, 7);
    let locked = s.path("locked");
    fs::create_dir(&locked).unwrap();
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o555)).unwrap();
    let out = locked.join("result");
    // Root ignores permission bits: the capabilities that let it are dropped for the
    // child, so the 0555 directory is read-only for expo as it would be for a user. Found
    // before the computation, so `--dry-run` reports it too; the cause is printed once.
    let args = extrapolate_args(&s.path("sft"), &s.path("aligned"), &out);
    let mut dry = args.clone();
    dry.push("--dry-run".into());
    for args in [args, dry] {
        let (status, stderr) = run_without_dac_override(&args);
        assert_eq!(status.code(), Some(1), "{status}\n{stderr}");
        assert!(
            stderr.contains(&format!(
                "cannot create expo's temporary directory in {}",
                locked.display()
            )),
            "{stderr}"
        );
        assert_eq!(stderr.matches("Permission denied").count(), 1, "{stderr}");
        assert_eq!(list_dir(&locked), Vec::<String>::new());
    }
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o755)).unwrap();

    // A parent that is a regular file.
    let file = s.path("plain-file");
    fs::write(&file, "x").unwrap();
    extrapolate(
        &s.path("sft"),
        &s.path("aligned"),
        "0.5",
        &file.join("result"),
    )
    .assert_fails(
        1,
        &[&format!("its parent {} is not a directory", file.display())],
    );
    assert_eq!(fs::read(&file).unwrap(), b"x");
    s.assert_no_output();
}

// ---------------------------------------------------------------------------------------
// Dangerous paths
// ---------------------------------------------------------------------------------------

#[test]
fn outputs_overlapping_an_input_are_refused_before_anything_is_written() {
    let s = Scratch::new();
    let (t0, t1) = common::tiny_llama(Dtype::F32, Dtype::BF16, false, 3);
    let models = s.path("models");
    let sft = common::single(&models.join("sft"), &t0);
    let aligned = common::sharded(&models.join("aligned"), &common::split(&t1, 2));
    fs::write(aligned.join("config.json"), "{}\n").unwrap();
    let file = sft.join("model.safetensors");
    symlink(&models, s.path("alias")).unwrap();
    let before = snapshot(&models);
    let root_entries = list_dir(s.root());

    let cases: Vec<(PathBuf, PathBuf, PathBuf)> = vec![
        // (sft, aligned, output)
        (sft.clone(), aligned.clone(), aligned.clone()),
        (sft.clone(), aligned.clone(), sft.clone()),
        (sft.clone(), aligned.clone(), aligned.join("out")),
        (sft.clone(), aligned.clone(), sft.join("out")),
        (sft.clone(), aligned.clone(), models.clone()),
        (sft.clone(), aligned.clone(), s.root().to_path_buf()),
        (
            sft.clone(),
            aligned.clone(),
            s.path("alias").join("aligned"),
        ),
        (
            sft.clone(),
            aligned.clone(),
            s.path("alias").join("sft").join("x"),
        ),
        (
            sft.clone(),
            aligned.clone(),
            aligned.join("..").join("aligned"),
        ),
        // A single-file input: its directory is refused as the output.
        (file.clone(), aligned.clone(), sft.clone()),
    ];
    for (a, b, out) in cases {
        // --force is the dangerous case: without it most of these are refused as
        // non-empty anyway.
        extrapolate(&a, &b, "0.5", &out)
            .arg("--force")
            .assert_fails(2, &["overlaps"]);
        assert_eq!(
            snapshot(&models),
            before,
            "--output {} changed files",
            out.display()
        );
        assert_eq!(list_dir(s.root()), root_entries);
        assert_eq!(list_dir(&s.outputs()), Vec::<String>::new());
        for dir in [&models, &sft, &aligned] {
            common::assert_no_staging(dir);
        }
    }
    // The weight file itself as the output: not a directory, refused.
    extrapolate(&sft, &aligned, "0.5", &file)
        .arg("--force")
        .assert_fails(1, &["is not a directory"]);
    assert_eq!(snapshot(&models), before);
}

#[test]
fn the_same_checkpoint_as_both_inputs_is_a_warning() {
    let s = Scratch::new();
    let t1: Vec<Tensor> = common::tiny_llama(Dtype::F32, Dtype::F32, false, 5).1;
    let dir = common::single(&s.path("model"), &t1);
    symlink(&dir, s.path("alias")).unwrap();
    for (sft, aligned) in [(dir.clone(), dir.clone()), (s.path("alias"), dir.clone())] {
        let out = s.out(&format!("o{}", list_dir(&s.outputs()).len()));
        let done = extrapolate(&sft, &aligned, "0.5", &out).assert_ok();
        assert!(
            done.stderr
                .contains("warning: --sft and --aligned are the same checkpoint"),
            "{}",
            done.stderr
        );
        // θ1 + α·0 = θ1.
        assert_eq!(
            common::read_checkpoint(&out).shard_names(),
            vec!["model.safetensors"]
        );
        let (_, tensors) = common::read_shard(&out.join("model.safetensors"));
        for t in &t1 {
            let got = tensors.iter().find(|x| x.name == t.name).unwrap();
            assert_eq!(got.values(), t.values(), "{}", t.name);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Symlinked checkpoints (the Hugging Face cache layout, given as paths)
// ---------------------------------------------------------------------------------------

/// Moves every file of `dir` into `blobs/` under a content name and replaces it with a
/// relative symlink, as `huggingface_hub` lays out `snapshots/<rev>/`.
fn hubify(dir: &Path, blobs: &Path) {
    fs::create_dir_all(blobs).unwrap();
    for (i, rel) in list_tree(dir).into_iter().enumerate() {
        let path = dir.join(&rel);
        let blob = blobs.join(format!("{i:040x}"));
        fs::rename(&path, &blob).unwrap();
        let depth = Path::new(&rel).components().count() - 1;
        let up = "../".repeat(depth + 2);
        symlink(format!("{up}blobs/{i:040x}"), &path).unwrap();
    }
}

#[test]
fn symlinked_checkpoints_work_like_real_files() {
    let s = Scratch::new();
    let (t0, t1) = common::tiny_llama(Dtype::BF16, Dtype::BF16, true, 11);
    // Plain copies, for the expected output.
    let plain_sft = common::single(&s.path("plain/sft"), &t0);
    let plain_aligned = common::sharded(&s.path("plain/aligned"), &common::split(&t1, 3));
    fs::write(plain_aligned.join("config.json"), "{\"a\": 1}\n").unwrap();
    let expected = s.out("expected");
    extrapolate(&plain_sft, &plain_aligned, "0.3", &expected).assert_ok();

    // The same files in hub-cache layout, given as snapshot paths.
    let repo_sft = s.path("hub/models--org--sft");
    let repo_aligned = s.path("hub/models--org--dpo");
    let snap_sft = repo_sft.join("snapshots/0123456789abcdef0123456789abcdef01234567");
    let snap_aligned = repo_aligned.join("snapshots/89abcdef0123456789abcdef0123456789abcdef");
    common::single(&snap_sft, &t0);
    common::sharded(&snap_aligned, &common::split(&t1, 3));
    fs::write(snap_aligned.join("config.json"), "{\"a\": 1}\n").unwrap();
    hubify(&snap_sft, &repo_sft.join("blobs"));
    hubify(&snap_aligned, &repo_aligned.join("blobs"));
    assert!(
        fs::symlink_metadata(snap_aligned.join("model.safetensors.index.json"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    // And a symlink to the snapshot directory itself.
    symlink(&snap_aligned, s.path("latest")).unwrap();

    let out = s.out("linked");
    extrapolate(&snap_sft, &s.path("latest"), "0.3", &out).assert_ok();
    assert_eq!(
        common::weight_files(&out),
        common::weight_files(&expected),
        "symlinked inputs gave different weights"
    );
    // Side files are copied as files, not as links into the cache.
    let config = out.join("config.json");
    assert!(fs::symlink_metadata(&config).unwrap().file_type().is_file());
    assert_eq!(fs::read(&config).unwrap(), b"{\"a\": 1}\n");

    // An output that would contain the blobs the snapshot links to is refused.
    extrapolate(&snap_sft, &snap_aligned, "0.3", &repo_aligned.join("blobs"))
        .arg("--force")
        .assert_fails(2, &["overlaps"]);
    assert!(repo_aligned.join("blobs").read_dir().unwrap().count() > 0);
}

#[test]
fn a_guarded_map_survives_truncation_and_reports_it() {
    // In-process, through the library: what `expo extrapolate` relies on.
    let s = Scratch::new();
    let file = sparse_checkpoint(&s.path("ck"), 2, 64);
    let ck = expo::checkpoint::Checkpoint::open(&file).unwrap();
    let maps = expo::engine::MappedCheckpoint::map_guarded(&ck).unwrap();
    maps.check_intact().unwrap();
    let (loc, _) = ck.get("layers.1.weight").unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(4096)
        .unwrap();
    // Reading past the new end would raise SIGBUS; the guard turns it into zeros and a mark.
    let bytes = maps.tensor(&ck, loc);
    let sum: u64 = bytes.iter().map(|&b| u64::from(b)).sum();
    assert_eq!(sum, 0);
    assert!(maps.damaged());
    let err = maps.check_intact().unwrap_err().to_string();
    assert!(
        err.contains(&format!("{} was truncated", file.display())),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------
// Paths swapped during a --force run (made deterministic with the test-only failpoints)
// ---------------------------------------------------------------------------------------

/// Lets a paused run go on when dropped, also when the test's action panicked.
struct Resume(PathBuf);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = fs::write(&self.0, b"");
    }
}

/// Runs `run` (an `expo` invocation, finished with `check`: `assert_ok`/`assert_fails`) on
/// another thread with the failpoint `point` armed. When expo reaches it (and waits), calls
/// `act`, then lets expo go on; returns what `check` returned.
fn race<T: Send + 'static>(
    s: &Scratch,
    point: &str,
    run: common::Expo,
    check: impl FnOnce(common::Expo) -> T + Send + 'static,
    act: impl FnOnce(),
) -> T {
    let dir = s.path("failpoints");
    fs::create_dir_all(&dir).unwrap();
    for end in ["reached", "continue"] {
        let _ = fs::remove_file(dir.join(format!("{point}.{end}")));
    }
    let run = run
        .env("EXPO_FAILPOINT", point)
        .env("EXPO_FAILPOINT_DIR", &dir);
    let handle = std::thread::spawn(move || check(run));
    let reached = dir.join(format!("{point}.reached"));
    let started = Instant::now();
    while !reached.exists() {
        if handle.is_finished() {
            match handle.join() {
                Ok(_) => panic!("expo finished without reaching the failpoint {point}"),
                Err(p) => std::panic::resume_unwind(p),
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "expo did not reach the failpoint {point}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    {
        let _resume = Resume(dir.join(format!("{point}.continue")));
        act();
    }
    match handle.join() {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    }
}

/// The staging-named entries in `dir`.
fn staging_entries(dir: &Path) -> Vec<PathBuf> {
    list_dir(dir)
        .into_iter()
        .filter(|n| n.starts_with(".expo-tmp-"))
        .map(|n| dir.join(n))
        .collect()
}

/// Someone's data that a link may be made to point at (it looks like a checkpoint).
fn victim(s: &Scratch) -> (PathBuf, Vec<(String, Vec<u8>)>) {
    let v = s.path("victim");
    fs::create_dir_all(v.join("deep")).unwrap();
    fs::write(v.join("config.json"), b"{}").unwrap();
    fs::write(v.join("deep/data.bin"), b"precious").unwrap();
    let snap = snapshot(&v);
    (v, snap)
}

#[test]
fn force_never_deletes_through_a_link_swapped_in_before_the_exchange() {
    let s = Scratch::new();
    small_pair(&s, 7);
    let out = s.out("result");
    let before = previous_output(&out);
    let (victim, victim_files) = victim(&s);
    let real = s.path("result-real");
    let needle = format!("--output {} changed while expo ran", out.display());
    race(
        &s,
        "output-exchange",
        extrapolate(&s.path("sft"), &s.path("aligned"), "0.5", &out).arg("--force"),
        move |e| e.assert_fails(1, &[needle.as_str(), "untouched"]),
        || {
            fs::rename(&out, &real).unwrap();
            symlink(&victim, &out).unwrap();
        },
    );
    assert_eq!(snapshot(&victim), victim_files);
    assert_eq!(fs::read_link(&out).unwrap(), victim);
    // The validated directory, moved away by the test, is as it was (unmarked again).
    assert_eq!(snapshot(&real), before);
    assert_eq!(list_dir(&s.outputs()), ["result"]);
}

#[test]
fn force_never_deletes_through_a_link_swapped_in_for_the_moved_aside_output() {
    let s = Scratch::new();
    small_pair(&s, 7);
    let out = s.out("result");
    previous_output(&out);
    let (victim, victim_files) = victim(&s);
    let moved = s.path("moved-old");
    let outputs = s.outputs();
    let swapped = std::cell::RefCell::new(PathBuf::new());
    let done = race(
        &s,
        "output-remove-old",
        extrapolate(&s.path("sft"), &s.path("aligned"), "0.5", &out).arg("--force"),
        |e| e.assert_ok(),
        || {
            // The previous output, moved aside under the temporary name, is replaced by
            // a link to someone else's data before expo deletes it.
            let aside = staging_entries(&outputs);
            assert_eq!(aside.len(), 1, "{aside:?}");
            fs::rename(&aside[0], &moved).unwrap();
            symlink(&victim, &aside[0]).unwrap();
            *swapped.borrow_mut() = aside[0].clone();
        },
    );
    assert_eq!(snapshot(&victim), victim_files);
    let link = swapped.into_inner();
    assert_eq!(fs::read_link(&link).unwrap(), victim);
    // What was deleted is the previous output itself, through its handle, wherever it went.
    assert_eq!(list_tree(&moved), Vec::<String>::new());
    assert!(out.join("model.safetensors").is_file() && !out.join("sub").exists());
    assert!(
        done.stderr.contains("moved or replaced during the run"),
        "{}",
        done.stderr
    );
}

#[test]
fn force_does_not_delete_a_directory_that_replaced_the_checkpoint_during_the_run() {
    let s = Scratch::new();
    small_pair(&s, 7);
    let out = s.out("result");
    let before = previous_output(&out);
    let old = s.path("result-old");
    let out2 = out.clone();
    race(
        &s,
        "output-exchange",
        extrapolate(&s.path("sft"), &s.path("aligned"), "0.5", &out).arg("--force"),
        |e| e.assert_fails(1, &["changed while expo ran"]),
        || {
            fs::rename(&out2, &old).unwrap();
            fs::create_dir_all(out2.join("src")).unwrap();
            fs::write(out2.join("Cargo.toml"), "[package]\n").unwrap();
            fs::write(out2.join("src/main.rs"), "fn main() {}\n").unwrap();
        },
    );
    assert_eq!(list_tree(&out), ["Cargo.toml", "src/main.rs"]);
    assert_eq!(snapshot(&old), before);
    assert_eq!(list_dir(&s.outputs()), ["result"]);

    // The same directory, emptied of its checkpoint and filled with other work: what is
    // moved aside must still look like a checkpoint.
    fs::remove_dir_all(&out).unwrap();
    previous_output(&out);
    let out2 = out.clone();
    race(
        &s,
        "output-exchange",
        extrapolate(&s.path("sft"), &s.path("aligned"), "0.5", &out).arg("--force"),
        |e| e.assert_fails(1, &["changed while expo ran"]),
        || {
            fs::remove_file(out2.join("model.safetensors")).unwrap();
            fs::write(out2.join("thesis.tex"), "chapter 1").unwrap();
        },
    );
    assert_eq!(list_tree(&out), ["sub/notes.txt", "thesis.tex"]);
    assert_eq!(list_dir(&s.outputs()), ["result"]);
}

/// Runs expo as a user for whom permission bits count: as root, the capabilities that
/// bypass them are dropped for the child only. Returns its status and stderr.
fn run_without_dac_override(args: &[std::ffi::OsString]) -> (ExitStatus, String) {
    let mut cmd = expo_command(args);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::geteuid() == 0 {
                for cap in [1, 2, 3] {
                    // CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
                    if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
            }
            Ok(())
        });
    }
    finish(cmd.spawn().expect("dropping capabilities for the child"))
}

#[test]
fn a_previous_output_that_could_not_be_deleted_is_refused_before_the_run() {
    let s = Scratch::new();
    small_pair(&s, 7);
    let out = s.out("result");
    let before = previous_output(&out);
    // A read-only directory inside (as a copy from a read-only cache leaves): after the
    // swap its files could not be deleted, and a hidden multi-GB leftover would remain.
    let sub = out.join("sub");
    fs::set_permissions(&sub, fs::Permissions::from_mode(0o555)).unwrap();
    for dry_run in [true, false] {
        let mut args = extrapolate_args(&s.path("sft"), &s.path("aligned"), &out);
        args.push("--force".into());
        if dry_run {
            args.push("--dry-run".into());
        }
        let (status, stderr) = run_without_dac_override(&args);
        assert_eq!(status.code(), Some(1), "{status}\n{stderr}");
        for needle in [
            format!("--output {} cannot be replaced", out.display()),
            format!("{} is not writable", sub.display()),
            "chmod -R u+w".to_string(),
        ] {
            assert!(stderr.contains(&needle), "no `{needle}`:\n{stderr}");
        }
        assert_eq!(stderr.matches("Permission denied").count(), 1, "{stderr}");
        assert_eq!(snapshot(&out), before);
        assert_eq!(list_dir(&s.outputs()), ["result"]);
    }
    fs::set_permissions(&sub, fs::Permissions::from_mode(0o755)).unwrap();
}
