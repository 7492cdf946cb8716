//! RUN/search.svg: score against α, θ1's level, the best marked, failures marked. Written
//! by hand (a few lines of SVG), rewritten after each result.

use std::fmt::Write as _;

/// One finished trial: its α and score (`None` when it failed or was unusable).
#[derive(Debug, Clone, Copy)]
pub struct Point {
    pub alpha: f64,
    pub score: Option<f64>,
}

const W: f64 = 640.0;
const H: f64 = 400.0;
const M: f64 = 56.0;

/// The plot as an SVG document.
pub fn svg(points: &[Point], baseline: Option<f64>, best: Option<(f64, f64)>) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let frame = Frame::new(points, baseline);
    frame.axes(&mut s);
    if let Some(b) = baseline {
        frame.baseline(&mut s, b);
    }
    frame.scores(&mut s, points);
    frame.failures(&mut s, points);
    if let Some((x, y)) = best {
        frame.best(&mut s, x, y);
    }
    s.push_str("</svg>\n");
    s
}

/// The ranges of α and of the scores that the plot area shows.
struct Frame {
    x0: f64,
    x1: f64,
    y0: f64,
    y1: f64,
}

impl Frame {
    fn new(points: &[Point], baseline: Option<f64>) -> Frame {
        let xs: Vec<f64> = points.iter().map(|p| p.alpha).collect();
        let ys: Vec<f64> = points
            .iter()
            .filter_map(|p| p.score)
            .chain(baseline)
            .collect();
        let (x0, x1) = span(&xs);
        let (y0, y1) = span(&ys);
        Frame { x0, x1, y0, y1 }
    }

    /// The horizontal position of α `x`.
    fn px(&self, x: f64) -> f64 {
        M + fraction(x, self.x0, self.x1) * (W - 2.0 * M)
    }

    /// The vertical position of score `y`.
    fn py(&self, y: f64) -> f64 {
        H - M - fraction(y, self.y0, self.y1) * (H - 2.0 * M)
    }

    /// Axes and their ranges.
    fn axes(&self, s: &mut String) {
        let _ = writeln!(
            s,
            r#"<path d="M{M} {t} V{b} H{r}" stroke="black" fill="none"/>"#,
            t = M,
            b = H - M,
            r = W - M
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">α</text><text x="{M}" y="{}" text-anchor="middle">{}</text><text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            W / 2.0,
            H - 16.0,
            H - M + 16.0,
            short(self.x0),
            W - M,
            H - M + 16.0,
            short(self.x1)
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text><text x="{}" y="{}" text-anchor="end">{}</text><text x="14" y="{}" transform="rotate(-90 14 {})" text-anchor="middle">score</text>"#,
            M - 4.0,
            H - M,
            short(self.y0),
            M - 4.0,
            M + 4.0,
            short(self.y1),
            H / 2.0,
            H / 2.0
        );
    }

    /// θ1's level (the α = 0 score), dashed.
    fn baseline(&self, s: &mut String, b: f64) {
        let _ = writeln!(
            s,
            r##"<line x1="{M}" x2="{}" y1="{y}" y2="{y}" stroke="#888" stroke-dasharray="4 4"/><text x="{}" y="{}" fill="#888" text-anchor="end">θ1 (α = 0)</text>"##,
            W - M,
            W - M,
            self.py(b) - 4.0,
            y = self.py(b)
        );
    }

    /// The scored trials, one point per α, joined in order of α.
    fn scores(&self, s: &mut String, points: &[Point]) {
        let mut ok: Vec<(f64, f64)> = points
            .iter()
            .filter_map(|p| Some((p.alpha, p.score?)))
            .collect();
        ok.sort_by(|a, b| a.0.total_cmp(&b.0));
        ok.dedup_by(|a, b| a.0 == b.0);
        if ok.len() > 1 {
            let d: Vec<String> = ok
                .iter()
                .map(|&(x, y)| format!("{:.1},{:.1}", self.px(x), self.py(y)))
                .collect();
            let _ = writeln!(
                s,
                r##"<polyline points="{}" fill="none" stroke="#36c"/>"##,
                d.join(" ")
            );
        }
        for &(x, y) in &ok {
            let _ = writeln!(
                s,
                r##"<circle cx="{:.1}" cy="{:.1}" r="3" fill="#36c"><title>α {} score {}</title></circle>"##,
                self.px(x),
                self.py(y),
                short(x),
                short(y)
            );
        }
    }

    /// A cross on the α axis for each trial that failed or was unusable.
    fn failures(&self, s: &mut String, points: &[Point]) {
        for p in points.iter().filter(|p| p.score.is_none()) {
            let (x, y) = (self.px(p.alpha), H - M - 8.0);
            let _ = writeln!(
                s,
                r##"<path d="M{} {} l8 8 m0 -8 l-8 8" stroke="#c33"><title>α {} failed</title></path>"##,
                x - 4.0,
                y - 4.0,
                short(p.alpha)
            );
        }
    }

    /// The best α, circled.
    fn best(&self, s: &mut String, x: f64, y: f64) {
        let _ = writeln!(
            s,
            r##"<circle cx="{:.1}" cy="{:.1}" r="7" fill="none" stroke="#c33" stroke-width="2"/><text x="{:.1}" y="{:.1}" fill="#c33" text-anchor="middle">best α = {}</text>"##,
            self.px(x),
            self.py(y),
            self.px(x),
            self.py(y) - 12.0,
            short(x)
        );
    }
}

/// Where `v` lies between `lo` and `hi` (0 … 1), computed on halves so that scores near
/// the largest floats do not overflow.
fn fraction(v: f64, lo: f64, hi: f64) -> f64 {
    let f = (v / 2.0 - lo / 2.0) / (hi / 2.0 - lo / 2.0);
    if f.is_finite() {
        f
    } else {
        0.5
    }
}

fn span(v: &[f64]) -> (f64, f64) {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    let width = hi / 2.0 - lo / 2.0;
    if width <= f64::EPSILON * hi.abs().max(lo.abs()).max(1.0) {
        let pad = 0.5_f64.max(hi.abs() * 1e-6);
        return (lo - pad, hi + pad);
    }
    let pad = width * 0.1;
    let (a, b) = (lo - pad, hi + pad);
    (
        if a.is_finite() { a } else { lo },
        if b.is_finite() { b } else { hi },
    )
}

fn short(v: f64) -> String {
    crate::text::significant(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_points_baseline_best_and_failures() {
        let pts = [
            Point {
                alpha: 0.0,
                score: Some(1.0),
            },
            Point {
                alpha: 0.3,
                score: Some(2.0),
            },
            Point {
                alpha: 0.5,
                score: None,
            },
        ];
        let s = svg(&pts, Some(1.0), Some((0.3, 2.0)));
        assert!(s.starts_with("<svg") && s.ends_with("</svg>\n"));
        assert!(s.contains("polyline") && s.contains("best α = 0.3"));
        assert!(s.contains("α 0.5 failed") && s.contains("θ1 (α = 0)"));
        // Degenerate ranges draw without NaN.
        let s = svg(
            &[Point {
                alpha: 1.0,
                score: Some(3.0),
            }],
            None,
            None,
        );
        assert!(!s.contains("NaN"));
        assert!(!svg(&[], None, None).contains("NaN"));
    }
}
