//! Several curves in one chart (sweep trials, an LR range test, compared runs), with the
//! table and the log below.

use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Direction, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Paragraph, Widget};

use super::plot::{Layer, Plot, PlotKind};
use super::{block, put};
use crate::app::overlay::{Overlay, OverlayKind as View};
use crate::app::App;

pub const COLORS: [Color; 8] = [
    Color::Cyan,
    Color::LightRed,
    Color::LightGreen,
    Color::LightMagenta,
    Color::Yellow,
    Color::LightBlue,
    Color::White,
    Color::Gray,
];

pub fn render(o: &Overlay, app: &App, area: Rect, buf: &mut Buffer) {
    let rows = Layout::default()
        .direction(Direction::Vertical)
        .constraints([Constraint::Length(1), Constraint::Percentage(62), Constraint::Min(4), Constraint::Length(1)])
        .split(area);
    Paragraph::new(Line::from(vec![
        Span::styled(" difflab ", Style::default().add_modifier(Modifier::BOLD).fg(Color::Black).bg(Color::Cyan)),
        Span::raw(" "),
        Span::styled(o.title.clone(), Style::default().add_modifier(Modifier::BOLD)),
        Span::raw(" | "),
        Span::styled(o.status.clone(), Style::default().fg(if o.finished { Color::Cyan } else { Color::Green })),
    ]))
    .render(rows[0], buf);

    (&curves(o, app, rows[1].width)).render(rows[1], buf);

    let bottom = Layout::default()
        .direction(Direction::Horizontal)
        .constraints([Constraint::Percentage(60), Constraint::Percentage(40)])
        .split(rows[2]);
    results(o, app, bottom[0], buf);
    let log = block(" events ", Color::Gray, app.ascii);
    let inner = log.inner(bottom[1]);
    log.render(bottom[1], buf);
    let h = inner.height as usize;
    for (i, line) in o.log.iter().rev().take(h).rev().enumerate() {
        put(buf, inner.x, inner.y + i as u16, line, inner.width as usize, Style::default().fg(Color::Gray));
    }
    let hint = if o.finished {
        "[q] quit  [y] log-y"
    } else if o.kind == View::Sweep {
        "[q] stop the sweep  [y] log-y"
    } else if o.kind == View::Study {
        "[q] stop the study (runs so far are kept; run it again to resume)  [y] log-y"
    } else {
        "[q] quit  [y] log-y"
    };
    put(buf, rows[3].x, rows[3].y, hint, rows[3].width as usize, Style::default().fg(Color::DarkGray));
}

/// The curves: each run's train loss and eval points (a study's arm bands beneath), LR-test and
/// study lines faint.
fn curves(o: &Overlay, app: &App, width: u16) -> Plot {
    let n = (width as usize).saturating_sub(10) * 2;
    let mut layers = vec![];
    // a study's arm bands under its curves: the lowest and highest eval loss over seeds
    for (group, low, high) in o.bands() {
        let color = COLORS[group % COLORS.len()];
        layers.push(Layer { points: low, color, kind: PlotKind::Line, faint: true });
        layers.push(Layer { points: high, color, kind: PlotKind::Line, faint: true });
    }
    for (i, c) in o.curves.iter().enumerate() {
        let color = COLORS[c.group % COLORS.len()];
        layers.push(Layer {
            points: c.loss.envelope(n),
            color,
            kind: PlotKind::Line,
            faint: (o.kind == View::LrFind && i == 0) || o.kind == View::Study,
        });
        if !c.eval.is_empty() {
            layers.push(Layer { points: c.eval.envelope(n), color, kind: PlotKind::Points, faint: false });
        }
    }
    let legend: Vec<String> = o.curves.iter().enumerate().map(|(i, c)| format!("{}:{}", i + 1, c.label)).collect();
    let title = match o.kind {
        View::LrFind => " loss vs log10(learning rate) ".to_string(),
        View::Study => format!(
            " loss (train faint, eval points, band: eval min-max over seeds){}  {} ",
            if o.log_y { " (log)" } else { "" },
            o.arms.iter().enumerate().map(|(i, a)| format!("{}:{a}", i + 1)).collect::<Vec<_>>().join("  ")
        ),
        _ => format!(" loss{}  {} ", if o.log_y { " (log)" } else { "" }, legend.join("  ")),
    };
    Plot {
        title,
        layers,
        hlines: vec![],
        vmarks: o.marks.iter().map(|m| (*m, Color::Yellow)).collect(),
        log_y: o.log_y,
        ascii: app.ascii,
        sci: false,
        empty: "waiting for the first step".into(),
        border: Color::Cyan,
        // a healthy curve starts at its highest: cap the axis a little above the highest start
        y_cap: o
            .curves
            .iter()
            .filter_map(|c| c.loss.buckets().first().map(|b| b.max))
            .reduce(f64::max)
            .map(|m| m * 1.2),
    }
}

/// The results table, the rows that stand for curves in their colours.
fn results(o: &Overlay, app: &App, area: Rect, buf: &mut Buffer) {
    let table = block(" results ", Color::Gray, app.ascii);
    let inner = table.inner(area);
    table.render(area, buf);
    for (i, line) in o.table.iter().enumerate().take(inner.height as usize) {
        // the rows that stand for curves (a finished study's: for arms) take their colours;
        // a finished study's table has a provenance line and a header first, a sweep's a header
        let (first, rows) = match (o.kind, o.finished) {
            (View::Study, true) => (2, o.arms.len()),
            (View::Sweep, true) => (1, o.curves.len()),
            (View::Compare, _) => (1, o.curves.len()),
            (View::LrFind, _) => (0, 0),
            _ => (0, o.curves.len()),
        };
        let color = if (first..first + rows).contains(&i) {
            let k = i - first;
            let group = match o.kind {
                View::Study if o.finished => k,
                _ => o.curves.get(k).map_or(k, |c| c.group),
            };
            COLORS[group % COLORS.len()]
        } else {
            Color::Gray
        };
        put(buf, inner.x, inner.y + i as u16, line, inner.width as usize, Style::default().fg(color));
    }
}
