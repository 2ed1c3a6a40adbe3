//! Small SVG line charts (stacked panels sharing the x axis) for the simulator's and the load
//! tests' reports; no plotting dependency for a few polylines.

use std::fmt::Write;

pub struct Series {
    pub name: String,
    pub color: &'static str,
    pub points: Vec<(f64, f64)>,
}

pub struct Panel {
    pub y_label: &'static str,
    pub series: Vec<Series>,
}

const WIDTH: f64 = 900.0;
const PANEL_HEIGHT: f64 = 240.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const GAP: f64 = 50.0;

/// A "nice" axis maximum and tick step for values up to `max`.
fn ticks(max: f64) -> (f64, f64) {
    let max = if max > 0.0 { max } else { 1.0 };
    let raw = max / 5.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude);
    ((max / step).ceil() * step, step)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

pub fn svg(title: &str, x_label: &str, panels: &[Panel]) -> String {
    let height = TOP + panels.len() as f64 * (PANEL_HEIGHT + GAP) + 10.0;
    let plot_width = WIDTH - LEFT - RIGHT;
    let all = || {
        panels
            .iter()
            .flat_map(|p| &p.series)
            .flat_map(|s| &s.points)
    };
    let x_min = all().map(|p| p.0).fold(f64::INFINITY, f64::min);
    let x_max = all().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
    let (x_min, x_span) = if x_min.is_finite() && x_max > x_min {
        (x_min, x_max - x_min)
    } else {
        (0.0, 1.0)
    };
    let (_, x_step) = ticks(x_span);

    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = write!(
        out,
        r#"<text x="{LEFT}" y="22" font-size="15">{}</text>"#,
        escape(title)
    );
    for (i, panel) in panels.iter().enumerate() {
        let top = TOP + i as f64 * (PANEL_HEIGHT + GAP);
        let bottom = top + PANEL_HEIGHT;
        let y_max = panel
            .series
            .iter()
            .flat_map(|s| &s.points)
            .map(|p| p.1)
            .fold(0.0, f64::max);
        let (y_max, y_step) = ticks(y_max);
        let x = |v: f64| LEFT + (v - x_min) / x_span * plot_width;
        let y = |v: f64| bottom - v / y_max * PANEL_HEIGHT;
        // Grid and axes.
        let mut v = 0.0;
        while v <= y_max + y_step / 2.0 {
            let _ = write!(
                out,
                r##"<line x1="{LEFT}" x2="{}" y1="{py:.1}" y2="{py:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                WIDTH - RIGHT,
                LEFT - 6.0,
                y(v) + 4.0,
                v,
                py = y(v)
            );
            v += y_step;
        }
        let mut v = (x_min / x_step).ceil() * x_step;
        while v <= x_min + x_span + x_step / 2.0 {
            let _ = write!(
                out,
                r##"<line x1="{px:.1}" x2="{px:.1}" y1="{top}" y2="{bottom}" stroke="#f4f4f4"/><text x="{px:.1}" y="{}" text-anchor="middle">{}</text>"##,
                bottom + 15.0,
                v,
                px = x(v)
            );
            v += x_step;
        }
        let _ = write!(
            out,
            r##"<rect x="{LEFT}" y="{top}" width="{plot_width}" height="{PANEL_HEIGHT}" fill="none" stroke="#888"/>"##
        );
        let _ = write!(
            out,
            r#"<text transform="translate(16,{:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
            top + PANEL_HEIGHT / 2.0,
            escape(panel.y_label)
        );
        if i + 1 == panels.len() {
            let _ = write!(
                out,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
                LEFT + plot_width / 2.0,
                bottom + 32.0,
                escape(x_label)
            );
        }
        // Lines and legend.
        for (j, series) in panel.series.iter().enumerate() {
            let points: Vec<String> = series
                .points
                .iter()
                .map(|&(px, py)| format!("{:.1},{:.1}", x(px), y(py.min(y_max))))
                .collect();
            let _ = write!(
                out,
                r#"<polyline fill="none" stroke="{}" stroke-width="1.6" points="{}"/>"#,
                series.color,
                points.join(" ")
            );
            let lx = LEFT + 10.0 + j as f64 * 220.0;
            let _ = write!(
                out,
                r#"<rect x="{lx}" y="{}" width="14" height="4" fill="{}"/><text x="{}" y="{}">{}</text>"#,
                top - 10.0,
                series.color,
                lx + 18.0,
                top - 5.0,
                escape(&series.name)
            );
        }
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_maximum() {
        assert_eq!(ticks(9.0), (10.0, 2.0));
        assert_eq!(ticks(97.0), (100.0, 20.0));
        assert_eq!(ticks(0.0), (1.0, 0.2));
    }

    #[test]
    fn chart_has_one_polyline_per_series() {
        let panel = Panel {
            y_label: "y",
            series: vec![
                Series {
                    name: "a<b".into(),
                    color: "red",
                    points: vec![(0.0, 1.0), (1.0, 2.0)],
                },
                Series {
                    name: "c".into(),
                    color: "blue",
                    points: vec![(0.0, 0.0), (1.0, 3.0)],
                },
            ],
        };
        let svg = svg("t", "x", &[panel]);
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("a&lt;b"));
        assert!(svg.ends_with("</svg>\n"));
    }
}
