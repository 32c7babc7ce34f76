//! The preset picker screen.

use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Direction, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Paragraph, Widget, Wrap};

use super::{block, button_row, put};
use crate::app::picker::Field;
use crate::app::{App, Button, Picker};
use crate::data::TokenizerSpec;
use crate::sinks::human::si;

fn areas(area: Rect) -> (Rect, Rect, Rect, Rect) {
    let rows = Layout::default()
        .direction(Direction::Vertical)
        .constraints([Constraint::Length(1), Constraint::Min(5), Constraint::Length(1)])
        .split(area);
    let cols = Layout::default()
        .direction(Direction::Horizontal)
        .constraints([Constraint::Length(24.min(area.width / 3)), Constraint::Min(20)])
        .split(rows[1]);
    (rows[0], cols[0], cols[1], rows[2])
}

fn bar(area: Rect) -> Vec<(Rect, Button, String)> {
    let (_, _, _, bar) = areas(area);
    button_row(bar, &[("[enter] start".into(), Button::Start), ("[q] quit".into(), Button::Quit)])
}

/// Keys without a button, shown after the buttons.
fn hints(area: Rect, buf: &mut Buffer) {
    let (_, _, _, bar) = areas(area);
    let used: u16 =
        super::button_row(bar, &[("[enter] start".into(), Button::Start), ("[q] quit".into(), Button::Quit)])
            .iter()
            .map(|(r, _, _)| r.width + 1)
            .sum();
    put(
        buf,
        bar.x + used + 1,
        bar.y,
        "up/down select | l LR | s steps | o output | r seed",
        bar.width.saturating_sub(used + 1) as usize,
        Style::default().fg(Color::DarkGray),
    );
}

pub fn buttons(area: Rect) -> Vec<(Rect, Button)> {
    bar(area).into_iter().map(|(r, b, _)| (r, b)).collect()
}

fn detail_lines(p: &Picker) -> Vec<Line<'static>> {
    let Some(e) = p.current() else { return vec![Line::from("no presets")] };
    let key = |k: &str| Span::styled(format!("{k:<14}"), Style::default().fg(Color::Gray));
    let mut lines = vec![
        Line::from(Span::styled(e.description.clone(), Style::default().add_modifier(Modifier::BOLD))),
        Line::from(""),
    ];
    match &e.config {
        Err(err) => lines.push(Line::from(Span::styled(err.clone(), Style::default().fg(Color::Red)))),
        Ok(c) => {
            // the vocabulary (and so the parameter count) is known before the tokenizer loads
            // for gpt2 and byte only; a trained BPE may stop short of its N
            let tokenizer = c.tokenizer_spec();
            let size = match (tokenizer.known_vocab_size(), &tokenizer) {
                (Some(v), _) => format!("~{} params (vocabulary {v})", si(c.model_config(v).num_parameters() as f64)),
                (None, TokenizerSpec::Bpe(n)) => {
                    format!("<= {} params (BPE vocabulary <= {n})", si(c.model_config(*n).num_parameters() as f64))
                }
                (None, _) => "params known after the tokenizer loads".into(),
            };
            let variant = c.model_config(0).variant_name();
            let data = format!("{} (subset {})", c.data_name(), c.subset_ratio);
            let edit = |f: Field, value: String| -> Span<'static> {
                match &p.editing {
                    Some((ef, text)) if *ef == f => {
                        Span::styled(format!("{text}_"), Style::default().fg(Color::Black).bg(Color::Yellow))
                    }
                    _ => Span::styled(value, Style::default().fg(Color::Yellow)),
                }
            };
            let rows: Vec<(&str, Vec<Span<'static>>)> = vec![
                (
                    "model",
                    vec![Span::raw(format!("{} layers x {} wide, {} heads, {size}", c.n_layer, c.n_embd, c.n_head))],
                ),
                ("variant", vec![Span::raw(variant)]),
                ("data", vec![Span::raw(data)]),
                ("tokenizer", vec![Span::raw(tokenizer.to_string())]),
                (
                    "sequence",
                    vec![Span::raw(format!(
                        "block {} | batch {} = {} x {} micro",
                        c.block_size,
                        c.batch_size,
                        c.accumulation_steps(),
                        c.micro_batch_size
                    ))],
                ),
                (
                    "learning rate",
                    vec![
                        edit(Field::LearningRate, p.shown(Field::LearningRate)),
                        Span::styled("   [l] edit", Style::default().fg(Color::DarkGray)),
                    ],
                ),
                (
                    "schedule",
                    vec![Span::raw(format!(
                        "{} | warmup {} steps / ratio {}",
                        c.lr_scheduler_type, c.warmup_steps, c.warmup_ratio
                    ))],
                ),
                (
                    "steps",
                    vec![
                        edit(Field::MaxSteps, p.shown(Field::MaxSteps)),
                        Span::raw(epochs_note(&p.shown(Field::MaxSteps), c.num_train_epochs)),
                        Span::styled("   [s] edit", Style::default().fg(Color::DarkGray)),
                    ],
                ),
                (
                    "output",
                    vec![
                        edit(Field::OutputDir, p.shown(Field::OutputDir)),
                        Span::styled("   [o] edit", Style::default().fg(Color::DarkGray)),
                    ],
                ),
                (
                    "seed",
                    vec![
                        edit(Field::Seed, p.shown(Field::Seed)),
                        Span::styled("   [r] edit", Style::default().fg(Color::DarkGray)),
                    ],
                ),
                ("time", vec![Span::raw(e.estimate.clone().unwrap_or_else(|| "steps known once the data is".into()))]),
            ];
            let mut rows = rows;
            if let Some(procedure) = &e.procedure {
                // "sweep learning_rate in [..] = 4 trials x 150 steps": what enter will run
                let (kind, rest) = procedure.split_once(' ').unwrap_or((procedure.as_str(), ""));
                rows.insert(
                    0,
                    (
                        if kind == "sweep" { "sweep" } else { "study" },
                        vec![Span::styled(rest.to_string(), Style::default().fg(Color::Cyan))],
                    ),
                );
            }
            for (k, mut v) in rows {
                let mut spans = vec![key(k)];
                spans.append(&mut v);
                lines.push(Line::from(spans));
            }
        }
    }
    if let Some(err) = &p.error {
        lines.push(Line::from(""));
        lines.push(Line::from(Span::styled(err.clone(), Style::default().fg(Color::Red))));
    }
    lines
}

pub fn render(p: &Picker, app: &App, area: Rect, buf: &mut Buffer) {
    let (header, list, detail, _) = areas(area);
    Paragraph::new(Line::from(vec![
        Span::styled(" difflab ", Style::default().add_modifier(Modifier::BOLD).fg(Color::Black).bg(Color::Cyan)),
        Span::raw("  choose a preset  (up/down, enter to start)"),
    ]))
    .render(header, buf);
    let frame = block(" presets ", Color::Cyan, app.ascii);
    let inner = frame.inner(list);
    frame.render(list, buf);
    for (i, e) in p.entries.iter().enumerate().take(inner.height as usize) {
        let style = if i == p.selected {
            Style::default().fg(Color::Black).bg(Color::Cyan)
        } else if e.config.is_err() {
            Style::default().fg(Color::Red)
        } else {
            Style::default()
        };
        let marker = if i == p.selected { ">" } else { " " };
        put(
            buf,
            inner.x,
            inner.y + i as u16,
            format!("{marker} {:<w$}", e.name, w = (inner.width as usize).saturating_sub(2)),
            inner.width as usize,
            style,
        );
    }
    let name = p.current().map_or(String::new(), |e| format!(" {} ", e.name));
    Paragraph::new(detail_lines(p))
        .wrap(Wrap { trim: false })
        .block(block(name, Color::Cyan, app.ascii))
        .render(detail, buf);
    for (rect, _, label) in bar(area) {
        put(buf, rect.x, rect.y, &label, rect.width as usize, Style::default().fg(Color::Black).bg(Color::Gray));
    }
    hints(area, buf);
}

/// Beside the step limit: the epochs it trains for when no step limit is set (a step limit
/// overrides `num_train_epochs`, as in HF Trainer).
fn epochs_note(max_steps: &str, epochs: f64) -> String {
    if max_steps.parse::<u64>().is_ok() {
        "  (overrides epochs)".into()
    } else {
        format!("  ({epochs} epoch{})", if epochs == 1.0 { "" } else { "s" })
    }
}
