//! `expo search` with fake evaluators: small sh scripts that compute a score from
//! EXPO_ALPHA (e.g. −(α − 0.3)²) and record what they were asked to do.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::{self, expo, list_dir, small_pair, weight_files, Dtype, Expo, Scratch};
use serde_json::Value;

/// Writes an evaluator script; every call appends `alpha slot trial` to `calls`.
fn evaluator(s: &Scratch, name: &str, body: &str) -> PathBuf {
    let path = s.path(name);
    let calls = s.path("calls");
    let text = format!(
        "#!/bin/sh\necho \"$EXPO_ALPHA $EXPO_SLOT $EXPO_TRIAL\" >> '{}'\n{body}\n",
        calls.display()
    );
    fs::write(&path, text).unwrap();
    path
}

/// Prints −(α − p)² as the score.
fn peak(p: f64) -> String {
    format!("awk -v a=\"$EXPO_ALPHA\" 'BEGIN {{ printf \"%.9f\\n\", -(a-{p})*(a-{p}) }}'")
}

fn calls(s: &Scratch) -> Vec<String> {
    fs::read_to_string(s.path("calls"))
        .unwrap_or_default()
        .lines()
        .map(|l| l.split(' ').next().unwrap().to_string())
        .collect()
}

/// `expo search --sft … --aligned … --eval 'sh SCRIPT {output}' --run RUN`.
fn search(s: &Scratch, script: &Path) -> Expo {
    expo(&["search"])
        .arg("--sft")
        .arg(s.path("sft"))
        .arg("--aligned")
        .arg(s.path("aligned"))
        .arg("--eval")
        .arg(format!("sh '{}' {{output}}", script.display()))
        .arg("--run")
        .arg(s.out("run"))
}

fn ledger(s: &Scratch) -> Vec<Value> {
    fs::read_to_string(s.out("run").join("ledger.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn candidates(s: &Scratch) -> Vec<String> {
    list_dir(&s.out("run"))
        .into_iter()
        .filter(|n| n.starts_with("alpha-"))
        .collect()
}

#[test]
fn a_peak_at_0_3_is_found_exactly_and_only_its_candidate_is_kept() {
    let s = Scratch::new();
    small_pair(&s, 9);
    let script = evaluator(&s, "eval.sh", &peak(0.3));
    let out = search(&s, &script).arg("--json").assert_ok();
    let j = out.json.unwrap();
    assert_eq!(j["status"], "resolved", "{j:#}");
    assert_eq!(j["best"]["alpha"].as_f64(), Some(0.3));
    assert_eq!(j["evaluations"], 6);
    assert_eq!(j["baseline"]["score"].as_f64(), Some(-0.09));
    assert_eq!(candidates(&s), ["alpha-0.3"]);
    assert_eq!(calls(&s), ["0", "0.1", "0.2", "0.3", "0.4", "0.5"]);
    // RUN/summary.json is what --json printed (up to the elapsed time).
    let mut summary: Value =
        serde_json::from_str(&fs::read_to_string(s.out("run").join("summary.json")).unwrap())
            .unwrap();
    let mut printed = j.clone();
    summary["seconds"] = Value::Null;
    printed["seconds"] = Value::Null;
    assert_eq!(summary, printed);
    let svg = fs::read_to_string(s.out("run").join("search.svg")).unwrap();
    assert!(svg.contains("best α = 0.3"));
    assert!(out.stderr.contains("best alpha = 0.3"), "{}", out.stderr);
    // Bit-identical to `expo extrapolate --alpha 0.3`.
    let reference = s.out("reference");
    common::extrapolate(&s.path("sft"), &s.path("aligned"), "0.3", &reference).assert_ok();
    let kept = weight_files(&s.out("run").join("alpha-0.3"));
    assert!(!kept.is_empty());
    assert_eq!(kept, weight_files(&reference));
    // The rebuild command names the same α and output.
    let rebuild = j["rebuild"].as_str().unwrap();
    assert!(rebuild.contains("--alpha 0.3 --output"), "{rebuild}");
}

#[test]
fn a_peak_at_2_5_expands_past_the_first_batch_and_lands_within_one_step() {
    let s = Scratch::new();
    small_pair(&s, 9);
    let script = evaluator(&s, "eval.sh", &peak(2.5));
    let j = search(&s, &script).arg("--json").assert_ok().json.unwrap();
    assert_eq!(j["status"], "resolved", "{j:#}");
    let best = j["best"]["alpha"].as_f64().unwrap();
    assert!((best - 2.5).abs() <= 0.5, "{best}");
    let called = calls(&s);
    assert!(called.contains(&"1".to_string()) && called.contains(&"2".to_string()));
    assert!(j["evaluations"].as_u64().unwrap() <= 20);
    assert_eq!(candidates(&s).len(), 1);
}

#[test]
fn two_jobs_give_the_same_answer_using_both_slots() {
    let s = Scratch::new();
    small_pair(&s, 9);
    let script = evaluator(&s, "eval.sh", &peak(0.3));
    let j = search(&s, &script)
        .args(&["-j", "2", "--json"])
        .assert_ok()
        .json
        .unwrap();
    assert_eq!(j["status"], "resolved");
    assert_eq!(j["best"]["alpha"].as_f64(), Some(0.3));
    let slots: std::collections::BTreeSet<u64> = ledger(&s)
        .iter()
        .filter(|e| e["event"] == "start")
        .map(|e| e["slot"].as_u64().unwrap())
        .collect();
    assert_eq!(slots, [0, 1].into());
    let slots_seen: std::collections::BTreeSet<String> = fs::read_to_string(s.path("calls"))
        .unwrap()
        .lines()
        .map(|l| l.split(' ').nth(1).unwrap().to_string())
        .collect();
    assert_eq!(slots_seen, ["0".to_string(), "1".to_string()].into());
    assert_eq!(candidates(&s), ["alpha-0.3"]);
}

#[test]
fn a_missing_evaluator_aborts_at_once() {
    let s = Scratch::new();
    small_pair(&s, 9);
    let out = expo(&["search"])
        .arg("--sft")
        .arg(s.path("sft"))
        .arg("--aligned")
        .arg(s.path("aligned"))
        .args(&["--eval", "no-such-evaluator-xyz {output}", "--run"])
        .arg(s.out("run"))
        .assert_fails(
            1,
            &["exit 127", "command not found", "no-such-evaluator-xyz"],
        );
    let _ = out;
    let ends: Vec<Value> = ledger(&s)
        .into_iter()
        .filter(|e| e["event"] == "end")
        .collect();
    assert_eq!(ends.len(), 1, "{ends:?}");
    assert_eq!(ends[0]["exit"], 127);
    // 126: found but not executable.
    let s = Scratch::new();
    small_pair(&s, 9);
    let script = s.path("noexec.sh");
    fs::write(&script, "#!/bin/sh\necho 1\n").unwrap();
    expo(&["search"])
        .arg("--sft")
        .arg(s.path("sft"))
        .arg("--aligned")
        .arg(s.path("aligned"))
        .arg("--eval")
        .arg(format!("'{}' {{output}}", script.display()))
        .arg("--run")
        .arg(s.out("run"))
        .assert_fails(1, &["exit 126", "Permission denied"]);
}

#[test]
fn exit_125_is_unusable_and_not_retried_other_failures_are_retried_then_holes() {
    let s = Scratch::new();
    small_pair(&s, 9);
    let body = format!(
        "case \"$EXPO_ALPHA\" in 0.2) exit 125;; 0.4) echo boom >&2; exit 3;; esac\n{}",
        peak(0.3)
    );
    let script = evaluator(&s, "eval.sh", &body);
    let j = search(&s, &script).arg("--json").assert_ok().json.unwrap();
    let called = calls(&s);
    assert_eq!(called.iter().filter(|a| *a == "0.2").count(), 1);
    assert_eq!(called.iter().filter(|a| *a == "0.4").count(), 2);
    let states: Vec<(f64, String)> = j["trials"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["alpha"].as_f64().unwrap(),
                t["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(states.contains(&(0.2, "unusable".into())));
    assert_eq!(
        states
            .iter()
            .filter(|(a, st)| *a == 0.4 && st == "failed")
            .count(),
        2
    );
    // The best is still found between the holes, and no failed candidate is kept.
    assert_eq!(j["best"]["alpha"].as_f64(), Some(0.3));
    assert_eq!(candidates(&s), ["alpha-0.3"]);
    let log = fs::read_dir(s.out("run").join("trials"))
        .unwrap()
        .filter_map(|e| fs::read_to_string(e.unwrap().path().join("stderr.log")).ok())
        .any(|t| t.contains("boom"));
    assert!(log, "the evaluator's stderr goes to the trial's log");
}

#[test]
fn too_many_failures_stop_the_search_with_exit_1() {
    let s = Scratch::new();
    small_pair(&s, 9);
    let script = evaluator(&s, "eval.sh", "exit 1");
    search(&s, &script)
        .args(&["--retries", "0", "--max-failures", "2"])
        .assert_fails(1, &["failed", "--max-failures 2"]);
    assert_eq!(calls(&s).len(), 2);
    assert_eq!(candidates(&s), Vec::<String>::new());
}

fn pid_gone(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // A zombie waiting for its reaper runs no more.
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

/// Kills a process group when a test ends, even by a failed assertion.
struct KillGroupOnDrop(i32);

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        // SAFETY: signalling the process group of an evaluator this test started.
        unsafe { libc::kill(-self.0, libc::SIGKILL) };
    }
}

/// Waits (bounded) until process `pid` is gone: a SIGKILL is delivered asynchronously.
fn wait_gone(pid: i32) {
    for _ in 0..2000 {
        if pid_gone(pid) {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("process {pid} is still running");
}

/// Waits (bounded) until `path` exists: a handshake, not a timing assertion.
fn wait_for(path: &Path) {
    for _ in 0..6000 {
        if path.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("{} never appeared", path.display());
}

#[test]
fn a_timeout_kills_the_evaluator_and_its_children() {
    let s = Scratch::new();
    small_pair(&s, 9);
    let pids = s.path("pids");
    let body = format!(
        "sleep 1000 &\necho $! >> '{p}'\necho $$ >> '{p}'\nwait",
        p = pids.display()
    );
    let script = evaluator(&s, "eval.sh", &body);
    search(&s, &script)
        .args(&[
            "-a",
            "0.1",
            "--no-baseline",
            "--timeout",
            "300ms",
            "--kill-after",
            "200ms",
            "--retries",
            "0",
            "--max-failures",
            "1",
        ])
        .assert_fails(1, &["failed"]);
    let text = fs::read_to_string(&pids).unwrap();
    let pids: Vec<i32> = text.lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(pids.len(), 2);
    for pid in pids {
        wait_gone(pid);
    }
    let end = ledger(&s)
        .into_iter()
        .find(|e| e["event"] == "end")
        .unwrap();
    assert_eq!(end["state"], "failed");
}

/// Starts `expo search` as a child process (to signal it).
fn spawn_search(s: &Scratch, script: &Path, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_expo"))
        .arg("search")
        .arg("--sft")
        .arg(s.path("sft"))
        .arg("--aligned")
        .arg(s.path("aligned"))
        .arg("--eval")
        .arg(format!("sh '{}' {{output}}", script.display()))
        .arg("--run")
        .arg(s.out("run"))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// An evaluator that, at α = 0.2, records its pid and blocks until `go` exists.
fn blocking_evaluator(s: &Scratch) -> PathBuf {
    let body = format!(
        "if [ \"$EXPO_ALPHA\" = 0.2 ] && [ ! -e '{go}' ]; then echo $$ > '{blocked}.tmp'; mv '{blocked}.tmp' '{blocked}'; while [ ! -e '{go}' ]; do sleep 0.05; done; fi\n{}",
        peak(0.3),
        go = s.path("go").display(),
        blocked = s.path("blocked").display()
    );
    evaluator(s, "eval.sh", &body)
}

#[test]
fn ctrl_c_exits_130_and_resume_finishes_without_evaluating_a_finished_alpha_again() {
    let s = Scratch::new();
    small_pair(&s, 9);
    let script = blocking_evaluator(&s);
    let child = spawn_search(&s, &script, &[]);
    wait_for(&s.path("blocked"));
    let blocked: i32 = fs::read_to_string(s.path("blocked"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: signalling a child process this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("--resume"), "{stderr}");
    wait_gone(blocked);
    let events = ledger(&s);
    assert!(events
        .iter()
        .any(|e| e["event"] == "end" && e["state"] == "interrupted" && e["alpha"] == 0.2));
    // Its candidate was removed; the finished ones are out of contention or kept.
    assert!(!s.out("run").join("alpha-0.2").exists());
    assert_eq!(calls(&s), ["0", "0.1", "0.2"]);

    fs::write(s.path("go"), "").unwrap();
    let j = search(&s, &script)
        .args(&["--resume", "--json"])
        .assert_ok()
        .json
        .unwrap();
    assert_eq!(j["status"], "resolved");
    assert_eq!(j["best"]["alpha"].as_f64(), Some(0.3));
    assert_eq!(calls(&s), ["0", "0.1", "0.2", "0.2", "0.3", "0.4", "0.5"]);
    assert_eq!(candidates(&s), ["alpha-0.3"]);
}

#[test]
fn a_second_ctrl_c_kills_an_evaluator_that_ignores_sigterm_at_once() {
    let s = Scratch::new();
    small_pair(&s, 9);
    // The evaluator's own shell (the group leader) survives SIGTERM.
    let eval = format!(
        "trap 'touch {termed}' TERM; echo $$ > {pid}.tmp; mv {pid}.tmp {pid}; while :; do sleep 0.05; done",
        termed = s.path("termed").display(),
        pid = s.path("pid").display()
    );
    let child = Command::new(env!("CARGO_BIN_EXE_expo"))
        .arg("search")
        .arg("--sft")
        .arg(s.path("sft"))
        .arg("--aligned")
        .arg(s.path("aligned"))
        .args(["--eval", &eval, "--kill-after", "1h", "--run"])
        .arg(s.out("run"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&s.path("pid"));
    let pid: i32 = fs::read_to_string(s.path("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _cleanup = KillGroupOnDrop(pid);
    // SAFETY: signalling a child process this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    wait_for(&s.path("termed"));
    assert!(
        !pid_gone(pid),
        "SIGTERM was ignored: the evaluator still runs"
    );
    // SAFETY: as above.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130));
    wait_gone(pid);
}

#[test]
fn ctrl_c_while_candidates_are_built_leaves_nothing_behind() {
    let s = Scratch::new();
    small_pair(&s, 9);
    let script = evaluator(&s, "eval.sh", &peak(0.3));
    let args: Vec<std::ffi::OsString> = vec![
        "search".into(),
        "--sft".into(),
        s.path("sft").into(),
        "--aligned".into(),
        s.path("aligned").into(),
        "--eval".into(),
        format!("sh '{}' {{output}}", script.display()).into(),
        "--run".into(),
        s.out("run").into(),
    ];
    let paused = common::Paused::start(&args, "search-build", &s.path("fp"));
    paused.signal(libc::SIGINT);
    let (code, stderr) = paused.wait();
    assert_eq!(code, 130, "{stderr}");
    // Only the baseline was evaluated; the candidate being built is not there.
    assert_eq!(calls(&s), ["0"]);
    assert_eq!(candidates(&s), Vec::<String>::new());
    common::assert_no_staging(&s.out("run"));
    assert!(ledger(&s)
        .iter()
        .any(|e| e["event"] == "end" && e["state"] == "interrupted" && e["alpha"] == 0.1));
    let j = search(&s, &script)
        .args(&["--resume", "--json"])
        .assert_ok()
        .json
        .unwrap();
    assert_eq!(j["best"]["alpha"].as_f64(), Some(0.3));
    assert_eq!(calls(&s), ["0", "0.1", "0.2", "0.3", "0.4", "0.5"]);
}

#[test]
fn resume_after_expo_was_killed_reruns_only_the_unfinished_trial() {
    let s = Scratch::new();
    small_pair(&s, 9);
    let script = blocking_evaluator(&s);
    let mut child = spawn_search(&s, &script, &[]);
    wait_for(&s.path("blocked"));
    let blocked: i32 = fs::read_to_string(s.path("blocked"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    // The orphaned evaluator is in its own process group; end it as a user would.
    // SAFETY: signalling the process group of an evaluator this test caused to start.
    unsafe { libc::kill(-blocked, libc::SIGKILL) };
    // The trial started but never ended.
    let events = ledger(&s);
    assert!(events
        .iter()
        .any(|e| e["event"] == "start" && e["alpha"] == 0.2));
    assert!(!events
        .iter()
        .any(|e| e["event"] == "end" && e["alpha"] == 0.2));
    fs::write(s.path("go"), "").unwrap();
    let j = search(&s, &script)
        .args(&["--resume", "--json"])
        .assert_ok()
        .json
        .unwrap();
    assert_eq!(j["best"]["alpha"].as_f64(), Some(0.3));
    assert_eq!(calls(&s), ["0", "0.1", "0.2", "0.2", "0.3", "0.4", "0.5"]);
    assert_eq!(candidates(&s), ["alpha-0.3"]);
    let reference = s.out("reference");
    common::extrapolate(&s.path("sft"), &s.path("aligned"), "0.3", &reference).assert_ok();
    assert_eq!(
        weight_files(&s.out("run").join("alpha-0.3")),
        weight_files(&reference)
    );
}

#[test]
fn a_changed_input_is_refused_on_resume_naming_it_while_jobs_may_change() {
    let s = Scratch::new();
    small_pair(&s, 9);
    let script = evaluator(&s, "eval.sh", &peak(0.3));
    search(&s, &script).arg("--json").assert_ok();
    search(&s, &script)
        .args(&["--resume", "--minimize"])
        .assert_fails(2, &["--minimize", "differs"]);
    search(&s, &script)
        .args(&["--resume", "--score-json", "/x"])
        .assert_fails(2, &["--score-json"]);
    expo(&["search"])
        .arg("--sft")
        .arg(s.path("sft"))
        .arg("--aligned")
        .arg(s.path("aligned"))
        .args(&["--eval", "other {output}", "--resume", "--run"])
        .arg(s.out("run"))
        .assert_fails(2, &["--eval", "other {output}"]);
    // A checkpoint rewritten since: its fingerprint differs.
    let (t0, _) = common::tiny_llama(Dtype::BF16, Dtype::BF16, false, 10);
    fs::remove_dir_all(s.path("sft")).unwrap();
    common::single(&s.path("sft"), &t0);
    search(&s, &script)
        .arg("--resume")
        .assert_fails(2, &["--sft"]);
    // Without --resume an existing run is not overwritten.
    let s2 = Scratch::new();
    small_pair(&s2, 9);
    let script2 = evaluator(&s2, "eval.sh", &peak(0.3));
    search(&s2, &script2).arg("--json").assert_ok();
    search(&s2, &script2).assert_fails(2, &["--resume"]);
    // Jobs, budget and timeout may change: nothing is evaluated again.
    let before = calls(&s2).len();
    let j = search(&s2, &script2)
        .args(&[
            "--resume",
            "-j",
            "3",
            "--max-evals",
            "30",
            "--timeout",
            "1h",
            "--json",
        ])
        .assert_ok()
        .json
        .unwrap();
    assert_eq!(calls(&s2).len(), before);
    assert_eq!(j["best"]["alpha"].as_f64(), Some(0.3));
}

#[test]
fn scores_from_json_pointers_and_score_files() {
    let s = Scratch::new();
    small_pair(&s, 9);
    // lm-eval style keys with commas, on stdout.
    let body = "awk -v a=\"$EXPO_ALPHA\" 'BEGIN { printf \"{\\\"results\\\": {\\\"t/x\\\": {\\\"acc,none\\\": %.9f}}, \\\"len\\\": 7}\\n\", -(a-0.3)*(a-0.3) }'";
    let script = evaluator(&s, "eval.sh", body);
    let j = search(&s, &script)
        .args(&["--score-json", "/results/t~1x/acc,none", "--json"])
        .assert_ok()
        .json
        .unwrap();
    assert_eq!(j["best"]["alpha"].as_f64(), Some(0.3));
    let end = ledger(&s)
        .into_iter()
        .find(|e| e["event"] == "end")
        .unwrap();
    assert_eq!(end["json"]["len"], 7, "the evaluator's JSON is kept");

    // A score file named by a template; stdout is only logs.
    let s = Scratch::new();
    small_pair(&s, 9);
    let body = format!(
        "echo 'log 12:00:01'\n{} > \"$EXPO_WORKDIR/score.txt\"",
        peak(0.3)
    );
    let script = evaluator(&s, "eval.sh", &body);
    let j = search(&s, &script)
        .args(&["--score-file", "{workdir}/score.txt", "--json"])
        .assert_ok()
        .json
        .unwrap();
    assert_eq!(j["best"]["alpha"].as_f64(), Some(0.3));

    // --minimize: the lowest score wins.
    let s = Scratch::new();
    small_pair(&s, 9);
    let body = "awk -v a=\"$EXPO_ALPHA\" 'BEGIN { printf \"%.9f\\n\", (a-0.2)*(a-0.2) }'";
    let script = evaluator(&s, "eval.sh", body);
    let j = search(&s, &script)
        .args(&["--minimize", "--json"])
        .assert_ok()
        .json
        .unwrap();
    assert_eq!(j["best"]["alpha"].as_f64(), Some(0.2));

    // A last line that is not one number is a failure, not a score.
    let s = Scratch::new();
    small_pair(&s, 9);
    let script = evaluator(&s, "eval.sh", "echo 0.5\necho 'done at 12:00'");
    search(&s, &script)
        .args(&["--retries", "0", "--max-failures", "1"])
        .assert_fails(1, &["failed"]);
    let stderr_warned = ledger(&s)
        .iter()
        .any(|e| e["event"] == "end" && e["state"] == "failed");
    assert!(stderr_warned);
}

#[test]
fn keep_all_keeps_every_candidate_and_a_directory_expo_did_not_make_is_never_deleted() {
    let s = Scratch::new();
    small_pair(&s, 9);
    let script = evaluator(&s, "eval.sh", &peak(0.3));
    search(&s, &script)
        .args(&["--keep", "all", "--json"])
        .assert_ok();
    assert_eq!(
        candidates(&s),
        [
            "alpha-0.1",
            "alpha-0.2",
            "alpha-0.3",
            "alpha-0.4",
            "alpha-0.5"
        ]
    );
    // Candidates elsewhere, in a directory created on demand.
    let s3 = Scratch::new();
    small_pair(&s3, 9);
    let script3 = evaluator(&s3, "eval.sh", &peak(0.3));
    let cands = s3.out("cands").join("deep");
    search(&s3, &script3)
        .arg("--output")
        .arg(cands.join("c-{alpha}"))
        .arg("--json")
        .assert_ok();
    assert_eq!(list_dir(&cands), ["c-0.3"]);
    // --keep 2: the two best stay.
    let s = Scratch::new();
    small_pair(&s, 9);
    let script = evaluator(&s, "eval.sh", &peak(0.3));
    search(&s, &script)
        .args(&["--keep", "2", "--json"])
        .assert_ok();
    assert_eq!(candidates(&s), ["alpha-0.2", "alpha-0.3"]);
    // A user's directory where a candidate would go: refused, left alone.
    let s = Scratch::new();
    small_pair(&s, 9);
    let script = evaluator(&s, "eval.sh", &peak(0.3));
    let mine = s.out("run").join("alpha-0.2");
    fs::create_dir_all(&mine).unwrap();
    fs::write(mine.join("notes.txt"), "mine").unwrap();
    search(&s, &script).assert_fails(1, &["alpha-0.2", "not made by this search"]);
    assert_eq!(fs::read_to_string(mine.join("notes.txt")).unwrap(), "mine");
}

#[test]
fn dry_run_prints_the_commands_and_writes_nothing() {
    let s = Scratch::new();
    small_pair(&s, 9);
    let script = evaluator(&s, "eval.sh", &peak(0.3));
    let out = search(&s, &script)
        .args(&["--dry-run", "--json"])
        .assert_ok();
    let j = out.json.unwrap();
    let cmds = j["commands"].as_array().unwrap();
    assert_eq!(cmds.len(), 6);
    assert!(cmds[0]["command"]
        .as_str()
        .unwrap()
        .ends_with(&*s.path("aligned").to_string_lossy()));
    assert!(cmds[3]["command"].as_str().unwrap().contains("alpha-0.3"));
    assert!(j["free_bytes"].as_u64().unwrap() > 0);
    assert!(out.stderr.contains("alpha-0.3"));
    assert!(!s.out("run").exists());
    assert!(!s.path("calls").exists());
}

#[test]
fn usage_errors() {
    let s = Scratch::new();
    small_pair(&s, 9);
    let script = evaluator(&s, "eval.sh", &peak(0.3));
    let base = || {
        expo(&["search"])
            .arg("--sft")
            .arg(s.path("sft"))
            .arg("--aligned")
            .arg(s.path("aligned"))
            .arg("--run")
            .arg(s.out("run"))
    };
    base()
        .args(&["--eval", "x {alpah}"])
        .assert_fails(2, &["{alpah}", "{alpha}"]);
    base()
        .args(&["--eval", "x {alpha}", "--output"])
        .arg(s.out("cands"))
        .assert_fails(2, &["{alpha}"]);
    base()
        .args(&["--eval", "x", "--score-json", "results/x"])
        .assert_fails(2, &["JSON pointer"]);
    base()
        .args(&["--eval", "x", "--bounds", "0.5:1"])
        .assert_fails(2, &["--bounds"]);
    search(&s, &script)
        .arg("--resume")
        .assert_fails(2, &["holds no search"]);
    assert!(!s.out("run").exists());
}

/// The pid written (atomically) to `path` by an evaluator.
fn read_pid(path: &Path) -> i32 {
    fs::read_to_string(path).unwrap().trim().parse().unwrap()
}

/// `expo search` with an `--eval` given as it is (not through `sh SCRIPT`), as a child.
fn spawn_search_eval(s: &Scratch, eval: &str, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_expo"))
        .arg("search")
        .arg("--sft")
        .arg(s.path("sft"))
        .arg("--aligned")
        .arg(s.path("aligned"))
        .arg("--eval")
        .arg(eval)
        .arg("--run")
        .arg(s.out("run"))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn kill_after_is_the_grace_of_the_workers_when_the_shell_dies_at_sigterm() {
    let s = Scratch::new();
    small_pair(&s, 9);
    // A worker with a clean-up trap under a `sh -c` that dies at SIGTERM (a compound
    // command, so no exec): its clean-up waits for the test's `release`.
    let worker = s.path("worker.sh");
    fs::write(
        &worker,
        format!(
            "trap 'touch {termed}; while [ ! -e {release} ]; do sleep 0.2; done; touch {cleaned}; exit 0' TERM\necho $$ > {w}.tmp; mv {w}.tmp {w}\nwhile :; do sleep 0.05; done\n",
            termed = s.path("termed").display(),
            release = s.path("release").display(),
            cleaned = s.path("cleaned").display(),
            w = s.path("wpid").display(),
        ),
    )
    .unwrap();
    let eval = format!("sh '{}' & wait", worker.display());
    let child = spawn_search_eval(
        &s,
        &eval,
        &["-a", "0.1", "--no-baseline", "--kill-after", "1h"],
    );
    wait_for(&s.path("wpid"));
    let wpid = read_pid(&s.path("wpid"));
    let _cleanup = KillGroupOnDrop(wpid);
    // SAFETY: signalling a child process this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    // The worker got SIGTERM (or, on a run that kills at once, is gone).
    for _ in 0..6000 {
        if s.path("termed").exists() || pid_gone(wpid) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    fs::write(s.path("release"), "").unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        s.path("cleaned").exists(),
        "the worker was killed before its clean-up ended: {stderr}"
    );
    wait_gone(wpid);
}

#[test]
fn a_simple_command_runs_with_exec_as_the_leader_of_its_group() {
    let s = Scratch::new();
    small_pair(&s, 9);
    let script = evaluator(
        &s,
        "eval.sh",
        &format!(
            "echo $$ > '{p}'; cut -d' ' -f5 /proc/$$/stat > '{g}'\necho 0.5",
            p = s.path("pid").display(),
            g = s.path("pgid").display()
        ),
    );
    search(&s, &script)
        .args(&["-a", "0.1", "--no-baseline", "--max-evals", "1"])
        .run();
    assert_eq!(read_pid(&s.path("pid")), read_pid(&s.path("pgid")));
}

#[test]
fn a_worker_in_its_own_session_is_stopped_with_its_trial() {
    let s = Scratch::new();
    small_pair(&s, 9);
    let spid = s.path("spid");
    let script = evaluator(
        &s,
        "eval.sh",
        &format!(
            "setsid sh -c 'echo $$ > {p}.tmp; mv {p}.tmp {p}; exec sleep 1000' &\nwhile [ ! -e {p} ]; do sleep 0.05; done\necho 0.5",
            p = spid.display()
        ),
    );
    search(&s, &script)
        .args(&["-a", "0.1", "--no-baseline", "--max-evals", "1"])
        .run();
    let pid = read_pid(&spid);
    let _cleanup = KillGroupOnDrop(pid);
    wait_gone(pid);
}

#[test]
fn kill_9_of_expo_then_resume_stops_the_evaluators_of_the_earlier_run_first() {
    let s = Scratch::new();
    small_pair(&s, 9);
    // At α = 0.2 the first time: a leader (expo's child) and a worker of its group that
    // runs until killed. Every later evaluation notes whether that worker still runs (a
    // zombie left for init to reap runs no more).
    let body = format!(
        "if [ -e '{w}' ]; then st=$(cut -d' ' -f3 /proc/$(cat '{w}')/stat 2>/dev/null); if [ -n \"$st\" ] && [ \"$st\" != Z ]; then touch '{overlap}'; fi; fi\n\
         if [ \"$EXPO_ALPHA\" = 0.2 ] && [ ! -e '{w}' ]; then echo $$ > '{l}'; (while :; do sleep 0.05; done) & echo $! > '{w}.tmp'; mv '{w}.tmp' '{w}'; wait; fi\n{}",
        peak(0.3),
        w = s.path("worker").display(),
        l = s.path("leader").display(),
        overlap = s.path("overlap").display(),
    );
    let script = evaluator(&s, "eval.sh", &body);
    let mut child = spawn_search(&s, &script, &[]);
    wait_for(&s.path("worker"));
    let leader = read_pid(&s.path("leader"));
    let worker = read_pid(&s.path("worker"));
    let _cleanup = KillGroupOnDrop(leader);
    child.kill().unwrap();
    child.wait().unwrap();
    // The direct child gets SIGTERM when expo dies (PR_SET_PDEATHSIG) ...
    wait_gone(leader);
    // ... its worker does not, but the ledger says how to find it.
    assert!(!pid_gone(worker));
    let job = ledger(&s)
        .into_iter()
        .find(|e| e["event"] == "job" && e["pgid"] == leader)
        .expect("a job event with the process group");
    assert!(job["start_time"].as_u64().unwrap() > 0, "{job}");
    let out = search(&s, &script)
        .args(&["--resume", "--json"])
        .assert_ok();
    assert!(out.stderr.contains("still running"), "{}", out.stderr);
    wait_gone(worker);
    assert!(
        !s.path("overlap").exists(),
        "an evaluation ran while a process of the earlier run was alive"
    );
    assert_eq!(out.json.unwrap()["best"]["alpha"].as_f64(), Some(0.3));
}

#[test]
fn max_failures_stops_running_trials_and_shows_the_stderr_of_each_failure() {
    let s = Scratch::new();
    small_pair(&s, 9);
    let blocked = s.path("blocked");
    let body = format!(
        "if [ \"$EXPO_ALPHA\" = 0.2 ]; then echo $$ > '{b}.tmp'; mv '{b}.tmp' '{b}'; while :; do sleep 0.05; done; fi\n\
         while [ ! -e '{b}' ]; do sleep 0.05; done\necho 'oops: CUDA out of memory' >&2\nexit 1",
        b = blocked.display()
    );
    let script = evaluator(&s, "eval.sh", &body);
    let child = spawn_search(
        &s,
        &script,
        &[
            "-a",
            "0.1,0.2",
            "--no-baseline",
            "-j",
            "2",
            "--retries",
            "0",
            "--max-failures",
            "1",
        ],
    );
    let (code, stderr) = wait_bounded(child);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("--max-failures 1"), "{stderr}");
    assert!(stderr.contains("oops: CUDA out of memory"), "{stderr}");
    let pid = read_pid(&blocked);
    let _cleanup = KillGroupOnDrop(pid);
    wait_gone(pid);
    assert!(ledger(&s)
        .iter()
        .any(|e| e["event"] == "end" && e["alpha"] == 0.2 && e["state"] == "interrupted"));
}

/// Waits for a search started by [`spawn_search`] (at most two minutes: a search that does
/// not end is killed and fails the test): its exit code and stderr.
fn wait_bounded(mut child: Child) -> (Option<i32>, String) {
    let err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut { err }, &mut text);
        text
    });
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if started.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the search did not end: {}", reader.join().unwrap());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status.code(), reader.join().unwrap())
}

/// A fake Slurm on PATH: `sbatch` runs the job script at once in a session of its own,
/// `squeue -t all -j IDS` says RUNNING / COMPLETED / FAILED / CANCELLED, `scancel` signals
/// the job's group (TERM with `--signal=TERM`, else KILL), `scontrol show job -o ID` gives
/// the exit code. Every call is logged in DIR/calls. Returns (bin dir, state dir).
fn fake_slurm(s: &Scratch) -> (PathBuf, PathBuf) {
    let bin = s.path("fakebin");
    let state = s.path("fakeslurm");
    fs::create_dir_all(&bin).unwrap();
    fs::create_dir_all(&state).unwrap();
    let scripts = [
        (
            "sbatch",
            r#"echo "sbatch $*" >> "$FAKE_SLURM/calls"
for a; do script=$a; done
case " $* " in *" -p nosuch "*) echo "sbatch: error: invalid partition specified: nosuch" >&2; echo "sbatch: error: Batch job submission failed: Invalid partition name specified" >&2; exit 1;; esac
n=$(( $(cat "$FAKE_SLURM/next" 2>/dev/null || echo 0) + 1 )); echo $n > "$FAKE_SLURM/next"
out=$(sed -n 's/^#SBATCH --output=//p' "$script"); err=$(sed -n 's/^#SBATCH --error=//p' "$script")
setsid sh -c 'sh "$1" > "$2" 2> "$3"; echo $? > "$4.exit.tmp"; mv "$4.exit.tmp" "$4.exit"' sh "$script" "$out" "$err" "$FAKE_SLURM/$n" < /dev/null > /dev/null 2>&1 &
echo $! > "$FAKE_SLURM/$n.pid"
echo $n"#,
        ),
        (
            "squeue",
            r#"echo "squeue $*" >> "$FAKE_SLURM/calls"
ids=
while [ $# -gt 0 ]; do case $1 in -j) ids=$2; shift;; esac; shift; done
for id in $(echo "$ids" | tr , ' '); do
  if [ -e "$FAKE_SLURM/$id.cancelled" ] && ! kill -0 "$(cat "$FAKE_SLURM/$id.pid")" 2>/dev/null; then echo "$id CANCELLED None"
  elif [ -e "$FAKE_SLURM/$id.exit" ]; then
    if [ -e "$FAKE_SLURM/$id.cancelled" ]; then echo "$id CANCELLED None"
    elif [ "$(cat "$FAKE_SLURM/$id.exit")" = 0 ]; then echo "$id COMPLETED None"
    else echo "$id FAILED NonZeroExitCode"; fi
  elif [ -e "$FAKE_SLURM/$id.pid" ]; then echo "$id RUNNING None"; fi
done"#,
        ),
        (
            "scancel",
            r#"echo "scancel $*" >> "$FAKE_SLURM/calls"
sig=KILL
for a; do case $a in --signal=*) sig=${a#--signal=};; -*) ;; *) touch "$FAKE_SLURM/$a.cancelled"; kill -$sig -"$(cat "$FAKE_SLURM/$a.pid")" 2>/dev/null;; esac; done
exit 0"#,
        ),
        (
            "scontrol",
            r#"echo "scontrol $*" >> "$FAKE_SLURM/calls"
for a; do id=$a; done
echo "JobId=$id JobState=X ExitCode=$(cat "$FAKE_SLURM/$id.exit" 2>/dev/null || echo 0):0""#,
        ),
    ];
    for (name, body) in scripts {
        let p = bin.join(name);
        fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
    }
    (bin, state)
}

fn with_fake_slurm(e: Expo, bin: &Path, state: &Path) -> Expo {
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    e.env("PATH", path).env("FAKE_SLURM", state)
}

fn slurm_calls(state: &Path) -> Vec<String> {
    fs::read_to_string(state.join("calls"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn slurm_jobs_are_submitted_followed_with_one_squeue_for_all_and_recorded() {
    let s = Scratch::new();
    small_pair(&s, 9);
    let (bin, state) = fake_slurm(&s);
    let script = evaluator(&s, "eval.sh", &peak(0.3));
    let j = with_fake_slurm(search(&s, &script), &bin, &state)
        .args(&["-j", "2", "--slurm", "--gpus=1", "--json"])
        .assert_ok()
        .json
        .unwrap();
    assert_eq!(j["best"]["alpha"].as_f64(), Some(0.3));
    let calls = slurm_calls(&state);
    let sbatch: Vec<&String> = calls.iter().filter(|c| c.starts_with("sbatch")).collect();
    assert_eq!(sbatch.len(), j["evaluations"].as_u64().unwrap() as usize);
    assert!(
        sbatch[0].starts_with("sbatch --parsable --gpus=1 "),
        "{}",
        sbatch[0]
    );
    // One query per poll for every job in flight; none after a job was seen to end.
    assert!(calls
        .iter()
        .filter(|c| c.starts_with("squeue"))
        .all(|c| c.contains("-t all") && c.contains("-j ")));
    assert!(calls
        .iter()
        .any(|c| c.starts_with("squeue") && c.contains(',')));
    let jobs: Vec<Value> = ledger(&s)
        .into_iter()
        .filter(|e| e["event"] == "job")
        .collect();
    assert_eq!(jobs.len(), sbatch.len());
    assert!(jobs
        .iter()
        .all(|e| e["launcher"] == "slurm" && e["job_id"].as_str().is_some()));
    let name = jobs[0]["name"].as_str().unwrap();
    assert!(name.starts_with("expo-") && name.ends_with("-1"), "{name}");
    let job_sh = fs::read_to_string(s.out("run").join("trials/1/job.sh")).unwrap();
    assert!(
        job_sh.contains(&format!("#SBATCH --job-name={name}")),
        "{job_sh}"
    );
}

#[test]
fn a_slurm_timeout_cancels_with_term_first_then_hard_and_a_refused_submission_aborts() {
    let s = Scratch::new();
    small_pair(&s, 9);
    let (bin, state) = fake_slurm(&s);
    let script = evaluator(
        &s,
        "eval.sh",
        "trap 'echo termed >> \"$EXPO_WORKDIR/termed\"' TERM\nwhile :; do sleep 0.1; done",
    );
    with_fake_slurm(search(&s, &script), &bin, &state)
        .args(&[
            "-a",
            "0.1",
            "--no-baseline",
            "--timeout",
            "1s",
            "--kill-after",
            "1s",
            "--retries",
            "0",
            "--max-failures",
            "1",
            "--slurm",
            "",
        ])
        .assert_fails(1, &["timed out"]);
    let calls = slurm_calls(&state);
    let cancels: Vec<&String> = calls.iter().filter(|c| c.starts_with("scancel")).collect();
    assert_eq!(cancels[0], "scancel --full --signal=TERM 1", "{calls:?}");
    assert_eq!(cancels[1], "scancel 1", "{calls:?}");
    assert!(s.out("run").join("trials/1/termed").exists());
    // The last call is the query that saw the job leave the queue, and only then was its
    // candidate deleted.
    assert!(!s.out("run").join("alpha-0.1").exists());

    let s = Scratch::new();
    small_pair(&s, 9);
    let (bin, state) = fake_slurm(&s);
    let script = evaluator(&s, "eval.sh", &peak(0.3));
    with_fake_slurm(search(&s, &script), &bin, &state)
        .args(&["--slurm", "-p nosuch"])
        .assert_fails(1, &["invalid partition specified: nosuch"]);
    assert_eq!(
        slurm_calls(&state)
            .iter()
            .filter(|c| c.starts_with("sbatch"))
            .count(),
        1
    );
}
