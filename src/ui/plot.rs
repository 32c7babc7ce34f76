//! A line/point chart drawn straight into the buffer: Braille dots (2x4 per cell) or, for
//! terminals without those glyphs, ASCII. Points come from `Series::envelope`, at most a few
//! per column, so a frame costs the same with ten points or a million.

use ratatui::buffer::Buffer;
use ratatui::layout::Rect;
use ratatui::style::{Color, Modifier, Style};
use ratatui::widgets::Widget;

use super::{block, put};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlotKind {
    Line,
    Points,
}

#[derive(Debug, Clone)]
pub struct Layer {
    pub points: Vec<(f64, f64)>,
    pub color: Color,
    pub kind: PlotKind,
    /// Drawn dim (the raw line under a smoothed one).
    pub faint: bool,
}

#[derive(Debug, Clone)]
pub struct Plot {
    pub title: String,
    pub layers: Vec<Layer>,
    /// Horizontal reference lines (a clipping threshold).
    pub hlines: Vec<(f64, Color)>,
    /// Vertical marks at x (a control, a checkpoint).
    pub vmarks: Vec<(f64, Color)>,
    pub log_y: bool,
    pub ascii: bool,
    /// Scientific tick labels (learning rates).
    pub sci: bool,
    pub empty: String,
    pub border: Color,
    /// Upper limit of the y axis (points above are clipped), so one diverged curve does not
    /// flatten the others.
    pub y_cap: Option<f64>,
}

const BRAILLE_BITS: [[u8; 4]; 2] = [[0x01, 0x02, 0x04, 0x40], [0x08, 0x10, 0x20, 0x80]];

pub fn tick(v: f64, sci: bool) -> String {
    if v == 0.0 {
        "0".into()
    } else if sci || v.abs() < 1e-3 || v.abs() >= 1e5 {
        format!("{v:.1e}")
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

struct Canvas {
    w: usize,
    h: usize,
    /// Braille bits and colour per cell (ASCII: a char and colour).
    bits: Vec<u8>,
    chars: Vec<Option<char>>,
    colors: Vec<Option<(Color, bool)>>,
    ascii: bool,
}

impl Canvas {
    fn new(w: usize, h: usize, ascii: bool) -> Self {
        Self { w, h, bits: vec![0; w * h], chars: vec![None; w * h], colors: vec![None; w * h], ascii }
    }

    /// Dot resolution.
    fn dots(&self) -> (usize, usize) {
        if self.ascii {
            (self.w, self.h)
        } else {
            (self.w * 2, self.h * 4)
        }
    }

    fn set(&mut self, dx: i64, dy: i64, color: Color, faint: bool, ch: char) {
        let (dw, dh) = self.dots();
        if dx < 0 || dy < 0 || dx >= dw as i64 || dy >= dh as i64 {
            return;
        }
        let (dx, dy) = (dx as usize, dy as usize);
        let (cx, cy) = if self.ascii { (dx, dy) } else { (dx / 2, dy / 4) };
        let i = cy * self.w + cx;
        if self.ascii {
            self.chars[i] = Some(ch);
        } else {
            self.bits[i] |= BRAILLE_BITS[dx % 2][dy % 4];
        }
        // a faint layer never recolours a cell a bright one already took
        if !(faint && self.colors[i].is_some_and(|(_, f)| !f)) {
            self.colors[i] = Some((color, faint));
        }
    }

    fn line(&mut self, a: (i64, i64), b: (i64, i64), color: Color, faint: bool, ch: char) {
        // Bresenham
        let (mut x0, mut y0) = a;
        let (dx, dy) = ((b.0 - a.0).abs(), -(b.1 - a.1).abs());
        let (sx, sy) = (if a.0 < b.0 { 1 } else { -1 }, if a.1 < b.1 { 1 } else { -1 });
        let mut err = dx + dy;
        loop {
            self.set(x0, y0, color, faint, ch);
            if (x0, y0) == b {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x0 += sx;
            }
            if e2 <= dx {
                err += dx;
                y0 += sy;
            }
        }
    }

    fn draw(&self, area: Rect, buf: &mut Buffer) {
        for cy in 0..self.h {
            for cx in 0..self.w {
                let i = cy * self.w + cx;
                let ch = if self.ascii {
                    match self.chars[i] {
                        Some(c) => c,
                        None => continue,
                    }
                } else if self.bits[i] == 0 {
                    continue;
                } else {
                    char::from_u32(0x2800 + self.bits[i] as u32).unwrap_or(' ')
                };
                let (color, faint) = self.colors[i].unwrap_or((Color::Reset, false));
                let mut style = Style::default().fg(color);
                if faint {
                    style = style.add_modifier(Modifier::DIM);
                }
                if let Some(cell) = buf.cell_mut((area.x + cx as u16, area.y + cy as u16)) {
                    cell.set_char(ch).set_style(style);
                }
            }
        }
    }
}

impl Plot {
    fn y_of(&self, y: f64) -> Option<f64> {
        if self.log_y {
            (y > 0.0).then(|| y.log10())
        } else {
            Some(y)
        }
    }

    fn ranges(&self) -> Option<((f64, f64), (f64, f64))> {
        let pts = self.layers.iter().flat_map(|l| l.points.iter());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
        for &(x, y) in pts {
            if let Some(y) = self.y_of(y).filter(|y| y.is_finite()) {
                x0 = x0.min(x);
                x1 = x1.max(x);
                y0 = y0.min(y);
                y1 = y1.max(y);
            }
        }
        if !x0.is_finite() {
            return None;
        }
        for (y, _) in &self.hlines {
            if let Some(y) = self.y_of(*y) {
                y0 = y0.min(y);
                y1 = y1.max(y);
            }
        }
        if x1 <= x0 {
            x1 = x0 + 1.0;
        }
        if let Some(cap) = self.y_cap.and_then(|c| self.y_of(c)) {
            y1 = y1.min(cap).max(y0);
        }
        // 8% padding so the extremes do not sit on the frame
        let pad = ((y1 - y0) * 0.08).max(y1.abs() * 1e-3).max(1e-12);
        // non-negative data keeps a non-negative axis (an LR never reads below 0)
        let lo = if y0 >= 0.0 && !self.log_y { (y0 - pad).max(0.0) } else { y0 - pad };
        Some(((x0, x1), (lo, y1 + pad)))
    }
}

impl Widget for &Plot {
    fn render(self, area: Rect, buf: &mut Buffer) {
        let frame = block(self.title.as_str(), self.border, self.ascii);
        let inner = frame.inner(area);
        frame.render(area, buf);
        if inner.width < 12 || inner.height < 3 {
            return;
        }
        let Some(((x0, x1), (y0, y1))) = self.ranges() else {
            put(
                buf,
                inner.x + 1,
                inner.y + inner.height / 2,
                &self.empty,
                inner.width as usize - 1,
                Style::default().fg(Color::DarkGray),
            );
            return;
        };
        let label_w = 8u16;
        let plot = Rect { x: inner.x + label_w, y: inner.y, width: inner.width - label_w, height: inner.height - 1 };
        let unlog = |v: f64| if self.log_y { 10f64.powf(v) } else { v };
        // y ticks: top, middle, bottom
        let label_style = Style::default().fg(Color::Gray);
        for (row, v) in [(0, y1), (plot.height / 2, (y0 + y1) / 2.0), (plot.height.saturating_sub(1), y0)] {
            let text = format!("{:>7}", tick(unlog(v), self.sci));
            put(buf, inner.x, plot.y + row, &text, 7, label_style);
        }
        // x ticks: left, middle, right (steps)
        let bottom = inner.y + inner.height - 1;
        let left = format!("{x0:.0}");
        let mid = format!("{:.0}", (x0 + x1) / 2.0);
        let right = format!("{x1:.0}");
        put(buf, plot.x, bottom, &left, plot.width as usize, label_style);
        let mx = plot.x + plot.width / 2 - (mid.len() as u16 / 2).min(plot.width / 2);
        if mx > plot.x + left.len() as u16 + 1 {
            put(buf, mx, bottom, &mid, mid.len(), label_style);
        }
        let rx = (plot.x + plot.width).saturating_sub(right.len() as u16);
        if rx > mx + mid.len() as u16 {
            put(buf, rx, bottom, &right, right.len(), label_style);
        }

        let mut canvas = Canvas::new(plot.width as usize, plot.height as usize, self.ascii);
        let (dw, dh) = canvas.dots();
        let to_dot = |x: f64, y: f64| -> (i64, i64) {
            let fx = (x - x0) / (x1 - x0);
            let fy = (y - y0) / (y1 - y0);
            ((fx * (dw as f64 - 1.0)).round() as i64, ((1.0 - fy) * (dh as f64 - 1.0)).round() as i64)
        };
        for (x, color) in &self.vmarks {
            if *x >= x0 && *x <= x1 {
                let (dx, _) = to_dot(*x, y0);
                canvas.line((dx, 0), (dx, dh as i64 - 1), *color, true, '|');
            }
        }
        for (y, color) in &self.hlines {
            if let Some(y) = self.y_of(*y) {
                let (_, dy) = to_dot(x0, y);
                let mut dx = 0;
                while dx < dw as i64 {
                    canvas.line((dx, dy), ((dx + 1).min(dw as i64 - 1), dy), *color, false, '-');
                    dx += 4;
                }
            }
        }
        for layer in &self.layers {
            let ch = match (layer.kind, layer.faint) {
                (PlotKind::Points, _) => 'o',
                (PlotKind::Line, true) => '.',
                (PlotKind::Line, false) => '*',
            };
            let dots: Vec<(i64, i64)> = layer
                .points
                .iter()
                .filter_map(|&(x, y)| self.y_of(y).filter(|y| y.is_finite()).map(|y| to_dot(x, y)))
                .collect();
            match layer.kind {
                PlotKind::Points => {
                    for &(dx, dy) in &dots {
                        canvas.set(dx, dy, layer.color, layer.faint, ch);
                        if !self.ascii {
                            canvas.set(dx + 1, dy, layer.color, layer.faint, ch);
                            canvas.set(dx, dy + 1, layer.color, layer.faint, ch);
                            canvas.set(dx + 1, dy + 1, layer.color, layer.faint, ch);
                        }
                    }
                }
                PlotKind::Line => {
                    if dots.len() == 1 {
                        canvas.set(dots[0].0, dots[0].1, layer.color, layer.faint, ch);
                    }
                    for w in dots.windows(2) {
                        canvas.line(w[0], w[1], layer.color, layer.faint, ch);
                    }
                }
            }
        }
        canvas.draw(plot, buf);
    }
}
