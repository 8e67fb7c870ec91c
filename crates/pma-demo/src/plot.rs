//! PNG plots of a [`Results`], drawn with `plotters` and an embedded font.
//!
//! Plots are rendered from `results.json` data only. Text uses DejaVu Sans, vendored in
//! `assets/` and registered with plotters' `ab_glyph` backend once per process, so drawing needs
//! no system fonts or fontconfig. Non-finite values (a diverged run) are left out of a line.
//!
//! [`draw_all`] writes into `OUT/plots/`:
//! - `loss_vs_step.png`: raw trunk checkpoints, the best merge at each point, annealed branches;
//! - `heat_table.png`: method × N, one panel per merge point, coloured by the change against the
//!   newest raw checkpoint;
//! - reproduction only: `sweeps.png`, `prediction.png`, `moe.png`, `continued.png`, `spike.png`.

use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::error::{Error, Result};
use crate::ids::{RunId, Tag};
use crate::results::Results;

static FONT_TTF: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
const FONT: &str = "sans-serif";
const WIDTH: u32 = 900;
const HEIGHT: u32 = 520;

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
];

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The vendored file is a valid TrueType font; a failure would only mean text is missing.
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, FONT_TTF);
    });
}

/// How a series is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// A line.
    Line,
    /// A line with a dot at each point.
    LineDots,
    /// Dots only.
    Dots,
    /// A shaded area: `points` run along its upper edge, left to right, then back along its
    /// lower edge. It takes the colour of the series after it, the one it is the spread of.
    Band,
}

/// One labelled series of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend text.
    pub label: String,
    /// (x, y) points; non-finite ones are skipped.
    pub points: Vec<(f64, f64)>,
    /// How to draw it.
    pub mark: Mark,
}

/// A line chart.
#[derive(Debug, Clone)]
pub struct Chart {
    /// Title.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Y axis label.
    pub y_label: String,
    /// Series, drawn in order with colours from a fixed palette.
    pub series: Vec<Series>,
}

fn plot_err(path: &Path) -> impl Fn(String) -> Error + '_ {
    move |reason| Error::Plot {
        path: path.to_path_buf(),
        reason,
    }
}

fn bounds(series: &[Series]) -> Option<((f64, f64), (f64, f64))> {
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    if pts.is_empty() {
        return None;
    }
    let (mut x0, mut x1, mut y0, mut y1) = (
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::NEG_INFINITY,
    );
    for (x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let pad_x = pad(x0, x1, 0.03);
    let pad_y = pad(y0, y1, 0.08).max(1e-3);
    Some(((x0 - pad_x, x1 + pad_x), (y0 - pad_y, y1 + pad_y)))
}

/// Margin around `lo..=hi`: a fraction of the span, or, when every point shares one value (a
/// single annealing fork), a tenth of that value. A fixed tiny margin there made a 2e-9 wide
/// axis whose six-decimal labels all read "0.409600".
fn pad(lo: f64, hi: f64, fraction: f64) -> f64 {
    let span = hi - lo;
    if span > 0.0 {
        span * fraction
    } else {
        (lo.abs() * 0.1).max(1.0)
    }
}

/// Tick labels per axis (plotters' default, named so [`axis_decimals`] agrees with it).
const AXIS_LABELS: usize = 10;

/// Decimals that tell apart the ticks plotters places on `lo..hi`: it steps by the smallest
/// 1, 2 or 5 × 10^k that gives at most [`AXIS_LABELS`] ticks. A fixed format printed "0 0 0"
/// for an axis from 0.1 to 0.3 million tokens. Plotters counts the ticks that fit inside the
/// range, so its step can be just under span / [`AXIS_LABELS`] (0.05 on 0.488..0.997, whose
/// labels read "0.9 0.9 0.8" with one decimal); sizing for half that step never prints too few.
fn axis_decimals(lo: f64, hi: f64) -> usize {
    let span = (hi - lo).abs();
    if !span.is_finite() || span == 0.0 {
        return 0;
    }
    let rough = span / AXIS_LABELS as f64 / 2.0;
    let magnitude = 10f64.powf(rough.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|&s| s >= rough)
        .unwrap_or(10.0 * magnitude);
    (-step.log10().floor()).clamp(0.0, 6.0) as usize
}

fn draw_chart(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    chart: &Chart,
) -> std::result::Result<(), String> {
    let Some(((x0, x1), (y0, y1))) = bounds(&chart.series) else {
        return area
            .draw(&Text::new(
                format!("{}: no data", chart.title),
                (20, 20),
                (FONT, 16).into_font(),
            ))
            .map_err(|e| e.to_string());
    };
    let mut ctx = ChartBuilder::on(area)
        .caption(&chart.title, (FONT, 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| e.to_string())?;
    ctx.configure_mesh()
        .x_desc(chart.x_label.as_str())
        .y_desc(chart.y_label.as_str())
        .label_style((FONT, 13))
        .x_labels(AXIS_LABELS)
        .y_labels(AXIS_LABELS)
        .y_label_formatter(&|y| format!("{:.*}", axis_decimals(y0, y1), y))
        .x_label_formatter(&|x| format!("{:.*}", axis_decimals(x0, x1), x))
        .draw()
        .map_err(|e| e.to_string())?;
    // Bands share the colour of the series they are the spread of, which follows them.
    let mut line = 0;
    for s in &chart.series {
        let color = COLORS[line % COLORS.len()];
        if s.mark != Mark::Band {
            line += 1;
        }
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect();
        if pts.is_empty() {
            continue;
        }
        let style = ShapeStyle::from(&color).stroke_width(2);
        match s.mark {
            Mark::Line | Mark::LineDots => {
                ctx.draw_series(LineSeries::new(pts.clone(), style))
                    .map_err(|e| e.to_string())?
                    .label(s.label.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
                if s.mark == Mark::LineDots {
                    ctx.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
                        .map_err(|e| e.to_string())?;
                }
            }
            Mark::Dots => {
                ctx.draw_series(pts.iter().map(|&p| Circle::new(p, 5, color.filled())))
                    .map_err(|e| e.to_string())?
                    .label(s.label.as_str())
                    .legend(move |(x, y)| Circle::new((x + 10, y), 5, color.filled()));
            }
            Mark::Band => {
                let fill = color.mix(0.2).filled();
                // A band over one x has no width: draw it as a thick bar, an error bar.
                let x = pts[0].0;
                let area: Box<dyn Iterator<Item = _>> = if pts.iter().all(|p| p.0 == x) {
                    let bar = ShapeStyle::from(&color.mix(0.35)).stroke_width(8);
                    Box::new(std::iter::once(
                        PathElement::new(pts.clone(), bar).into_dyn(),
                    ))
                } else {
                    Box::new(std::iter::once(Polygon::new(pts, fill).into_dyn()))
                };
                ctx.draw_series(area)
                    .map_err(|e| e.to_string())?
                    .label(s.label.as_str())
                    .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 20, y + 5)], fill));
            }
        }
    }
    ctx.configure_series_labels()
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Draws `charts` side by side (one row) into `path`.
pub fn draw_charts(path: &Path, charts: &[Chart]) -> Result<()> {
    register_font();
    let err = plot_err(path);
    let n = charts.len().max(1) as u32;
    let root =
        BitMapBackend::new(path, (WIDTH * n.min(2), HEIGHT * n.div_ceil(2))).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let cols = n.min(2) as usize;
    let rows = (n as usize).div_ceil(cols);
    let areas = root.split_evenly((rows, cols));
    for (area, chart) in areas.iter().zip(charts) {
        draw_chart(area, chart).map_err(&err)?;
    }
    root.present().map_err(|e| err(e.to_string()))
}

/// One cell of a heat table.
#[derive(Debug, Clone)]
pub struct HeatCell {
    /// Text in the cell.
    pub text: String,
    /// Colour value: negative is better (green), positive worse (red); `None` is grey.
    pub delta: Option<f64>,
}

/// A table of coloured cells with row and column headers.
#[derive(Debug, Clone)]
pub struct HeatTable {
    /// Title above the table.
    pub title: String,
    /// Column headers.
    pub columns: Vec<String>,
    /// (row header, cells).
    pub rows: Vec<(String, Vec<HeatCell>)>,
}

fn heat_color(delta: Option<f64>, scale: f64) -> RGBColor {
    let Some(d) = delta.filter(|d| d.is_finite()) else {
        return RGBColor(220, 220, 220);
    };
    let t = (d.abs() / scale.max(1e-12)).min(1.0);
    let mix = |a: u8, b: u8| (f64::from(a) + (f64::from(b) - f64::from(a)) * t).round() as u8;
    if d < 0.0 {
        RGBColor(mix(255, 60), mix(255, 170), mix(255, 80))
    } else {
        RGBColor(mix(255, 220), mix(255, 70), mix(255, 60))
    }
}

/// Draws heat tables stacked vertically into `path`.
pub fn draw_heat_tables(path: &Path, tables: &[HeatTable], footer: &str) -> Result<()> {
    register_font();
    let err = plot_err(path);
    let (cell_w, cell_h, head_w, title_h) = (170i32, 44i32, 110i32, 40i32);
    let max_cols = tables.iter().map(|t| t.columns.len()).max().unwrap_or(1) as i32;
    let block_h = |t: &HeatTable| title_h + cell_h * (t.rows.len() as i32 + 1) + 16;
    let height: i32 = tables.iter().map(block_h).sum::<i32>() + 40;
    let width = head_w + cell_w * max_cols + 24;
    let root = BitMapBackend::new(path, (width as u32, height as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let scale = tables
        .iter()
        .flat_map(|t| t.rows.iter().flat_map(|r| r.1.iter()))
        .filter_map(|c| c.delta)
        .filter(|d| d.is_finite())
        .fold(0.0f64, |m, d| m.max(d.abs()));
    let text = |s: &str, x: i32, y: i32, size: i32| {
        root.draw(&Text::new(s.to_string(), (x, y), (FONT, size).into_font()))
            .map_err(|e| err(e.to_string()))
    };
    let mut y = 10;
    for t in tables {
        text(&t.title, 12, y + 8, 17)?;
        let y0 = y + title_h;
        for (j, c) in t.columns.iter().enumerate() {
            text(c, head_w + cell_w * j as i32 + 12, y0 + 14, 15)?;
        }
        for (i, (label, cells)) in t.rows.iter().enumerate() {
            let ry = y0 + cell_h * (i as i32 + 1);
            text(label, 12, ry + 14, 15)?;
            for (j, cell) in cells.iter().enumerate() {
                let x = head_w + cell_w * j as i32;
                root.draw(&Rectangle::new(
                    [(x, ry), (x + cell_w - 4, ry + cell_h - 4)],
                    heat_color(cell.delta, scale).filled(),
                ))
                .map_err(|e| err(e.to_string()))?;
                text(&cell.text, x + 8, ry + 13, 14)?;
            }
        }
        y += block_h(t);
    }
    text(footer, 12, height - 28, 13)?;
    root.present().map_err(|e| err(e.to_string()))
}

/// Where plots go.
pub fn plots_dir(out: &Path) -> PathBuf {
    out.join("plots")
}

/// The method labels of the grid, in a fixed order.
pub fn grid_labels(r: &Results) -> Vec<String> {
    let mut labels = vec!["sma".to_string()];
    labels.extend(r.config.ema_alphas.iter().map(|a| format!("ema{a}")));
    labels.push("wma".into());
    labels
}

/// Steps of the merges tagged `tag` in `run`, sorted.
pub fn merge_steps(r: &Results, run: RunId, tag: Tag) -> Vec<u64> {
    let mut s: Vec<u64> = r
        .merges
        .iter()
        .filter(|m| m.run == run && m.has_tag(tag))
        .map(|m| m.step)
        .collect();
    s.sort_unstable();
    s.dedup();
    s
}

/// A [`Mark::Band`] from the values of each x: its minimum to its maximum. Left out (`None`)
/// where no x has two values, as in a one-seed run.
fn band(
    label: &str,
    values: &std::collections::BTreeMap<u64, Vec<f64>>,
    scale: f64,
) -> Option<Series> {
    let edges: Vec<(f64, f64, f64)> = values
        .iter()
        .filter_map(|(&x, v)| {
            let v: Vec<f64> = v.iter().copied().filter(|y| y.is_finite()).collect();
            (v.len() >= 2).then(|| {
                let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                (x as f64 / scale, lo, hi)
            })
        })
        .collect();
    if edges.is_empty() {
        return None;
    }
    let mut points: Vec<(f64, f64)> = edges.iter().map(|&(x, _, hi)| (x, hi)).collect();
    points.extend(edges.iter().rev().map(|&(x, lo, _)| (x, lo)));
    Some(Series {
        label: label.into(),
        points,
        mark: Mark::Band,
    })
}

/// Collects `(x, value)` pairs from every seed into per-x lists.
fn per_x(pairs: impl Iterator<Item = (u64, f64)>) -> std::collections::BTreeMap<u64, Vec<f64>> {
    let mut m: std::collections::BTreeMap<u64, Vec<f64>> = Default::default();
    for (x, v) in pairs {
        m.entry(x).or_default().push(v);
    }
    m
}

/// The seeds of a multi-seed run (empty otherwise).
fn seed_runs(r: &Results) -> &[crate::results::SeedRun] {
    r.seeds.as_ref().map_or(&[], |s| s.seeds.as_slice())
}

/// Draws every plot the results have data for; returns the files written, relative to `out`.
pub fn draw_all(r: &Results, out: &Path) -> Result<Vec<String>> {
    let dir = plots_dir(out);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, "creating", e))?;
    let mut written = Vec::new();
    let mut put = |name: &str, f: &dyn Fn(&Path) -> Result<()>| -> Result<()> {
        let path = dir.join(name);
        f(&path)?;
        written.push(format!("plots/{name}"));
        Ok(())
    };

    put("loss_vs_step.png", &|p| draw_charts(p, &[loss_chart(r)]))?;
    put("heat_table.png", &|p| {
        draw_heat_tables(
            p,
            &heat_tables(r),
            "cell: val loss (change vs the newest raw checkpoint); green = merge better",
        )
    })?;
    if r.merges_tagged(Tag::NSweep).next().is_some()
        || r.merges_tagged(Tag::VSweep).next().is_some()
    {
        put("sweeps.png", &|p| draw_charts(p, &sweep_charts(r)))?;
    }
    if !r.predictions.is_empty() {
        put("prediction.png", &|p| {
            draw_charts(p, &[prediction_chart(r)])
        })?;
    }
    if r.run(RunId::Moe).is_some() {
        put("moe.png", &|p| draw_charts(p, &[moe_chart(r)]))?;
    }
    if let Some(c) = &r.continued {
        let runs = [
            (
                RunId::ContinuedRaw { order: 0 },
                "from newest raw (order 0)",
            ),
            (RunId::ContinuedPma { order: 0 }, "from PMA merge (order 0)"),
        ];
        put("continued.png", &|p| {
            draw_charts(
                p,
                &[
                    continued_chart(c),
                    curve_chart(r, &runs, "Continued training: grad norm", true, false),
                ],
            )
        })?;
    }
    if let Some(s) = &r.spike {
        let sweep: Vec<(RunId, String)> = s
            .sweep
            .iter()
            .filter_map(|w| Some((w.run.parse().ok()?, format!("LR {:e}", w.lr))))
            .collect();
        let mut rescue: Vec<(RunId, String)> = Vec::new();
        if let Some(x) = &s.rescue {
            if let Ok(id) = x.run.parse() {
                rescue.push((id, "spiking run".into()));
            }
            for q in &x.resumes {
                if let Ok(id) = q.run.parse() {
                    let from = if q.from_merge { "PMA" } else { "raw" };
                    rescue.push((id, format!("{from}, order {}", q.order)));
                }
            }
        }
        let sweep: Vec<(RunId, &str)> = sweep.iter().map(|(id, l)| (*id, l.as_str())).collect();
        let rescue: Vec<(RunId, &str)> = rescue.iter().map(|(id, l)| (*id, l.as_str())).collect();
        put("spike.png", &|p| {
            draw_charts(
                p,
                &[
                    curve_chart(r, &sweep, "LR sweep: train loss", false, false),
                    curve_chart(
                        r,
                        &rescue,
                        "Rescue at the spiking LR: train loss",
                        false,
                        true,
                    ),
                ],
            )
        })?;
    }
    Ok(written)
}

/// The best merge of the trunk at each grid and prediction step (interval K), by step.
fn best_merges(
    merges: &[crate::results::MergeRecord],
    predictions: &[crate::results::PredictionRecord],
    save_every: u64,
) -> std::collections::BTreeMap<u64, f64> {
    let steps = merges
        .iter()
        .filter(|m| m.run == RunId::Trunk && m.has_tag(Tag::Grid))
        .map(|m| m.step)
        .chain(
            predictions
                .iter()
                .filter(|p| p.run == RunId::Trunk)
                .map(|p| p.step),
        );
    steps
        .filter_map(|s| {
            merges
                .iter()
                .filter(|m| m.run == RunId::Trunk && m.step == s && m.interval == save_every)
                .min_by(|a, b| a.val_loss.total_cmp(&b.val_loss))
                .map(|m| (s, m.val_loss))
        })
        .collect()
}

fn loss_chart(r: &Results) -> Chart {
    let seeds = seed_runs(r);
    let raw: Vec<(f64, f64)> = r
        .checkpoints
        .iter()
        .filter(|c| c.run == RunId::Trunk)
        .map(|c| (c.global_step as f64, c.val_loss))
        .collect();
    let mut series = Vec::new();
    series.extend(band(
        "raw: seeds' min to max",
        &per_x(seeds.iter().flat_map(|s| {
            s.checkpoints
                .iter()
                .filter(|c| c.run == RunId::Trunk)
                .map(|c| (c.global_step, c.val_loss))
        })),
        1.0,
    ));
    series.push(Series {
        label: "raw checkpoints (constant LR)".into(),
        points: raw,
        mark: Mark::LineDots,
    });
    let save_every = r.config.save_every;
    series.extend(band(
        "best merge: seeds' min to max",
        &per_x(
            seeds
                .iter()
                .flat_map(|s| best_merges(&s.merges, &s.predictions, save_every)),
        ),
        1.0,
    ));
    series.push(Series {
        label: "best merge at each point".into(),
        points: best_merges(&r.merges, &r.predictions, save_every)
            .into_iter()
            .map(|(s, v)| (s as f64, v))
            .collect(),
        mark: Mark::Dots,
    });
    series.extend(annealed_series(r, RunId::Trunk, "annealed from"));
    let title = if seeds.is_empty() {
        "Validation loss vs step".to_string()
    } else {
        format!(
            "Validation loss vs step (lines: seed {}; bands: {} seeds)",
            r.seed,
            seeds.len()
        )
    };
    Chart {
        title,
        x_label: "trunk step".into(),
        y_label: "val loss (nats/byte)".into(),
        series,
    }
}

/// Method × N tables, one per grid point.
pub fn heat_tables(r: &Results) -> Vec<HeatTable> {
    let ns = &r.config.ns;
    merge_steps(r, RunId::Trunk, Tag::Grid)
        .into_iter()
        .map(|step| {
            let raw = r.checkpoint(RunId::Trunk, step).map(|c| c.val_loss);
            let rows = grid_labels(r)
                .into_iter()
                .map(|label| {
                    let cells = ns
                        .iter()
                        .map(|&n| {
                            let m = r.merges.iter().find(|m| {
                                m.run == RunId::Trunk
                                    && m.step == step
                                    && m.n == n
                                    && m.interval == r.config.save_every
                                    && m.label() == label
                            });
                            match (m, raw) {
                                (Some(m), Some(raw)) => HeatCell {
                                    text: format!("{:.4} ({:+.4})", m.val_loss, m.val_loss - raw),
                                    delta: Some(m.val_loss - raw),
                                },
                                (Some(m), None) => HeatCell {
                                    text: format!("{:.4}", m.val_loss),
                                    delta: None,
                                },
                                _ => HeatCell {
                                    text: "-".into(),
                                    delta: None,
                                },
                            }
                        })
                        .collect();
                    (label, cells)
                })
                .collect();
            HeatTable {
                title: format!(
                    "step {step}: newest raw checkpoint {}",
                    raw.map_or("-".into(), |v| format!("{v:.4}"))
                ),
                columns: ns.iter().map(|n| format!("N = {n}")).collect(),
                rows,
            }
        })
        .collect()
}

fn sweep_charts(r: &Results) -> Vec<Chart> {
    let mut charts = Vec::new();
    for (tag, x_label, key) in [
        (Tag::NSweep, "N (checkpoints merged)", 0),
        (Tag::VSweep, "V (steps between merged checkpoints)", 1),
    ] {
        let series = merge_steps(r, RunId::Trunk, tag)
            .into_iter()
            .flat_map(|step| {
                let mut pts: Vec<(f64, f64)> = r
                    .merges_tagged(tag)
                    .filter(|m| m.run == RunId::Trunk && m.step == step)
                    .map(|m| {
                        (
                            if key == 0 {
                                m.n as f64
                            } else {
                                m.interval as f64
                            },
                            m.val_loss,
                        )
                    })
                    .collect();
                pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                let x_of = |m: &crate::results::MergeRecord| {
                    if key == 0 {
                        m.n as u64
                    } else {
                        m.interval
                    }
                };
                let spread = band(
                    &format!("step {step}: seeds' min to max"),
                    &per_x(seed_runs(r).iter().flat_map(|s| {
                        s.merges
                            .iter()
                            .filter(|m| m.has_tag(tag) && m.run == RunId::Trunk && m.step == step)
                            .map(|m| (x_of(m), m.val_loss))
                    })),
                    1.0,
                );
                spread.into_iter().chain(std::iter::once(Series {
                    label: format!("SMA ending at step {step}"),
                    points: pts,
                    mark: Mark::LineDots,
                }))
            })
            .collect();
        charts.push(Chart {
            title: if key == 0 {
                "N sweep (V = K)".into()
            } else {
                "V sweep (fixed N)".into()
            },
            x_label: x_label.into(),
            y_label: "val loss (nats/byte)".into(),
            series,
        });
    }
    charts
}

fn prediction_chart(r: &Results) -> Chart {
    type Pick = fn(&crate::results::PredictionRecord) -> f64;
    let pick = |f: Pick| -> Vec<(f64, f64)> {
        r.predictions
            .iter()
            .filter(|p| p.run == RunId::Trunk)
            .map(|p| (p.tokens as f64 / 1e6, f(p)))
            .collect()
    };
    // Across seeds, keyed by token count (the same grid in every seed).
    let spread = |f: Pick, label: &str| {
        band(
            label,
            &per_x(seed_runs(r).iter().flat_map(|s| {
                s.predictions
                    .iter()
                    .filter(|p| p.run == RunId::Trunk)
                    .map(move |p| (p.tokens, f(p)))
            })),
            1e6,
        )
    };
    let lines: [(&str, Pick); 3] = [
        ("raw (constant LR)", |p| p.raw_loss),
        ("best merge (constant LR)", |p| p.merge_loss),
        ("annealed", |p| p.annealed_loss),
    ];
    let mut series = Vec::new();
    for (label, f) in lines {
        series.extend(spread(f, &format!("{label}: seeds' min to max")));
        series.push(Series {
            label: label.into(),
            points: pick(f),
            mark: Mark::LineDots,
        });
    }
    Chart {
        title: "Annealing prediction at matched token counts (dense trunk)".into(),
        x_label: "training tokens (millions)".into(),
        y_label: "val loss (nats/byte)".into(),
        series,
    }
}

/// One line per annealing fork of `base_run`: its starting checkpoint, then its own checkpoints.
fn annealed_series(r: &Results, base_run: RunId, label: &str) -> Vec<Series> {
    r.annealed
        .iter()
        .filter(|a| a.base_run == base_run)
        .map(|a| {
            let mut points: Vec<(f64, f64)> = r
                .checkpoint(base_run, a.from_step)
                .map(|c| (c.global_step as f64, c.val_loss))
                .into_iter()
                .collect();
            points.extend(
                r.checkpoints
                    .iter()
                    .filter(|c| c.run == a.run)
                    .map(|c| (c.global_step as f64, c.val_loss)),
            );
            Series {
                label: format!("{label} {}", a.from_step),
                points,
                mark: Mark::LineDots,
            }
        })
        .collect()
}

fn moe_chart(r: &Results) -> Chart {
    let raw: Vec<(f64, f64)> = r
        .checkpoints
        .iter()
        .filter(|c| c.run == RunId::Moe)
        .map(|c| (c.step as f64, c.val_loss))
        .collect();
    let mut series = vec![Series {
        label: "MoE raw checkpoints".into(),
        points: raw,
        mark: Mark::LineDots,
    }];
    series.extend(annealed_series(r, RunId::Moe, "MoE annealed from"));
    for label in grid_labels(r) {
        let pts: Vec<(f64, f64)> = r
            .merges_tagged(Tag::Moe)
            .filter(|m| m.label() == label)
            .map(|m| (m.step as f64, m.val_loss))
            .collect();
        series.push(Series {
            label: format!("MoE merge {label}"),
            points: pts,
            mark: Mark::Dots,
        });
    }
    Chart {
        title: "MoE: validation loss".into(),
        x_label: "step".into(),
        y_label: "val loss (nats/byte)".into(),
        series,
    }
}

/// Held-out loss along continued training: each init's spread over the data orders and its
/// first order.
fn continued_chart(c: &crate::results::ContinuedRecord) -> Chart {
    type Pick = fn(&(u64, f64, f64)) -> f64;
    let inits: [(&str, Pick); 2] = [("from newest raw", |p| p.1), ("from PMA merge", |p| p.2)];
    let mut series = Vec::new();
    for (label, f) in inits {
        series.extend(band(
            &format!("{label}: orders' min to max"),
            &per_x(
                c.orders
                    .iter()
                    .flat_map(|o| o.heldout_curve.iter().map(move |p| (p.0, f(p)))),
            ),
            1.0,
        ));
        series.push(Series {
            label: format!("{label} (order 0)"),
            points: c.orders.first().map_or(Vec::new(), |o| {
                o.heldout_curve.iter().map(|p| (p.0 as f64, f(p))).collect()
            }),
            mark: Mark::LineDots,
        });
    }
    Chart {
        title: "Continued training: held-out loss".into(),
        x_label: "continued-training step".into(),
        y_label: "held-out loss (nats/byte)".into(),
        series,
    }
}

fn curve_chart(
    r: &Results,
    runs: &[(RunId, &str)],
    title: &str,
    grad_norm: bool,
    global: bool,
) -> Chart {
    let series = runs
        .iter()
        .filter_map(|(name, label)| {
            let run = r.run(*name)?;
            let off = if global { run.step_offset } else { 0 };
            Some(Series {
                label: (*label).into(),
                points: run
                    .curve
                    .iter()
                    .map(|c| {
                        (
                            (c.step + off) as f64,
                            if grad_norm { c.grad_norm } else { c.loss },
                        )
                    })
                    .collect(),
                mark: Mark::Line,
            })
        })
        .collect();
    Chart {
        title: title.into(),
        x_label: if global {
            "step (spiking run's count)".into()
        } else {
            "step".into()
        },
        y_label: if grad_norm {
            "grad norm (L2)".into()
        } else {
            "train loss (nats/byte)".into()
        },
        series,
    }
}

#[cfg(test)]
mod tests {
    use plotters::coord::ranged1d::Ranged;
    use plotters::coord::types::RangedCoordf64;

    use super::*;

    #[test]
    fn tick_labels_tell_ticks_apart() {
        // The prediction chart's token axis: 0.1 .. 0.3 million tokens.
        assert_eq!(axis_decimals(0.1, 0.3), 2);
        assert_eq!(axis_decimals(0.0, 2.4), 1);
        assert_eq!(axis_decimals(0.0, 12_000.0), 0);
        // Ten ticks 0.05 apart fit in 0.488..0.997 (a grad-norm axis).
        assert_eq!(axis_decimals(0.488, 0.997), 2);
        assert_eq!(axis_decimals(1.6, 1.75), 2);
        assert_eq!(axis_decimals(3.0, 3.0), 0);
        // Against the ticks plotters itself places: every label distinct.
        for (lo, hi) in [
            (0.1, 0.3),
            (0.0, 2.4),
            (1.62, 1.71),
            (-0.004, 0.013),
            (0.0, 9e5),
            (0.488, 0.997),
        ] {
            let d = axis_decimals(lo, hi);
            let ticks = RangedCoordf64::from(lo..hi).key_points(AXIS_LABELS);
            assert!(ticks.len() >= 3, "{lo}..{hi}: {ticks:?}");
            let labels: Vec<String> = ticks.iter().map(|t| format!("{t:.d$}")).collect();
            let mut unique = labels.clone();
            unique.dedup();
            assert_eq!(unique, labels, "{lo}..{hi}");
        }
    }

    #[test]
    fn one_point_gets_an_axis_its_labels_can_tell_apart() {
        let series = [Series {
            label: "one fork".into(),
            points: vec![(0.4096, 1.7)],
            mark: Mark::Dots,
        }];
        let ((x0, x1), (y0, y1)) = bounds(&series).unwrap();
        assert!(x0 < 0.4096 && 0.4096 < x1 && y0 < 1.7 && 1.7 < y1);
        for (lo, hi) in [(x0, x1), (y0, y1)] {
            let d = axis_decimals(lo, hi);
            assert!(d <= 2, "{lo}..{hi}: {d} decimals");
            let ticks = RangedCoordf64::from(lo..hi).key_points(AXIS_LABELS);
            let labels: Vec<String> = ticks.iter().map(|t| format!("{t:.d$}")).collect();
            let mut unique = labels.clone();
            unique.dedup();
            assert!(
                labels.len() >= 3 && unique == labels,
                "{lo}..{hi}: {labels:?}"
            );
        }
    }

    #[test]
    fn renders_a_png_with_the_embedded_font() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.png");
        let chart = Chart {
            title: "Validation loss vs step".into(),
            x_label: "step".into(),
            y_label: "loss".into(),
            series: vec![
                Series {
                    label: "a".into(),
                    points: vec![(0.0, 2.0), (1.0, 1.5), (2.0, f64::NAN), (3.0, 1.2)],
                    mark: Mark::LineDots,
                },
                Series {
                    label: "b".into(),
                    points: vec![(1.0, 1.4)],
                    mark: Mark::Dots,
                },
            ],
        };
        draw_charts(&path, &[chart]).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        let table = HeatTable {
            title: "t".into(),
            columns: vec!["N = 3".into()],
            rows: vec![(
                "sma".into(),
                vec![HeatCell {
                    text: "1.0".into(),
                    delta: Some(-0.1),
                }],
            )],
        };
        let path = dir.path().join("h.png");
        draw_heat_tables(&path, &[table], "footer").unwrap();
        assert_eq!(&std::fs::read(&path).unwrap()[1..4], b"PNG");
    }
}
