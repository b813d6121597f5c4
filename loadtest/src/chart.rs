//! SVG charts for load-test reports, written next to the JSON report because a chart is read
//! faster than a table.
//!
//! [`report_svg`] writes one standalone SVG 1.1 document by hand: no plotting crate, and the
//! same input always gives the same bytes. It has up to two panels, stacked:
//!
//! 1. **Latency distribution**: one line per [`LatencyCurve`]; x = percentile on the usual
//!    `1/(1-p)` log axis (0%, 90%, 99%, … as far as the largest sample count supports, at most
//!    99.999%), y = milliseconds from 0. The legend gives p50/p99/p99.9/max per curve. Every
//!    curve spans the whole axis: past its own count its quantile is simply its max.
//! 2. **Throughput over time**: one line per [`Series`] (points drawn in the given order);
//!    x = seconds since the start; [`Mark`]s are dashed vertical lines with their labels.
//!
//! Units in panel 2: series are grouped by unit in order of first appearance. The first group
//! is drawn against the left axis, the second against the right axis. Any further group gets
//! its own scale over the plot height with no axis drawn, and its legend entry gives that
//! scale's range (e.g. "own scale 0–400"), so its line still reads correctly. Marks are drawn
//! in panel 2 only.
//!
//! A panel is left out when it has nothing to draw; with neither panel the document says
//! "no data". Non-finite points and marks are skipped, values are clamped to ±1e300, and empty
//! or constant ranges are widened, so no `NaN` or `inf` ever reaches the document.

use std::fmt::{self, Write as _};

use hdrhistogram::Histogram;

/// One latency distribution to draw: values recorded in MICROSECONDS.
pub struct LatencyCurve<'a> {
    /// Legend name, e.g. "publish → socket".
    pub name: &'a str,
    /// The recorded latencies, µs.
    pub histogram_us: &'a Histogram<u64>,
}

/// One line over time: x = seconds since the run started, y = value (e.g. per-second rates).
pub struct Series {
    /// Legend name, e.g. "delivered".
    pub name: String,
    /// Unit of the y values, e.g. "msg/s"; series are put on an axis by unit.
    pub unit: String,
    /// `(seconds since start, value)`; non-finite points are skipped.
    pub points: Vec<(f64, f64)>,
}

/// A vertical marker at a time (e.g. "SIGTERM gateway 1"), seconds since start.
pub struct Mark {
    /// Seconds since the run started.
    pub at_s: f64,
    /// Text drawn beside the line.
    pub label: String,
}

const WIDTH: f64 = 960.0;
const PLOT_LEFT: f64 = 80.0;
const PLOT_RIGHT: f64 = 880.0;
const PLOT_HEIGHT: f64 = 240.0;
const TITLE_HEIGHT: f64 = 44.0;
/// Room above a plot for the panel title.
const PANEL_HEADER: f64 = 30.0;
/// Room below a plot for tick labels and the x axis label.
const AXIS_FOOTER: f64 = 52.0;
const LEGEND_ROW: f64 = 18.0;
const PANEL_GAP: f64 = 20.0;
/// Points per latency curve, evenly spaced on the log percentile axis.
const LATENCY_SAMPLES: u32 = 240;
const PERCENTILE_LABELS: [&str; 6] = ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"];
/// A y axis gets one more step when the top value is within this factor of the top tick,
/// so a line at the top is not hidden by the frame.
const HEADROOM: f64 = 1.05;
/// Largest magnitude drawn; keeps every span finite.
const VALUE_LIMIT: f64 = 1e300;
const PALETTE: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];
const GRID: &str = r##"stroke="#e4e4e4""##;
const MUTED: &str = r##"fill="#666""##;

/// The whole chart: a latency panel and a throughput panel, each left out when it has
/// nothing to draw (see the module docs for axes and units). Always a valid SVG document.
pub fn report_svg(
    title: &str,
    latencies: &[LatencyCurve<'_>],
    throughput: &[Series],
    marks: &[Mark],
) -> String {
    let mut svg = Svg::default();
    svg.text(
        (WIDTH / 2.0, 28.0),
        "middle",
        r#"font-size="18" font-weight="bold""#,
        title,
    );
    let mut top = TITLE_HEIGHT;
    let mut drew_panel = false;
    if latencies.iter().any(|c| !c.histogram_us.is_empty()) {
        top += latency_panel(&mut svg, top, latencies) + PANEL_GAP;
        drew_panel = true;
    }
    if throughput
        .iter()
        .any(|s| s.points.iter().any(|&p| finite_point(p).is_some()))
    {
        top += throughput_panel(&mut svg, top, throughput, marks) + PANEL_GAP;
        drew_panel = true;
    }
    if !drew_panel {
        svg.text((WIDTH / 2.0, top + 30.0), "middle", MUTED, "no data");
        top += 60.0;
    }
    let height = top.ceil();
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" \
         version=\"1.1\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"{w}\" height=\"{h}\" fill=\"white\"/>\n{body}</svg>\n",
        w = Num(WIDTH),
        h = Num(height),
        body = svg.out
    )
}

/// Panel 1; returns its height.
fn latency_panel(svg: &mut Svg, top: f64, curves: &[LatencyCurve<'_>]) -> f64 {
    let max_count = curves
        .iter()
        .map(|c| c.histogram_us.len())
        .max()
        .unwrap_or(0);
    let decades = supported_decades(max_count);
    let lines: Vec<Vec<(f64, f64)>> = curves
        .iter()
        .map(|c| {
            if c.histogram_us.is_empty() {
                return Vec::new();
            }
            (0..=LATENCY_SAMPLES)
                .map(|i| {
                    let x = f64::from(decades) * f64::from(i) / f64::from(LATENCY_SAMPLES);
                    (
                        x,
                        us_to_ms(c.histogram_us.value_at_quantile(percentile_at(x))),
                    )
                })
                .collect()
        })
        .collect();
    let max_ms = lines.iter().flatten().map(|p| p.1).fold(0.0, f64::max);
    let plot_top = top + PANEL_HEADER;
    let xs = Scale::new(0.0, f64::from(decades), PLOT_LEFT, PLOT_RIGHT);
    let y_ticks = value_ticks(0.0, max_ms);
    let ys = Scale::new(y_ticks.lo, y_ticks.hi, plot_top + PLOT_HEIGHT, plot_top);
    panel_frame(svg, plot_top, "Latency distribution", "percentile");
    for (decade, label) in PERCENTILE_LABELS
        .iter()
        .enumerate()
        .take(decades as usize + 1)
    {
        x_tick(svg, xs.map(decade as f64), plot_top, label);
    }
    y_axis(svg, &y_ticks, &ys, true, "latency (ms)");
    let mut legend = Vec::new();
    for (i, (curve, line)) in curves.iter().zip(&lines).enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let h = curve.histogram_us;
        let text = if h.is_empty() {
            format!("{}: no samples", curve.name)
        } else {
            svg.path(line, &xs, &ys, colour);
            let q = |p: f64| format_ms(us_to_ms(h.value_at_quantile(p)));
            format!(
                "{}: p50 {} ms · p99 {} ms · p99.9 {} ms · max {} ms · n={}",
                curve.name,
                q(0.5),
                q(0.99),
                q(0.999),
                format_ms(us_to_ms(h.max())),
                h.len()
            )
        };
        legend.push((colour, text));
    }
    PANEL_HEADER + PLOT_HEIGHT + legend_rows(svg, plot_top, &legend)
}

/// Panel 2; returns its height.
fn throughput_panel(svg: &mut Svg, top: f64, series: &[Series], marks: &[Mark]) -> f64 {
    let lines: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|s| s.points.iter().filter_map(|&p| finite_point(p)).collect())
        .collect();
    let marks: Vec<(f64, &str)> = marks
        .iter()
        .filter(|m| m.at_s.is_finite())
        .map(|m| (m.at_s.clamp(-VALUE_LIMIT, VALUE_LIMIT), m.label.as_str()))
        .collect();
    let times = lines
        .iter()
        .flatten()
        .map(|p| p.0)
        .chain(marks.iter().map(|m| m.0));
    let (x_lo, x_hi) = times.fold((0.0, 0.0), |(lo, hi), x| (f64::min(lo, x), f64::max(hi, x)));
    // Unit groups in order of first appearance, each with a range that includes 0.
    let mut groups: Vec<(&str, f64, f64)> = Vec::new();
    let mut group_of = Vec::with_capacity(series.len());
    for (s, line) in series.iter().zip(&lines) {
        let g = match groups.iter().position(|g| g.0 == s.unit) {
            Some(g) => g,
            None => {
                groups.push((s.unit.as_str(), 0.0, 0.0));
                groups.len() - 1
            }
        };
        for &(_, y) in line {
            groups[g].1 = groups[g].1.min(y);
            groups[g].2 = groups[g].2.max(y);
        }
        group_of.push(g);
    }
    let plot_top = top + PANEL_HEADER;
    let x_ticks = nice_ticks(x_lo, x_hi, 10);
    let xs = Scale::new(x_ticks.lo, x_ticks.hi, PLOT_LEFT, PLOT_RIGHT);
    let y_ticks: Vec<Ticks> = groups.iter().map(|g| value_ticks(g.1, g.2)).collect();
    let y_scales: Vec<Scale> = y_ticks
        .iter()
        .map(|t| Scale::new(t.lo, t.hi, plot_top + PLOT_HEIGHT, plot_top))
        .collect();
    panel_frame(svg, plot_top, "Throughput over time", "seconds since start");
    for &x in &x_ticks.values {
        x_tick(svg, xs.map(x), plot_top, &format_tick(x, x_ticks.step));
    }
    // Only the first two unit groups get an axis: left, then right.
    for (g, ((unit, _, _), ticks)) in groups.iter().zip(&y_ticks).enumerate().take(2) {
        y_axis(svg, ticks, &y_scales[g], g == 0, unit);
    }
    let mut legend = Vec::new();
    for (i, ((s, line), &g)) in series.iter().zip(&lines).zip(&group_of).enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        if !line.is_empty() {
            svg.path(line, &xs, &y_scales[g], colour);
        }
        let axis = match g {
            0 => String::new(),
            1 => ", right axis".to_owned(),
            _ => {
                let t = &y_ticks[g];
                let (lo, hi) = (format_tick(t.lo, t.step), format_tick(t.hi, t.step));
                format!(", own scale {lo}–{hi}")
            }
        };
        let empty = if line.is_empty() { " — no data" } else { "" };
        legend.push((colour, format!("{} ({}{axis}){empty}", s.name, s.unit)));
    }
    for (i, &(at, label)) in marks.iter().enumerate() {
        let x = xs.map(at);
        let dash = r##"stroke="#555" stroke-dasharray="5 4""##;
        svg.line((x, plot_top), (x, plot_top + PLOT_HEIGHT), dash);
        // Stagger labels over three rows so marks close in time stay legible.
        let y = plot_top + 12.0 + (i % 3) as f64 * 13.0;
        let (lx, anchor) = if x > PLOT_RIGHT - 160.0 {
            (x - 4.0, "end")
        } else {
            (x + 4.0, "start")
        };
        svg.text((lx, y), anchor, r##"font-size="11" fill="#333""##, label);
    }
    PANEL_HEADER + PLOT_HEIGHT + legend_rows(svg, plot_top, &legend)
}

/// Panel title, plot border and x axis label.
fn panel_frame(svg: &mut Svg, plot_top: f64, title: &str, x_label: &str) {
    let bold = r#"font-size="14" font-weight="bold""#;
    svg.text((PLOT_LEFT, plot_top - 10.0), "start", bold, title);
    let width = PLOT_RIGHT - PLOT_LEFT;
    svg.push(format_args!(
        r##"<rect x="{}" y="{}" width="{}" height="{}" fill="none" stroke="#999"/>"##,
        Num(PLOT_LEFT),
        Num(plot_top),
        Num(width),
        Num(PLOT_HEIGHT)
    ));
    let centre = (PLOT_LEFT + width / 2.0, plot_top + PLOT_HEIGHT + 36.0);
    svg.text(centre, "middle", MUTED, x_label);
}

/// A vertical grid line at `x` with its label under the plot.
fn x_tick(svg: &mut Svg, x: f64, plot_top: f64, label: &str) {
    let bottom = plot_top + PLOT_HEIGHT;
    svg.line((x, plot_top), (x, bottom), GRID);
    svg.text((x, bottom + 16.0), "middle", "", label);
}

/// Tick labels on the left (with horizontal grid lines) or right side, and the axis label.
fn y_axis(svg: &mut Svg, ticks: &Ticks, scale: &Scale, left: bool, label: &str) {
    for &v in &ticks.values {
        let y = scale.map(v);
        if left {
            svg.line((PLOT_LEFT, y), (PLOT_RIGHT, y), GRID);
        }
        let (x, anchor) = if left {
            (PLOT_LEFT - 6.0, "end")
        } else {
            (PLOT_RIGHT + 6.0, "start")
        };
        svg.text((x, y + 4.0), anchor, "", &format_tick(v, ticks.step));
    }
    let (x, angle) = if left {
        (22.0, -90)
    } else {
        (WIDTH - 22.0, 90)
    };
    let y = scale.from + (scale.to - scale.from) / 2.0;
    let rotate = format!(
        r#"transform="rotate({angle} {} {})" {MUTED}"#,
        Num(x),
        Num(y)
    );
    svg.text((x, y), "middle", &rotate, label);
}

/// One legend row per entry under the x axis label; returns the footer height.
fn legend_rows(svg: &mut Svg, plot_top: f64, entries: &[(&str, String)]) -> f64 {
    let first = plot_top + PLOT_HEIGHT + AXIS_FOOTER;
    for (i, (colour, text)) in entries.iter().enumerate() {
        let y = first + i as f64 * LEGEND_ROW;
        let stroke = format!(r#"stroke="{colour}" stroke-width="3""#);
        svg.line((PLOT_LEFT, y - 4.0), (PLOT_LEFT + 22.0, y - 4.0), &stroke);
        svg.text((PLOT_LEFT + 30.0, y), "start", "", text);
    }
    AXIS_FOOTER + entries.len() as f64 * LEGEND_ROW
}

/// Decades of the percentile axis (1 = up to 90%, 3 = up to 99.9%) that `count` samples
/// support: p = 1 - 1/count is the last distinct percentile. At least 1, at most 5.
fn supported_decades(count: u64) -> u32 {
    let decades = (count.max(1) as f64).log10() + 1e-9;
    decades
        .floor()
        .clamp(1.0, (PERCENTILE_LABELS.len() - 1) as f64) as u32
}

/// The percentile at position `decades` on the log axis, where x = log10(1 / (1 - p)).
fn percentile_at(decades: f64) -> f64 {
    1.0 - 10f64.powf(-decades)
}

fn us_to_ms(us: u64) -> f64 {
    (us as f64 / 1000.0).min(VALUE_LIMIT)
}

/// Three significant digits, enough to compare curves.
fn format_ms(ms: f64) -> String {
    match ms {
        m if m >= 100.0 => format!("{m:.0}"),
        m if m >= 10.0 => format!("{m:.1}"),
        m if m >= 1.0 => format!("{m:.2}"),
        m => format!("{m:.3}"),
    }
}

fn finite_point((x, y): (f64, f64)) -> Option<(f64, f64)> {
    (x.is_finite() && y.is_finite()).then(|| {
        (
            x.clamp(-VALUE_LIMIT, VALUE_LIMIT),
            y.clamp(-VALUE_LIMIT, VALUE_LIMIT),
        )
    })
}

/// Round tick values covering a range; `lo`/`hi` are the covered range's ends.
struct Ticks {
    lo: f64,
    hi: f64,
    step: f64,
    values: Vec<f64>,
}

/// About `target` ticks in 1-2-5 steps covering `lo..=hi`. Widens an empty range and clamps
/// huge ones, so the result is always finite with `lo < hi`.
fn nice_ticks(lo: f64, hi: f64, target: usize) -> Ticks {
    let clamp = |v: f64, fallback: f64| {
        if v.is_finite() {
            v.clamp(-VALUE_LIMIT, VALUE_LIMIT)
        } else {
            fallback
        }
    };
    let (mut lo, mut hi) = (clamp(lo, 0.0), clamp(hi, 1.0));
    if lo > hi {
        std::mem::swap(&mut lo, &mut hi);
    }
    if hi - lo < lo.abs().max(hi.abs()).max(1.0) * 1e-9 {
        hi = lo + lo.abs().max(1.0);
    }
    let raw = (hi - lo) / target.max(1) as f64;
    let magnitude = 10f64.powf(raw.log10().floor());
    let nice = match raw / magnitude {
        r if r <= 1.0 => 1.0,
        r if r <= 2.0 => 2.0,
        r if r <= 5.0 => 5.0,
        _ => 10.0,
    };
    let step = nice * magnitude;
    let (lo, hi) = ((lo / step).floor() * step, (hi / step).ceil() * step);
    let count = ((hi - lo) / step).round().clamp(1.0, 100.0) as u32;
    let values = (0..=count)
        .map(|i| lo + f64::from(i) * step)
        .map(|v| if v.abs() < step * 1e-6 { 0.0 } else { v })
        .collect();
    Ticks {
        lo,
        hi,
        step,
        values,
    }
}

/// Ticks for a y axis: about five, with headroom above `hi` (see [`HEADROOM`]).
fn value_ticks(lo: f64, hi: f64) -> Ticks {
    let mut ticks = nice_ticks(lo, hi, 5);
    if hi > 0.0 && hi * HEADROOM > ticks.hi && ticks.hi + ticks.step < VALUE_LIMIT {
        ticks.hi += ticks.step;
        ticks.values.push(ticks.hi);
    }
    ticks
}

/// A tick label with as many decimals as `step` needs, and k/M/G for big round steps.
fn format_tick(v: f64, step: f64) -> String {
    if v == 0.0 {
        return "0".to_owned();
    }
    if step >= 1e12 {
        return format!("{v:e}");
    }
    let (div, suffix) = [(1e9, "G"), (1e6, "M"), (1e3, "k")]
        .into_iter()
        .find(|&(d, _)| step >= d)
        .unwrap_or((1.0, ""));
    let scaled = step / div;
    let decimals = if scaled >= 1.0 {
        0
    } else {
        (-scaled.log10().floor()).clamp(0.0, 12.0) as usize
    };
    format!("{:.*}{suffix}", decimals, v / div)
}

/// Linear map from data `lo..=hi` to pixels `from..=to` (clamped to the plot).
struct Scale {
    lo: f64,
    hi: f64,
    from: f64,
    to: f64,
}

impl Scale {
    fn new(lo: f64, hi: f64, from: f64, to: f64) -> Self {
        Self { lo, hi, from, to }
    }

    fn map(&self, v: f64) -> f64 {
        let span = self.hi - self.lo;
        if !span.is_finite() || span <= 0.0 || !v.is_finite() {
            return self.from;
        }
        self.from + ((v - self.lo) / span).clamp(0.0, 1.0) * (self.to - self.from)
    }
}

/// A coordinate with one decimal; never prints NaN or inf.
struct Num(f64);

impl fmt::Display for Num {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_finite() {
            write!(f, "{:.1}", self.0)
        } else {
            f.write_str("0")
        }
    }
}

/// Text escaped for XML; control characters (not allowed in XML 1.0) become spaces.
struct Escaped<'a>(&'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            match c {
                '&' => f.write_str("&amp;")?,
                '<' => f.write_str("&lt;")?,
                '>' => f.write_str("&gt;")?,
                '"' => f.write_str("&quot;")?,
                '\'' => f.write_str("&apos;")?,
                c if c.is_control() || c == '\u{FFFE}' || c == '\u{FFFF}' => f.write_char(' ')?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// The document body under construction, one element per line.
#[derive(Default)]
struct Svg {
    out: String,
}

impl Svg {
    fn push(&mut self, element: fmt::Arguments<'_>) {
        // Writing to a String cannot fail.
        let _ = self.out.write_fmt(element);
        self.out.push('\n');
    }

    fn line(&mut self, (x1, y1): (f64, f64), (x2, y2): (f64, f64), style: &str) {
        let (x1, y1, x2, y2) = (Num(x1), Num(y1), Num(x2), Num(y2));
        self.push(format_args!(
            r#"<line x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" {style}/>"#
        ));
    }

    /// `style` is trusted attribute text; `content` is escaped.
    fn text(&mut self, (x, y): (f64, f64), anchor: &str, style: &str, content: &str) {
        let (x, y, content) = (Num(x), Num(y), Escaped(content));
        self.push(format_args!(
            r#"<text x="{x}" y="{y}" text-anchor="{anchor}" {style}>{content}</text>"#
        ));
    }

    /// A data line; a line of one point gets a dot too, to be seen.
    fn path(&mut self, points: &[(f64, f64)], xs: &Scale, ys: &Scale, colour: &str) {
        let mut d = String::with_capacity(points.len() * 14);
        for (i, &(x, y)) in points.iter().enumerate() {
            let _ = write!(
                d,
                "{}{} {} ",
                if i == 0 { "M" } else { "L" },
                Num(xs.map(x)),
                Num(ys.map(y))
            );
        }
        if let [(x, y)] = points {
            let (cx, cy) = (Num(xs.map(*x)), Num(ys.map(*y)));
            self.push(format_args!(
                r#"<circle cx="{cx}" cy="{cy}" r="3" fill="{colour}"/>"#
            ));
        }
        self.push(format_args!(
            r#"<path d="{}" fill="none" stroke="{colour}" stroke-width="2" stroke-linecap="round" stroke-linejoin="round"/>"#,
            d.trim_end()
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small well-formedness check: one root, balanced tags, `name="value"` attributes, and
    /// no raw markup or bare `&` in text or values (only the five predefined entities).
    fn assert_clean(doc: &str) {
        let decl = r#"<?xml version="1.0" encoding="UTF-8"?>"#;
        let mut rest = doc.strip_prefix(decl).expect("XML declaration first");
        let (mut open, mut roots) = (Vec::new(), 0);
        while let Some(start) = rest.find('<') {
            assert_text(&rest[..start]);
            assert!(
                !open.is_empty() || rest[..start].trim().is_empty(),
                "text outside root"
            );
            let end = start + rest[start..].find('>').expect("tag closed");
            let tag = &rest[start + 1..end];
            rest = &rest[end + 1..];
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(open.pop(), Some(name), "balanced tags");
                continue;
            }
            let (tag, empty) = tag.strip_suffix('/').map_or((tag, false), |t| (t, true));
            let (name, mut attrs) = tag.split_once(' ').unwrap_or((tag, ""));
            assert!(!name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric()));
            while !attrs.trim().is_empty() {
                let (key, after) = attrs.trim_start().split_once("=\"").expect("key=\"");
                assert!(
                    key.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
                    "{key}"
                );
                let (value, after) = after.split_once('"').expect("closing quote");
                assert_text(value);
                attrs = after;
            }
            roots += usize::from(open.is_empty());
            if !empty {
                open.push(name);
            }
        }
        assert!(rest.trim().is_empty() && open.is_empty() && roots == 1);
        assert!(
            !doc.contains("NaN") && !doc.contains("inf"),
            "non-finite in\n{doc}"
        );
    }

    fn assert_text(text: &str) {
        assert!(!text.contains(['<', '>']), "raw markup in {text:?}");
        let entities = ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"];
        for (i, _) in text.match_indices('&') {
            assert!(
                entities.iter().any(|e| text[i..].starts_with(e)),
                "bare & in {text:?}"
            );
        }
    }

    fn histogram_ms(values: impl IntoIterator<Item = u64>) -> Histogram<u64> {
        let mut h = Histogram::new(3).expect("3 significant figures is valid");
        for ms in values {
            h.record(ms * 1000)
                .expect("an auto-resizing histogram takes any value");
        }
        h
    }

    fn curve<'a>(name: &'a str, histogram_us: &'a Histogram<u64>) -> LatencyCurve<'a> {
        LatencyCurve { name, histogram_us }
    }

    fn mark(at_s: f64, label: &str) -> Mark {
        Mark {
            at_s,
            label: label.into(),
        }
    }

    fn series(name: &str, unit: &str, points: Vec<(f64, f64)>) -> Series {
        Series {
            name: name.into(),
            unit: unit.into(),
            points,
        }
    }

    /// The x attribute of the `<text>` element whose content is `label`.
    fn text_x(doc: &str, label: &str) -> Option<f64> {
        let line = doc
            .lines()
            .find(|l| l.ends_with(&format!(">{label}</text>")))?;
        line.split("x=\"").nth(1)?.split('"').next()?.parse().ok()
    }

    #[test]
    fn one_path_per_curve_and_series_with_legend_axes_and_marks() {
        let (fast, slow) = (
            histogram_ms(1..=1000),
            histogram_ms((1..=1000).map(|v| v * 2)),
        );
        let curves = [curve("fast", &fast), curve("slow", &slow)];
        let rates = [
            series(
                "delivered/s",
                "per second",
                (0..60).map(|s| (f64::from(s), 5e4)).collect(),
            ),
            series("connected", "sockets", vec![(0.0, 10.0), (59.0, 10_000.0)]),
            series("rss", "MB", vec![(0.0, 100.0), (59.0, 340.0)]),
        ];
        let doc = report_svg("run", &curves, &rates, &[mark(30.0, "SIGTERM gateway 1")]);
        assert_clean(&doc);
        assert!(doc.contains(r#"xmlns="http://www.w3.org/2000/svg" version="1.1""#));
        assert!(doc.contains(r#"width="960.0""#) && doc.contains(r#"viewBox="0 0 960.0 "#));
        assert_eq!(doc.matches("<path ").count(), 5);
        assert!(doc.contains(">SIGTERM gateway 1</text>") && doc.contains("stroke-dasharray"));
        assert!(doc.contains("(sockets, right axis)") && doc.contains(">12k</text>"));
        assert!(doc.contains("(MB, own scale 0–400)") && doc.contains(">60k</text>"));
        assert!(doc.contains(">latency (ms)</text>") && doc.contains(">percentile</text>"));
        // 1..=1000 ms recorded: p99 is about 990 ms, max about 1000 ms.
        let legend = doc.split("fast: ").nth(1).expect("legend row");
        let p99: f64 = legend
            .split("p99 ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|s| s.parse().ok())
            .expect("p99 in the legend");
        assert!((985.0..=995.0).contains(&p99), "p99 = {p99}");
        assert!(legend.contains("max 1000 ms") || legend.contains("max 1001 ms"));
    }

    #[test]
    fn percentile_axis_is_log_of_one_over_one_minus_p() {
        assert!((percentile_at(100f64.log10()) - 0.99).abs() < 1e-12);
        let h = histogram_ms(1..=1000);
        let doc = report_svg("p", &[curve("a", &h)], &[], &[]);
        // 1000 samples support three decades (99.9%) and no more.
        assert_eq!(supported_decades(h.len()), 3);
        assert!(doc.contains(">99.9%</text>") && !doc.contains(">99.99%</text>"));
        let at = |x: f64| PLOT_LEFT + (PLOT_RIGHT - PLOT_LEFT) * x / 3.0;
        let log_x = (1.0 / (1.0 - 0.99f64)).log10();
        assert!((text_x(&doc, "99%").expect("99% tick") - at(log_x)).abs() < 0.1);
        assert!((text_x(&doc, "0%").expect("0% tick") - at(0.0)).abs() < 0.1);
        assert_eq!(
            (supported_decades(0), supported_decades(10_000_000)),
            (1, 5)
        );
    }

    #[test]
    fn ticks_are_nice_round_numbers() {
        let labels = |lo, hi, n| {
            let t = nice_ticks(lo, hi, n);
            t.values
                .iter()
                .map(|&v| format_tick(v, t.step))
                .collect::<Vec<_>>()
        };
        assert_eq!(labels(0.0, 97.0, 5), ["0", "20", "40", "60", "80", "100"]);
        assert_eq!(
            labels(0.0, 59.0, 10),
            ["0", "10", "20", "30", "40", "50", "60"]
        );
        assert_eq!(labels(0.0, 0.73, 5), ["0", "0.2", "0.4", "0.6", "0.8"]);
        assert_eq!(labels(0.0, 12_345.0, 5), ["0", "5k", "10k", "15k"]);
        assert_eq!(labels(-3.0, 7.0, 5), ["-4", "-2", "0", "2", "4", "6", "8"]);
        assert_eq!(
            labels(0.0, 0.0, 5),
            ["0", "0.2", "0.4", "0.6", "0.8", "1.0"]
        );
        let top = |hi| value_ticks(0.0, hi).values.last().copied();
        assert_eq!(
            (top(10_000.0), top(9_000.0), top(0.0)),
            (Some(12e3), Some(1e4), Some(1.0))
        );
        let huge = nice_ticks(-f64::MAX, f64::INFINITY, 5);
        assert!(huge.values.iter().all(|v| v.is_finite()) && huge.lo < huge.hi);
    }

    #[test]
    fn names_are_escaped() {
        let h = histogram_ms([5]);
        let name = r#"a<b & "c" 'd'>"#;
        let rates = [series(name, "<&>", vec![(0.0, 1.0)])];
        let marks = [mark(0.5, "kill & <restart>\u{0}")];
        let doc = report_svg("title & <co>", &[curve(name, &h)], &rates, &marks);
        assert_clean(&doc);
        assert!(doc.contains("a&lt;b &amp; &quot;c&quot; &apos;d&apos;&gt;"));
        assert!(doc.contains("title &amp; &lt;co&gt;") && doc.contains("&lt;restart&gt; <"));
    }

    #[test]
    fn empty_inputs_give_a_valid_document_that_says_no_data() {
        let empty = histogram_ms([]);
        let no_points = [series("s", "u", Vec::new())];
        for doc in [
            report_svg("", &[], &[], &[]),
            report_svg("t", &[curve("none", &empty)], &no_points, &[mark(1.0, "m")]),
        ] {
            assert_clean(&doc);
            assert!(doc.contains(">no data</text>") && !doc.contains("<path"));
        }
    }

    #[test]
    fn degenerate_data_never_yields_nan_or_inf() {
        let (one, zero) = (histogram_ms([7]), histogram_ms([0]));
        let mut huge = Histogram::<u64>::new(3).expect("valid");
        huge.record(1 << 60).expect("auto-resizing");
        let curves = [
            curve("one", &one),
            curve("zero", &zero),
            curve("huge", &huge),
        ];
        let wild = vec![
            (f64::NAN, 1.0),
            (1.0, f64::MAX),
            (2.0, -f64::MAX),
            (f64::INFINITY, 0.0),
        ];
        let rates = [
            series("flat", "u", vec![(0.0, 0.0), (0.0, 0.0)]),
            series("single", "v", vec![(3.0, 2.0)]),
            series("wild", "w", wild),
        ];
        let marks = [mark(f64::NAN, "lost"), mark(-5.0, "early")];
        let doc = report_svg("edge", &curves, &rates, &marks);
        assert_clean(&doc);
        assert_eq!(doc.matches("<path ").count(), 6);
        assert!(doc.contains("<circle ") && doc.contains(">early</text>"));
        assert!(!doc.contains(">lost</text>"));
        // Only zeros: a 0..1 ms axis rather than a zero-height one.
        let only_zero = report_svg("z", &curves[1..2], &[], &[]);
        assert_clean(&only_zero);
        assert!(only_zero.contains(">1.0</text>"));
    }
}
