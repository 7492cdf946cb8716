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
    search_args(s, script)
        .into_iter()
        .skip(1)
        .fold(expo(&["search"]), |e, a| e.arg(a))
}

/// The arguments of [`search`], for a search started as a child (failpoints, signals).
fn search_args(s: &Scratch, script: &Path) -> Vec<std::ffi::OsString> {
    vec![
        "search".into(),
        "--sft".into(),
        s.path("sft").into(),
        "--aligned".into(),
        s.path("aligned").into(),
        "--eval".into(),
        format!("sh '{}' {{output}}", script.display()).into(),
        "--run".into(),
        s.out("run").into(),
    ]
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
    let args = search_args(&s, &script);
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
    let mine = s.out("cands").join("alpha-0.2");
    fs::create_dir_all(&mine).unwrap();
    fs::write(mine.join("notes.txt"), "mine").unwrap();
    search(&s, &script)
        .arg("--output")
        .arg(s.out("cands").join("alpha-{alpha}"))
        .assert_fails(1, &["alpha-0.2", "not made by this search"]);
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

/// Issue 22 item 1: a `--run` that holds the user's files and no ledger is refused, in the
/// run and in `--dry-run`, and nothing in it is touched.
#[test]
fn a_run_directory_holding_user_files_and_no_ledger_is_refused() {
    let s = Scratch::new();
    small_pair(&s, 9);
    let script = evaluator(&s, "eval.sh", &peak(0.3));
    let run = s.out("run");
    fs::create_dir_all(run.join("trials")).unwrap();
    for name in ["summary.json", "search.svg", "summary.tmp", "trials/notes"] {
        fs::write(run.join(name), format!("mine: {name}")).unwrap();
    }
    let before = common::snapshot(&run);
    search(&s, &script)
        .arg("--dry-run")
        .assert_fails(2, &["not empty", "holds no search"]);
    search(&s, &script).assert_fails(2, &["not empty", "holds no search"]);
    assert_eq!(common::snapshot(&run), before);
    assert!(!s.path("calls").exists());
    // An empty directory is fine.
    let s = Scratch::new();
    small_pair(&s, 9);
    let script = evaluator(&s, "eval.sh", &peak(0.3));
    fs::create_dir_all(s.out("run")).unwrap();
    search(&s, &script).arg("--json").assert_ok();
}

/// `expo search` started with `args`, in `cwd`, the evaluator `script`, not waited for.
fn spawn_search_in(s: &Scratch, cwd: &Path, script: &Path, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_expo"))
        .current_dir(cwd)
        .arg("search")
        .arg("--sft")
        .arg(s.path("sft"))
        .arg("--aligned")
        .arg(s.path("aligned"))
        .arg("--eval")
        .arg(format!("sh '{}' {{output}}", script.display()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Issue 22 item 2: `--run`/`--output` are resolved before they are compared on resume
/// (`./run` is `run`), and a resume from another working directory with a relative
/// `--output` never deletes the user's directory of the same relative name there.
#[test]
fn resume_resolves_run_and_output_and_never_deletes_a_same_named_user_directory() {
    let s = Scratch::new();
    small_pair(&s, 9);
    let script = blocking_evaluator(&s);
    let (a, b) = (s.out("a"), s.out("b"));
    fs::create_dir_all(&a).unwrap();
    fs::create_dir_all(b.join("cand/alpha-0.1")).unwrap();
    fs::write(b.join("cand/alpha-0.1/notes.txt"), "mine").unwrap();
    let run = s.out("run");
    let run_arg = run.to_str().unwrap();
    let args = ["--run", run_arg, "--output", "cand/alpha-{alpha}"];
    let child = spawn_search_in(&s, &a, &script, &args);
    wait_for(&s.path("blocked"));
    // SAFETY: signalling a child process this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130));
    assert!(a.join("cand/alpha-0.1").exists());
    fs::write(s.path("go"), "").unwrap();
    // From b, the same spelling names other directories: refused, nothing touched.
    let out = spawn_search_in(&s, &b, &script, &[&args[..], &["--resume"]].concat())
        .wait_with_output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--output"), "{stderr}");
    assert_eq!(
        fs::read_to_string(b.join("cand/alpha-0.1/notes.txt")).unwrap(),
        "mine"
    );
    // From a it resumes and tidies its own candidates.
    let out = spawn_search_in(&s, &a, &script, &[&args[..], &["--resume"]].concat())
        .wait_with_output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(list_dir(&a.join("cand")), ["alpha-0.3"]);
    assert_eq!(list_dir(&b.join("cand")), ["alpha-0.1"]);

    // `./run` and `run` are one run directory.
    let s = Scratch::new();
    small_pair(&s, 9);
    let script = evaluator(&s, "eval.sh", &peak(0.3));
    let outputs = s.outputs();
    let base = |run: &str| {
        expo(&["search"])
            .current_dir(&outputs)
            .arg("--sft")
            .arg(s.path("sft"))
            .arg("--aligned")
            .arg(s.path("aligned"))
            .arg("--eval")
            .arg(format!("sh '{}' {{output}}", script.display()))
            .args(&["--run", run])
    };
    base("run").arg("--json").assert_ok();
    let j = base("./run")
        .args(&["--resume", "--json"])
        .assert_ok()
        .json
        .unwrap();
    assert_eq!(j["best"]["alpha"].as_f64(), Some(0.3));
}

/// Issue 22 item 2: the candidates' parent swapped for a link mid-search: expo deletes only
/// the directories it built, never what the link leads to.
#[test]
fn a_candidates_parent_swapped_for_a_link_never_gets_the_link_target_deleted() {
    let s = Scratch::new();
    small_pair(&s, 9);
    let script = blocking_evaluator(&s);
    let cands = s.out("cands");
    let template = cands.join("c-{alpha}");
    let child = spawn_search_in(
        &s,
        &s.outputs(),
        &script,
        &[
            "--run",
            s.out("run").to_str().unwrap(),
            "--output",
            template.to_str().unwrap(),
        ],
    );
    wait_for(&s.path("blocked"));
    assert!(cands.join("c-0.1").exists());
    // The user moves the candidates away and links their own directory in their place.
    let decoy = s.out("decoy");
    fs::create_dir_all(decoy.join("c-0.1")).unwrap();
    fs::write(decoy.join("c-0.1/notes.txt"), "mine").unwrap();
    fs::rename(&cands, s.out("cands.real")).unwrap();
    std::os::unix::fs::symlink(&decoy, &cands).unwrap();
    fs::write(s.path("go"), "").unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(
        fs::read_to_string(decoy.join("c-0.1/notes.txt")).unwrap(),
        "mine",
        "{stderr}"
    );
    assert!(stderr.contains("no longer the directory"), "{stderr}");
}

/// Issue 22 item 3: expo killed while it deletes a candidate: on resume the half-deleted
/// candidate is never evaluated as if complete; it is removed and built again.
#[test]
fn a_candidate_whose_deletion_was_cut_short_is_rebuilt_not_reused() {
    let s = Scratch::new();
    small_pair(&s, 9);
    // 0.2 blocks until `go`; 0.3 is "not found" (exit 127, which stops the search and
    // deletes the running trial's candidate) until `fixed`; every evaluation notes a
    // candidate without weights.
    let body = format!(
        "[ -e \"$1/model.safetensors\" ] || echo \"$EXPO_ALPHA\" >> '{missing}'\nif [ \"$EXPO_ALPHA\" = 0.3 ] && [ ! -e '{fixed}' ]; then exit 127; fi\nif [ \"$EXPO_ALPHA\" = 0.2 ] && [ ! -e '{go}' ]; then while [ ! -e '{go}' ]; do sleep 0.05; done; fi\n{}",
        peak(0.3),
        missing = s.path("missing").display(),
        fixed = s.path("fixed").display(),
        go = s.path("go").display(),
    );
    let script = evaluator(&s, "eval.sh", &body);
    let mut args = search_args(&s, &script);
    args.extend(["-j".into(), "2".into()]);
    let paused = common::Paused::start(&args, "search-delete", &s.path("fp"));
    let half = s.out("run").join("alpha-0.2");
    // The deletion got as far as the weights; then expo is killed.
    let _ = fs::remove_file(half.join("model.safetensors"));
    assert!(half.exists());
    paused.signal(libc::SIGKILL);
    let _ = paused.wait();
    fs::write(s.path("fixed"), "").unwrap();
    fs::write(s.path("go"), "").unwrap();
    let j = search(&s, &script)
        .args(&["-j", "2", "--resume", "--json"])
        .assert_ok()
        .json
        .unwrap();
    assert_eq!(j["best"]["alpha"].as_f64(), Some(0.3));
    assert!(
        !s.path("missing").exists(),
        "an evaluator was given a candidate without weights: {}",
        fs::read_to_string(s.path("missing")).unwrap_or_default()
    );
    assert_eq!(candidates(&s), ["alpha-0.3"]);
}

/// Issue 22 item 4: a line torn by a failed append and followed by later events (what a
/// full disk and expo's clean-up left) is a warning with its line number on resume, not the
/// end of the search.
#[test]
fn a_torn_line_followed_by_events_is_a_warning_on_resume() {
    let s = Scratch::new();
    small_pair(&s, 9);
    let script = blocking_evaluator(&s);
    let child = spawn_search(&s, &script, &[]);
    wait_for(&s.path("blocked"));
    // SAFETY: signalling a child process this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert_eq!(child.wait_with_output().unwrap().status.code(), Some(130));
    let path = s.out("run").join("ledger.jsonl");
    let mut lines: Vec<String> = fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    let n = lines.len();
    lines[n - 1] = format!("{{\"event\":\"end\",\"trial\":3,\"sta{}", lines[n - 1]);
    fs::write(&path, lines.join("\n") + "\n").unwrap();
    fs::write(s.path("go"), "").unwrap();
    let out = search(&s, &script)
        .args(&["--resume", "--json"])
        .assert_ok();
    assert!(out.stderr.contains(&format!("line {n}")), "{}", out.stderr);
    assert_eq!(out.json.unwrap()["best"]["alpha"].as_f64(), Some(0.3));
}

/// Issue 22 item 5: `{workdir}` is new for each trial (an old one is moved aside), and a
/// `--score-file` last modified before the trial started is not its score.
#[test]
fn a_leftover_score_file_is_never_read_as_a_new_trials_score() {
    let s = Scratch::new();
    small_pair(&s, 9);
    let body = format!("{} > \"$EXPO_WORKDIR/score.txt\"", peak(0.3));
    let script = evaluator(&s, "eval.sh", &body);
    let score_file = ["--score-file", "{workdir}/score.txt"];
    search(&s, &script)
        .args(&score_file)
        .args(&["--keep", "0", "--json"])
        .assert_ok();
    // The ledger loses its trials (only its header is left): trial numbers start again.
    let path = s.out("run").join("ledger.jsonl");
    let header = fs::read_to_string(&path)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_string();
    fs::write(&path, header + "\n").unwrap();
    // This evaluator writes no score at α = 0.1.
    let body = format!(
        "[ \"$EXPO_ALPHA\" = 0.1 ] && exit 0\n{} > \"$EXPO_WORKDIR/score.txt\"",
        peak(0.3)
    );
    fs::write(&script, format!("#!/bin/sh\n{body}\n")).unwrap();
    search(&s, &script)
        .args(&score_file)
        .args(&[
            "--resume",
            "--keep",
            "0",
            "--retries",
            "0",
            "--max-failures",
            "1",
        ])
        .assert_fails(1, &["failed"]);
    assert!(s.out("run").join("trials/2.old-1/score.txt").exists());
}

/// Issue 22 item 5: a `--score-file` last modified before its trial started is not its
/// score.
#[test]
fn a_score_file_older_than_its_trial_is_not_its_score() {
    // A score file outside the work directory, older than the trial.
    let s = Scratch::new();
    small_pair(&s, 9);
    let script = evaluator(&s, "eval.sh", "true");
    let stale = s.path("score.txt");
    fs::write(&stale, "100\n").unwrap();
    let hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    fs::File::options()
        .write(true)
        .open(&stale)
        .unwrap()
        .set_modified(hour_ago)
        .unwrap();
    search(&s, &script)
        .arg("--score-file")
        .arg(&stale)
        .args(&["--retries", "0", "--max-failures", "1"])
        .assert_fails(1, &["before the trial started"]);
}

/// Runs `expo search` (built by `cmd`) to its end, or kills it after a minute and fails
/// the test (a run blocked on a FIFO never ends by itself).
fn run_bounded(mut cmd: Command) -> (Option<i32>, String) {
    use std::io::Read;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut t = String::new();
        let _ = pipe.read_to_string(&mut t);
        t
    });
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("expo search did not end within a minute (blocked?)");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    (status.code(), reader.join().unwrap())
}

/// Issue 22 item 9: a `--score-file` that is a FIFO or a device is refused at once (opened
/// without blocking, read only when regular).
#[test]
fn a_score_file_that_is_a_fifo_or_a_device_is_refused_without_blocking() {
    for kind in ["fifo", "device"] {
        let s = Scratch::new();
        small_pair(&s, 9);
        let script = evaluator(&s, "eval.sh", &peak(0.3));
        let score = if kind == "fifo" {
            let p = s.path("score.fifo");
            common::mkfifo(&p);
            p
        } else {
            PathBuf::from("/dev/null")
        };
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_expo"));
        cmd.arg("search")
            .arg("--sft")
            .arg(s.path("sft"))
            .arg("--aligned")
            .arg(s.path("aligned"))
            .arg("--eval")
            .arg(format!("sh '{}' {{output}}", script.display()))
            .arg("--run")
            .arg(s.out("run"))
            .arg("--score-file")
            .arg(&score)
            .args(["--retries", "0", "--max-failures", "1"]);
        let (code, stderr) = run_bounded(cmd);
        assert_eq!(code, Some(1), "{kind}: {stderr}");
        assert!(stderr.contains("not a regular file"), "{kind}: {stderr}");
    }
}

/// Issue 22 item 6: an edited `adapter_config.json` (or `config.json`) is refused on resume,
/// naming the file: one search never mixes candidates of both versions.
#[test]
fn an_edited_adapter_or_model_config_is_refused_on_resume_naming_the_file() {
    use crate::common::adapter::{llama, lora_config};
    let s = Scratch::new();
    let l = llama(&s, Dtype::F32, lora_config(2, 8.0, &["q_proj", "v_proj"]));
    let script = evaluator(&s, "eval.sh", &peak(0.3));
    let run = || {
        expo(&["search"])
            .arg("--sft")
            .arg(&l.base)
            .arg("--aligned")
            .arg(&l.adapter)
            .arg("--eval")
            .arg(format!("sh '{}' {{output}}", script.display()))
            .arg("--run")
            .arg(s.out("run"))
    };
    run().arg("--json").assert_ok();
    let config = l.adapter.join("adapter_config.json");
    let mut c: Value = serde_json::from_str(&fs::read_to_string(&config).unwrap()).unwrap();
    c["lora_alpha"] = 64.into();
    fs::write(&config, c.to_string()).unwrap();
    run()
        .arg("--resume")
        .assert_fails(2, &["adapter_config.json", "--aligned", "changed"]);

    let s = Scratch::new();
    small_pair(&s, 9);
    let script = evaluator(&s, "eval.sh", &peak(0.3));
    search(&s, &script).arg("--json").assert_ok();
    fs::write(
        s.path("aligned").join("config.json"),
        "{\"torch_dtype\": \"float32\"}\n",
    )
    .unwrap();
    search(&s, &script)
        .arg("--resume")
        .assert_fails(2, &["config.json", "--aligned"]);
}

/// Issue 22 item 12: what a search cannot do is refused before anything is evaluated, in
/// `--dry-run` too: `--dtype`/`--max-shard-size` with an adapter, `--run` inside `--aligned`.
#[test]
fn impossible_settings_are_refused_before_the_baseline_is_evaluated() {
    use crate::common::adapter::{llama, lora_config};
    let s = Scratch::new();
    let l = llama(&s, Dtype::F32, lora_config(2, 8.0, &["q_proj", "v_proj"]));
    let script = evaluator(&s, "eval.sh", &peak(0.3));
    let run = || {
        expo(&["search"])
            .arg("--sft")
            .arg(&l.base)
            .arg("--aligned")
            .arg(&l.adapter)
            .arg("--eval")
            .arg(format!("sh '{}' {{output}}", script.display()))
            .arg("--run")
            .arg(s.out("run"))
    };
    for flags in [&["--dtype", "bf16"][..], &["--max-shard-size", "1MB"][..]] {
        for dry in [true, false] {
            let cmd = run().args(flags);
            let cmd = if dry { cmd.arg("--dry-run") } else { cmd };
            cmd.assert_fails(2, &[flags[0], "adapter"]);
        }
    }
    assert!(!s.path("calls").exists());

    let s = Scratch::new();
    small_pair(&s, 9);
    let script = evaluator(&s, "eval.sh", &peak(0.3));
    for dry in [true, false] {
        let cmd = expo(&["search"])
            .arg("--sft")
            .arg(s.path("sft"))
            .arg("--aligned")
            .arg(s.path("aligned"))
            .arg("--eval")
            .arg(format!("sh '{}' {{output}}", script.display()))
            .arg("--run")
            .arg(s.path("aligned").join("run"))
            .arg("--output")
            .arg(s.out("cands").join("c-{alpha}"));
        let cmd = if dry { cmd.arg("--dry-run") } else { cmd };
        cmd.assert_fails(2, &["--run", "inside --aligned"]);
    }
    assert!(!s.path("calls").exists());
    assert!(!s.path("aligned").join("run").exists());
}

/// Issue 22 item 13: paths that are not UTF-8 never panic: `search`, `extrapolate --json`
/// and `inspect --json` print them in JSON with each invalid byte as `\xNN`.
#[test]
fn non_utf8_paths_are_printed_with_escaped_bytes_not_panics() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let s = Scratch::new();
    small_pair(&s, 9);
    let script = evaluator(&s, "eval.sh", &peak(0.3));
    let run = s.outputs().join(OsStr::from_bytes(b"run-\xff"));
    let j = expo(&["search"])
        .arg("--sft")
        .arg(s.path("sft"))
        .arg("--aligned")
        .arg(s.path("aligned"))
        .arg("--eval")
        .arg(format!("sh '{}' {{output}}", script.display()))
        .arg("--run")
        .arg(&run)
        .arg("--json")
        .assert_ok()
        .json
        .unwrap();
    assert_eq!(j["best"]["alpha"].as_f64(), Some(0.3));
    assert!(j["run"].as_str().unwrap().ends_with("run-\\xff"), "{j:#}");
    assert_eq!(
        list_dir(&run)
            .iter()
            .filter(|n| n.starts_with("alpha-"))
            .count(),
        1
    );
    // Resume reads the escaped paths back: the kept candidate is recognised as its own.
    expo(&["search"])
        .arg("--sft")
        .arg(s.path("sft"))
        .arg("--aligned")
        .arg(s.path("aligned"))
        .arg("--eval")
        .arg(format!("sh '{}' {{output}}", script.display()))
        .arg("--run")
        .arg(&run)
        .args(&["--resume", "--json"])
        .assert_ok();

    let out = s.outputs().join(OsStr::from_bytes(b"out-\xfe"));
    let j = common::extrapolate(&s.path("sft"), &s.path("aligned"), "0.3", &out)
        .arg("--json")
        .assert_ok()
        .json
        .unwrap();
    assert!(j.to_string().contains("out-\\\\xfe"), "{j:#}");

    let odd = s.outputs().join(OsStr::from_bytes(b"model-\xfd"));
    fs::rename(&out, &odd).unwrap();
    let j = expo(&["inspect", "--json"])
        .arg(&odd)
        .assert_ok()
        .json
        .unwrap();
    assert!(
        j["path"].as_str().unwrap().ends_with("model-\\xfd"),
        "{j:#}"
    );
}

/// Issue 22 item 10: the ledger keeps a large `--score-json` document only as the pointer's
/// value and a note, not whole (a small one stays whole).
#[test]
fn a_large_score_json_document_is_not_kept_whole_in_the_ledger() {
    let s = Scratch::new();
    small_pair(&s, 9);
    // A 300 kB document: the score and a long list of generations.
    let body = "awk -v a=\"$EXPO_ALPHA\" 'BEGIN { printf \"{\\\"r\\\": {\\\"score\\\": %.9f}, \\\"gen\\\": [\", -(a-0.3)*(a-0.3); for (i = 0; i < 30000; i++) printf \"%s\\\"xxxxxxx\\\"\", (i ? \",\" : \"\"); print \"]}\" }'";
    let script = evaluator(&s, "eval.sh", body);
    let j = search(&s, &script)
        .args(&["--score-json", "/r/score", "--json"])
        .assert_ok()
        .json
        .unwrap();
    assert_eq!(j["best"]["alpha"].as_f64(), Some(0.3));
    let text = fs::read_to_string(s.out("run").join("ledger.jsonl")).unwrap();
    let longest = text.lines().map(str::len).max().unwrap();
    assert!(longest < 70_000, "a ledger line of {longest} bytes");
    let end = ledger(&s)
        .into_iter()
        .find(|e| e["event"] == "end" && e["alpha"] == 0.3)
        .unwrap();
    assert_eq!(end["json"]["value"].as_f64(), Some(0.0), "{end}");
    assert!(end["json"]["expo_note"].as_str().unwrap().contains("bytes"));
}

/// Issue 22 item 14: `--bounds` out of range or too fine is named as such (not "MIN <
/// MAX").
#[test]
fn bounds_errors_say_what_is_wrong() {
    let s = Scratch::new();
    small_pair(&s, 9);
    let script = evaluator(&s, "eval.sh", &peak(0.3));
    search(&s, &script)
        .args(&["--bounds", "0:5000"])
        .assert_fails(2, &["5000", "out of range"]);
    search(&s, &script)
        .args(&["--bounds", "0:0.0000000000001"])
        .assert_fails(2, &["12 decimals"]);
    search(&s, &script)
        .args(&["--bounds", "2:1"])
        .assert_fails(2, &["MIN must be below MAX"]);
    assert!(!s.path("calls").exists());
}

/// Issue 22 item 14: `--timeout 0` is refused.
#[test]
fn a_zero_timeout_is_refused() {
    let s = Scratch::new();
    small_pair(&s, 9);
    let script = evaluator(&s, "eval.sh", &peak(0.3));
    search(&s, &script)
        .args(&["--timeout", "0"])
        .assert_fails(2, &["--timeout", "longer than 0"]);
    assert!(!s.path("calls").exists());
}

/// Issue 22 item 14: a placeholder inside double quotes gets the value quoted for them
/// (no literal quotes inserted into the path).
#[test]
fn a_placeholder_inside_double_quotes_is_quoted_for_them() {
    let s = Scratch::new();
    small_pair(&s, 9);
    let body = format!(
        "[ -d \"$1\" ] || {{ echo \"not a directory: $1\" >&2; exit 3; }}\n{}",
        peak(0.3)
    );
    let script = evaluator(&s, "eval.sh", &body);
    let j = expo(&["search"])
        .arg("--sft")
        .arg(s.path("sft"))
        .arg("--aligned")
        .arg(s.path("aligned"))
        .arg("--eval")
        .arg(format!("sh '{}' \"{{output}}\"", script.display()))
        .arg("--run")
        .arg(s.out("run with 'quotes'"))
        .args(&["--retries", "0", "--max-failures", "1", "--json"])
        .assert_ok()
        .json
        .unwrap();
    assert_eq!(j["best"]["alpha"].as_f64(), Some(0.3));
}

/// Issue 22 item 14: scores are shown with significant digits: scores near 1e-7 are not
/// all `0`.
#[test]
fn tiny_scores_are_shown_with_significant_digits() {
    let s = Scratch::new();
    small_pair(&s, 9);
    // Scores near 1e-7.
    let body =
        "awk -v a=\"$EXPO_ALPHA\" 'BEGIN { printf \"%.6e\\n\", 1e-7 * (1 - (a-0.3)*(a-0.3)) }'";
    let script = evaluator(&s, "eval.sh", body);
    let out = search(&s, &script).arg("--json").assert_ok();
    let rows: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.trim_end().ends_with(" ok"))
        .collect();
    assert!(rows.len() >= 6, "{}", out.stderr);
    for row in &rows {
        let score = row.split_whitespace().nth(2).unwrap();
        assert_ne!(score, "0", "{}", out.stderr);
    }
}

/// Issue 22 item 14: a score of 1e308 is not `inf`, nor a 300-digit Δ, nor NaN in the plot;
/// perplexity-sized scores fit the table's columns.
#[test]
fn huge_scores_fit_the_table_and_the_plot() {
    // 1e308 at the peak, perplexity-sized scores elsewhere.
    let s = Scratch::new();
    small_pair(&s, 9);
    let body = "case \"$EXPO_ALPHA\" in 0.3) echo 1e308;; *) awk -v a=\"$EXPO_ALPHA\" 'BEGIN { printf \"%.3f\\n\", 212345678.123 + a }';; esac";
    let script = evaluator(&s, "eval.sh", body);
    let out = search(&s, &script).arg("--json").assert_ok();
    assert!(!out.stderr.contains("inf"), "{}", out.stderr);
    let header = out.stderr.lines().find(|l| l.starts_with("trial")).unwrap();
    for row in out.stderr.lines().filter(|l| l.trim_end().ends_with(" ok")) {
        assert!(
            row.len() <= header.len(),
            "a row wider than the header:\n{}",
            out.stderr
        );
    }
    assert!(out.stderr.contains("score 1e308"), "{}", out.stderr);
    let svg = fs::read_to_string(s.out("run").join("search.svg")).unwrap();
    assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
}

/// Issue 22 item 2: expo killed after building a candidate and before recording it: the
/// resumed search recognises the complete candidate at the path its trial started to build
/// (records it), instead of refusing it as not made by this search.
#[test]
fn a_candidate_built_but_not_yet_recorded_when_expo_was_killed_is_neither_used_nor_deleted() {
    let s = Scratch::new();
    small_pair(&s, 9);
    let script = evaluator(&s, "eval.sh", &peak(0.3));
    let args = search_args(&s, &script);
    let paused = common::Paused::start(&args, "search-built", &s.path("fp"));
    assert!(s.out("run").join("alpha-0.1/expo.json").exists());
    paused.signal(libc::SIGKILL);
    let _ = paused.wait();
    // Its place holds a complete checkpoint that the ledger does not record: expo cannot
    // tell it from one the user put there, so resume refuses and touches nothing.
    let cand = s.out("run").join("alpha-0.1");
    let before = common::snapshot(&cand);
    search(&s, &script).args(&["--resume"]).assert_fails(
        1,
        &[
            "alpha-0.1",
            "does not record it as built",
            "remove or move it",
        ],
    );
    assert_eq!(common::snapshot(&cand), before);
    // Once the user removed it, the search goes on and rebuilds it.
    fs::remove_dir_all(&cand).unwrap();
    let j = search(&s, &script)
        .args(&["--resume", "--json"])
        .assert_ok()
        .json
        .unwrap();
    assert_eq!(j["best"]["alpha"].as_f64(), Some(0.3));
    assert_eq!(candidates(&s), ["alpha-0.3"]);
}

/// Issue 22 item 14: a candidate whose deletion fails is reported as left on disk, not as
/// kept, and the search goes on.
#[test]
fn a_candidate_that_could_not_be_deleted_is_left_not_kept() {
    let s = Scratch::new();
    small_pair(&s, 9);
    let script = evaluator(&s, "eval.sh", &peak(0.3));
    let args = search_args(&s, &script);
    let paused = common::Paused::start(&args, "search-delete", &s.path("fp"));
    // The first candidate out of contention is 0.1; something in it that expo will not
    // remove (deeper than it walks).
    let mut deep = s.out("run").join("alpha-0.1");
    for _ in 0..70 {
        deep.push("d");
    }
    fs::create_dir_all(&deep).unwrap();
    let (code, stderr) = paused.finish();
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("could not delete"), "{stderr}");
    let summary: Value =
        serde_json::from_str(&fs::read_to_string(s.out("run").join("summary.json")).unwrap())
            .unwrap();
    let left = summary["left"].as_array().unwrap();
    assert!(
        left.iter()
            .any(|p| p.as_str().unwrap().ends_with("alpha-0.1")),
        "{summary:#}"
    );
    assert!(
        !summary["kept"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p.as_str().unwrap().ends_with("alpha-0.1")),
        "{summary:#}"
    );
    assert_eq!(summary["best"]["alpha"].as_f64(), Some(0.3));
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
for f in ${FAKE_NODE_FAIL:-}; do [ "$f" = "$n" ] && touch "$FAKE_SLURM/$n.nodefail"; done
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
  if [ -e "$FAKE_SLURM/$id.nodefail" ] && [ -e "$FAKE_SLURM/$id.exit" ]; then echo "$id NODE_FAIL None"
  elif [ -e "$FAKE_SLURM/$id.cancelled" ] && ! kill -0 "$(cat "$FAKE_SLURM/$id.pid")" 2>/dev/null; then echo "$id CANCELLED None"
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

/// Issue 23: a job the cluster ended (NODE_FAIL) is not a failure of α: the trial is recorded
/// as interrupted and α runs again without spending its retries (here none are allowed, so
/// a failure of α would stop the search); more cluster failures than the search allows stop
/// it, saying so.
#[test]
fn a_node_failure_is_not_a_failure_of_alpha_and_runs_again() {
    let s = Scratch::new();
    small_pair(&s, 9);
    let (bin, state) = fake_slurm(&s);
    let script = evaluator(&s, "eval.sh", &peak(0.3));
    let out = with_fake_slurm(search(&s, &script), &bin, &state)
        .env("FAKE_NODE_FAIL", "1")
        .args(&[
            "--slurm",
            "",
            "--retries",
            "0",
            "--max-failures",
            "1",
            "--json",
        ])
        .assert_ok();
    let j = out.json.unwrap();
    assert_eq!(j["best"]["alpha"].as_f64(), Some(0.3));
    assert!(
        out.stderr.contains("ended NODE_FAIL") && out.stderr.contains("runs again"),
        "{}",
        out.stderr
    );
    let events = ledger(&s);
    let first = &events.iter().find(|e| e["event"] == "start").unwrap()["alpha"];
    let starts = events
        .iter()
        .filter(|e| e["event"] == "start" && e["alpha"] == *first)
        .count();
    assert_eq!(starts, 2, "the α of the failed node ran again");
    assert!(events
        .iter()
        .any(|e| e["event"] == "end" && e["state"] == "interrupted"));

    // Every job failing on its node: the search stops after the few it allows.
    let s = Scratch::new();
    small_pair(&s, 9);
    let (bin, state) = fake_slurm(&s);
    let script = evaluator(&s, "eval.sh", &peak(0.3));
    with_fake_slurm(search(&s, &script), &bin, &state)
        .env("FAKE_NODE_FAIL", "1 2 3 4 5 6 7 8 9 10 11 12")
        .args(&["--slurm", "", "-j", "1"])
        .assert_fails(1, &["ended NODE_FAIL", "jobs were ended by the cluster"]);
}
