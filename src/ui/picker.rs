//! The preset picker screen.

use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Direction, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Paragraph, Widget, Wrap};

use super::{block, button_row, put};
use crate::app::picker::{Field, Tab};
use crate::app::{App, Button, Picker};
use crate::config::RunConfig;
use crate::data::TokenizerSpec;
use crate::events::RunStatus;
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

fn bar(p: &Picker, area: Rect) -> Vec<(Rect, Button, String)> {
    let (_, _, _, bar) = areas(area);
    let enter = if p.tab == Tab::Runs { "[enter] watch" } else { "[enter] start" };
    button_row(bar, &[(enter.into(), Button::Start), ("[q] quit".into(), Button::Quit)])
}

/// Keys without a button, shown after the buttons.
fn hints(p: &Picker, area: Rect, buf: &mut Buffer) {
    let (_, _, _, bar_area) = areas(area);
    let used: u16 = bar(p, area).iter().map(|(r, _, _)| r.width + 1).sum();
    let text = match p.tab {
        Tab::Presets => "tab runs | l LR | s steps | o output | r seed".to_string(),
        Tab::Runs => format!("r resume | space mark | c compare ({}) | tab presets", p.marked.len()),
    };
    put(
        buf,
        bar_area.x + used + 1,
        bar_area.y,
        text,
        bar_area.width.saturating_sub(used + 1) as usize,
        Style::default().fg(Color::DarkGray),
    );
}

pub fn buttons(p: &Picker, area: Rect) -> Vec<(Rect, Button)> {
    bar(p, area).into_iter().map(|(r, b, _)| (r, b)).collect()
}

/// `12-03 14:05` (UTC) from Unix seconds.
fn when(t: f64) -> String {
    let stamp = crate::events::utc_stamp(t); // 2026-12-03_14-05-09
    format!("{} {}", stamp.get(5..10).unwrap_or(""), stamp.get(11..16).unwrap_or("").replace('-', ":"))
}

/// The runs tab: one row per run under the outputs folder, newest first, then the selected
/// run's folder and what can be done with it.
fn render_runs(p: &Picker, app: &App, area: Rect, buf: &mut Buffer) {
    let (_, list, detail, _) = areas(area);
    let table = Rect { x: list.x, y: list.y, width: list.width + detail.width, height: list.height };
    let frame = block(format!(" runs under {} ", p.runs_root.display()), Color::Cyan, app.ascii);
    let inner = frame.inner(table);
    frame.render(table, buf);
    let dim = Style::default().fg(Color::DarkGray);
    if p.runs.is_empty() {
        let text = format!("no runs under {} yet: start one from the presets tab (tab)", p.runs_root.display());
        Paragraph::new(text).style(dim).wrap(Wrap { trim: true }).render(inner, buf);
        return;
    }
    let w = inner.width as usize;
    let name_w = w.saturating_sub(2 + 12 + 13 + 10 + 12 + 4).clamp(8, 48);
    let head =
        format!("  {:<name_w$} {:<12} {:>13} {:>10} {:>12}", "run", "status", "steps", "eval loss", "when (UTC)");
    put(buf, inner.x, inner.y, &head, w, Style::default().fg(Color::Gray).add_modifier(Modifier::BOLD));
    // room for the rows, and three lines below them for the selected run
    let rows = (inner.height as usize).saturating_sub(4);
    let first = p.run_selected.saturating_sub(rows.saturating_sub(1));
    for (i, r) in p.runs.iter().enumerate().skip(first).take(rows) {
        let selected = i == p.run_selected;
        let mark = if p.marked.contains(&i) { "*" } else { " " };
        let cursor = if selected { ">" } else { " " };
        let steps = match r.max_steps {
            Some(m) => format!("{}/{m}", r.steps),
            None => r.steps.to_string(),
        };
        let eval = r.final_eval_loss.map_or("-".into(), |l| format!("{l:.4}"));
        let mut name = r.name.clone();
        if name.chars().count() > name_w {
            // the end of a long path says most: `.../lr-1e-3`
            name = format!(
                "..{}",
                name.chars().rev().take(name_w - 2).collect::<Vec<_>>().into_iter().rev().collect::<String>()
            );
        }
        let line = format!(
            "{cursor}{mark}{name:<name_w$} {:<12} {steps:>13} {eval:>10} {:>12}",
            r.status.as_str(),
            when(r.modified)
        );
        let style = match (selected, r.status) {
            (true, _) => Style::default().fg(Color::Black).bg(Color::Cyan),
            (false, RunStatus::Diverged | RunStatus::Failed) => Style::default().fg(Color::Red),
            (false, RunStatus::Running) => Style::default().fg(Color::Green),
            (false, RunStatus::Interrupted | RunStatus::Stopped) => Style::default().fg(Color::Yellow),
            _ => Style::default(),
        };
        put(buf, inner.x, inner.y + 1 + (i - first) as u16, &line, w, style);
    }
    let y = inner.y + inner.height.saturating_sub(2);
    if let Some(r) = p.current_run() {
        let resume = match (r.resumable(), r.checkpoint) {
            (true, Some(c)) => format!("r resumes from checkpoint-{c}"),
            (false, Some(c)) => format!("checkpoint-{c}"),
            (_, None) => "no checkpoint".into(),
        };
        put(buf, inner.x, y, format!("{} | {resume}", r.dir.display()), w, dim);
    }
    if let Some(err) = &p.error {
        put(buf, inner.x, y + 1, err, w, Style::default().fg(Color::Red));
    }
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
            let mut rows = settings_rows(p, c, e.estimate.clone());
            if let Some(by_arm) = &e.variants {
                // a study of variants: each arm's, not the base settings' one
                if let Some(row) = rows.iter_mut().find(|r| r.0 == "variant") {
                    row.1 = vec![Span::raw(by_arm.clone())];
                }
            }
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

/// The selected preset's settings, a row each, the editable ones shown as edited.
fn settings_rows(p: &Picker, c: &RunConfig, estimate: Option<String>) -> Vec<(&'static str, Vec<Span<'static>>)> {
    // the vocabulary (and so the parameter count) is known before the tokenizer loads for gpt2
    // and byte only; a trained BPE may stop short of its N
    let tokenizer = c.tokenizer_spec();
    let size = match (tokenizer.known_vocab_size(), &tokenizer) {
        (Some(v), _) => format!("~{} params (vocabulary {v})", si(c.model_config(v).num_parameters() as f64)),
        (None, TokenizerSpec::Bpe(n)) => {
            format!("<= {} params (BPE vocabulary <= {n})", si(c.model_config(*n).num_parameters() as f64))
        }
        (None, _) => "params known after the tokenizer loads".into(),
    };
    let edit = |f: Field, hint: &str| -> Vec<Span<'static>> {
        let value = match &p.editing {
            Some((ef, text)) if *ef == f => {
                Span::styled(format!("{text}_"), Style::default().fg(Color::Black).bg(Color::Yellow))
            }
            _ => Span::styled(p.shown(f), Style::default().fg(Color::Yellow)),
        };
        vec![value, Span::styled(format!("   [{hint}] edit"), Style::default().fg(Color::DarkGray))]
    };
    let mut steps = edit(Field::MaxSteps, "s");
    steps.insert(1, Span::raw(epochs_note(&p.shown(Field::MaxSteps), c.num_train_epochs)));
    let raw = |s: String| vec![Span::raw(s)];
    vec![
        ("model", raw(format!("{} layers x {} wide, {} heads, {size}", c.n_layer, c.n_embd, c.n_head))),
        ("variant", raw(c.model_config(0).variant_name())),
        ("data", raw(format!("{} (subset {})", c.data_name(), c.subset_ratio))),
        ("tokenizer", raw(tokenizer.to_string())),
        (
            "sequence",
            raw(format!(
                "block {} | batch {} = {} x {} micro",
                c.block_size,
                c.batch_size,
                c.accumulation_steps(),
                c.micro_batch_size
            )),
        ),
        ("learning rate", edit(Field::LearningRate, "l")),
        (
            "schedule",
            raw(format!("{} | warmup {} steps / ratio {}", c.lr_scheduler_type, c.warmup_steps, c.warmup_ratio)),
        ),
        ("steps", steps),
        ("output", edit(Field::OutputDir, "o")),
        ("seed", edit(Field::Seed, "r")),
        ("time", raw(estimate.unwrap_or_else(|| "steps known once the data is".into()))),
    ]
}

pub fn render(p: &Picker, app: &App, area: Rect, buf: &mut Buffer) {
    let (header, list, detail, _) = areas(area);
    let tab = |t: Tab, label: &str| {
        if p.tab == t {
            Span::styled(format!(" {label} "), Style::default().fg(Color::Black).bg(Color::Gray))
        } else {
            Span::styled(format!(" {label} "), Style::default().fg(Color::DarkGray))
        }
    };
    Paragraph::new(Line::from(vec![
        Span::styled(" difflab ", Style::default().add_modifier(Modifier::BOLD).fg(Color::Black).bg(Color::Cyan)),
        Span::raw(" "),
        tab(Tab::Presets, "presets"),
        tab(Tab::Runs, &format!("runs ({})", p.runs.len())),
        Span::styled("  tab switches", Style::default().fg(Color::DarkGray)),
    ]))
    .render(header, buf);
    if p.tab == Tab::Runs {
        render_runs(p, app, area, buf);
        for (rect, _, label) in bar(p, area) {
            put(buf, rect.x, rect.y, &label, rect.width as usize, Style::default().fg(Color::Black).bg(Color::Gray));
        }
        hints(p, area, buf);
        return;
    }
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
    for (rect, _, label) in bar(p, area) {
        put(buf, rect.x, rect.y, &label, rect.width as usize, Style::default().fg(Color::Black).bg(Color::Gray));
    }
    hints(p, area, buf);
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
