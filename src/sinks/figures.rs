//! Figures drawn with plotters: loss (train, eval points), learning rate, gradient norm (with
//! the clipping threshold) and the differential-norm histogram. Written as PNGs under
//! `output_dir/figures/` at each evaluation and at the end, and (by the TensorBoard sink) as
//! `figures/*` images.

use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::prelude::*;

use super::Sink;
use crate::atomic_file;
use crate::events::{Event, Histogram};
use crate::series::Series;

pub const WIDTH: u32 = 800;
pub const HEIGHT: u32 = 480;
const FONT: &str = "sans-serif";

pub struct Png {
    pub width: u32,
    pub height: u32,
    pub bytes: Vec<u8>,
}

/// What the figures show, accumulated from events (bounded memory).
#[derive(Debug, Default, Clone)]
pub struct History {
    pub loss: Series,
    pub eval: Series,
    pub lr: Series,
    pub grad_norm: Series,
    pub max_grad_norm: Option<f64>,
    pub hist: Option<(u64, Histogram)>,
    pub title: String,
}

impl History {
    pub fn update(&mut self, event: &Event) {
        match event {
            Event::TrainBegin(b) => {
                self.max_grad_norm = b.config["max_grad_norm"].as_f64();
                self.title = match &b.preset {
                    Some(p) => format!("{p}: {}", b.variant),
                    None => b.variant.clone(),
                };
            }
            Event::Progress(p) => {
                let x = p.step as f64;
                self.loss.push(x, p.loss);
                self.lr.push(x, p.learning_rate);
                self.grad_norm.push(x, p.grad_norm);
                if let Some(h) = &p.diff_norm_hist {
                    self.hist = Some((p.step, h.clone()));
                }
            }
            Event::Evaluate(e) => self.eval.push(e.step as f64, e.eval_loss),
            _ => {}
        }
    }
}

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // DejaVu Sans (Bitstream Vera licence, assets/fonts/LICENSE-DejaVu.txt): no system
        // font lookup, so figures look the same everywhere.
        let _ = plotters::style::register_font(
            FONT,
            FontStyle::Normal,
            include_bytes!("../../assets/fonts/DejaVuSans.ttf"),
        );
    });
}

fn to_io(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

fn encode_png(rgb: &[u8], width: u32, height: u32) -> std::io::Result<Png> {
    let mut bytes = vec![];
    let mut enc = png::Encoder::new(&mut bytes, width, height);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header().map_err(to_io)?.write_image_data(rgb).map_err(to_io)?;
    Ok(Png { width, height, bytes })
}

/// Draws into an RGB buffer with `draw`, then encodes it.
fn render(
    draw: impl FnOnce(DrawingArea<BitMapBackend, plotters::coord::Shift>) -> Result<(), String>,
) -> std::io::Result<Png> {
    register_font();
    let mut rgb = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(to_io)?;
        draw(root.clone()).map_err(to_io)?;
        root.present().map_err(to_io)?;
    }
    encode_png(&rgb, WIDTH, HEIGHT)
}

fn tick(v: f64, sci: bool) -> String {
    if v == 0.0 {
        "0".into()
    } else if sci {
        format!("{v:.1e}")
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn padded(lo: f64, hi: f64) -> (f64, f64) {
    let pad = ((hi - lo) * 0.05).max(hi.abs() * 1e-3).max(1e-12);
    (lo - pad, hi + pad)
}

pub struct Line<'a> {
    pub label: &'a str,
    pub points: Vec<(f64, f64)>,
    pub color: RGBColor,
    pub markers: bool,
}

/// The x axis: optimizer steps, log10 of a learning rate, or named columns at 0, 1, ..
/// (`Extras::categories`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XAxis {
    Steps,
    Log10Lr,
    Categories,
}

/// A shaded region between two curves, `(x, low, high)`: the spread over seeds.
pub struct Band {
    pub points: Vec<(f64, f64, f64)>,
    pub color: RGBColor,
}

/// What a chart may carry besides its lines.
#[derive(Default)]
pub struct Extras<'a> {
    pub bands: Vec<Band>,
    /// A dashed horizontal line and its legend label (the clipping threshold).
    pub threshold: Option<(f64, &'a str)>,
    /// Vertical markers at x, labelled (LR changes, pauses).
    pub marks: Vec<(f64, String)>,
    /// The names of the columns for `XAxis::Categories`.
    pub categories: Vec<String>,
}

pub const BLUE: RGBColor = RGBColor(52, 101, 164);
pub const RED: RGBColor = RGBColor(204, 0, 0);
pub const GREEN: RGBColor = RGBColor(78, 154, 6);
pub const PURPLE: RGBColor = RGBColor(117, 80, 123);
/// Distinct line colours for overlays (sweeps, comparisons).
pub const PALETTE: [RGBColor; 8] = [
    BLUE,
    RED,
    GREEN,
    PURPLE,
    RGBColor(245, 121, 0),
    RGBColor(6, 152, 154),
    RGBColor(196, 160, 0),
    RGBColor(85, 87, 83),
];

fn line_chart(title: &str, y_label: &str, lines: Vec<Line>, threshold: Option<(f64, &str)>) -> std::io::Result<Png> {
    chart(title, XAxis::Steps, y_label, lines, threshold)
}

pub fn chart(
    title: &str,
    x_axis: XAxis,
    y_label: &str,
    lines: Vec<Line>,
    threshold: Option<(f64, &str)>,
) -> std::io::Result<Png> {
    chart_with(title, x_axis, y_label, lines, Extras { threshold, ..Default::default() })
}

pub fn chart_with(title: &str, x_axis: XAxis, y_label: &str, lines: Vec<Line>, extras: Extras) -> std::io::Result<Png> {
    let threshold = extras.threshold;
    let xs = lines.iter().flat_map(|l| l.points.iter().map(|p| p.0));
    let (x_lo, x_hi) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| (a.min(x), b.max(x)));
    let band_ys = extras.bands.iter().flat_map(|b| b.points.iter().flat_map(|p| [p.1, p.2]));
    let ys = lines.iter().flat_map(|l| l.points.iter().map(|p| p.1)).chain(threshold.map(|t| t.0)).chain(band_ys);
    let (y_lo, y_hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| (a.min(y), b.max(y)));
    let (x_lo, x_hi) = match x_axis {
        // a column's points sit at its index: half a column of room each side
        XAxis::Categories => (-0.5, extras.categories.len().max(1) as f64 - 0.5),
        _ if x_lo.is_finite() => (x_lo.min(x_hi - 1.0), x_hi),
        _ => (0.0, 1.0),
    };
    let categories = extras.categories.clone();
    let (y_lo, y_hi) = if y_lo.is_finite() { padded(y_lo, y_hi) } else { (0.0, 1.0) };
    // one number format per axis: scientific when the values are small (learning rates)
    let sci = y_hi.abs().max(y_lo.abs()) < 1e-2;
    render(|root| {
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FONT, 22))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(72)
            .build_cartesian_2d(x_lo..x_hi, y_lo..y_hi)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc(match x_axis {
                XAxis::Steps => "optimizer step",
                XAxis::Log10Lr => "learning rate (log scale)",
                XAxis::Categories => "arm",
            })
            .y_desc(y_label)
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 15))
            .y_label_formatter(&|v| tick(*v, sci))
            .x_labels(if x_axis == XAxis::Categories { categories.len().max(1) } else { 10 })
            .x_label_formatter(&|v| match x_axis {
                XAxis::Steps => format!("{v:.0}"),
                XAxis::Log10Lr => format!("{:.0e}", 10f64.powf(*v)),
                XAxis::Categories => {
                    let i = v.round();
                    if (v - i).abs() < 0.05 && i >= 0.0 {
                        categories.get(i as usize).cloned().unwrap_or_default()
                    } else {
                        String::new()
                    }
                }
            })
            .max_light_lines(1)
            .draw()
            .map_err(|e| e.to_string())?;
        // bands first, under the lines: a polygon from the low edge out and the high edge back
        for band in &extras.bands {
            let outline: Vec<(f64, f64)> =
                band.points.iter().map(|p| (p.0, p.1)).chain(band.points.iter().rev().map(|p| (p.0, p.2))).collect();
            if outline.len() >= 3 {
                chart
                    .draw_series(std::iter::once(Polygon::new(outline, band.color.mix(0.2).filled())))
                    .map_err(|e| e.to_string())?;
            }
        }
        for (x, label) in &extras.marks {
            let grey = RGBColor(136, 138, 133);
            chart
                .draw_series(std::iter::once(PathElement::new(vec![(*x, y_lo), (*x, y_hi)], grey.stroke_width(1))))
                .map_err(|e| e.to_string())?;
            chart
                .draw_series(std::iter::once(Text::new(label.clone(), (*x, y_hi), (FONT, 12).into_font().color(&grey))))
                .map_err(|e| e.to_string())?;
        }
        for line in &lines {
            let color = line.color;
            if line.markers {
                chart
                    .draw_series(line.points.iter().map(|&p| Circle::new(p, 4, color.filled())))
                    .map_err(|e| e.to_string())?
                    .label(line.label)
                    .legend(move |(x, y)| Circle::new((x + 10, y), 4, color.filled()));
            } else {
                chart
                    .draw_series(LineSeries::new(line.points.clone(), color.stroke_width(2)))
                    .map_err(|e| e.to_string())?
                    .label(line.label)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            }
        }
        if let Some((t, label)) = threshold {
            let orange = RGBColor(245, 121, 0);
            let dashes = (0..60).map(|i| x_lo + (x_hi - x_lo) * i as f64 / 60.0).collect::<Vec<_>>();
            chart
                .draw_series(
                    dashes
                        .chunks(2)
                        .filter(|c| c.len() == 2)
                        .map(|c| PathElement::new(vec![(c[0], t), (c[1], t)], orange.stroke_width(2))),
                )
                .map_err(|e| e.to_string())?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 8, y)], orange.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .label_font((FONT, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| e.to_string())
    })
}

fn histogram_chart(title: &str, h: &Histogram) -> std::io::Result<Png> {
    let (lo, hi) = (h.edges.first().copied().unwrap_or(0.0), h.edges.last().copied().unwrap_or(1.0));
    let (lo, hi) = if hi > lo { (lo, hi) } else { (lo - 0.5, hi + 0.5) };
    let top = h.counts.iter().copied().max().unwrap_or(1).max(1) as f64 * 1.1;
    let n = h.counts.iter().sum::<u64>().max(1) as f64;
    let mean = h.sum / n;
    let std = (h.sum_squares / n - mean * mean).max(0.0).sqrt();
    // the legend goes on the side the mass is not on, so it never hides bars
    let legend_at =
        if mean > (lo + hi) / 2.0 { SeriesLabelPosition::UpperLeft } else { SeriesLabelPosition::UpperRight };
    let label = format!("tokens per bin (mean {mean:.3}, std {std:.3})");
    render(|root| {
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FONT, 22))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(60)
            .build_cartesian_2d(lo..hi, 0.0..top)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("L2 norm of d_t = e_t - e_(t-1) over channels")
            .y_desc("tokens (count)")
            .y_label_formatter(&|v| format!("{v:.0}"))
            .max_light_lines(1)
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 15))
            .draw()
            .map_err(|e| e.to_string())?;
        let blue = BLUE;
        chart
            .draw_series(h.counts.iter().enumerate().map(|(i, c)| {
                let (x0, x1) = (h.edges[i], h.edges[i + 1]);
                Rectangle::new([(x0, 0.0), (x1, *c as f64)], blue.mix(0.8).filled())
            }))
            .map_err(|e| e.to_string())?
            .label(label.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], blue.filled()));
        chart
            .configure_series_labels()
            .label_font((FONT, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(legend_at)
            .draw()
            .map_err(|e| e.to_string())
    })
}

/// Every figure the history has data for, as `(name, png)`.
pub fn render_all(h: &History) -> std::io::Result<Vec<(&'static str, Png)>> {
    let mut out = vec![];
    let prefix = if h.title.is_empty() { String::new() } else { format!("{}: ", h.title) };
    if !h.loss.is_empty() {
        let mut lines = vec![Line { label: "train loss", points: h.loss.envelope(1600), color: BLUE, markers: false }];
        if !h.eval.is_empty() {
            lines.push(Line { label: "eval loss", points: h.eval.envelope(400), color: RED, markers: true });
        }
        out.push(("loss", line_chart(&format!("{prefix}loss"), "loss (nats per token)", lines, None)?));
        let lr = vec![Line { label: "learning rate", points: h.lr.envelope(1600), color: GREEN, markers: false }];
        out.push(("learning_rate", line_chart(&format!("{prefix}learning rate"), "learning rate", lr, None)?));
        let gn = vec![Line {
            label: "grad norm (before clipping)",
            points: h.grad_norm.envelope(1600),
            color: PURPLE,
            markers: false,
        }];
        out.push((
            "grad_norm",
            line_chart(
                &format!("{prefix}gradient norm"),
                "global L2 norm",
                gn,
                h.max_grad_norm.map(|t| (t, "clip threshold")),
            )?,
        ));
    }
    if let Some((step, hist)) = &h.hist {
        out.push(("diff_norm_hist", histogram_chart(&format!("{prefix}differential norms at step {step}"), hist)?));
    }
    Ok(out)
}

/// Writes `output_dir/figures/*.png` at each evaluation and at the end.
pub struct Figures {
    dir: PathBuf,
    history: History,
}

impl Figures {
    pub fn new(output_dir: &Path) -> Self {
        Self { dir: output_dir.join("figures"), history: History::default() }
    }

    fn write(&self) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        for (name, png) in render_all(&self.history)? {
            atomic_file::write(&self.dir.join(format!("{name}.png")), &png.bytes)?;
        }
        Ok(())
    }
}

impl Sink for Figures {
    fn handle(&mut self, event: &Event) -> std::io::Result<()> {
        self.history.update(event);
        match event {
            Event::Evaluate(_) | Event::TrainEnd(_) => self.write(),
            _ => Ok(()),
        }
    }
}
