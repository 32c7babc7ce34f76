//! Figures drawn with plotters: loss (train, eval points), learning rate, gradient norm (with
//! the clipping threshold) and the differential-norm histogram. Written as PNGs under
//! `output_dir/figures/` at each evaluation and at the end, and (by the TensorBoard sink) as
//! `figures/*` images.

use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::prelude::*;

use super::Sink;
use crate::atomic_file;
use crate::events::{ControlAction, Event, Histogram};
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
    /// LR changes, pauses and checkpoints by hand, `(step, "lr x0.1")`, drawn on every chart
    /// (the dashboard's marks). Scheduled checkpoints are left out: they would be a fence.
    pub marks: Vec<(f64, String)>,
    /// The loss by position of the first and the latest evaluation at the training length.
    pub positions: Option<(PositionCurve, PositionCurve)>,
}

/// An evaluation's loss by position: its step and buckets.
pub type PositionCurve = (u64, Vec<crate::events::PositionBucket>);

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
            // the run's curve is at its training length; longer windows are another measure
            Event::Evaluate(e) if e.at_training_length() => {
                self.eval.push(e.step as f64, e.eval_loss);
                if let Some(buckets) = &e.position_loss {
                    let latest = (e.step, buckets.clone());
                    self.positions = Some(match self.positions.take() {
                        Some((first, _)) => (first, latest),
                        None => (latest.clone(), latest),
                    });
                }
            }
            Event::Control(c) => {
                let what = match c.action {
                    ControlAction::ScaleLr => format!("lr x{}", c.lr_scale),
                    ControlAction::Pause => "pause".into(),
                    ControlAction::Checkpoint => "checkpoint".into(),
                    _ => return,
                };
                self.marks.push((c.step as f64, what));
            }
            _ => {}
        }
    }
}

const DEJAVU: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

use bitmap::Bitmap;

mod bitmap {
    use plotters::prelude::{BitMapBackend, DrawingBackend};
    use plotters_backend::{BackendColor, BackendCoord, BackendStyle, BackendTextStyle, DrawingErrorKind};

    /// The bitmap backend with its text drawn here. plotters 0.3.7 places each ab_glyph outline
    /// at the pen position and drops its left side bearing (`px_bounds().min.x`), so a narrow pair
    /// runs together ("learning" read as "leaming"); this draws each glyph at pen + bearing, with
    /// the font's kerning, and hands every other drawing call to plotters' `BitMapBackend`.
    pub struct Bitmap<'a> {
        pub inner: BitMapBackend<'a>,
        pub font: ab_glyph::FontRef<'static>,
    }

    type BitmapError<'a> = DrawingErrorKind<<BitMapBackend<'a> as DrawingBackend>::ErrorType>;

    impl<'a> DrawingBackend for Bitmap<'a> {
        type ErrorType = <BitMapBackend<'a> as DrawingBackend>::ErrorType;

        fn get_size(&self) -> (u32, u32) {
            self.inner.get_size()
        }

        fn ensure_prepared(&mut self) -> Result<(), BitmapError<'a>> {
            self.inner.ensure_prepared()
        }

        fn present(&mut self) -> Result<(), BitmapError<'a>> {
            self.inner.present()
        }

        fn draw_pixel(&mut self, point: BackendCoord, color: BackendColor) -> Result<(), BitmapError<'a>> {
            self.inner.draw_pixel(point, color)
        }

        fn draw_line<S: BackendStyle>(
            &mut self,
            from: BackendCoord,
            to: BackendCoord,
            style: &S,
        ) -> Result<(), BitmapError<'a>> {
            self.inner.draw_line(from, to, style)
        }

        fn draw_rect<S: BackendStyle>(
            &mut self,
            upper_left: BackendCoord,
            bottom_right: BackendCoord,
            style: &S,
            fill: bool,
        ) -> Result<(), BitmapError<'a>> {
            self.inner.draw_rect(upper_left, bottom_right, style, fill)
        }

        fn draw_text<S: BackendTextStyle>(
            &mut self,
            text: &str,
            style: &S,
            pos: BackendCoord,
        ) -> Result<(), BitmapError<'a>> {
            use ab_glyph::{Font, ScaleFont};
            use plotters_backend::text_anchor::{HPos, VPos};
            let color = style.color();
            if color.alpha == 0.0 {
                return Ok(());
            }
            let size = style.size() as f32;
            let font = self.font.as_scaled(size);
            // lay the line out: pen positions with kerning, then the ink's extent
            let mut glyphs = vec![];
            let (mut pen, mut prev) = (0f32, None);
            for c in text.chars() {
                let id = font.glyph_id(c);
                if let Some(p) = prev {
                    pen += font.kern(p, id);
                }
                glyphs.push(id.with_scale_and_position(size, ab_glyph::point(pen, font.ascent())));
                pen += font.h_advance(id);
                prev = Some(id);
            }
            let (width, height) = (pen.ceil() as i32, (font.ascent() - font.descent()).ceil() as i32);
            let dx = match style.anchor().h_pos {
                HPos::Left => 0,
                HPos::Right => -width,
                HPos::Center => -width / 2,
            };
            let dy = match style.anchor().v_pos {
                VPos::Top => 0,
                VPos::Center => -height / 2,
                VPos::Bottom => -height,
            };
            let transform = style.transform();
            let (w, h) = self.get_size();
            for glyph in glyphs {
                let Some(outline) = self.font.outline_glyph(glyph) else { continue };
                let bounds = outline.px_bounds();
                let mut pixels = vec![];
                outline.draw(|x, y, coverage| pixels.push((x, y, coverage)));
                for (x, y, coverage) in pixels {
                    // the glyph's pixel, from its bounds (bearing included) into the line's box
                    let (gx, gy) = (bounds.min.x as i32 + x as i32 + dx, bounds.min.y as i32 + y as i32 + dy);
                    let (tx, ty) = transform.transform(gx, gy);
                    let (px, py) = (pos.0 + tx, pos.1 + ty);
                    if px >= 0 && py >= 0 && (px as u32) < w && (py as u32) < h && coverage > 0.0 {
                        let c = BackendColor { alpha: color.alpha * coverage as f64, rgb: color.rgb };
                        self.inner.draw_pixel((px, py), c)?;
                    }
                }
            }
            Ok(())
        }
    }
}

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // DejaVu Sans (Bitstream Vera licence, assets/fonts/LICENSE-DejaVu.txt): no system
        // font lookup, so figures look the same everywhere.
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, DEJAVU);
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
    draw: impl FnOnce(DrawingArea<Bitmap, plotters::coord::Shift>) -> Result<(), String>,
) -> std::io::Result<Png> {
    register_font();
    let font = ab_glyph::FontRef::try_from_slice(DEJAVU).map_err(to_io)?;
    let mut rgb = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let backend = Bitmap { inner: BitMapBackend::with_buffer(&mut rgb, (WIDTH, HEIGHT)), font };
        let root = backend.into_drawing_area();
        root.fill(&WHITE).map_err(to_io)?;
        draw(root.clone()).map_err(to_io)?;
        root.present().map_err(to_io)?;
    }
    encode_png(&rgb, WIDTH, HEIGHT)
}

/// A tick label with enough decimals to tell ticks `range / 5` apart (two at least).
fn tick(v: f64, sci: bool, range: f64) -> String {
    let decimals = ((-(range / 5.0).log10()).ceil() as i64).clamp(2, 6) as usize;
    if v == 0.0 {
        "0".into()
    } else if sci {
        format!("{v:.1e}")
    } else if v.abs() >= 100.0 && decimals <= 2 {
        format!("{v:.0}")
    } else {
        format!("{v:.decimals$}")
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
    /// log2 of a context length in tokens (points at log2 L, labelled L).
    Log2Length,
    /// A position within a window (tokens of context seen).
    Position,
    /// Training tokens seen.
    Tokens,
    /// Training seconds (pauses excluded).
    Seconds,
}

impl XAxis {
    fn description(self) -> &'static str {
        match self {
            XAxis::Steps => "optimizer step",
            XAxis::Log10Lr => "learning rate (log scale)",
            XAxis::Categories => "arm",
            XAxis::Log2Length => "context length in tokens (log scale)",
            XAxis::Position => "position in the window (tokens of context seen)",
            XAxis::Tokens => "training tokens seen",
            XAxis::Seconds => "training seconds (pauses excluded)",
        }
    }

    /// The tick label at `v` (a column's name for categories).
    fn label(self, v: f64, categories: &[String]) -> String {
        let near = |v: f64| (v - v.round()).abs() < 0.05;
        match self {
            XAxis::Steps | XAxis::Position | XAxis::Seconds => format!("{v:.0}"),
            XAxis::Tokens => crate::sinks::human::si(v),
            // decades as 1e-3; between them two digits, so 10^-2.2 reads 6.3e-3, not 6e-3
            XAxis::Log10Lr if near(v) => format!("{:.0e}", 10f64.powf(v.round())),
            XAxis::Log10Lr => format!("{:.1e}", 10f64.powf(v)),
            // the powers of two only: between them a length label would read as a length
            XAxis::Log2Length if near(v) => format!("{:.0}", 2f64.powf(v.round())),
            XAxis::Categories if near(v) && v.round() >= 0.0 => {
                categories.get(v.round() as usize).cloned().unwrap_or_default()
            }
            XAxis::Log2Length | XAxis::Categories => String::new(),
        }
    }
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
/// Context drawn under the data (a seed's arms joined).
pub const LIGHT_GREY: RGBColor = RGBColor(186, 189, 182);
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

fn line_chart(
    title: &str,
    y_label: &str,
    lines: Vec<Line>,
    threshold: Option<(f64, &str)>,
    marks: &[(f64, String)],
) -> std::io::Result<Png> {
    chart_with(title, XAxis::Steps, y_label, lines, Extras { threshold, marks: marks.to_vec(), ..Default::default() })
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

/// The axes' ranges: the points' (a threshold and bands included), the y range padded; a
/// category axis half a column wider than its columns each side.
fn ranges(x_axis: XAxis, lines: &[Line], extras: &Extras) -> ((f64, f64), (f64, f64)) {
    let xs = lines.iter().flat_map(|l| l.points.iter().map(|p| p.0));
    let (x_lo, x_hi) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| (a.min(x), b.max(x)));
    let band_ys = extras.bands.iter().flat_map(|b| b.points.iter().flat_map(|p| [p.1, p.2]));
    let ys =
        lines.iter().flat_map(|l| l.points.iter().map(|p| p.1)).chain(extras.threshold.map(|t| t.0)).chain(band_ys);
    let (y_lo, y_hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), y| (a.min(y), b.max(y)));
    let x = match x_axis {
        // a column's points sit at its index: half a column of room each side
        XAxis::Categories => (-0.5, extras.categories.len().max(1) as f64 - 0.5),
        // a quarter of a doubling of room each side: the end points are not on the frame
        XAxis::Log2Length if x_lo.is_finite() => (x_lo - 0.25, x_hi + 0.25),
        // a tenth of a decade each side: the first and last learning rates and their labels show
        XAxis::Log10Lr if x_lo.is_finite() => (x_lo - 0.1, x_hi + 0.1),
        _ if x_lo.is_finite() => (x_lo.min(x_hi - 1.0), x_hi),
        _ => (0.0, 1.0),
    };
    let y = if y_lo.is_finite() { padded(y_lo, y_hi) } else { (0.0, 1.0) };
    (x, y)
}

pub fn chart_with(title: &str, x_axis: XAxis, y_label: &str, lines: Vec<Line>, extras: Extras) -> std::io::Result<Png> {
    let threshold = extras.threshold;
    let ((x_lo, x_hi), (y_lo, y_hi)) = ranges(x_axis, &lines, &extras);
    let categories = extras.categories.clone();
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
            .x_desc(x_axis.description())
            .y_desc(y_label)
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 15))
            .y_label_formatter(&|v| tick(*v, sci, y_hi - y_lo))
            .x_labels(match x_axis {
                XAxis::Categories => categories.len().max(1),
                // one label a doubling, at the lengths themselves
                XAxis::Log2Length => ((x_hi - x_lo).round() as usize + 1).max(2),
                _ => 10,
            })
            .x_label_formatter(&|v| x_axis.label(*v, &categories))
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
        draw_marks(&mut chart, &extras.marks, (x_lo, x_hi), (y_lo, y_hi))?;
        for line in &lines {
            let color = line.color;
            if line.markers {
                // points in order are joined thinly: a seed across arms, evaluations over steps
                if line.points.len() > 1 {
                    chart
                        .draw_series(LineSeries::new(line.points.clone(), color.mix(0.6).stroke_width(1)))
                        .map_err(|e| e.to_string())?;
                }
                chart
                    .draw_series(line.points.iter().map(|&p| Circle::new(p, 4, color.filled())))
                    .map_err(|e| e.to_string())?
                    .label(line.label)
                    .legend(move |(x, y)| Circle::new((x + 10, y), 4, color.filled()));
            } else {
                let series = chart
                    .draw_series(LineSeries::new(line.points.clone(), color.stroke_width(2)))
                    .map_err(|e| e.to_string())?;
                // an unlabelled line (one of several alike) has no legend entry of its own
                if !line.label.is_empty() {
                    series
                        .label(line.label)
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
                }
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
            .position(legend_corner(&lines, &extras.bands, threshold.is_some(), (x_lo, x_hi), (y_lo, y_hi)))
            .draw()
            .map_err(|e| e.to_string())
    })
}

type Chart<'a, 'b> = ChartContext<
    'a,
    Bitmap<'b>,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

/// Vertical markers with their labels. A mark's label goes a row lower than the one before it
/// when they would overlap (marks of several runs at one step), so none is printed over another.
fn draw_marks(
    chart: &mut Chart,
    marks: &[(f64, String)],
    (x_lo, x_hi): (f64, f64),
    (y_lo, y_hi): (f64, f64),
) -> Result<(), String> {
    let mut marks = marks.to_vec();
    marks.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (mut row, mut last_x) = (0usize, f64::NEG_INFINITY);
    for (x, label) in &marks {
        let grey = RGBColor(136, 138, 133);
        row = if (x - last_x).abs() < 0.12 * (x_hi - x_lo) { row + 1 } else { 0 };
        last_x = *x;
        let y = y_hi - (y_hi - y_lo) * 0.045 * row as f64;
        chart
            .draw_series(std::iter::once(PathElement::new(vec![(*x, y_lo), (*x, y_hi)], grey.stroke_width(1))))
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(std::iter::once(Text::new(label.clone(), (*x, y), (FONT, 12).into_font().color(&grey))))
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The corner whose legend box would cover the fewest drawn points (lines sampled along their
/// segments, bands at their edges), upper right on a tie: a legend never hides the curve's end
/// where another corner is free.
fn legend_corner(
    lines: &[Line],
    bands: &[Band],
    has_threshold: bool,
    (x_lo, x_hi): (f64, f64),
    (y_lo, y_hi): (f64, f64),
) -> SeriesLabelPosition {
    // the box in fractions of the plot (about 700 x 390 px): 7.5 px a character plus the
    // swatch, 20 px a row
    let rows = lines.iter().filter(|l| !l.label.is_empty()).count() + usize::from(has_threshold);
    let longest = lines.iter().map(|l| l.label.chars().count()).max().unwrap_or(0);
    let (w, h) = (((longest as f64 * 7.5 + 50.0) / 700.0).min(1.0), ((rows as f64 * 20.0 + 16.0) / 390.0).min(1.0));
    let mut points: Vec<(f64, f64)> = vec![];
    for l in lines {
        points.extend(&l.points);
        if !l.markers || l.points.len() > 1 {
            for p in l.points.windows(2) {
                points.extend((1..8).map(|k| {
                    let t = k as f64 / 8.0;
                    (p[0].0 + t * (p[1].0 - p[0].0), p[0].1 + t * (p[1].1 - p[0].1))
                }));
            }
        }
    }
    points.extend(bands.iter().flat_map(|b| b.points.iter().flat_map(|p| [(p.0, p.1), (p.0, p.2)])));
    let fraction = |(x, y): (f64, f64)| ((x - x_lo) / (x_hi - x_lo), (y - y_lo) / (y_hi - y_lo));
    let covered = |left: bool, top: bool| {
        points
            .iter()
            .map(|p| fraction(*p))
            .filter(|(fx, fy)| {
                let in_x = if left { *fx <= w } else { *fx >= 1.0 - w };
                let in_y = if top { *fy >= 1.0 - h } else { *fy <= h };
                in_x && in_y
            })
            .count()
    };
    [
        (SeriesLabelPosition::UpperRight, false, true),
        (SeriesLabelPosition::UpperLeft, true, true),
        (SeriesLabelPosition::LowerRight, false, false),
        (SeriesLabelPosition::LowerLeft, true, false),
    ]
    .into_iter()
    .min_by_key(|(_, left, top)| covered(*left, *top))
    .map_or(SeriesLabelPosition::UpperRight, |c| c.0)
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
        // the same on a log axis (plotted as log10 of the loss): the late, small gains show
        let log_lines: Vec<Line> = lines
            .iter()
            .map(|l| Line {
                label: l.label,
                points: l.points.iter().filter(|p| p.1 > 0.0).map(|p| (p.0, p.1.log10())).collect(),
                color: l.color,
                markers: l.markers,
            })
            .collect();
        out.push(("loss", line_chart(&format!("{prefix}loss"), "loss (nats per token)", lines, None, &h.marks)?));
        out.push((
            "loss_log",
            line_chart(
                &format!("{prefix}loss, log scale"),
                "log10 of the loss (nats per token)",
                log_lines,
                None,
                &h.marks,
            )?,
        ));
        let lr = vec![Line { label: "learning rate", points: h.lr.envelope(1600), color: GREEN, markers: false }];
        out.push((
            "learning_rate",
            line_chart(&format!("{prefix}learning rate"), "learning rate", lr, None, &h.marks)?,
        ));
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
                &h.marks,
            )?,
        ));
    }
    if let Some((step, hist)) = &h.hist {
        out.push(("diff_norm_hist", histogram_chart(&format!("{prefix}differential norms at step {step}"), hist)?));
    }
    if let Some((first, latest)) = &h.positions {
        out.push((
            "position_loss",
            position_chart(&format!("{prefix}eval loss by position in the block"), first, latest)?,
        ));
    }
    Ok(out)
}

/// The eval loss at each position of the training length's blocks: the latest evaluation, and
/// the first (faint) for what training changed. Does the model use its context? The curve
/// falls along the block if it does.
fn position_chart(title: &str, first: &PositionCurve, latest: &PositionCurve) -> std::io::Result<Png> {
    let points = |c: &PositionCurve| c.1.iter().map(|b| ((b.from + b.to) as f64 / 2.0, b.loss)).collect::<Vec<_>>();
    let (first_label, latest_label) = (format!("step {}", first.0), format!("step {}", latest.0));
    let mut lines = vec![];
    if first.0 != latest.0 {
        lines.push(Line { label: &first_label, points: points(first), color: PALETTE[7], markers: false });
    }
    lines.push(Line { label: &latest_label, points: points(latest), color: RED, markers: true });
    chart_with(title, XAxis::Position, "eval loss (nats per token)", lines, Extras::default())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{ControlOrigin, ControlRecord};

    /// Log-LR ticks between decades carry two digits: 10^-2.2 is 6.3e-3, not "6e-3".
    #[test]
    fn lr_ticks_name_the_value_they_stand_at() {
        let label = |v: f64| XAxis::Log10Lr.label(v, &[]);
        assert_eq!(label(-3.0), "1e-3");
        assert_eq!(label(-2.2), "6.3e-3");
        assert_eq!(label(-2.8), "1.6e-3");
    }

    /// A curve rising to the top right (extrapolation losses) keeps the legend out of its way;
    /// a falling loss curve leaves the upper right free.
    #[test]
    fn the_legend_goes_to_the_emptiest_corner() {
        let line = |points: Vec<(f64, f64)>| Line { label: "rope=true (mean)", points, color: BLUE, markers: true };
        let rising = [line(vec![(0.0, 1.41), (1.0, 1.41), (2.0, 1.43), (3.0, 1.51)])];
        let at = |lines: &[Line]| legend_corner(lines, &[], false, (-0.25, 3.25), (1.40, 1.52));
        assert!(!matches!(at(&rising), SeriesLabelPosition::UpperRight), "over the curve's end");
        let falling = [line(vec![(0.0, 1.51), (1.0, 1.45), (2.0, 1.42), (3.0, 1.41)])];
        assert!(matches!(at(&falling), SeriesLabelPosition::UpperRight));
    }

    /// Runs of inked columns in a 40 x 24 drawing of `text` at 14 px.
    fn ink_runs(text: &str, ours: bool) -> usize {
        register_font();
        let mut rgb = vec![255u8; 40 * 24 * 3];
        {
            let style = TextStyle::from((FONT, 14)).color(&BLACK);
            let inner = BitMapBackend::with_buffer(&mut rgb, (40, 24));
            if ours {
                let font = ab_glyph::FontRef::try_from_slice(DEJAVU).unwrap();
                let mut b = Bitmap { inner, font };
                b.draw_text(text, &style, (4, 4)).unwrap();
                b.present().unwrap();
            } else {
                let mut b = inner;
                b.draw_text(text, &style, (4, 4)).unwrap();
                b.present().unwrap();
            }
        }
        let inked: Vec<bool> = (0..40).map(|x| (0..24).any(|y| rgb[(y * 40 + x) * 3] < 160)).collect();
        inked.windows(2).filter(|w| w[1] && !w[0]).count() + usize::from(inked[0])
    }

    #[test]
    fn r_and_n_stay_two_letters() {
        // plotters' own drawing drops the left side bearing: "rn" inks as one run ("m")
        assert_eq!(ink_runs("rn", false), 1, "the plotters bug this works around is still there");
        assert_eq!(ink_runs("rn", true), 2, "drawn with its bearing, r and n have a gap");
    }

    #[test]
    fn hand_made_lr_changes_and_pauses_are_marked_and_a_log_loss_figure_is_drawn() {
        let mut h = History::default();
        for step in 1..=20u64 {
            h.update(&Event::Progress(crate::events::StepRecord {
                step,
                loss: 5.0 / step as f64,
                learning_rate: 1e-3,
                grad_norm: 1.0,
                tokens_per_second: 1.0,
                ..Default::default()
            }));
        }
        let control =
            |step, action| Event::Control(ControlRecord { step, action, lr_scale: 0.1, origin: ControlOrigin::Ui });
        h.update(&control(8, ControlAction::ScaleLr));
        h.update(&control(12, ControlAction::Pause));
        h.update(&control(13, ControlAction::Resume));
        assert_eq!(h.marks, vec![(8.0, "lr x0.1".to_string()), (12.0, "pause".to_string())]);
        let names: Vec<&str> = render_all(&h).unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["loss", "loss_log", "learning_rate", "grad_norm"]);
    }
}
