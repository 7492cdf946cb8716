//! The search loop: reap finished evaluators, ask the rule, build and start the next trials,
//! record each end; and stopping everything on an interrupt or an error.

use std::ffi::OsString;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};

use super::candidates::Planned;
use super::evaluator::{self, Running, Values};
use super::ledger::{self, End, State, Trial};
use super::rule::{self, Decision, Lat, Outcome, Status};
use super::{Abort, Search};
use crate::interrupt;

/// A trial in flight.
struct Active {
    trial: Trial,
    values: Values,
    proc: Running,
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
            // Reap finished evaluators.
            let mut k = 0;
            while k < active.len() {
                let exit = active[k]
                    .proc
                    .poll(self.cfg.timeout, self.cfg.kill_after)
                    .context("waiting for the evaluator")
                    .map_err(broken)?;
                match exit {
                    Some(exit) => {
                        let a = active.remove(k);
                        self.record_end(a, exit)?;
                    }
                    None => k += 1,
                }
            }
            let running: Vec<Lat> = active.iter().map(|a| a.trial.alpha).collect();
            let view = rule::View::new(&self.cfg.settings, &self.finished(), &running);
            let free = self.cfg.jobs.saturating_sub(active.len());
            match rule::decide(&self.cfg.settings, &view, free) {
                Decision::Propose(batch) => {
                    if interrupt::check().is_err() {
                        return Err(Abort::Interrupted);
                    }
                    self.launch(batch, active)?;
                }
                Decision::Wait => std::thread::sleep(Duration::from_millis(20)),
                Decision::Done(status) => return Ok(status),
            }
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

    /// Starts the evaluator of `trial` in its own work directory.
    fn start_evaluator(&self, trial: Trial) -> Result<Active, Abort> {
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
        let env: Vec<(&str, OsString)> = vec![
            ("EXPO_ALPHA", values.alpha.clone().into()),
            ("EXPO_OUTPUT", values.output.clone().into()),
            ("EXPO_WORKDIR", values.workdir.clone().into()),
            ("EXPO_SLOT", values.slot.to_string().into()),
            ("EXPO_TRIAL", values.trial.to_string().into()),
        ];
        let proc = evaluator::spawn(
            &command,
            &env,
            &workdir.join("stdout.log"),
            &workdir.join("stderr.log"),
        )
        .with_context(|| format!("starting the evaluator (sh -c) for trial {}", trial.trial))
        .map_err(Abort::Broken)?;
        Ok(Active {
            trial,
            values,
            proc,
        })
    }

    fn record_end(&mut self, a: Active, exit: evaluator::Exit) -> Result<(), Abort> {
        let Active {
            trial,
            values,
            proc: _,
        } = a;
        if matches!(exit.code, Some(126) | Some(127)) {
            return Err(self.unrunnable(trial, &values, &exit));
        }
        let (end, note) = self.judge(&exit, &values);
        if let Some(n) = note {
            self.reporter.warn(format!(
                "trial {} (alpha {}): {n}; logs in {}",
                trial.trial,
                trial.alpha,
                values.workdir.display()
            ));
        }
        self.store_end(trial, end)?;
        self.tidy()?;
        self.write_outputs(None).map_err(Abort::Broken)?;
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

    /// Stops every running evaluator: SIGTERM to each group, SIGKILL after --kill-after;
    /// records them as `state` and removes their candidates.
    fn stop_all(&mut self, active: &mut Vec<Active>, state: State) {
        for a in active.iter_mut() {
            a.proc.terminate();
        }
        let mut exits = Vec::new();
        while !active.is_empty() {
            let mut k = 0;
            while k < active.len() {
                match active[k].proc.poll(None, self.cfg.kill_after) {
                    Ok(Some(e)) => exits.push((active.remove(k), e)),
                    Ok(None) => k += 1,
                    Err(_) => {
                        active[k].proc.kill_now();
                        let a = active.remove(k);
                        let e = evaluator::Exit {
                            code: None,
                            signal: Some(libc::SIGKILL),
                            seconds: a.proc.started.elapsed().as_secs_f64(),
                            timed_out: false,
                        };
                        exits.push((a, e));
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(10));
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
