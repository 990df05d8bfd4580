//! The results as SVG charts, drawn with plotters' SVG backend: throughput,
//! added p99 latency, memory while holding streams, and CPU per request.
//! Each target keeps one colour across all four charts; the direct path is
//! left out of every one (it is the baseline, not a proxy).

use std::error::Error;
use std::path::{Path, PathBuf};

use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use crate::{Point, Results, Target};

const SIZE: (u32, u32) = (900, 500);
/// The legend's column at the right of each chart.
const LEGEND_WIDTH: u32 = 190;
/// Font sizes as plotters takes them (its SVG backend writes size / 1.24).
const TITLE: f64 = 26.0;
const NOTE: f64 = 16.0;
const LABEL: f64 = 16.0;
const AXIS: f64 = 17.0;
const FONT: &str = "sans-serif";
const INK: RGBColor = RGBColor(40, 40, 40);
const MUTED: RGBColor = RGBColor(100, 100, 100);
const GRID: RGBColor = RGBColor(225, 225, 225);

/// Tableau 10 (yellow and grey darkened to read on white), then five more.
const PALETTE: [RGBColor; 15] = [
    RGBColor(78, 121, 167),
    RGBColor(242, 142, 43),
    RGBColor(225, 87, 89),
    RGBColor(118, 183, 178),
    RGBColor(89, 161, 79),
    RGBColor(200, 165, 30),
    RGBColor(176, 122, 161),
    RGBColor(255, 157, 167),
    RGBColor(156, 117, 95),
    RGBColor(120, 112, 108),
    RGBColor(31, 58, 147),
    RGBColor(140, 209, 125),
    RGBColor(170, 40, 110),
    RGBColor(0, 150, 200),
    RGBColor(90, 60, 20),
];

type Fallible<T = ()> = Result<T, Box<dyn Error>>;

/// What the charts need of a run, back from its JSON (`report::json`):
/// each point's requests/s, p99 and CPU, and the held streams. A point's
/// latency histogram holds its p99 alone, which is all the charts read.
pub fn results_from_json(v: &serde_json::Value) -> Result<Results, String> {
    use clap::Parser as _;
    let cli = crate::Cli::try_parse_from(["sluice-bench"]).map_err(|e| e.to_string())?;
    let plan = crate::Plan::from(&cli.run);
    let machine = crate::report::Machine::read(Path::new("/nonexistent"), None, 1, None);
    let bad = |what: &str| format!("not a sluice-bench results file: {what}");
    let mut targets = vec![];
    for t in v["targets"].as_array().ok_or_else(|| bad("no targets"))? {
        // Target names are static in a run; here they live as long as the
        // command, which draws and exits.
        let name: &'static str = Box::leak(
            t["name"]
                .as_str()
                .ok_or_else(|| bad("a target without a name"))?
                .to_string()
                .into_boxed_str(),
        );
        let mut points = vec![];
        for p in t["points"].as_array().into_iter().flatten() {
            let mut latency = crate::load::histogram();
            latency.saturating_record(p["latency"]["p99_us"].as_u64().unwrap_or(1));
            let seconds = 1.0;
            let fixed = crate::load::Fixed {
                requests: p["rps"].as_f64().unwrap_or(0.0).round() as u64,
                errors: 0,
                seconds,
                latency,
            };
            let conns = p["conns"]
                .as_u64()
                .ok_or_else(|| bad("a point without conns"))?;
            let mut point = Point::new(conns as usize, fixed, None);
            point.cpu_us = p["cpu_us_per_request"].as_f64();
            points.push(point);
        }
        let held = t["held"].as_object().map(|h| {
            let before = h["before_rss_kib"].as_u64().unwrap_or(0);
            let steps = h["points"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|x| {
                    (
                        x["streams"].as_u64().unwrap_or(0) as usize,
                        x["rss_kib"].as_u64().unwrap_or(0),
                        x["failed"].as_u64().unwrap_or(0),
                    )
                })
                .collect();
            (before, steps)
        });
        targets.push(Target {
            name,
            shape: crate::client::Shape::default(),
            everywhere: t["streams_only"] != true,
            points,
            streams: None,
            idle_rss_kib: t["idle_rss_kib"].as_u64(),
            held,
            stream_cpu_us: None,
        });
    }
    Ok(Results {
        plan,
        gateways: vec![],
        machine,
        targets,
        soak: None,
        cases: vec![],
        case_conns: 32,
    })
}

/// Writes the four charts into `dir` (made if missing) and returns their
/// paths. A chart without data in this run still gets its file, saying so,
/// so that no chart from an earlier run is left behind.
pub fn write(results: &Results, dir: &Path) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let colours = Colours::of(results);
    let charts = [
        ("bench-throughput.svg", Chart::Bars(throughput(results))),
        ("bench-latency.svg", Chart::Bars(latency(results))),
        ("bench-memory.svg", Chart::Lines(memory(results))),
        ("bench-cpu.svg", Chart::Bars(cpu(results))),
    ];
    let mut written = Vec::with_capacity(charts.len());
    for (file, chart) in charts {
        let path = dir.join(file);
        let drawn = match &chart {
            Chart::Bars(b) => draw_bars(&path, b, &colours),
            Chart::Lines(l) => draw_lines(&path, l, &colours),
        };
        drawn.map_err(|e| format!("{}: {e}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

enum Chart {
    Bars(Bars),
    Lines(Lines),
}

/// Grouped bars: one group per connection count, one bar per target.
struct Bars {
    title: &'static str,
    subtitle: String,
    y_label: &'static str,
    groups: Vec<usize>,
    /// Each target's value per group (none where it has no figure).
    series: Vec<(&'static str, Vec<Option<f64>>)>,
}

/// One line per target through (x, y) points.
struct Lines {
    title: &'static str,
    subtitle: String,
    x_label: &'static str,
    y_label: &'static str,
    series: Vec<(&'static str, Vec<(f64, f64)>)>,
}

/// The proxies charted: sluice and what a user would run instead (the
/// direct path dwarfs them; sluice's own variants are in the tables).
fn proxies(r: &Results) -> impl Iterator<Item = &Target> {
    const VARIANT: &str = "sluice-";
    r.targets.iter().filter(|t| {
        t.name != "direct"
            && t.name != "baseline"
            && (!t.name.starts_with(VARIANT) || t.name == "sluice-nolog")
    })
}

fn point(t: &Target, conns: usize) -> Option<&Point> {
    t.points.iter().find(|p| p.conns == conns)
}

fn p99(p: &Point) -> f64 {
    p.fixed.latency.value_at_quantile(0.99) as f64
}

/// The connection counts that any proxy was measured at, in the plan's
/// order (then any others, ascending).
fn groups(r: &Results) -> Vec<usize> {
    let mut seen: Vec<usize> = proxies(r)
        .flat_map(|t| t.points.iter().map(|p| p.conns))
        .collect();
    seen.sort_unstable();
    seen.dedup();
    let mut out: Vec<usize> = r
        .plan
        .conns
        .iter()
        .copied()
        .filter(|c| seen.contains(c))
        .collect();
    out.extend(seen.into_iter().filter(|c| !r.plan.conns.contains(c)));
    out.dedup();
    out
}

/// Grouped bars of `f` per proxy and connection count; proxies without any
/// figure are left out.
fn bars_of(
    r: &Results,
    f: impl Fn(&Target, &Point) -> Option<f64>,
) -> Vec<(&'static str, Vec<Option<f64>>)> {
    let groups = groups(r);
    proxies(r)
        .map(|t| {
            let values = groups
                .iter()
                .map(|&c| point(t, c).and_then(|p| f(t, p)).filter(|v| v.is_finite()))
                .collect();
            (t.name, values)
        })
        .filter(|(_, v): &(_, Vec<Option<f64>>)| v.iter().any(Option::is_some))
        .collect()
}

fn throughput(r: &Results) -> Bars {
    Bars {
        title: "Throughput by connection count",
        subtitle: "Requests answered per second, closed loop (higher is better). \
                   The direct path is left out: it dwarfs the proxies."
            .into(),
        y_label: "requests per second",
        groups: groups(r),
        series: bars_of(r, |_, p| (p.fixed.seconds > 0.0).then(|| p.fixed.rps())),
    }
}

fn latency(r: &Results) -> Bars {
    let direct = r.targets.iter().find(|t| t.name == "direct");
    Bars {
        title: "Added p99 latency by connection count",
        subtitle: "The proxy's p99 latency minus the direct path's at the same connection count, \
                   in µs (lower is better)."
            .into(),
        y_label: "added p99 latency, µs",
        groups: groups(r),
        series: bars_of(r, |_, p| {
            let d = point(direct?, p.conns)?;
            (p.fixed.requests > 0 && d.fixed.requests > 0).then(|| p99(p) - p99(d))
        }),
    }
}

fn cpu(r: &Results) -> Bars {
    Bars {
        title: "Proxy CPU per request by connection count",
        subtitle:
            "CPU time (user + system) of the proxy's process tree per answered request, in µs \
                   (lower is better)."
                .into(),
        y_label: "CPU per request, µs",
        groups: groups(r),
        series: bars_of(r, |_, p| p.cpu_us),
    }
}

fn memory(r: &Results) -> Lines {
    let series = proxies(r)
        .filter_map(|t| {
            let (before, steps) = t.held.as_ref()?;
            let mut points = vec![(0.0, mib(*before))];
            // At the streams actually open: a gateway that cannot keep up
            // holds fewer than asked.
            points.extend(
                steps
                    .iter()
                    .filter(|s| crate::report::open_at(s) > 0)
                    .map(|s| (crate::report::open_at(s) as f64, mib(s.1))),
            );
            Some((t.name, points))
        })
        .collect();
    Lines {
        title: "Memory while holding streams open",
        subtitle: "RSS of the proxy's whole process tree before opening streams, then at each \
                   step (lower is better)."
            .into(),
        x_label: "streams held open",
        y_label: "RSS, MiB",
        series,
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// One colour per proxy, by its place among the run's proxies, so that a
/// target has the same colour in every chart.
struct Colours(Vec<(&'static str, RGBColor)>);

impl Colours {
    fn of(r: &Results) -> Colours {
        Colours(
            proxies(r)
                .enumerate()
                .map(|(i, t)| (t.name, colour(i)))
                .collect(),
        )
    }

    fn get(&self, name: &str) -> RGBColor {
        self.0
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(INK, |(_, c)| *c)
    }
}

/// The palette, then hues spread by the golden angle.
fn colour(i: usize) -> RGBColor {
    if let Some(&c) = PALETTE.get(i) {
        return c;
    }
    let hue = ((i - PALETTE.len()) as f64 * 0.618_034).fract();
    let (r, g, b) = HSLColor(hue, 0.65, 0.42).rgb();
    RGBColor(r, g, b)
}

/// A y axis, linear from zero or logarithmic (base 10) where the values
/// span two orders of magnitude or more. Values go onto the axis through
/// `at`; a log axis is drawn in log10 units with its labels turned back.
struct Scale {
    log: bool,
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
    /// Some values are zero or less and sit at the bottom of a log axis.
    clamped: bool,
}

impl Scale {
    fn new(values: &[f64]) -> Scale {
        Scale::with_headroom(values, 0.04)
    }

    /// `headroom`: how much of the span to leave above a linear axis's top
    /// value.
    fn with_headroom(values: &[f64], headroom: f64) -> Scale {
        let positive: Vec<f64> = values.iter().copied().filter(|&v| v > 0.0).collect();
        let min_pos = positive.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(0.0, f64::max);
        if positive.len() >= 2 && max / min_pos >= 100.0 {
            let lo = min_pos.log10().floor();
            let hi = max.log10().ceil().max(lo + 1.0);
            let mut ticks = Vec::new();
            let mut e = lo;
            while e <= hi {
                ticks.push(e);
                if hi - lo <= 3.0 && e < hi {
                    ticks.push(e + 2f64.log10());
                    ticks.push(e + 5f64.log10());
                }
                e += 1.0;
            }
            return Scale {
                log: true,
                lo,
                hi,
                ticks,
                clamped: values.iter().any(|&v| v <= 0.0),
            };
        }
        let min = values.iter().copied().fold(0.0, f64::min);
        let (lo, hi) = if max - min > 0.0 {
            (min, max)
        } else {
            (0.0, 1.0)
        };
        let span = hi - lo;
        let step = nice_step(span / 5.0);
        // The top on a tick; below zero only as far as the lowest value.
        let hi = ((hi + span * headroom) / step).ceil() * step;
        let lo = if lo < 0.0 { lo - span * 0.04 } else { 0.0 };
        let first = (lo / step).ceil() as i64;
        let ticks = (first..)
            .map(|i| i as f64 * step)
            .take_while(|&t| t <= hi + step / 2.0)
            .collect();
        Scale {
            log: false,
            lo,
            hi,
            ticks,
            clamped: false,
        }
    }

    /// Where `v` goes on the axis.
    fn at(&self, v: f64) -> f64 {
        if self.log {
            v.max(10f64.powf(self.lo)).log10()
        } else {
            v
        }
    }

    /// Where bars start: zero, or the bottom of a log axis.
    fn base(&self) -> f64 {
        if self.log {
            self.lo
        } else {
            0.0
        }
    }

    fn label(&self, axis: f64) -> String {
        number(if self.log { 10f64.powf(axis) } else { axis })
    }

    fn describe(&self, label: &str) -> String {
        if self.log {
            format!("{label} (log scale)")
        } else {
            label.to_string()
        }
    }

    fn coord(&self) -> Axis {
        Axis::new(self.lo, self.hi, self.ticks.clone())
    }
}

/// A linear f64 axis with its ticks (and grid lines) where we put them.
/// (plotters' `with_key_points` on an f64 range loses the label formatter.)
struct Axis {
    inner: RangedCoordf64,
    ticks: Vec<f64>,
}

impl Axis {
    fn new(lo: f64, hi: f64, ticks: Vec<f64>) -> Axis {
        Axis {
            inner: (lo..hi).into(),
            ticks,
        }
    }
}

impl Ranged for Axis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.inner.map(value, limit)
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.inner.range()
    }
}

/// 1, 2 or 5 times a power of ten, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    let raw = raw.max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|&s| s >= raw * (1.0 - 1e-9))
        .unwrap_or(10.0 * mag)
}

/// An axis label: whole numbers with thousands separators, fractions with
/// at most three decimals.
fn number(v: f64) -> String {
    let v = (v * 1000.0).round() / 1000.0;
    if v.fract() != 0.0 {
        return format!("{v}");
    }
    let digits = format!("{}", v.abs() as u64);
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if v < 0.0 {
        format!("-{out}")
    } else {
        out
    }
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

/// White background, title and subtitle; returns the plot area (left) and
/// the legend column (right).
fn frame<'a>(root: &Area<'a>, title: &str, notes: &[&str]) -> Fallible<(Area<'a>, Area<'a>)> {
    root.fill(&WHITE)?;
    root.draw(&Text::new(
        title.to_string(),
        (16, 12),
        (FONT, TITLE).into_font().style(FontStyle::Bold).color(&INK),
    ))?;
    let mut y = 40;
    for note in notes {
        root.draw(&Text::new(
            note.to_string(),
            (16, y),
            (FONT, NOTE).into_font().color(&MUTED),
        ))?;
        y += 17;
    }
    let (_, body) = root.split_vertically(y + 4);
    Ok(body.split_horizontally(SIZE.0 - LEGEND_WIDTH))
}

fn legend(area: &Area, names: &[&'static str], colours: &Colours) -> Fallible {
    for (i, name) in names.iter().enumerate() {
        let y = 24 + 24 * i as i32;
        area.draw(&Rectangle::new(
            [(8, y - 6), (22, y + 8)],
            colours.get(name).filled(),
        ))?;
        area.draw(&Text::new(
            name.to_string(),
            (30, y - 6),
            (FONT, AXIS).into_font().color(&INK),
        ))?;
    }
    Ok(())
}

fn no_data(area: &Area) -> Fallible {
    area.draw(&Text::new(
        "No data in this run.",
        (40, 60),
        (FONT, 20).into_font().color(&MUTED),
    ))?;
    Ok(())
}

fn draw_bars(path: &Path, bars: &Bars, colours: &Colours) -> Fallible {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    let values: Vec<f64> = bars
        .series
        .iter()
        .flat_map(|s| s.1.iter().flatten())
        .copied()
        .collect();
    let scale = Scale::new(&values);
    let mut notes = vec![bars.subtitle.as_str()];
    if scale.clamped {
        notes.push("Log scale: figures of zero or less are drawn at its bottom.");
    }
    let (plot, key) = frame(&root, bars.title, &notes)?;
    if values.is_empty() {
        no_data(&plot)?;
        root.present()?;
        return Ok(());
    }
    let n = bars.groups.len();
    let centres: Vec<f64> = (0..n).map(|i| i as f64 + 0.5).collect();
    let mut chart = ChartBuilder::on(&plot)
        .margin(12)
        .x_label_area_size(48)
        .y_label_area_size(96)
        .build_cartesian_2d(Axis::new(0.0, n as f64, centres), scale.coord())?;
    let group_label = |x: &f64| {
        bars.groups
            .get(x.floor().max(0.0) as usize)
            .map_or(String::new(), |c| c.to_string())
    };
    let value_label = |y: &f64| scale.label(*y);
    chart
        .configure_mesh()
        .disable_x_mesh()
        .bold_line_style(GRID)
        .x_desc("concurrent connections")
        .y_desc(scale.describe(bars.y_label))
        .x_label_formatter(&group_label)
        .y_label_formatter(&value_label)
        .label_style((FONT, LABEL).into_font().color(&INK))
        .axis_desc_style((FONT, AXIS).into_font().color(&INK))
        .draw()?;
    let slot = 0.8 / bars.series.len() as f64;
    for (j, (name, values)) in bars.series.iter().enumerate() {
        let colour = colours.get(name);
        chart.draw_series(values.iter().enumerate().filter_map(|(i, v)| {
            let v = (*v)?;
            let x0 = i as f64 + 0.1 + j as f64 * slot;
            Some(Rectangle::new(
                [
                    (x0 + slot * 0.06, scale.base()),
                    (x0 + slot * 0.94, scale.at(v)),
                ],
                colour.filled(),
            ))
        }))?;
    }
    if !scale.log && scale.lo < 0.0 {
        // The zero line, where bars below zero hang from.
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(0.0, 0.0), (n as f64, 0.0)],
            INK.stroke_width(1),
        )))?;
    }
    let names: Vec<&'static str> = bars.series.iter().map(|s| s.0).collect();
    legend(&key, &names, colours)?;
    root.present()?;
    Ok(())
}

fn draw_lines(path: &Path, lines: &Lines, colours: &Colours) -> Fallible {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    let ys: Vec<f64> = lines
        .series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.1))
        .collect();
    let scale = Scale::new(&ys);
    let (plot, key) = frame(&root, lines.title, &[&lines.subtitle])?;
    if ys.is_empty() {
        no_data(&plot)?;
        root.present()?;
        return Ok(());
    }
    let xs: Vec<f64> = lines
        .series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.0))
        .collect();
    // Streams held on a linear axis from zero, even when far apart.
    let x_max = xs.iter().copied().fold(0.0, f64::max);
    let x_scale = Scale::with_headroom(&[0.0, x_max], 0.0);
    let mut chart = ChartBuilder::on(&plot)
        .margin(12)
        .x_label_area_size(48)
        .y_label_area_size(96)
        .build_cartesian_2d(x_scale.coord(), scale.coord())?;
    let x_label = |x: &f64| number(*x);
    let y_label = |y: &f64| scale.label(*y);
    chart
        .configure_mesh()
        .bold_line_style(GRID)
        .x_desc(lines.x_label)
        .y_desc(scale.describe(lines.y_label))
        .x_label_formatter(&x_label)
        .y_label_formatter(&y_label)
        .label_style((FONT, LABEL).into_font().color(&INK))
        .axis_desc_style((FONT, AXIS).into_font().color(&INK))
        .draw()?;
    for (name, points) in &lines.series {
        let colour = colours.get(name);
        let on_axis: Vec<(f64, f64)> = points.iter().map(|&(x, y)| (x, scale.at(y))).collect();
        chart.draw_series(LineSeries::new(on_axis.clone(), colour.stroke_width(2)))?;
        chart.draw_series(
            on_axis
                .into_iter()
                .map(|p| Circle::new(p, 4, colour.filled())),
        )?;
    }
    let names: Vec<&'static str> = lines.series.iter().map(|s| s.0).collect();
    legend(&key, &names, colours)?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::{histogram, Fixed};
    use clap::Parser as _;

    /// A load point of `requests` over one second, every latency `us`.
    fn point(conns: usize, requests: u64, us: u64, cpu_us: Option<f64>) -> Point {
        let mut latency = histogram();
        latency.record_n(us, requests).expect("in bounds");
        let fixed = Fixed {
            requests,
            errors: 0,
            seconds: 1.0,
            latency,
        };
        let mut p = Point::new(conns, fixed, None);
        p.cpu_us = cpu_us;
        p
    }

    fn target(
        name: &'static str,
        points: Vec<Point>,
        held: Option<(u64, Vec<crate::HeldStep>)>,
    ) -> Target {
        Target {
            name,
            shape: crate::client::Shape::default(),
            everywhere: true,
            points,
            streams: None,
            idle_rss_kib: held.as_ref().map(|h| h.0),
            held,
            stream_cpu_us: None,
        }
    }

    fn results() -> Results {
        let cli =
            crate::Cli::try_parse_from(["sluice-bench", "--conns", "1,32,256"]).expect("args");
        let plan = crate::Plan::from(&cli.run);
        let machine = crate::report::Machine::read(Path::new("/nonexistent/sluice"), None, 1, None);
        let direct = target(
            "direct",
            vec![
                point(1, 40_000, 40, None),
                point(32, 300_000, 150, None),
                point(256, 310_000, 1200, None),
            ],
            None,
        );
        let sluice = target(
            "sluice",
            vec![
                point(1, 20_000, 70, Some(25.0)),
                point(32, 120_000, 400, Some(18.0)),
                point(256, 125_000, 2500, Some(17.5)),
            ],
            Some((8_000, vec![(2000, 40_000, 0), (8000, 130_000, 0)])),
        );
        let nginx = target(
            "nginx",
            vec![
                point(1, 18_000, 75, Some(30.0)),
                point(32, 100_000, 380, Some(22.0)),
                point(256, 101_000, 1100, Some(21.0)),
            ],
            Some((4_000, vec![(2000, 20_000, 0), (8000, 70_000, 3)])),
        );
        // A slow gateway measured at one connection count only: the charts
        // go logarithmic and leave its other bars empty.
        let gateway = target(
            "litellm",
            vec![point(1, 300, 9_000, Some(3_000.0))],
            Some((300_000, vec![(2000, 500_000, 10)])),
        );
        // No figures at all: in no chart.
        let absent = target("portkey", vec![], None);
        Results {
            plan,
            gateways: vec![],
            machine,
            targets: vec![direct, sluice, nginx, gateway, absent],
            soak: None,
            cases: vec![],
            case_conns: 32,
        }
    }

    /// The contents of the SVG's <text> elements.
    fn texts(svg: &str) -> Vec<&str> {
        svg.split("<text")
            .skip(1)
            .filter_map(|t| Some(t.split_once('>')?.1.split_once("</text>")?.0.trim()))
            .collect()
    }

    #[test]
    fn charts_drawn_again_from_a_runs_json_show_the_same_figures() {
        let json = crate::report::json(&results());
        let back = results_from_json(&json).expect("read back");
        let names: Vec<&str> = back.targets.iter().map(|t| t.name).collect();
        assert_eq!(names, ["direct", "sluice", "nginx", "litellm", "portkey"]);
        let (a, b) = (&results().targets[1], &back.targets[1]);
        for (p, q) in a.points.iter().zip(&b.points) {
            assert_eq!(p.fixed.rps().round(), q.fixed.rps());
            assert_eq!(p.cpu_us, q.cpu_us);
            let p99 = |x: &Point| x.fixed.latency.value_at_quantile(0.99);
            assert!(
                p99(p).abs_diff(p99(q)) <= p99(p) / 100,
                "{} {}",
                p99(p),
                p99(q)
            );
        }
        assert_eq!(a.held, b.held);
        let dir =
            std::env::temp_dir().join(format!("sluice-bench-charts-json-{}", std::process::id()));
        assert_eq!(write(&back, &dir).expect("charts").len(), 4);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(results_from_json(&serde_json::json!({"x": 1})).is_err());
    }

    #[test]
    fn charts_are_svg_with_every_target_in_the_legend() {
        let dir = std::env::temp_dir().join(format!("sluice-bench-charts-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let written = write(&results(), &dir).expect("charts");
        let names: Vec<&str> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "bench-throughput.svg",
                "bench-latency.svg",
                "bench-memory.svg",
                "bench-cpu.svg"
            ]
        );
        for path in &written {
            let svg = std::fs::read_to_string(path).expect("written");
            assert!(
                svg.starts_with("<svg"),
                "{}: {}",
                path.display(),
                &svg[..40.min(svg.len())]
            );
            let texts = texts(&svg);
            for name in ["sluice", "nginx", "litellm"] {
                assert!(texts.contains(&name), "{} lacks {name}", path.display());
            }
            assert!(
                !texts.contains(&"direct"),
                "{} has the direct path",
                path.display()
            );
            assert!(
                !svg.contains("portkey"),
                "{} has a target without data",
                path.display()
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_chart_without_data_says_so() {
        let mut r = results();
        r.targets.retain(|t| t.name == "direct");
        let dir =
            std::env::temp_dir().join(format!("sluice-bench-charts-empty-{}", std::process::id()));
        let written = write(&r, &dir).expect("charts");
        assert_eq!(written.len(), 4);
        for path in &written {
            let svg = std::fs::read_to_string(path).expect("written");
            assert!(svg.contains("No data in this run."), "{}", path.display());
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn scales() {
        let s = Scale::new(&[20.0, 30.0, -3.0]);
        assert!(!s.log);
        assert_eq!(
            s.ticks.iter().map(|&t| s.label(t)).collect::<Vec<_>>(),
            ["0", "10", "20", "30", "40"]
        );
        assert!(s.lo < -3.0 && s.lo > -10.0);
        let s = Scale::new(&[20.0, 9_000.0, -3.0]);
        assert!(s.log && s.clamped);
        assert_eq!((s.lo, s.hi), (1.0, 4.0));
        assert_eq!(s.label(s.at(-3.0)), "10");
        assert_eq!(number(125_000.0), "125,000");
        assert_eq!(number(0.25), "0.25");
        assert_eq!(number(-1500.0), "-1,500");
        assert_eq!(colour(0), PALETTE[0]);
        assert_ne!(colour(15), colour(16));
    }
}
