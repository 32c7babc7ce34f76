//! Screens rendered with ratatui's `TestBackend`, from synthetic events: snapshots of the
//! picker and the dashboard at 80x24 and 160x48 (Braille and ASCII), and mouse hit-testing.

use difflab::app::{App, Button, Dashboard, Key, Mode, Msg, Picker};
use difflab::config::PresetLibrary;
use difflab::events::*;
use ratatui::backend::TestBackend;
use ratatui::layout::Rect;
use ratatui::Terminal;

fn begin(research: bool) -> Event {
    Event::TrainBegin(TrainBegin {
        config: serde_json::json!({"research": research, "max_grad_norm": 1.0}),
        preset: Some(if research { "sanity-diff" } else { "sanity-baseline" }.into()),
        num_parameters: 6_850_000,
        device: "cpu (2 threads)".into(),
        engine: "cpu-step".into(),
        world_size: 1,
        backend: "single".into(),
        variant: if research { "differential + rope" } else { "baseline (rope)" }.into(),
        vocab_size: 50257,
        train_blocks: 900,
        validation_blocks: 60,
        steps_per_epoch: 56,
        total_steps: 560,
        start_step: 0,
        tokens_per_step: 2048,
        warmup_steps: 50,
        output_dir: "outputs/sanity".into(),
        timestamp: 0.0,
    })
}

/// A synthetic run: 300 steps of a falling, noisy loss with one spike, warmup + cosine LR,
/// evals every 50 steps, an LR cut at 150, a pause at 200 and checkpoints.
fn dashboard(research: bool) -> App {
    let mut app = App::dashboard(Dashboard::new("run"), Mode::Owned, true, false);
    let mut send = |e: Event| {
        app.update(Msg::Event(e));
    };
    send(begin(research));
    let mut scale = 1.0;
    for step in 1..=300u64 {
        let s = step as f64;
        let noise = ((s * 12.9898).sin() * 43758.5453).fract() * 0.15;
        let loss = 3.0 + 7.5 * (-s / 60.0).exp() + noise + if step == 222 { 2.5 } else { 0.0 };
        let lr = if step < 50 {
            1e-3 * s / 50.0
        } else {
            1e-3 * 0.5 * (1.0 + (std::f64::consts::PI * (s - 50.0) / 510.0).cos())
        } * scale;
        send(Event::Progress(StepRecord {
            step,
            epoch: s / 56.0,
            loss,
            learning_rate: lr,
            grad_norm: 0.4 + 2.0 * (-s / 40.0).exp() + noise,
            tokens_per_second: 5120.0,
            diff_norm_mean: research.then_some(0.9),
            diff_norm_std: research.then_some(0.17),
            diff_norm_min: research.then_some(0.0),
            diff_norm_max: research.then_some(1.3),
            diff_norm_hist: research.then(|| Histogram {
                counts: vec![2, 0, 0, 1, 3, 5, 9, 14, 30, 52, 80, 111, 130, 120, 90, 60, 30, 12, 4, 1],
                edges: (0..=20).map(|i| i as f64 * 0.065).collect(),
                sum: 0.0,
                sum_squares: 0.0,
            }),
            elapsed: s * 0.4,
            // the embedding learns fast and settles; the blocks' ratios sit near 1e-3
            layers: Some(
                ["wte", "h.0", "h.1", "h.2", "h.3", "h.4", "h.5", "ln_f"]
                    .iter()
                    .enumerate()
                    .map(|(i, name)| LayerStat {
                        name: name.to_string(),
                        grad_norm: 0.3 / (i + 1) as f64,
                        update_ratio: if i == 0 { 3e-2 * (-s / 60.0).exp() } else { 1e-3 * (i as f64) } * scale,
                    })
                    .collect(),
            ),
            ..Default::default()
        }));
        if step % 50 == 0 {
            send(Event::Evaluate(EvalRecord {
                step,
                epoch: s / 56.0,
                eval_loss: loss + 0.1,
                perplexity: (loss + 0.1).exp(),
                eval_tokens: 7680,
                eval_tokens_per_second: 20000.0,
                eval_blocks: 40,
                validation_blocks: 40,
                ..Default::default()
            }));
        }
        if step % 100 == 0 {
            send(Event::Checkpoint(CheckpointRecord {
                step,
                path: format!("outputs/sanity/checkpoint-{step}"),
                reason: CheckpointReason::SaveSteps,
                deleted: vec![],
                seconds: None,
            }));
        }
        if step == 150 {
            scale = 0.1;
            send(Event::Control(ControlRecord {
                step,
                action: ControlAction::ScaleLr,
                lr_scale: 0.1,
                origin: ControlOrigin::Ui,
            }));
        }
    }
    send(Event::Control(ControlRecord {
        step: 300,
        action: ControlAction::Pause,
        lr_scale: 0.1,
        origin: ControlOrigin::Ui,
    }));
    app
}

fn draw(app: &App, w: u16, h: u16) -> Terminal<TestBackend> {
    let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
    t.draw(|f| difflab::ui::render(app, f)).unwrap();
    t
}

fn picker() -> App {
    let lib = PresetLibrary::builtin();
    let presets = lib.names().iter().map(|n| lib.chain(n).map(|c| (c.clone(), c.last().cloned().unwrap()))).collect();
    App::picker(Picker::new(presets, vec![]), true, false)
}

#[test]
fn picker_80x24() {
    insta::assert_snapshot!(draw(&picker(), 80, 24).backend());
}

#[test]
fn picker_160x48() {
    insta::assert_snapshot!(draw(&picker(), 160, 48).backend());
}

/// A study preset whose arms train different models shows each arm's, not the base settings'.
#[test]
fn a_study_preset_shows_the_variant_of_each_arm() {
    let mut app = picker();
    for _ in 0..30 {
        if draw(&app, 160, 48).backend().to_string().contains("Procedure, offline: baseline vs differential") {
            break;
        }
        app.update(Msg::Key(difflab::app::Key::Down));
    }
    let text = draw(&app, 160, 48).backend().to_string();
    assert!(text.contains("baseline: baseline (RoPE) | differential: differential + RoPE"), "{text}");
}

#[test]
fn dashboard_80x24() {
    insta::assert_snapshot!(draw(&dashboard(true), 80, 24).backend());
}

#[test]
fn dashboard_160x48() {
    insta::assert_snapshot!(draw(&dashboard(true), 160, 48).backend());
}

/// Once the run has ended the bar stops offering pause, checkpoint and LR (their keys do
/// nothing then); the view keys stay.
#[test]
fn an_ended_run_offers_no_controls() {
    let mut app = dashboard(true);
    let live = draw(&app, 160, 48).backend().to_string();
    // (paused at the end of the fixture: p resumes)
    assert!(live.contains("[p] resume") && live.contains("[c] checkpoint") && live.contains("[l] LR x0.1"), "{live}");
    app.update(Msg::Event(Event::TrainEnd(TrainEnd {
        step: 300,
        epoch: 5.0,
        train_loss: Some(3.2),
        train_loss_steps: 300,
        eval_loss: Some(3.3),
        perplexity: Some(27.1),
        best_eval_loss: Some(3.3),
        train_runtime: 60.0,
        tokens_per_second: 1000.0,
        skipped_steps: 0,
        status: RunStatus::Completed,
        error: None,
        output_dir: "outputs/run".into(),
    })));
    let ended = draw(&app, 160, 48).backend().to_string();
    assert!(
        !ended.contains("[p] resume") && !ended.contains("[c] checkpoint") && !ended.contains("[l] LR x0.1"),
        "{ended}"
    );
    assert!(ended.contains("[y] log-y") && ended.contains("[q] quit"), "{ended}");
    let narrow = draw(&app, 80, 24).backend().to_string();
    assert!(!narrow.contains("[p] resume") && !narrow.contains("[c]kpt"), "{narrow}");
}

#[test]
fn dashboard_ascii_baseline_log_y_80x24() {
    let mut app = dashboard(false);
    app.ascii = true;
    app.update(Msg::Click(Button::LogY));
    let t = draw(&app, 80, 24);
    let text = t.backend().to_string();
    assert!(text.is_ascii(), "ASCII mode draws no Braille or block glyphs");
    // a baseline has no differential norms: the panel starts on the layers
    assert!(text.contains("layers: grad, update/w") && text.contains("h.0"), "{text}");
    insta::assert_snapshot!(t.backend());
}

#[test]
fn quit_dialog_80x24() {
    let mut app = dashboard(true);
    app.update(Msg::Key(difflab::app::Key::Char('q')));
    insta::assert_snapshot!(draw(&app, 80, 24).backend());
}

#[test]
fn every_button_is_hit_where_it_is_drawn() {
    let app = dashboard(true);
    for (w, h) in [(80, 24), (160, 48)] {
        let t = draw(&app, w, h);
        let buf = t.backend().buffer();
        let area = Rect::new(0, 0, w, h);
        let row = h - 1;
        let line: String = (0..w).map(|x| buf[(x, row)].symbol().to_string()).collect();
        for (label, button) in [
            ("[p]", Button::Pause),
            ("[c]", Button::Checkpoint),
            ("[l]", Button::LowerLr),
            ("[q]", Button::Quit),
            ("[m]", Button::Mouse),
        ] {
            let col = line.find(label).unwrap_or_else(|| panic!("{label} drawn at {w}x{h}: {line}")) as u16;
            assert_eq!(difflab::ui::hit(&app, area, col + 1, row), Some(button), "{label} at {w}x{h}");
        }
        assert_eq!(difflab::ui::hit(&app, area, 1, 1), None, "a chart is not a button");
    }
}

#[test]
fn tiny_and_odd_sizes_do_not_panic() {
    let app = dashboard(true);
    for (w, h) in [(1, 1), (10, 5), (40, 12), (79, 23), (300, 90)] {
        draw(&app, w, h);
        draw(&picker(), w, h);
    }
}

#[test]
fn below_80x24_the_screen_says_so_instead_of_cut_panels() {
    for (w, h) in [(79, 24), (80, 23), (60, 20)] {
        let screen = draw(&dashboard(true), w, h).backend().to_string();
        assert!(screen.contains("terminal too small (need 80x24"), "{w}x{h}: {screen}");
        assert!(!screen.contains('│'), "{w}x{h}: no half-drawn panels");
    }
    // at 80x24 the dashboard itself, not the message
    let screen = draw(&dashboard(true), 80, 24).backend().to_string();
    assert!(!screen.contains("too small") && screen.contains("loss"));
}

/// The sweep view from synthetic trial events: three curves, the table, the suggestion.
#[test]
fn sweep_view_80x24() {
    use difflab::app::overlay::{Overlay, OverlayKind};
    use difflab::research::sweep::{SweepEvent, SweepSummary, TrialResult};
    let mut app = App::overlay(Overlay::new(OverlayKind::Sweep, "sweep -> outputs/sweep"), true, false);
    let lrs = [1e-1, 1e-2, 1e-3];
    let mut trials = vec![];
    for (i, lr) in lrs.iter().enumerate() {
        let label = format!("learning_rate-{lr}");
        app.update(Msg::Sweep(SweepEvent::TrialStart { index: i, of: 3, label: label.clone() }));
        let steps = if i == 0 { 12 } else { 60 };
        for s in 1..=steps {
            let x = s as f64;
            let loss = match i {
                0 => 6.0 - x * 0.2 + if s > 8 { (x - 8.0).powi(3) } else { 0.0 },
                1 => 2.5 + 4.0 * (-x / 15.0).exp(),
                _ => 5.0 + 1.5 * (-x / 60.0).exp(),
            };
            app.update(Msg::Sweep(SweepEvent::Train {
                index: i,
                event: Event::Progress(StepRecord {
                    step: s,
                    loss,
                    learning_rate: *lr,
                    grad_norm: 1.0,
                    tokens_per_second: 1.0,
                    elapsed: x,
                    ..Default::default()
                }),
            }));
        }
        let status = ["diverged", "completed", "completed"][i];
        let t = TrialResult {
            label,
            value: serde_json::json!(lr),
            output_dir: String::new(),
            final_loss: Some(2.6),
            best_loss: Some(2.5),
            eval_loss: Some(2.7),
            perplexity: Some(14.9),
            steps,
            status: status.parse().unwrap(),
            reused: false,
            note: None,
        };
        app.update(Msg::Sweep(SweepEvent::TrialEnd(t.clone())));
        trials.push(t);
    }
    let summary = SweepSummary {
        key: "learning_rate".into(),
        evaluated_on: "builtin, tokenizer byte, validation split (all blocks of 128 tokens)".into(),
        trials,
        highest_stable: Some(1e-2),
        recommended: Some(1e-3),
        recommended_by: Some("lowest eval loss 2.7000 among 2 stable trials".into()),
        one_notch_lower: Some(1e-4),
        variant: "baseline + RoPE".into(),
        edge: None,
    };
    app.update(Msg::Sweep(SweepEvent::Done { summary, written: Ok("outputs/sweep/summary.json".into()) }));
    let t = draw(&app, 80, 24);
    assert!(t.backend().to_string().contains("recommended"));
    insta::assert_snapshot!(t.backend());
}

/// The study view from synthetic events: two arms x two seeds, eval points coloured by arm
/// with each arm's band, the run in progress named by arm, seed and step.
#[test]
fn study_view_shows_progress_and_bands() {
    use difflab::app::overlay::{Overlay, OverlayKind};
    use difflab::research::study::{RunPlan, SeedResult, StudyEvent};
    let mut overlay = Overlay::new(OverlayKind::Study, "study -> outputs/study");
    overlay.arms = vec!["research=false".into(), "research=true".into()];
    let mut app = App::overlay(overlay, true, false);
    let runs = [(0usize, 42u64), (1, 42), (0, 43), (1, 43)];
    for (index, &(arm, seed)) in runs.iter().enumerate() {
        app.update(Msg::Study(StudyEvent::RunStart { index, of: 4, arm, seed, plan: RunPlan::Fresh { clear: false } }));
        for step in (0..=40).step_by(10) {
            let loss = 2.0 + arm as f64 * 0.3 + seed as f64 * 0.01 + 4.0 * (-(step as f64) / 15.0).exp();
            app.update(Msg::Study(StudyEvent::Train {
                index,
                event: Event::Evaluate(EvalRecord {
                    step,
                    eval_loss: loss,
                    perplexity: loss.exp(),
                    ..Default::default()
                }),
            }));
        }
        if index == 3 {
            break; // the last run is still going
        }
        let result = SeedResult {
            arm: ["research=false", "research=true"][arm].into(),
            seed,
            output_dir: String::new(),
            status: RunStatus::Completed,
            final_eval_loss: Some(2.0),
            best_eval_loss: Some(2.0),
            steps: 40,
            tokens_seen: Some(100),
            eval_curve: vec![],
            at_lengths: vec![],
            note: None,
        };
        app.update(Msg::Study(StudyEvent::RunEnd { index, result }));
    }
    let difflab::app::Screen::Overlay(o) = &app.screen else { panic!("the overlay view") };
    // arm 0 has two seeds' eval curves: a band of 5 steps; arm 1's second seed is at step 40 too
    let bands = o.bands();
    assert_eq!(bands.len(), 2, "a band per arm with two seeds");
    assert_eq!(bands[0].1.len(), 5);
    assert!(bands[0].1.iter().zip(&bands[0].2).all(|(lo, hi)| lo.1 < hi.1), "low edge under high edge");
    let t = draw(&app, 100, 30);
    let screen = t.backend().to_string();
    assert!(screen.contains("run 4/4: research=true s43"), "{screen}");
    assert!(screen.contains("band: eval min-max over seeds"), "{screen}");
    assert!(screen.contains("research=false s42") && screen.contains("completed"), "{screen}");
}

#[test]
fn the_event_log_scrolls_with_page_keys_and_the_wheel_and_stays_put_as_lines_arrive() {
    let mut app = App::dashboard(Dashboard::new("t"), Mode::Owned, true, false);
    let say = |app: &mut App, i: usize| {
        app.update(Msg::Event(Event::Message { level: Level::Info, text: format!("event number {i}") }));
    };
    for i in 0..40 {
        say(&mut app, i);
    }
    let screen = |app: &App| draw(app, 100, 30).backend().to_string();
    assert!(screen(&app).contains("event number 39") && screen(&app).contains("events (PgUp: older)"));
    app.update(Msg::Key(Key::PageUp));
    let s = screen(&app);
    assert!(s.contains("event number 34") && !s.contains("event number 39"), "{s}");
    assert!(s.contains("5 newer below: PgDn"), "{s}");
    // a new line does not move what is being read
    say(&mut app, 40);
    let s = screen(&app);
    assert!(s.contains("event number 34") && s.contains("6 newer below"), "{s}");
    app.update(Msg::Key(Key::WheelUp));
    assert!(screen(&app).contains("9 newer below"));
    // down past the newest: following again
    for _ in 0..3 {
        app.update(Msg::Key(Key::PageDown));
    }
    let s = screen(&app);
    assert!(s.contains("event number 40") && s.contains("events (PgUp: older)"), "{s}");
}

#[test]
fn v_cycles_the_panel_through_the_heat_map_and_the_layers() {
    let mut app = dashboard(true);
    app.update(Msg::Key(Key::Char('v')));
    let heat = draw(&app, 80, 24);
    insta::assert_snapshot!("panel_heat_80x24", heat.backend());
    let text = format!("{}", heat.backend());
    assert!(text.contains("diff-norm over steps") && text.contains("step "), "{text}");
    assert!(text.contains("[v]->layers"), "the key says what it does next: {text}");
    app.update(Msg::Key(Key::Char('v')));
    let layers = format!("{}", draw(&app, 160, 48).backend());
    insta::assert_snapshot!("panel_layers_160x48", layers);
    for row in ["wte ", "h.0 ", "h.5 ", "ln_f", "upd/w"] {
        assert!(layers.contains(row), "{row} missing: {layers}");
    }
    // at 80x24 the panel has room for fewer rows than layers: it says how many are left out
    let small = format!("{}", draw(&app, 80, 24).backend());
    assert!(small.contains("+3 more (taller terminal)"), "{small}");
    // then the eval loss by position: waiting for an evaluation, then its curve
    app.update(Msg::Key(Key::Char('v')));
    let waiting = format!("{}", draw(&app, 80, 24).backend());
    assert!(waiting.contains("eval loss by position"), "{waiting}");
    let buckets: Vec<PositionBucket> = (0..16)
        .map(|i| PositionBucket { from: 8 * i, to: 8 * (i + 1), loss: 3.0 - 0.1 * i as f64, predictions: 64 })
        .collect();
    for step in [50, 100] {
        let e = EvalRecord {
            step,
            eval_loss: 2.5,
            perplexity: 2.5f64.exp(),
            position_loss: Some(buckets.clone()),
            ..Default::default()
        };
        app.update(Msg::Event(Event::Evaluate(e)));
    }
    let positions = format!("{}", draw(&app, 160, 48).backend());
    assert!(positions.contains("position 0..128: step 100 (step 50 faint)"), "{positions}");
    assert!(format!("{}", draw(&app, 80, 24).backend()).contains("eval loss by position 0..128"));
    app.update(Msg::Key(Key::Char('v')));
    assert!(format!("{}", draw(&app, 80, 24).backend()).contains("diff-norm ||e_t"));
}

#[test]
fn the_picker_lists_past_runs_on_its_second_tab() {
    use difflab::research::runs::PastRun;
    let run = |name: &str, status: &str, steps: u64, eval: Option<f64>, checkpoint: Option<u64>, t: f64| PastRun {
        dir: std::path::PathBuf::from("outputs").join(name),
        name: name.into(),
        status: status.parse().unwrap(),
        steps,
        max_steps: Some(400),
        final_eval_loss: eval,
        modified: t,
        checkpoint,
        config: Default::default(),
    };
    let runs = vec![
        run("2026-12-03_15-40-02_demo", "running", 120, Some(2.1034), Some(100), 1_796_312_402.0),
        run("demo-lr-sweep/lr-1e-2", "diverged", 37, None, None, 1_796_300_000.0),
        run("study/research=true/seed-42", "interrupted", 250, Some(1.5121), Some(200), 1_796_200_000.0),
        run("demo", "completed", 400, Some(1.4394), Some(400), 1_796_100_000.0),
    ];
    let lib = PresetLibrary::builtin();
    let presets = lib.names().iter().map(|n| lib.chain(n).map(|c| (c.clone(), c.last().cloned().unwrap()))).collect();
    let mut app = App::picker(Picker::new(presets, vec![]).with_runs("outputs".into(), runs), true, false);
    assert!(format!("{}", draw(&app, 80, 24).backend()).contains("runs (4)"), "the tab says how many");
    app.update(Msg::Key(Key::Tab));
    app.update(Msg::Key(Key::Down));
    app.update(Msg::Key(Key::Char(' ')));
    app.update(Msg::Key(Key::Down));
    let t = draw(&app, 80, 24);
    let text = format!("{}", t.backend());
    insta::assert_snapshot!("picker_runs_80x24", t.backend());
    for want in ["runs under outputs", "diverged", "250/400", "1.5121", "12-03 15:40", "r resumes from checkpoint-200"]
    {
        assert!(text.contains(want), "{want}: {text}");
    }
    assert!(text.contains(">*") || text.contains(" *demo-lr"), "the marked run shows its mark: {text}");
    insta::assert_snapshot!("picker_runs_160x48", draw(&app, 160, 48).backend());
}
