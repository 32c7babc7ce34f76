//! The view: a pure function of `&App` into a frame. Never mutates state, never sees a
//! channel. Layout is computed by functions the event loop shares for mouse hit-testing.

pub mod dashboard;
pub mod overlay;
pub mod picker;
pub mod plot;

use ratatui::buffer::Buffer;
use ratatui::layout::Rect;
use ratatui::style::{Color, Style};
use ratatui::symbols::border;
use ratatui::widgets::{Block, Borders};
use ratatui::Frame;

use crate::app::{App, Button, Screen};

/// The smallest terminal every screen is laid out for.
pub const MIN_WIDTH: u16 = 80;
pub const MIN_HEIGHT: u16 = 24;

pub fn render(app: &App, frame: &mut Frame) {
    let area = frame.area();
    if area.width < MIN_WIDTH || area.height < MIN_HEIGHT {
        // half-drawn panels would mislead: say what is needed instead (the run goes on)
        let lines = [
            format!("terminal too small (need {MIN_WIDTH}x{MIN_HEIGHT}, have {}x{})", area.width, area.height),
            "enlarge it, or press q to leave; a run goes on meanwhile".to_string(),
        ];
        let buf = frame.buffer_mut();
        for (i, line) in lines.iter().enumerate() {
            let x = area.x + area.width.saturating_sub(line.chars().count() as u16) / 2;
            let y = area.y + (area.height / 2).saturating_sub(1) + i as u16;
            put(buf, x, y, line, area.width as usize, Style::default().fg(Color::Yellow));
        }
        return;
    }
    match &app.screen {
        Screen::Picker(p) => picker::render(p, app, area, frame.buffer_mut()),
        Screen::Dashboard(d) => dashboard::render(d, app, area, frame.buffer_mut()),
        Screen::Overlay(o) => overlay::render(o, app, area, frame.buffer_mut()),
    }
}

/// The button under a mouse click at `(col, row)` in a frame of `area`.
pub fn hit(app: &App, area: Rect, col: u16, row: u16) -> Option<Button> {
    if area.width < MIN_WIDTH || area.height < MIN_HEIGHT {
        return None;
    }
    let buttons = match &app.screen {
        Screen::Picker(p) => picker::buttons(p, area),
        Screen::Dashboard(_) => dashboard::buttons(app, area),
        Screen::Overlay(_) => vec![],
    };
    buttons
        .into_iter()
        .find(|(r, _)| col >= r.x && col < r.x + r.width && row >= r.y && row < r.y + r.height)
        .map(|(_, b)| b)
}

/// Writes `text` at `(x, y)`, clipped to `width` and to the buffer (tiny terminals never panic).
pub fn put(buf: &mut Buffer, x: u16, y: u16, text: impl AsRef<str>, width: usize, style: Style) {
    let a = buf.area;
    if y < a.y || y >= a.y + a.height || x < a.x || x >= a.x + a.width {
        return;
    }
    let room = (a.x + a.width - x) as usize;
    buf.set_stringn(x, y, text, width.min(room), style);
}

/// A bordered block; plain ASCII borders in `--ascii` mode.
pub fn block(title: impl Into<String>, color: Color, ascii: bool) -> Block<'static> {
    let b = Block::default().borders(Borders::ALL).border_style(Style::default().fg(color)).title(title.into());
    if ascii {
        b.border_set(ASCII_BORDER)
    } else {
        b
    }
}

pub const ASCII_BORDER: border::Set = border::Set {
    top_left: "+",
    top_right: "+",
    bottom_left: "+",
    bottom_right: "+",
    vertical_left: "|",
    vertical_right: "|",
    horizontal_top: "-",
    horizontal_bottom: "-",
};

/// `w` x `h` centred in `area`.
pub fn centered(area: Rect, w: u16, h: u16) -> Rect {
    let w = w.min(area.width);
    let h = h.min(area.height);
    Rect { x: area.x + (area.width - w) / 2, y: area.y + (area.height - h) / 2, width: w, height: h }
}

/// Lays out `[label]` buttons left to right on one row; returns their rects.
pub fn button_row(area: Rect, labels: &[(String, Button)]) -> Vec<(Rect, Button, String)> {
    let mut x = area.x;
    let mut out = vec![];
    for (label, b) in labels {
        let w = label.chars().count() as u16;
        if x + w > area.x + area.width {
            break;
        }
        out.push((Rect { x, y: area.y, width: w, height: 1 }, *b, label.clone()));
        x += w + 1;
    }
    out
}
