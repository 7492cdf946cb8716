//! The search loop: reap finished evaluators, ask the rule, build and start the next trials,
//! record each end; and stopping everything on an interrupt or an error.

use std::ffi::OsString;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};

use super::candidates::Planned;
use super::evaluator::{self, Values};
use super::launch::{self, JobSpec, LaunchError};
use super::ledger::{self, End, State, Trial};
use super::rule::{self, Decision, Lat, Outcome, Status};
use super::{Abort, Search};
use crate::interrupt;

/// How many jobs the cluster may end (node failure, preemption …) before the search stops.
const MAX_CLUSTER_FAILURES: u32 = 3;

/// A trial in flight.
struct Active {
    trial: Trial,
    values: Values,
    /// The reason it waits in a queue, as last shown.
    queued: Option<String>,
}

impl Search<'_> {
    pub(super) fn finished(&self) -> Vec<(Lat, Outcome)> {
        self.trials
            .iter()
            .filter_map(|t| {
                let e = t.end.as_ref()?;
                let o = match e.state {
                    State::Ok => Outcome::Ok(self.oriented(e.score?)),
                    State::Unusable => Outcome::Unusable,
                    State::Failed => Outcome::Failed,
                    State::Interrupted => return None,
                };
                Some((t.alpha, o))
            })
            .collect()
    }

    fn oriented(&self, s: f64) -> f64 {
        if self.cfg.minimize {
            -s
        } else {
            s
        }
    }

    pub(super) fn go(&mut self) -> Result<std::process::ExitCode> {
        interrupt::install();
        self.print_table_header();
        for t in self.trials.clone() {
            self.print_row(&t);
        }
        let mut active: Vec<Active> = Vec::new();
        let outcome = self.main_loop(&mut active);
        match outcome {
            Ok(status) => self.finish(status),
            Err(Abort::Interrupted) => {
                let running = active.len();
                self.stop_all(&mut active, State::Interrupted);
                let _ = self.write_outputs(None);
                Err(anyhow::Error::new(interrupt::Interrupted).context(format!(
                    "search stopped after {} evaluations ({running} running trial{} recorded as interrupted); continue it with the same command and --resume",
                    self.evaluations(),
                    if running == 1 { "" } else { "s" },
                )))
            }
            Err(Abort::Broken(e)) => {
                self.stop_all(&mut active, State::Interrupted);
                let _ = self.write_outputs(None);
                Err(e)
            }
        }
    }

    fn main_loop(&mut self, active: &mut Vec<Active>) -> Result<Status, Abort> {
        let broken = Abort::Broken;
        loop {
            if interrupt::check().is_err() {
                return Err(Abort::Interrupted);
            }
            // Reap finished evaluators: one refresh of all of them.
            let ended = self
                .launcher
                .poll(self.cfg.timeout, self.cfg.kill_after)
                .context("following the evaluators")
                .map_err(broken)?;
            for (n, exit) in ended {
                if let Some(k) = active.iter().position(|a| a.trial.trial == n) {
                    let a = active.remove(k);
                    self.record_end(a, exit)?;
                }
            }
            self.show_queued(active);
            let finished = self.finished();
            if !active.is_empty() {
                // --max-failures reached: the running trials are stopped, not waited for.
                let idle = rule::View::new(&self.cfg.settings, &finished, &[]);
                if matches!(
                    rule::decide(&self.cfg.settings, &idle, 0),
                    Decision::Done(Status::Failures)
                ) {
                    self.stop_all(active, State::Interrupted);
                    return Ok(Status::Failures);
                }
            }
            let running: Vec<Lat> = active.iter().map(|a| a.trial.alpha).collect();
            let view = rule::View::new(&self.cfg.settings, &finished, &running);
            let free = self.cfg.jobs.saturating_sub(active.len());
            match rule::decide(&self.cfg.settings, &view, free) {
                Decision::Propose(batch) => {
                    if interrupt::check().is_err() {
                        return Err(Abort::Interrupted);
                    }
                    self.launch(batch, active)?;
                }
                Decision::Wait => std::thread::sleep(self.launcher.interval()),
                Decision::Done(status) => {
                    // E.g. --max-failures reached: nothing keeps running.
                    self.stop_all(active, State::Interrupted);
                    return Ok(status);
                }
            }
        }
    }

    /// Says once per reason that a job waits in the scheduler's queue (Slurm's reason).
    fn show_queued(&self, active: &mut [Active]) {
        for a in active.iter_mut() {
            let Some(launch::Phase::Queued(reason)) = self.launcher.phase(a.trial.trial) else {
                continue;
            };
            if reason.is_empty() || reason == "None" || a.queued.as_deref() == Some(&reason) {
                continue;
            }
            self.reporter.warn(format!(
                "trial {} (alpha {}): PENDING in Slurm's queue ({reason}); queue time is not counted against --timeout{}",
                a.trial.trial,
                a.trial.alpha,
                match self.cfg.queue_timeout {
                    Some(q) => format!(", --queue-timeout {}", crate::text::seconds(q.as_secs_f64())),
                    None => String::new(),
                }
            ));
            a.queued = Some(reason);
        }
    }

    fn free_slot(&self, active: &[Active]) -> usize {
        (0..self.cfg.jobs)
            .find(|s| !active.iter().any(|a| a.trial.slot == *s))
            .unwrap_or(0)
    }

    /// Builds the candidates of `batch` in one pass and starts their evaluators.
    fn launch(&mut self, batch: Vec<Lat>, active: &mut Vec<Active>) -> Result<(), Abort> {
        let planned = self.plan_trials(batch, active)?;
        if !planned.to_build.is_empty() {
            self.build_candidates(&planned)?;
        }
        for trial in planned.trials {
            active.push(self.start_evaluator(trial)?);
        }
        Ok(())
    }

    /// Gives each α of `batch` a trial number, a free slot and its candidate, and records
    /// its start in the ledger.
    fn plan_trials(&mut self, batch: Vec<Lat>, active: &[Active]) -> Result<Planned, Abort> {
        let mut planned = Planned {
            trials: Vec::new(),
            to_build: Vec::new(),
        };
        let mut taken: Vec<usize> = active.iter().map(|a| a.trial.slot).collect();
        for a in batch {
            let candidate = self.candidate(a)?;
            if candidate.build {
                planned.to_build.push(a);
            }
            let slot = (0..self.cfg.jobs)
                .find(|s| !taken.contains(s))
                .unwrap_or_else(|| self.free_slot(active));
            taken.push(slot);
            let trial = Trial {
                trial: self.next_trial,
                alpha: a,
                slot,
                output: candidate.output,
                created: candidate.created,
                end: None,
            };
            self.next_trial += 1;
            self.ledger
                .append(&ledger::start_event(&trial))
                .map_err(|e| Abort::Broken(e.into()))?;
            if trial.created {
                self.created.insert(trial.output.clone());
            }
            planned.trials.push(trial);
        }
        Ok(planned)
    }

    /// Starts the evaluator of `trial` in its own work directory, and records how to find it
    /// again (a `job` event).
    fn start_evaluator(&mut self, trial: Trial) -> Result<Active, Abort> {
        let workdir = self.cfg.run.join("trials").join(trial.trial.to_string());
        super::run_dir::fresh_workdir(&workdir).map_err(Abort::Broken)?;
        let values = Values {
            alpha: trial.alpha.to_string(),
            output: trial.output.clone(),
            workdir: workdir.clone(),
            slot: trial.slot,
            trial: trial.trial,
        };
        let command = self.cfg.eval.command(&values);
        let env: Vec<(String, OsString)> = vec![
            ("EXPO_ALPHA".into(), values.alpha.clone().into()),
            ("EXPO_OUTPUT".into(), values.output.clone().into()),
            ("EXPO_WORKDIR".into(), values.workdir.clone().into()),
            ("EXPO_SLOT".into(), values.slot.to_string().into()),
            ("EXPO_TRIAL".into(), values.trial.to_string().into()),
        ];
        let spec = JobSpec {
            trial: trial.trial,
            command,
            env,
            stdout: workdir.join("stdout.log"),
            stderr: workdir.join("stderr.log"),
            workdir: workdir.clone(),
            name: launch::job_name(&self.id, trial.trial),
        };
        let record = match self.launcher.start(&spec) {
            Ok(r) => r,
            Err(e @ LaunchError::Refused { .. }) => {
                let _ = self.store_end(trial, End::interrupted());
                return Err(Abort::Broken(anyhow::Error::new(e)));
            }
            Err(e) => return Err(Abort::Broken(anyhow::Error::new(e))),
        };
        let mut event = record;
        event["event"] = "job".into();
        event["trial"] = trial.trial.into();
        self.ledger
            .append(&event)
            .map_err(|e| Abort::Broken(e.into()))?;
        Ok(Active {
            trial,
            values,
            queued: None,
        })
    }

    fn record_end(&mut self, a: Active, exit: evaluator::Exit) -> Result<(), Abort> {
        let Active { trial, values, .. } = a;
        if let Some(why) = &exit.cluster {
            return self.cluster_failure(trial, &values, why, exit.fatal);
        }
        if matches!(exit.code, Some(126) | Some(127)) {
            return Err(self.unrunnable(trial, &values, &exit));
        }
        let (end, note) = self.judge(&exit, &values);
        if let Some(n) = note {
            let stderr = values.workdir.join("stderr.log");
            let tail = evaluator::tail_lines(&stderr, 5);
            self.reporter.warn(format!(
                "trial {} (alpha {}): {n}; logs in {}{}",
                trial.trial,
                trial.alpha,
                values.workdir.display(),
                if tail.trim().is_empty() {
                    String::new()
                } else {
                    format!("; its stderr ends with:\n{tail}")
                }
            ));
        }
        self.store_end(trial, end)?;
        self.tidy()?;
        self.write_outputs(None).map_err(Abort::Broken)?;
        Ok(())
    }

    /// A job the cluster ended (node failure, preemption, a cancellation by someone else): not
    /// α's failure; the trial is recorded as interrupted and α runs again, at most
    /// [`MAX_CLUSTER_FAILURES`] times in a search. A fatal one (a queue that does not move)
    /// stops the search at once.
    fn cluster_failure(
        &mut self,
        trial: Trial,
        values: &Values,
        why: &str,
        fatal: bool,
    ) -> Result<(), Abort> {
        self.store_end(trial.clone(), End::interrupted())?;
        self.cluster_failures += 1;
        if fatal || self.cluster_failures > MAX_CLUSTER_FAILURES {
            return Err(Abort::Broken(anyhow::anyhow!(
                "trial {} (alpha {}): {why}{}; the search stopped (logs in {})",
                trial.trial,
                trial.alpha,
                if fatal {
                    String::new()
                } else {
                    format!("; {} jobs were ended by the cluster", self.cluster_failures)
                },
                values.workdir.display()
            )));
        }
        self.reporter.warn(format!(
            "trial {} (alpha {}): {why}; a failure of the cluster, not of alpha: it runs again",
            trial.trial, trial.alpha
        ));
        Ok(())
    }

    /// How a trial that ran ended: scored, unusable (exit 125) or failed; and why it failed.
    fn judge(&self, exit: &evaluator::Exit, values: &Values) -> (End, Option<String>) {
        let stdout = values.workdir.join("stdout.log");
        let mut note = None;
        let (state, score, json) = match exit.code {
            Some(125) => (State::Unusable, None, None),
            Some(0) if !exit.timed_out => match self.cfg.score.read(
                &stdout,
                values,
                SystemTime::now() - Duration::from_secs_f64(exit.seconds),
            ) {
                Ok(s) => (State::Ok, Some(s.value), s.json),
                Err(e) => {
                    // The whole chain: a read error carries its I/O cause as its source.
                    note = Some(format!("{:#}", anyhow::Error::new(e)));
                    (State::Failed, None, None)
                }
            },
            _ => {
                note = Some(if exit.timed_out {
                    format!(
                        "timed out after {}",
                        crate::text::seconds(self.cfg.timeout.map_or(0.0, |t| t.as_secs_f64()))
                    )
                } else if let Some(sig) = exit.signal {
                    format!("killed by signal {sig}")
                } else {
                    format!("exit {}", exit.code.unwrap_or(-1))
                });
                (State::Failed, None, None)
            }
        };
        let end = End {
            state,
            score,
            exit: exit.code,
            seconds: exit.seconds,
            json,
        };
        (end, note)
    }

    /// Records a trial whose evaluator could not be run (exit 126 or 127) as failed; the
    /// error that stops the search.
    fn unrunnable(&mut self, trial: Trial, values: &Values, exit: &evaluator::Exit) -> Abort {
        let end = End {
            state: State::Failed,
            score: None,
            exit: exit.code,
            seconds: exit.seconds,
            json: None,
        };
        if let Err(e) = self.store_end(trial, end) {
            return e;
        }
        let stderr = values.workdir.join("stderr.log");
        let tail = evaluator::tail_lines(&stderr, 10);
        Abort::Broken(anyhow::anyhow!(
            "the evaluator could not be run (exit {}: {}), so the search stopped; fix --eval `{}`{}",
            exit.code.unwrap_or(0),
            if exit.code == Some(127) { "command not found" } else { "not executable" },
            self.cfg.eval.spelling,
            if tail.is_empty() { String::new() } else { format!("; its stderr ({}) ends with:\n{tail}", stderr.display()) }
        ))
    }

    fn store_end(&mut self, mut trial: Trial, end: End) -> Result<(), Abort> {
        self.ledger
            .append(&ledger::end_event(&trial, &end))
            .map_err(|e| Abort::Broken(e.into()))?;
        trial.end = Some(end);
        self.print_row(&trial);
        if trial
            .end
            .as_ref()
            .is_some_and(|e| e.state != State::Interrupted)
        {
            self.trials.push(trial);
        }
        Ok(())
    }

    /// Stops every running evaluator: SIGTERM to each (its group, or `scancel`), the hard kill
    /// after --kill-after; waits until nothing of them runs, then records them as `state` and
    /// removes their candidates.
    fn stop_all(&mut self, active: &mut Vec<Active>, state: State) {
        for a in active.iter() {
            self.launcher.terminate(a.trial.trial);
        }
        let mut exits = Vec::new();
        while !active.is_empty() {
            match self.launcher.poll(None, self.cfg.kill_after) {
                Ok(ended) => {
                    for (n, e) in ended {
                        if let Some(k) = active.iter().position(|a| a.trial.trial == n) {
                            exits.push((active.remove(k), e));
                        }
                    }
                }
                Err(e) => {
                    self.reporter
                        .warn(format!("following the evaluators while stopping them: {e}"));
                    self.launcher.kill_all();
                    for a in active.drain(..) {
                        let e = evaluator::Exit {
                            code: None,
                            signal: Some(libc::SIGKILL),
                            seconds: 0.0,
                            timed_out: false,
                            cluster: None,
                            fatal: false,
                        };
                        exits.push((a, e));
                    }
                    break;
                }
            }
            if !active.is_empty() {
                std::thread::sleep(self.launcher.interval());
            }
        }
        for (a, e) in exits {
            let trial = a.trial.clone();
            let end = End {
                state,
                score: None,
                exit: e.code,
                seconds: e.seconds,
                json: None,
            };
            let _ = self.ledger.append(&ledger::end_event(&trial, &end));
            let mut shown = trial.clone();
            shown.end = Some(end);
            self.print_row(&shown);
            // Its candidate is removed unless a finished trial still needs it.
            let needed = self.trials.iter().any(|t| t.output == trial.output);
            if trial.created && !needed && self.created.contains(&trial.output) {
                let _ = self.delete(&trial.output);
            }
        }
    }

    fn print_table_header(&self) {
        self.reporter.table_header();
    }

    fn print_row(&self, t: &Trial) {
        self.reporter.trial_ended(t, self.baseline_score());
    }
}
