//! Controls from another process (`difflab watch`, or a script) to a running trainer, through
//! the run directory: a control is a small JSON file dropped atomically into
//! `RUN_DIR/control/`; the run's inbox picks it up, forwards it to the trainer and deletes it.
//! Only someone who can write the run directory can control the run; the trainer logs each
//! applied control to `metrics.jsonl`, which is the acknowledgement a watcher sees.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::Sender;

use crate::atomic_file;
use crate::events::ControlMsg;

pub const CONTROL_DIR: &str = "control";
/// Present while a trainer is attached to the run directory: its pid.
pub const LIVE_FILE: &str = "difflab.pid";

pub fn control_dir(run_dir: &Path) -> PathBuf {
    run_dir.join(CONTROL_DIR)
}

/// Drops a control into a run's inbox.
pub fn send(run_dir: &Path, msg: &ControlMsg) -> std::io::Result<PathBuf> {
    let dir = control_dir(run_dir);
    std::fs::create_dir_all(&dir)?;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let path = dir.join(format!("{nanos:024}-{}.json", std::process::id()));
    let text = serde_json::to_string(msg).map_err(std::io::Error::other)?;
    atomic_file::write(&path, text.as_bytes())?;
    Ok(path)
}

/// Whether a trainer process is attached to `run_dir` (its pid file names a live process).
pub fn is_live(run_dir: &Path) -> bool {
    std::fs::read_to_string(run_dir.join(LIVE_FILE))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
}

/// Polls a run's inbox and forwards controls until dropped.
pub struct Inbox {
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    run_dir: PathBuf,
}

impl Inbox {
    pub fn start(run_dir: &Path, tx: Sender<ControlMsg>) -> std::io::Result<Self> {
        let dir = control_dir(run_dir);
        std::fs::create_dir_all(&dir)?;
        // controls left from an earlier session are stale: they were meant for that run
        for stale in std::fs::read_dir(&dir)?.flatten() {
            let _ = std::fs::remove_file(stale.path());
        }
        atomic_file::write(&run_dir.join(LIVE_FILE), std::process::id().to_string().as_bytes())?;
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let thread = std::thread::Builder::new().name("difflab-inbox".into()).spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                for msg in take_all(&dir) {
                    if tx.send(msg).is_err() {
                        return;
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })?;
        Ok(Self { done, thread: Some(thread), run_dir: run_dir.to_path_buf() })
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(self.run_dir.join(LIVE_FILE));
    }
}

/// Reads and deletes every complete control file, oldest first. Unreadable files are
/// deleted too (they cannot become valid later: they were renamed into place whole).
fn take_all(dir: &Path) -> Vec<ControlMsg> {
    let Ok(read) = std::fs::read_dir(dir) else { return vec![] };
    let mut files: Vec<PathBuf> = read
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "json")
                && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    files
        .into_iter()
        .filter_map(|p| {
            let msg = std::fs::read_to_string(&p).ok().and_then(|t| serde_json::from_str(&t).ok());
            let _ = std::fs::remove_file(&p);
            msg
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Control, ControlOrigin};

    #[test]
    fn controls_dropped_in_the_directory_reach_the_channel_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, rx) = crossbeam_channel::unbounded();
        let inbox = Inbox::start(dir.path(), tx).unwrap();
        assert!(is_live(dir.path()));
        let pause = ControlMsg { control: Control::Pause, origin: ControlOrigin::Watch };
        let lower = ControlMsg { control: Control::ScaleLr { factor: 0.1 }, origin: ControlOrigin::Watch };
        send(dir.path(), &pause).unwrap();
        send(dir.path(), &lower).unwrap();
        let got: Vec<ControlMsg> = (0..2).map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap()).collect();
        assert_eq!(got, vec![pause, lower]);
        drop(inbox);
        assert!(!is_live(dir.path()));
        assert_eq!(std::fs::read_dir(control_dir(dir.path())).unwrap().count(), 0);
    }
}
