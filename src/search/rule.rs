//! The search rule: bracket and zoom on a decimal lattice.
//!
//! A pure, deterministic function of what is known (finished trials), what is running, and
//! how many evaluator slots are free. Resuming a search is replaying its ledger through it.
//!
//! α values are [`Lat`] points: integers in units of 10⁻¹² (so 0.35 is exactly 0.35 and
//! prints as `0.35`), converted to the f64 nearest to the decimal only at the edges.

use std::collections::BTreeMap;

/// Units of one α (10¹²): α values are multiples of 10⁻¹².
pub const UNITS: i64 = 1_000_000_000_000;

/// Largest |α| a search handles.
pub const MAX_ABS_ALPHA: i64 = 1000;

/// One α on the decimal lattice, in units of 10⁻¹².
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lat(pub i64);

impl Lat {
    /// The lattice point spelled exactly like `alpha`'s shortest decimal, or `None` when it
    /// has more than 12 decimals or is larger than ±1000.
    pub fn from_f64(alpha: f64) -> Option<Lat> {
        if !alpha.is_finite() || alpha.abs() > MAX_ABS_ALPHA as f64 {
            return None;
        }
        let text = crate::alpha::format_alpha(alpha);
        let (neg, digits) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text.as_str()),
        };
        let (whole, frac) = digits.split_once('.').unwrap_or((digits, ""));
        if frac.len() > 12 || whole.len() > 4 {
            return None;
        }
        let whole: i64 = whole.parse().ok()?;
        let mut f: i64 = 0;
        for (k, b) in frac.bytes().enumerate() {
            let d = i64::from(b.checked_sub(b'0')?);
            f += d * 10i64.pow(11 - k as u32);
        }
        let v = whole.checked_mul(UNITS)?.checked_add(f)?;
        Some(Lat(if neg { -v } else { v }))
    }

    /// The f64 nearest to this decimal (the quotient of two exact integers, correctly
    /// rounded), so it equals what `--alpha` parses from the same spelling.
    pub fn to_f64(self) -> f64 {
        let v = self.0 as f64 / UNITS as f64;
        if v == 0.0 {
            0.0
        } else {
            v
        }
    }
}

impl std::fmt::Display for Lat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::alpha::format_alpha(self.to_f64()))
    }
}

/// The 1-2-5 step nearest (geometrically; ties → the smaller) to `x` units, at least 1 unit.
pub fn nice_step(x: f64) -> i64 {
    let mut best = 1i64;
    let mut best_d = f64::INFINITY;
    let mut p = 1i64;
    while p <= UNITS * MAX_ABS_ALPHA {
        for m in [1, 2, 5] {
            let s = p * m;
            let d = ((s as f64) / x).ln().abs();
            if d < best_d - 1e-12 {
                best_d = d;
                best = s;
            }
        }
        p *= 10;
    }
    best
}

/// δ(α): the 1-2-5 step nearest to 0.1·(1 + |α|) (0.1 near 0.3, 0.5 near 2.5, 1 near 8).
pub fn default_step(a: Lat) -> i64 {
    let x = 0.1 * (UNITS as f64 + (a.0 as f64).abs());
    nice_step(x)
}

/// What one finished trial gave.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// A score (already oriented so that larger is better).
    Ok(f64),
    /// Exit 125: cannot be evaluated; counts as the worst score, never retried.
    Unusable,
    /// Failed (exit code, timeout, no score); retried, then a hole.
    Failed,
}

/// The settings the rule depends on.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The first batch, baseline (0) included unless --no-baseline.
    pub first: Vec<Lat>,
    pub lower: Lat,
    pub upper: Lat,
    /// Fixed step (--resolution X), in units; `None`: δ(α).
    pub resolution: Option<i64>,
    /// Scores within this of each other tie.
    pub tie: f64,
    pub max_evals: usize,
    pub retries: usize,
    pub max_failures: usize,
}

/// How a search ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The best α is bracketed within two steps.
    Resolved,
    /// The neighbours of the best score tie with it.
    Flat,
    /// The best α is at a bound.
    Edge,
    /// θ1 (α = 0) is as good as any candidate.
    NoGain,
    /// --max-evals was used up.
    Budget,
    /// --max-failures trials failed even after their retries.
    Failures,
    /// Nothing could be scored.
    NoScore,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Resolved => "resolved",
            Status::Flat => "flat",
            Status::Edge => "edge",
            Status::NoGain => "no-gain",
            Status::Budget => "budget",
            Status::Failures => "failures",
            Status::NoScore => "no-score",
        }
    }
}

/// The next step of the search.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Evaluate these α values (at most one per free slot).
    Propose(Vec<Lat>),
    /// Nothing to start now; wait for a running trial.
    Wait,
    /// The search is over (nothing is running).
    Done(Status),
}

/// What is known about one α.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Known {
    Score(f64),
    Hole,
    /// Failed fewer times than allowed: to be retried.
    Retry,
}

/// The state of the search, summarised per α.
#[derive(Debug)]
pub struct View {
    known: BTreeMap<Lat, Known>,
    pending: Vec<Lat>,
    evaluations: usize,
    holes: usize,
}

impl View {
    /// Summarises the finished trials (in order) and the running ones.
    pub fn new(settings: &Settings, finished: &[(Lat, Outcome)], running: &[Lat]) -> View {
        let mut known: BTreeMap<Lat, Known> = BTreeMap::new();
        let mut failures: BTreeMap<Lat, usize> = BTreeMap::new();
        for &(a, o) in finished {
            match o {
                Outcome::Ok(s) => {
                    if !matches!(known.get(&a), Some(Known::Score(_))) {
                        known.insert(a, Known::Score(s));
                    }
                }
                Outcome::Unusable => {
                    if !matches!(known.get(&a), Some(Known::Score(_))) {
                        known.insert(a, Known::Score(f64::NEG_INFINITY));
                    }
                }
                Outcome::Failed => {
                    let n = failures.entry(a).or_insert(0);
                    *n += 1;
                    if !matches!(known.get(&a), Some(Known::Score(_))) {
                        let k = if *n > settings.retries {
                            Known::Hole
                        } else {
                            Known::Retry
                        };
                        known.insert(a, k);
                    }
                }
            }
        }
        let holes = known.values().filter(|k| **k == Known::Hole).count();
        View {
            known,
            pending: running.to_vec(),
            evaluations: finished.len() + running.len(),
            holes,
        }
    }

    fn tried(&self, a: Lat) -> bool {
        self.known.contains_key(&a) && self.known[&a] != Known::Retry || self.pending.contains(&a)
    }

    fn scored(&self) -> impl Iterator<Item = (Lat, f64)> + '_ {
        self.known.iter().filter_map(|(&a, k)| match k {
            Known::Score(s) => Some((a, *s)),
            _ => None,
        })
    }

    /// True when α will not be evaluated again (scored, unusable, or a hole).
    pub fn is_final(&self, a: Lat) -> bool {
        matches!(self.known.get(&a), Some(Known::Score(_) | Known::Hole))
    }

    /// The best α so far: the highest score, ties → the smaller α.
    pub fn best(&self) -> Option<(Lat, f64)> {
        let mut best: Option<(Lat, f64)> = None;
        for (a, s) in self.scored() {
            // Ascending α: only a strictly better score replaces the best.
            if best.is_none_or(|(_, bs)| s > bs) {
                best = Some((a, s));
            }
        }
        best.filter(|(_, s)| *s > f64::NEG_INFINITY)
    }
}

/// The rule. `free` is the number of idle evaluator slots.
pub fn decide(settings: &Settings, view: &View, free: usize) -> Decision {
    let mut pending = view.pending.clone();
    let mut out = Vec::new();
    let mut evaluations = view.evaluations;
    let mut terminal = None;
    while out.len() < free && evaluations < settings.max_evals {
        match step(settings, view, &pending) {
            Step::Go(a) => {
                pending.push(a);
                out.push(a);
                evaluations += 1;
            }
            Step::Stop(s) => {
                terminal = Some(s);
                break;
            }
            Step::Wait => break,
        }
    }
    if !out.is_empty() {
        return Decision::Propose(out);
    }
    if !view.pending.is_empty() {
        return Decision::Wait;
    }
    if view.holes >= settings.max_failures.max(1) {
        return Decision::Done(Status::Failures);
    }
    let status = match terminal {
        Some(s) => s,
        None => match step(settings, view, &pending) {
            Step::Stop(s) => s,
            // Out of budget with more to do (or nothing runnable).
            _ => Status::Budget,
        },
    };
    Decision::Done(status)
}

enum Step {
    Go(Lat),
    Wait,
    Stop(Status),
}

fn step(settings: &Settings, view: &View, pending: &[Lat]) -> Step {
    if view.holes >= settings.max_failures.max(1) {
        return Step::Wait;
    }
    if let Some(a) = next_planned(settings, view, pending) {
        return Step::Go(a);
    }
    let Some((b, fb)) = view.best() else {
        return if pending.is_empty() && view.known.values().all(|k| *k != Known::Retry) {
            Step::Stop(Status::NoScore)
        } else {
            Step::Wait
        };
    };
    let around = Around::new(settings, view, pending, b, fb);
    match (around.left, around.right) {
        (_, None) => around.expand_up(),
        (None, Some(_)) => around.expand_down(),
        (Some(left), Some(right)) => around.bracketed(left, right),
    }
}

/// Retries first, then the first batch: the next α the search owes, if any.
fn next_planned(settings: &Settings, view: &View, pending: &[Lat]) -> Option<Lat> {
    for (&a, k) in &view.known {
        if *k == Known::Retry && !pending.contains(&a) {
            return Some(a);
        }
    }
    settings
        .first
        .iter()
        .find(|&&a| !(view.tried(a) || pending.contains(&a)))
        .copied()
}

/// The search around the best α `b` (score `fb`): its scored neighbours, the step δ, and
/// every α tried or running.
struct Around<'a> {
    settings: &'a Settings,
    view: &'a View,
    pending: &'a [Lat],
    b: Lat,
    fb: f64,
    delta: i64,
    left: Option<(Lat, f64)>,
    right: Option<(Lat, f64)>,
    all_tried: Vec<Lat>,
}

impl<'a> Around<'a> {
    fn new(settings: &'a Settings, view: &'a View, pending: &'a [Lat], b: Lat, fb: f64) -> Self {
        let delta = settings.resolution.unwrap_or_else(|| default_step(b));
        let points: Vec<(Lat, f64)> = view.scored().collect();
        let left = points.iter().rev().find(|(a, _)| *a < b).copied();
        let right = points.iter().find(|(a, _)| *a > b).copied();
        let all_tried: Vec<Lat> = view
            .known
            .keys()
            .copied()
            .chain(pending.iter().copied())
            .collect();
        Around {
            settings,
            view,
            pending,
            b,
            fb,
            delta,
            left,
            right,
            all_tried,
        }
    }

    fn tried(&self, a: Lat) -> bool {
        self.view.tried(a) || self.pending.contains(&a)
    }

    /// `s`, unless the best is no better than θ1's own score (α = 0): then no gain.
    fn no_gain(&self, s: Status) -> Status {
        let base = self.view.known.get(&Lat(0));
        match base {
            Some(Known::Score(f0)) if self.fb <= *f0 + self.settings.tie => Status::NoGain,
            _ => s,
        }
    }

    /// b is the largest scored α: expand upwards from the largest α tried.
    fn expand_up(&self) -> Step {
        let (b, settings) = (self.b, self.settings);
        let top = self.all_tried.iter().copied().max().unwrap_or(b);
        if top < settings.upper {
            let next = if top.0 > 0 {
                Lat(top.0.saturating_mul(2))
            } else {
                settings.upper
            };
            return Step::Go(next.min(settings.upper));
        }
        if self.pending.iter().any(|p| *p > b) {
            return Step::Wait;
        }
        // Nothing above b can be evaluated: zoom in below it, then it is an edge.
        let below = self.left.map(|l| l.0);
        zoom_to_edge(below, b, self.delta, self.pending, &self.all_tried, &|s| {
            self.no_gain(s)
        })
    }

    /// b is the smallest scored α (with a scored α above it).
    fn expand_down(&self) -> Step {
        let (b, settings) = (self.b, self.settings);
        if b > settings.lower && !self.tried(settings.lower) {
            return Step::Go(settings.lower);
        }
        if self.pending.iter().any(|p| *p < b) {
            return Step::Wait;
        }
        let below = (b > settings.lower).then_some(settings.lower);
        zoom_to_edge(below, b, self.delta, self.pending, &self.all_tried, &|s| {
            self.no_gain(s)
        })
    }

    /// b has scored neighbours on both sides, L and R: stop when the scores are flat or the
    /// bracket is narrow enough, else split its widest gap.
    fn bracketed(&self, (l, fl): (Lat, f64), (r, fr): (Lat, f64)) -> Step {
        let tie = self.settings.tie;
        if (self.fb - fl).abs() <= tie && (self.fb - fr).abs() <= tie {
            return stop_or_wait(self.pending, l, r, self.no_gain(Status::Flat));
        }
        if r.0 - l.0 <= 2 * self.delta {
            return stop_or_wait(self.pending, l, r, self.no_gain(Status::Resolved));
        }
        match self
            .widest_gap((l, fl), (r, fr))
            .and_then(|(x, y)| split(x, y, &self.all_tried))
        {
            Some(m) => Step::Go(m),
            None => Step::Wait,
        }
    }

    /// The widest gap between L and R (pending points count) that is wider than δ; of equal
    /// widths, the one on the side of the better outer neighbour, then the right.
    fn widest_gap(&self, (l, fl): (Lat, f64), (r, fr): (Lat, f64)) -> Option<(Lat, Lat)> {
        let b = self.b;
        let mut marks: Vec<Lat> = self
            .pending
            .iter()
            .copied()
            .filter(|p| *p > l && *p < r)
            .chain([l, b, r])
            .collect();
        marks.sort();
        marks.dedup();
        let mut best_gap: Option<(i64, i32, Lat, Lat)> = None;
        for w in marks.windows(2) {
            let (x, y) = (w[0], w[1]);
            let width = y.0 - x.0;
            if width <= self.delta {
                continue;
            }
            // Equal widths: the side of the better outer neighbour, then the right.
            let side = if y <= b {
                if fl >= fr {
                    1
                } else {
                    0
                }
            } else if fr >= fl {
                2
            } else {
                0
            };
            let key = (width, side, x, y);
            if best_gap.is_none_or(|g| (key.0, key.1) > (g.0, g.1)) {
                best_gap = Some(key);
            }
        }
        best_gap.map(|(_, _, x, y)| (x, y))
    }
}

/// With b at the edge of what can be evaluated: split the gap between b and its neighbour
/// `other` (a scored point, or a bound that is a hole) while it is wider than δ, then stop
/// with `edge`.
fn zoom_to_edge(
    other: Option<Lat>,
    b: Lat,
    delta: i64,
    pending: &[Lat],
    tried: &[Lat],
    no_gain: &dyn Fn(Status) -> Status,
) -> Step {
    if let Some(o) = other {
        let (x, y) = if o < b { (o, b) } else { (b, o) };
        if pending.iter().any(|p| *p > x && *p < y) {
            return Step::Wait;
        }
        if y.0 - x.0 > delta {
            if let Some(m) = split(x, y, tried) {
                return Step::Go(m);
            }
        }
    }
    Step::Stop(no_gain(Status::Edge))
}

/// Stops when nothing inside the bracket is still running.
fn stop_or_wait(pending: &[Lat], l: Lat, r: Lat, s: Status) -> Step {
    if pending.iter().any(|p| *p > l && *p < r) {
        Step::Wait
    } else {
        Step::Stop(s)
    }
}

/// The roundest lattice point strictly inside (x, y) and nearest its middle, not yet tried:
/// multiples of the coarsest 1-2-5 step that has one (1.5 between 1 and 2, 3 between 2 and 4).
fn split(x: Lat, y: Lat, tried: &[Lat]) -> Option<Lat> {
    let mut steps = Vec::new();
    let mut p = 1i64;
    while p <= UNITS * MAX_ABS_ALPHA {
        for m in [1, 2, 5] {
            steps.push(p * m);
        }
        p *= 10;
    }
    let mid2 = x.0 as i128 + y.0 as i128; // twice the middle
    for &s in steps.iter().rev() {
        if s >= y.0 - x.0 {
            continue;
        }
        let first = x.0.div_euclid(s) * s + s; // > x
        if first >= y.0 {
            continue;
        }
        let mut cands: Vec<i64> = Vec::new();
        let near = (mid2 / 2) as i64;
        let k = near.div_euclid(s) * s;
        for c in [k - s, k, k + s, k + 2 * s] {
            if c > x.0 && c < y.0 && !tried.contains(&Lat(c)) {
                cands.push(c);
            }
        }
        // Nearest to the middle; ties → the smaller.
        cands.sort_by_key(|c| ((2 * *c as i128 - mid2).abs(), *c));
        if let Some(&c) = cands.first() {
            return Some(Lat(c));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lat(a: f64) -> Lat {
        Lat::from_f64(a).unwrap()
    }

    fn settings(first: &[f64], lower: f64, upper: f64) -> Settings {
        Settings {
            first: first.iter().map(|&a| lat(a)).collect(),
            lower: lat(lower),
            upper: lat(upper),
            resolution: None,
            tie: 0.0,
            max_evals: 20,
            retries: 1,
            max_failures: 3,
        }
    }

    /// Runs the rule with `jobs` slots against `f`; trials finish in launch order.
    fn simulate(s: &Settings, jobs: usize, f: &dyn Fn(f64) -> Outcome) -> (Status, Vec<Lat>) {
        let mut finished: Vec<(Lat, Outcome)> = Vec::new();
        let mut running: Vec<Lat> = Vec::new();
        for _ in 0..1000 {
            let view = View::new(s, &finished, &running);
            match decide(s, &view, jobs - running.len()) {
                Decision::Propose(v) => {
                    assert!(v.len() <= jobs - running.len());
                    running.extend(v);
                }
                Decision::Wait => {
                    assert!(!running.is_empty(), "waiting with nothing running");
                    let a = running.remove(0);
                    finished.push((a, f(a.to_f64())));
                }
                Decision::Done(st) => {
                    assert!(running.is_empty());
                    let order = finished.iter().map(|(a, _)| *a).collect();
                    return (st, order);
                }
            }
            if running.len() == jobs {
                let a = running.remove(0);
                finished.push((a, f(a.to_f64())));
            }
        }
        panic!("the search did not end");
    }

    fn best(s: &Settings, order: &[Lat], f: &dyn Fn(f64) -> Outcome) -> Lat {
        let fin: Vec<_> = order.iter().map(|&a| (a, f(a.to_f64()))).collect();
        View::new(s, &fin, &[]).best().unwrap().0
    }

    fn peak(p: f64) -> impl Fn(f64) -> Outcome {
        move |a| Outcome::Ok(-(a - p) * (a - p))
    }

    #[test]
    fn lattice_round_trips_and_prints_short() {
        for a in [0.0, 0.1, 0.3, 0.35, 2.5, -0.5, 8.0, 999.999999999999] {
            assert_eq!(lat(a).to_f64(), a);
            assert_eq!(lat(a).to_string(), crate::alpha::format_alpha(a));
        }
        assert_eq!(Lat(350_000_000_000).to_string(), "0.35");
        assert!(Lat::from_f64(0.1234567890123).is_none());
        assert!(Lat::from_f64(1001.0).is_none());
        assert!(Lat::from_f64(f64::NAN).is_none());
    }

    #[test]
    fn steps_follow_the_paper() {
        assert_eq!(default_step(lat(0.3)), lat(0.1).0);
        assert_eq!(default_step(lat(2.5)), lat(0.5).0);
        assert_eq!(default_step(lat(8.0)), lat(1.0).0);
        assert_eq!(default_step(lat(0.0)), lat(0.1).0);
        assert_eq!(default_step(lat(20.0)), lat(2.0).0);
    }

    #[test]
    fn splits_are_round() {
        assert_eq!(split(lat(1.0), lat(2.0), &[]), Some(lat(1.5)));
        assert_eq!(split(lat(2.0), lat(4.0), &[]), Some(lat(3.0)));
        assert_eq!(split(lat(10.0), lat(20.0), &[]), Some(lat(15.0)));
        assert_eq!(split(lat(0.3), lat(0.4), &[]), Some(lat(0.35)));
        assert_eq!(split(lat(0.3), lat(0.4), &[lat(0.35)]), Some(lat(0.34)));
        assert_eq!(split(Lat(0), Lat(1), &[]), None);
    }

    #[test]
    fn peak_in_the_first_batch_is_found_exactly_in_six() {
        let s = settings(&[0.0, 0.1, 0.2, 0.3, 0.4, 0.5], 0.0, 4.0);
        let f = peak(0.3);
        let (st, order) = simulate(&s, 1, &f);
        assert_eq!(st, Status::Resolved);
        assert_eq!(order.len(), 6);
        assert_eq!(best(&s, &order, &f), lat(0.3));
        assert_eq!(best(&s, &order, &f).to_f64(), 0.3);
    }

    #[test]
    fn peak_at_8_in_0_to_20() {
        let s = settings(&[0.0, 5.0, 10.0], 0.0, 20.0);
        let f = peak(8.0);
        let (st, order) = simulate(&s, 1, &f);
        assert_eq!(st, Status::Resolved, "{order:?}");
        assert_eq!(best(&s, &order, &f), lat(8.0));
        assert!(order.len() <= 10, "{}", order.len());
    }

    #[test]
    fn monotone_past_the_first_batch_expands_to_the_peak() {
        let s = settings(&[0.0, 0.1, 0.2, 0.3, 0.4, 0.5], 0.0, 4.0);
        let f = peak(2.5);
        let (st, order) = simulate(&s, 1, &f);
        assert_eq!(st, Status::Resolved, "{order:?}");
        let b = best(&s, &order, &f);
        assert!((b.to_f64() - 2.5).abs() <= 0.5, "{b}");
        assert!(order.contains(&lat(1.0)) && order.contains(&lat(2.0)));
        assert_eq!(order.len(), 11, "{order:?}");
    }

    #[test]
    fn monotone_to_the_bound_is_an_edge() {
        let s = settings(&[0.0, 0.1, 0.2, 0.3, 0.4, 0.5], 0.0, 4.0);
        let f = |a: f64| Outcome::Ok(a);
        let (st, order) = simulate(&s, 1, &f);
        assert_eq!(st, Status::Edge);
        assert_eq!(best(&s, &order, &f), lat(4.0));
        // Zoomed in below the bound before giving up.
        assert!(order.contains(&lat(3.0)), "{order:?}");
    }

    #[test]
    fn theta1_best_is_no_gain_and_flat_is_flat() {
        let s = settings(&[0.0, 0.1, 0.2, 0.3, 0.4, 0.5], 0.0, 4.0);
        let (st, _) = simulate(&s, 1, &|a| Outcome::Ok(-a));
        assert_eq!(st, Status::NoGain);
        let mut s2 = s.clone();
        s2.tie = 0.5;
        let (st, order) = simulate(&s2, 1, &|a| {
            Outcome::Ok(if a == 0.0 {
                0.0
            } else {
                1.0 - (a - 0.3).abs() * 0.01
            })
        });
        assert_eq!(st, Status::Flat, "{order:?}");
    }

    #[test]
    fn failures_are_retried_then_holes_and_stop_the_search() {
        let s = settings(&[0.0, 0.1, 0.2, 0.3, 0.4, 0.5], 0.0, 4.0);
        let f = |a: f64| {
            if a == 0.2 {
                Outcome::Failed
            } else {
                Outcome::Ok(-(a - 0.3) * (a - 0.3))
            }
        };
        let (st, order) = simulate(&s, 1, &f);
        assert_eq!(st, Status::Resolved);
        assert_eq!(order.iter().filter(|a| **a == lat(0.2)).count(), 2);
        // 0.2 is a hole, never a bracket end: L is 0.1, so 0.2 is not retried again but 0.25 is tried.
        assert!(
            order.contains(&lat(0.25)) || order.contains(&lat(0.15)),
            "{order:?}"
        );
        let (st, _) = simulate(&s, 1, &|_| Outcome::Failed);
        assert_eq!(st, Status::Failures);
        let (st, _) = simulate(&s, 1, &|_| Outcome::Unusable);
        assert_eq!(st, Status::NoScore);
    }

    #[test]
    fn budget_stops() {
        let mut s = settings(&[0.0, 0.1, 0.2, 0.3, 0.4, 0.5], 0.0, 4.0);
        s.max_evals = 8;
        let (st, order) = simulate(&s, 2, &peak(2.5));
        assert_eq!(st, Status::Budget);
        assert_eq!(order.len(), 8);
    }

    #[test]
    fn two_slots_give_the_same_answers() {
        for p in [0.3, 2.5, 1.7] {
            let s = settings(&[0.0, 0.1, 0.2, 0.3, 0.4, 0.5], 0.0, 4.0);
            let f = peak(p);
            let (st1, o1) = simulate(&s, 1, &f);
            let (st2, o2) = simulate(&s, 2, &f);
            assert_eq!(st1, st2, "{p}");
            assert_eq!(best(&s, &o1, &f), best(&s, &o2, &f), "{p}");
        }
    }

    proptest! {
        #[test]
        fn unimodal_peaks_are_found_within_one_step(p in 0.0f64..4.0, jobs in 1usize..4) {
            let s = settings(&[0.0, 0.1, 0.2, 0.3, 0.4, 0.5], 0.0, 4.0);
            let f = peak(p);
            let (st, order) = simulate(&s, jobs, &f);
            let b = best(&s, &order, &f);
            prop_assert!(matches!(st, Status::Resolved | Status::Edge | Status::NoGain), "{:?}", st);
            if st == Status::Edge {
                prop_assert!(b == s.upper || b == s.lower, "edge at {}", b);
            }
            prop_assert!(order.len() <= 20);
            // Every α is tried once (no retries without failures).
            let mut sorted = order.clone();
            sorted.sort();
            sorted.dedup();
            prop_assert_eq!(sorted.len(), order.len());
            prop_assert!((b.to_f64() - p).abs() <= default_step(b) as f64 / UNITS as f64 + 1e-9,
                "peak {} best {} {:?}", p, b, order);
        }

        #[test]
        fn the_rule_is_deterministic(p in 0.0f64..4.0) {
            let s = settings(&[0.0, 0.1, 0.2, 0.3, 0.4, 0.5], 0.0, 4.0);
            let f = peak(p);
            prop_assert_eq!(simulate(&s, 2, &f), simulate(&s, 2, &f));
        }
    }
}
