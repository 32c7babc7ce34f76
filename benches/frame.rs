//! Dashboard frame time with long histories: `cargo bench --bench frame`.
//!
//! Feeds a dashboard 100k (and 1M) synthetic steps with evals, controls and diff-norm
//! histograms, then times `ui::render` into ratatui's `TestBackend` plus the buffer diff a real
//! terminal would get, at 80x24 and 160x48. The target is under 5 ms per frame at 100k points.
//! Plain `main` (no criterion): one dependency fewer, and the median of many frames is the figure.

use std::time::Instant;

use difflab::app::{App, Dashboard, Mode, Msg};
use difflab::events::*;
use ratatui::backend::TestBackend;
use ratatui::Terminal;

fn app_with(steps: u64, ascii: bool) -> App {
    let mut app = App::dashboard(Dashboard::new("bench"), Mode::Owned, true, ascii);
    app.update(Msg::Event(Event::TrainBegin(TrainBegin {
        config: serde_json::json!({"research": true, "max_grad_norm": 1.0}),
        preset: Some("mid-diff".into()),
        num_parameters: 124_000_000,
        device: "cpu".into(),
        engine: "cpu-step".into(),
        world_size: 1,
        backend: "single".into(),
        variant: "differential + rope".into(),
        vocab_size: 50257,
        train_blocks: steps as usize * 64,
        validation_blocks: 240,
        steps_per_epoch: steps,
        total_steps: steps,
        start_step: 0,
        tokens_per_step: 65536,
        warmup_steps: 3000,
        output_dir: "outputs/bench".into(),
        timestamp: 0.0,
    })));
    let hist = Histogram {
        counts: (0..20).map(|i| 100 - (i as i64 - 10).pow(2) as u64).collect(),
        edges: (0..=20).map(|i| i as f64 * 0.07).collect(),
        sum: 0.0,
        sum_squares: 0.0,
    };
    for step in 1..=steps {
        let s = step as f64;
        let noise = ((s * 12.9898).sin() * 43758.5453).fract() * 0.2;
        let loss = 3.0 + 7.0 * (-s / (steps as f64 / 5.0)).exp() + noise + if step % 9973 == 0 { 3.0 } else { 0.0 };
        app.update(Msg::Event(Event::Progress(StepRecord {
            step,
            epoch: s / steps as f64,
            loss,
            learning_rate: 1e-4 * (1.0 + (std::f64::consts::PI * s / steps as f64).cos()) / 2.0,
            grad_norm: 0.5 + noise,
            tokens_per_second: 50_000.0,
            diff_norm_mean: Some(0.9),
            diff_norm_std: Some(0.2),
            diff_norm_min: Some(0.0),
            diff_norm_max: Some(1.4),
            diff_norm_hist: (step % 100 == 0).then(|| hist.clone()),
            elapsed: s,
            ..Default::default()
        })));
        if step % 1000 == 0 {
            app.update(Msg::Event(Event::Evaluate(EvalRecord {
                step,
                epoch: s / steps as f64,
                eval_loss: loss,
                perplexity: loss.exp(),
                eval_tokens: 1 << 20,
                eval_tokens_per_second: 1e5,
                eval_blocks: 40,
                validation_blocks: 40,
                ..Default::default()
            })));
        }
        if step % 25_000 == 0 {
            app.update(Msg::Event(Event::Control(ControlRecord {
                step,
                action: ControlAction::ScaleLr,
                lr_scale: 0.1,
                origin: ControlOrigin::Ui,
            })));
        }
    }
    app
}

fn main() {
    println!("| points | terminal | glyphs | median ms/frame | p95 ms/frame |");
    println!("|---:|---|---|---:|---:|");
    for steps in [100_000u64, 1_000_000] {
        for ascii in [false, true] {
            let app = app_with(steps, ascii);
            for (w, h) in [(80u16, 24u16), (160, 48)] {
                let Ok(mut terminal) = Terminal::new(TestBackend::new(w, h)); // TestBackend cannot fail
                let mut times = Vec::new();
                for _ in 0..200 {
                    let t0 = Instant::now();
                    // a changed frame each time, as on a live run: the whole draw and diff run
                    if terminal.draw(|f| difflab::ui::render(&app, f)).is_err() {
                        return;
                    }
                    times.push(t0.elapsed().as_secs_f64() * 1e3);
                    let _ = terminal.clear();
                }
                // the frame timed is a real one: charts drawn, not an empty screen
                if terminal.draw(|f| difflab::ui::render(&app, f)).is_err() {
                    return;
                }
                let drawn = terminal.backend().buffer().content().iter().filter(|c| c.symbol() != " ").count();
                assert!(drawn > (w as usize * h as usize) / 5, "only {drawn} cells drawn at {w}x{h}");
                times.sort_by(f64::total_cmp);
                let glyphs = if ascii { "ascii" } else { "braille" };
                println!(
                    "| {steps} | {w}x{h} | {glyphs} | {:.2} | {:.2} |",
                    times[times.len() / 2],
                    times[times.len() * 95 / 100]
                );
            }
        }
    }
}
