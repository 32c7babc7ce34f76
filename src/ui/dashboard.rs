//! The live dashboard: loss, learning rate, gradient norm, diff-norm histogram, progress,
//! event log, buttons, and the quit dialog.

use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Direction, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Clear, Paragraph, Widget, Wrap};

use super::plot::{Layer, Plot, PlotKind};
use super::{block, button_row, centered, put};
use crate::app::dashboard::{heat_columns, MarkKind, Panel, PositionCurve, Status};
use crate::app::{App, Button, Dashboard, Dialog, Mode};
use crate::events::{LayerStat, Level};
use crate::sinks::human::si;

pub const TRAIN: Color = Color::Cyan;
pub const EVAL: Color = Color::LightRed;
pub const LR: Color = Color::LightGreen;
pub const GRAD: Color = Color::LightMagenta;
pub const MARK: Color = Color::Yellow;

pub struct Areas {
    pub header: Rect,
    pub loss: Rect,
    pub lr: Rect,
    pub grad: Rect,
    pub hist: Rect,
    pub progress: Rect,
    pub log: Rect,
    pub buttons: Rect,
}

pub fn areas(area: Rect) -> Areas {
    let rows = Layout::default()
        .direction(Direction::Vertical)
        .constraints([Constraint::Length(1), Constraint::Min(8), Constraint::Length(1)])
        .split(area);
    let body = Layout::default()
        .direction(Direction::Vertical)
        .constraints([Constraint::Percentage(60), Constraint::Percentage(40)])
        .split(rows[1]);
    let top = Layout::default()
        .direction(Direction::Horizontal)
        .constraints([Constraint::Percentage(55), Constraint::Percentage(45)])
        .split(body[0]);
    let right = Layout::default()
        .direction(Direction::Vertical)
        .constraints([Constraint::Percentage(50), Constraint::Percentage(50)])
        .split(top[1]);
    let bottom = Layout::default()
        .direction(Direction::Horizontal)
        .constraints([Constraint::Percentage(40), Constraint::Percentage(60)])
        .split(body[1]);
    let status = Layout::default()
        .direction(Direction::Vertical)
        .constraints([Constraint::Length(5), Constraint::Min(3)])
        .split(bottom[1]);
    Areas {
        header: rows[0],
        loss: top[0],
        lr: right[0],
        grad: right[1],
        hist: bottom[0],
        progress: status[0],
        log: status[1],
        buttons: rows[2],
    }
}

fn dialog_rect(area: Rect) -> Rect {
    centered(area, 62, 7)
}

fn dialog_buttons(app: &App, area: Rect) -> Vec<(Rect, Button, String)> {
    let r = dialog_rect(area);
    let row = Rect { x: r.x + 2, y: r.y + 4, width: r.width.saturating_sub(4), height: 1 };
    let labels = match app.dialog {
        Some(Dialog::Detach) => vec![
            ("[d] detach".to_string(), Button::DialogStop),
            ("[s] stop run + save".to_string(), Button::DialogSave),
            ("[c] cancel".to_string(), Button::DialogCancel),
        ],
        _ => vec![
            ("[s] stop + save".to_string(), Button::DialogSave),
            ("[d] stop, no save".to_string(), Button::DialogStop),
            ("[c] cancel".to_string(), Button::DialogCancel),
        ],
    };
    button_row(row, &labels)
}

fn bar_buttons(app: &App, d: &Dashboard, area: Rect) -> Vec<(Rect, Button, String)> {
    let a = areas(area);
    let on_off = |b: bool| if b { "on" } else { "off" };
    // every long label fits from 132 columns (the mouse toggle, last, is dropped first)
    let wide = area.width >= 132;
    let pause = match (d.paused, wide) {
        (true, _) => "[p] resume",
        (false, true) => "[p] pause",
        (false, false) => "[p]ause",
    };
    let quit = match (app.mode == Mode::Watching, wide) {
        (true, _) => "[q] detach",
        (false, true) => "[q] quit",
        (false, false) => "[q]uit",
    };
    let labels = if wide {
        vec![
            (pause.to_string(), Button::Pause),
            ("[c] checkpoint".to_string(), Button::Checkpoint),
            ("[l] LR x0.1".to_string(), Button::LowerLr),
            (quit.to_string(), Button::Quit),
            // what the key will do: "now -> after"
            (format!("[y] log-y {} -> {}", on_off(d.view.log_y), on_off(!d.view.log_y)), Button::LogY),
            (format!("[s] smooth {} -> {}", d.view.smoothing, d.view.next_smoothing()), Button::Smoothing),
            (format!("[v] {} -> {}", d.view.panel.label(), d.view.panel.next().label()), Button::Panel),
            (format!("[m] mouse {} -> {}", on_off(app.mouse), on_off(!app.mouse)), Button::Mouse),
        ]
    } else {
        vec![
            (pause.to_string(), Button::Pause),
            ("[c]kpt".to_string(), Button::Checkpoint),
            ("[l]r/10".to_string(), Button::LowerLr),
            (quit.to_string(), Button::Quit),
            (format!("[y]log->{}", on_off(!d.view.log_y)), Button::LogY),
            (format!("[s]mooth->{}", d.view.next_smoothing()), Button::Smoothing),
            (format!("[v]->{}", d.view.panel.next().label()), Button::Panel),
            (format!("[m]ouse->{}", on_off(!app.mouse)), Button::Mouse),
        ]
    };
    // a run that has ended takes no controls: its keys are not offered
    let labels: Vec<(String, Button)> = labels
        .into_iter()
        .filter(|(_, b)| !(d.finished() && matches!(b, Button::Pause | Button::Checkpoint | Button::LowerLr)))
        .collect();
    button_row(a.buttons, &labels)
}

/// Clickable regions: the dialog's when it is open, else the button bar's.
pub fn buttons(app: &App, area: Rect) -> Vec<(Rect, Button)> {
    let Some(d) = app.dash() else { return vec![] };
    let list = if app.dialog.is_some() { dialog_buttons(app, area) } else { bar_buttons(app, d, area) };
    list.into_iter().map(|(r, b, _)| (r, b)).collect()
}

fn status_text(d: &Dashboard) -> (String, Color) {
    match &d.status {
        Status::Preparing { stage, done, total } if *total > 0 && done < total => {
            (format!("preparing: {stage} {:.0}%", 100.0 * *done as f64 / *total as f64), Color::Yellow)
        }
        Status::Preparing { stage, .. } => (format!("preparing: {stage}"), Color::Yellow),
        Status::Training => ("training".into(), Color::Green),
        Status::Paused => ("PAUSED".into(), Color::Yellow),
        Status::Finished { status } => (format!("{status} - q to exit"), Color::Cyan),
        Status::Failed(_) => ("FAILED - see the log, q to exit".into(), Color::Red),
    }
}

fn render_header(app: &App, d: &Dashboard, area: Rect, buf: &mut Buffer) {
    let (status, color) = status_text(d);
    let mut spans = vec![
        Span::styled(" difflab ", Style::default().add_modifier(Modifier::BOLD).fg(Color::Black).bg(Color::Cyan)),
        Span::raw(" "),
    ];
    spans.push(Span::styled(d.title.clone(), Style::default().add_modifier(Modifier::BOLD)));
    spans.push(Span::raw(" "));
    spans.push(Span::styled(status, Style::default().fg(color).add_modifier(Modifier::BOLD)));
    if app.mode == Mode::Watching {
        spans.push(Span::styled(" (watching)", Style::default().fg(Color::Yellow)));
    }
    if let Some(b) = &d.begin {
        let world = if b.world_size > 1 { format!(" x{} {}", b.world_size, b.backend) } else { String::new() };
        let device = if area.width >= 100 { format!(" | {} | {}{world}", b.device, b.engine) } else { String::new() };
        spans.push(Span::raw(format!(" | {} | {} params{device}", b.variant, si(b.num_parameters as f64))));
    }
    Paragraph::new(Line::from(spans)).render(area, buf);
}

fn marks(d: &Dashboard, kinds: &[MarkKind]) -> Vec<(f64, Color)> {
    d.marks.iter().filter(|(_, k)| kinds.contains(k)).map(|(s, _)| (*s as f64, MARK)).collect()
}

fn points_for(width: u16) -> usize {
    (width as usize).saturating_sub(10) * 2
}

fn render_loss(app: &App, d: &Dashboard, area: Rect, buf: &mut Buffer) {
    let n = points_for(area.width);
    let mut layers = vec![];
    let smooth = d.view.smoothing > 0.0;
    layers.push(Layer { points: d.loss.envelope(n), color: TRAIN, kind: PlotKind::Line, faint: smooth });
    if smooth {
        let sm = d.loss.smoothed(d.view.smoothing);
        let step = sm.len().div_ceil(n.max(1)).max(1);
        layers.push(Layer {
            points: sm.into_iter().step_by(step).collect(),
            color: TRAIN,
            kind: PlotKind::Line,
            faint: false,
        });
    }
    layers.push(Layer { points: d.eval.envelope(n), color: EVAL, kind: PlotKind::Points, faint: false });
    let last = match (d.last_loss, d.eval_loss) {
        (Some(l), Some(e)) => format!(" train {l:.4}  eval {e:.4}{} ", if d.eval_partial { " (partial)" } else { "" }),
        (Some(l), None) => format!(" train {l:.4} "),
        _ => String::new(),
    };
    let title = format!(" loss{} {last}", if d.view.log_y { " (log)" } else { "" });
    let plot = Plot {
        title,
        layers,
        hlines: vec![],
        vmarks: marks(d, &[MarkKind::LrChange, MarkKind::Pause]),
        log_y: d.view.log_y,
        ascii: app.ascii,
        sci: false,
        empty: "waiting for the first step".into(),
        y_cap: None,
        border: TRAIN,
    };
    (&plot).render(area, buf);
}

fn render_lr(app: &App, d: &Dashboard, area: Rect, buf: &mut Buffer) {
    // the title fits its border: the long form where there is room
    let lr = d.last_lr.map_or(String::new(), |l| format!("{l:.2e}"));
    let long = format!(" (x{} by control)", d.lr_scale);
    let scale = match d.lr_scale != 1.0 {
        true if format!(" learning rate {lr}{long} ").chars().count() + 2 <= area.width as usize => long,
        true => format!(" (x{})", d.lr_scale),
        false => String::new(),
    };
    let plot = Plot {
        title: format!(" learning rate {lr}{scale} "),
        layers: vec![Layer {
            points: d.lr.envelope(points_for(area.width)),
            color: LR,
            kind: PlotKind::Line,
            faint: false,
        }],
        hlines: vec![],
        vmarks: marks(d, &[MarkKind::LrChange]),
        log_y: false,
        ascii: app.ascii,
        sci: true,
        empty: "-".into(),
        y_cap: None,
        border: LR,
    };
    (&plot).render(area, buf);
}

fn render_grad(app: &App, d: &Dashboard, area: Rect, buf: &mut Buffer) {
    let clip = d.max_grad_norm();
    let plot = Plot {
        title: format!(
            " grad norm {}{} ",
            d.last_grad_norm.map_or(String::new(), |g| format!("{g:.3}")),
            clip.map_or(String::new(), |c| format!("  (clip at {c})"))
        ),
        layers: vec![Layer {
            points: d.grad_norm.envelope(points_for(area.width)),
            color: GRAD,
            kind: PlotKind::Line,
            faint: false,
        }],
        hlines: clip.map(|c| vec![(c, Color::Red)]).unwrap_or_default(),
        vmarks: marks(d, &[MarkKind::Checkpoint]),
        log_y: d.view.log_y,
        ascii: app.ascii,
        sci: false,
        empty: "-".into(),
        y_cap: None,
        border: GRAD,
    };
    (&plot).render(area, buf);
}

/// The lower-left panel: the diff-norm histogram, its heat map over time, or the layers.
fn render_panel(app: &App, d: &Dashboard, area: Rect, buf: &mut Buffer) {
    let title = match d.view.panel {
        Panel::Histogram => " diff-norm ||e_t - e_(t-1)|| ",
        Panel::HeatMap => " diff-norm over steps ",
        Panel::Layers => " layers: grad, update/w ",
        Panel::Positions => " eval loss by position ",
    };
    let frame = block(title, Color::Blue, app.ascii);
    let inner = frame.inner(area);
    frame.render(area, buf);
    if inner.height < 2 || inner.width < 10 {
        return;
    }
    let dim = Style::default().fg(Color::DarkGray);
    if d.view.panel == Panel::Layers {
        return render_layers(app, d, inner, buf);
    }
    if d.view.panel == Panel::Positions {
        return render_positions(app, d, area, buf);
    }
    if d.begin.is_some() && !d.is_differential() {
        Paragraph::new("does not apply: baseline run (research false)")
            .style(dim)
            .wrap(Wrap { trim: true })
            .render(inner, buf);
        return;
    }
    let Some(s) = &d.diff else {
        Paragraph::new("waiting for the first step").style(dim).render(inner, buf);
        return;
    };
    let stats = if inner.width >= 50 {
        format!("step {} mean {:.3} std {:.3} min {:.3} max {:.3}", s.step, s.mean, s.std, s.min, s.max)
    } else if inner.width >= 31 {
        format!("mean {:.3} sd {:.3} [{:.2},{:.2}]", s.mean, s.std, s.min, s.max)
    } else {
        format!("{:.3}±{:.3} [{:.2},{:.2}]", s.mean, s.std, s.min, s.max)
    };
    put(buf, inner.x, inner.y, &stats, inner.width as usize, Style::default().fg(Color::Gray));
    if d.view.panel == Panel::HeatMap {
        return render_heat(app, d, inner, buf);
    }
    let Some(h) = &s.hist else { return };
    let bars = Rect { x: inner.x, y: inner.y + 1, width: inner.width, height: inner.height - 1 };
    let rows = bars.height.saturating_sub(1) as usize;
    let top = h.counts.iter().copied().max().unwrap_or(1).max(1) as f64;
    let n = h.counts.len().max(1);
    let col_w = (bars.width as usize / n).max(1);
    let levels: Vec<char> =
        if app.ascii { vec![' ', '.', ':', '#'] } else { " ▁▂▃▄▅▆▇█".chars().collect() };
    for (i, c) in h.counts.iter().enumerate() {
        let x = bars.x + (i * col_w) as u16;
        if x >= bars.x + bars.width {
            break;
        }
        // height in eighths (or ASCII thirds) of a row
        let sub = levels.len() - 1;
        let units = ((*c as f64 / top) * (rows * sub) as f64).round() as usize;
        for r in 0..rows {
            let filled = units.saturating_sub(r * sub).min(sub);
            if filled == 0 {
                continue;
            }
            let y = bars.y + (rows - 1 - r) as u16;
            for dx in 0..col_w.saturating_sub(usize::from(col_w > 1)) {
                if let Some(cell) = buf.cell_mut((x + dx as u16, y)) {
                    cell.set_char(levels[filled]).set_style(Style::default().fg(Color::Blue));
                }
            }
        }
    }
    let axis = format!("{:.2}", h.edges.first().copied().unwrap_or(0.0));
    let right = format!("{:.2}", h.edges.last().copied().unwrap_or(0.0));
    let y = bars.y + bars.height - 1;
    put(buf, bars.x, y, &axis, bars.width as usize, dim);
    let rx = (bars.x + bars.width).saturating_sub(right.len() as u16);
    put(buf, rx, y, &right, right.len(), dim);
}

/// The eval loss at each position of the training blocks: the latest evaluation, the first one
/// faint. A curve that falls along the block means the model reads its context.
fn render_positions(app: &App, d: &Dashboard, area: Rect, buf: &mut Buffer) {
    let points = |c: &PositionCurve| c.1.iter().map(|b| ((b.from + b.to) as f64 / 2.0, b.loss)).collect::<Vec<_>>();
    let (layers, title) = match &d.positions {
        Some((first, latest)) => {
            let mut layers = vec![];
            if first.0 != latest.0 {
                layers.push(Layer { points: points(first), color: Color::DarkGray, kind: PlotKind::Line, faint: true });
            }
            layers.push(Layer { points: points(latest), color: EVAL, kind: PlotKind::Line, faint: false });
            let span = latest.1.last().map_or(0, |b| b.to);
            (layers, format!(" eval loss by position 0..{span}: step {} (step {} faint) ", latest.0, first.0))
        }
        None => (vec![], " eval loss by position ".to_string()),
    };
    let plot = Plot {
        title,
        layers,
        hlines: vec![],
        vmarks: vec![],
        log_y: false,
        ascii: app.ascii,
        sci: false,
        empty: "waiting for the first evaluation".into(),
        y_cap: None,
        border: Color::Blue,
    };
    (&plot).render(area, buf);
}

/// Shades from empty to full.
fn shades(ascii: bool) -> Vec<char> {
    if ascii {
        vec![' ', '.', ':', '*', '#']
    } else {
        vec![' ', '░', '▒', '▓', '█']
    }
}

fn shade(levels: &[char], x: f64) -> char {
    let top = levels.len() - 1;
    if x <= 0.0 {
        return levels[0];
    }
    // anything above zero shows: a faint tail must not vanish
    levels[((x * top as f64).ceil() as usize).clamp(1, top)]
}

/// Diff-norm histograms over steps: value upwards, step to the right, darker = more tokens
/// (each column scaled to its own fullest bin).
fn render_heat(app: &App, d: &Dashboard, inner: Rect, buf: &mut Buffer) {
    let dim = Style::default().fg(Color::DarkGray);
    let label_w = 5u16;
    let rows = inner.height.saturating_sub(2) as usize;
    let cols = inner.width.saturating_sub(label_w) as usize;
    let Some(map) = heat_columns(&d.diff_history, cols, rows) else {
        put(buf, inner.x, inner.y + 1, "no histograms yet", inner.width as usize, dim);
        return;
    };
    let levels = shades(app.ascii);
    for (c, column) in map.columns.iter().enumerate() {
        for (r, v) in column.iter().enumerate() {
            let (x, y) = (inner.x + label_w + c as u16, inner.y + 1 + (rows - 1 - r) as u16);
            if let Some(cell) = buf.cell_mut((x, y)) {
                cell.set_char(shade(&levels, *v)).set_style(Style::default().fg(Color::Blue));
            }
        }
    }
    put(buf, inner.x, inner.y + 1, format!("{:.2}", map.hi), label_w as usize - 1, dim);
    put(buf, inner.x, inner.y + rows as u16, format!("{:.2}", map.lo), label_w as usize - 1, dim);
    let axis = format!("step {}..{}", map.steps.0, map.steps.1);
    put(buf, inner.x + label_w, inner.y + inner.height - 1, &axis, cols, dim);
}

/// One row per layer: gradient norm, update/weight ratio, and the ratio over steps as a strip
/// (green within 1e-4..1e-2, around Karpathy's healthy 1e-3; red above, blue below).
fn render_layers(app: &App, d: &Dashboard, inner: Rect, buf: &mut Buffer) {
    let dim = Style::default().fg(Color::DarkGray);
    let Some((step, last)) = d.layer_history.back() else {
        put(buf, inner.x, inner.y, "waiting for the first logged step", inner.width as usize, dim);
        return;
    };
    let name_w = last.iter().map(|l| l.name.len()).max().unwrap_or(4).max(4);
    let head = format!("{:<name_w$} {:>7} {:>7} step {step}", "", "grad", "upd/w");
    put(buf, inner.x, inner.y, &head, inner.width as usize, Style::default().fg(Color::Gray));
    let strip_x = inner.x + (name_w + 17) as u16;
    let strip_w = (inner.x + inner.width).saturating_sub(strip_x) as usize;
    let shown: Vec<&(u64, Vec<LayerStat>)> =
        d.layer_history.iter().skip(d.layer_history.len().saturating_sub(strip_w)).collect();
    let room = inner.height.saturating_sub(1) as usize;
    let cut = last.len() > room;
    let fit = if cut { room.saturating_sub(1) } else { last.len() };
    let levels = shades(app.ascii);
    for (i, layer) in last.iter().take(fit).enumerate() {
        let y = inner.y + 1 + i as u16;
        let row = format!("{:<name_w$} {:>7.1e} {:>7.1e}", layer.name, layer.grad_norm, layer.update_ratio);
        put(buf, inner.x, y, &row, inner.width as usize, Style::default().fg(Color::Gray));
        for (c, (_, layers)) in shown.iter().enumerate() {
            let Some(r) = layers.iter().find(|l| l.name == layer.name).map(|l| l.update_ratio) else { continue };
            let (color, level) = match r {
                r if !r.is_finite() => (Color::Red, 1.0),
                r if r > 1e-2 => (Color::Red, 1.0),
                r if r < 1e-4 => (Color::Blue, 0.25),
                // log10 from -4 to -2 -> a quarter to full
                r => (Color::Green, 0.25 + 0.75 * (r.log10() + 4.0) / 2.0),
            };
            if let Some(cell) = buf.cell_mut((strip_x + c as u16, y)) {
                cell.set_char(shade(&levels, level)).set_style(Style::default().fg(color));
            }
        }
    }
    if cut {
        let more = format!("+{} more (taller terminal)", last.len() - fit);
        put(buf, inner.x, inner.y + inner.height - 1, &more, inner.width as usize, dim);
    }
}

pub fn duration(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

fn render_progress(app: &App, d: &Dashboard, area: Rect, buf: &mut Buffer) {
    let frame = block(" progress ", Color::Gray, app.ascii);
    let inner = frame.inner(area);
    frame.render(area, buf);
    if inner.height == 0 || inner.width < 10 {
        return;
    }
    let total = d.total_steps();
    let frac = if total > 0 { (d.step as f64 / total as f64).clamp(0.0, 1.0) } else { 0.0 };
    if let Status::Preparing { stage, done, total } = &d.status {
        let pct = if *total > 0 { format!(" {:.0}%", 100.0 * *done as f64 / *total as f64) } else { String::new() };
        put(buf, inner.x, inner.y, format!("{stage}{pct}"), inner.width as usize, Style::default().fg(Color::Yellow));
        return;
    }
    let label = format!(" {}/{} ", d.step, total);
    let bar_w = (inner.width as usize).saturating_sub(label.len() + 5);
    let filled = (frac * bar_w as f64).round() as usize;
    let (full, empty) = if app.ascii { ('#', '.') } else { ('█', '░') };
    let bar: String = std::iter::repeat_n(full, filled).chain(std::iter::repeat_n(empty, bar_w - filled)).collect();
    put(buf, inner.x, inner.y, &bar, bar_w, Style::default().fg(Color::Green));
    put(
        buf,
        inner.x + bar_w as u16,
        inner.y,
        format!("{label}{:>3.0}%", frac * 100.0),
        inner.width as usize - bar_w,
        Style::default(),
    );
    let eta = match (&d.status, d.eta_seconds()) {
        (Status::Paused, _) => "paused".into(),
        (Status::Training, Some(e)) => duration(e),
        _ => "-".into(),
    };
    let mut line2 = format!(
        "epoch {:.2} | {} tok/s | ETA {eta} | {} in",
        d.epoch,
        d.tokens_per_second.map_or("-".into(), si),
        duration(d.elapsed)
    );
    if line2.chars().count() > inner.width as usize {
        line2 = format!("ep {:.2} | {} tok/s | ETA {eta}", d.epoch, d.tokens_per_second.map_or("-".into(), si));
    }
    let line3 = format!(
        "eval ppl {} | LR x{} | skipped {}{}",
        d.perplexity.map_or("-".into(), |p| format!("{p:.2}")),
        d.lr_scale,
        d.skipped,
        d.rss_mib.map(|m| format!(" | {m:.0} MiB")).unwrap_or_default()
            + &d.gpu_mib.map(|m| format!(" | GPU {m:.0} MiB")).unwrap_or_default()
    );
    for (i, line) in [line2, line3].iter().enumerate() {
        if (i as u16 + 1) < inner.height {
            put(buf, inner.x, inner.y + 1 + i as u16, line, inner.width as usize, Style::default().fg(Color::Gray));
        }
    }
}

fn render_log(app: &App, d: &Dashboard, area: Rect, buf: &mut Buffer) {
    let title = if d.log_scroll > 0 {
        format!(" events ({} newer below: PgDn) ", d.log_scroll)
    } else {
        " events (PgUp: older) ".to_string()
    };
    let frame = block(title, if d.log_scroll > 0 { Color::Yellow } else { Color::Gray }, app.ascii);
    let inner = frame.inner(area);
    frame.render(area, buf);
    let n = inner.height as usize;
    let lines: Vec<Line> = d
        .log
        .iter()
        .rev()
        .skip(d.log_scroll)
        .take(n)
        .rev()
        .map(|l| {
            let color = match l.level {
                Level::Info => Color::Gray,
                Level::Warning => Color::Yellow,
                Level::Error => Color::Red,
            };
            Line::from(Span::styled(l.text.clone(), Style::default().fg(color)))
        })
        .collect();
    Paragraph::new(lines).render(inner, buf);
}

fn render_dialog(app: &App, area: Rect, buf: &mut Buffer) {
    let r = dialog_rect(area);
    Clear.render(r, buf);
    let (title, question) = match app.dialog {
        Some(Dialog::Detach) => (" leave ", "Detach (the run goes on) or stop the run?"),
        _ => (" quit ", "Stop the run?"),
    };
    block(title, Color::Yellow, app.ascii).render(r, buf);
    put(buf, r.x + 2, r.y + 1, question, r.width as usize - 4, Style::default().add_modifier(Modifier::BOLD));
    // the dialog does not pause anything: say so, so nobody waits on it thinking it does
    let note = "training goes on while this is open";
    put(buf, r.x + 2, r.y + 2, note, r.width as usize - 4, Style::default().fg(Color::Gray));
    for (rect, _, label) in dialog_buttons(app, area) {
        put(buf, rect.x, rect.y, &label, rect.width as usize, Style::default().fg(Color::Black).bg(Color::Yellow));
    }
}

pub fn render(d: &Dashboard, app: &App, area: Rect, buf: &mut Buffer) {
    let a = areas(area);
    render_header(app, d, a.header, buf);
    render_loss(app, d, a.loss, buf);
    render_lr(app, d, a.lr, buf);
    render_grad(app, d, a.grad, buf);
    render_panel(app, d, a.hist, buf);
    render_progress(app, d, a.progress, buf);
    render_log(app, d, a.log, buf);
    let live = !d.finished();
    for (rect, b, label) in bar_buttons(app, d, area) {
        let active =
            live || matches!(b, Button::Quit | Button::LogY | Button::Smoothing | Button::Panel | Button::Mouse);
        let style = if active {
            Style::default().fg(Color::Black).bg(Color::Gray)
        } else {
            Style::default().fg(Color::DarkGray)
        };
        put(buf, rect.x, rect.y, &label, rect.width as usize, style);
    }
    if app.dialog.is_some() {
        render_dialog(app, area, buf);
    }
}
