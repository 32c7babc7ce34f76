//! Controls from another process (`difflab watch`, or a script) to a running trainer, through
//! the run directory: a control is a small JSON file dropped atomically into
//! `RUN_DIR/control/`; the run's inbox picks it up, forwards it to the trainer and deletes it.
//! Only someone who can write the run directory can control the run; the trainer logs each
//! applied control to `metrics.jsonl`, which is the acknowledgement a watcher sees.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
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

/// Polls a run's inbox and forwards controls until dropped. What it refuses (a file that is
/// not a regular file, is too big, or holds no control) it removes unread or unapplied, and
/// keeps a line about for the run's log (`take_refusals`).
pub struct Inbox {
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    run_dir: PathBuf,
    refusals: Arc<Mutex<Vec<String>>>,
}

/// The most a control file may hold: a control is a line of JSON.
const MAX_CONTROL_BYTES: u64 = 4096;

impl Inbox {
    pub fn start(run_dir: &Path, tx: Sender<ControlMsg>) -> std::io::Result<Self> {
        let dir = control_dir(run_dir);
        // the inbox deletes what it reads: never in a folder a link points it to
        if std::fs::symlink_metadata(&dir).is_ok_and(|m| !m.is_dir()) {
            return Err(std::io::Error::other(format!(
                "{} is not a folder of this run (a link or a file); remove it",
                dir.display()
            )));
        }
        std::fs::create_dir_all(&dir)?;
        // controls left from an earlier session are stale: they were meant for that run
        for stale in std::fs::read_dir(&dir)?.flatten() {
            let _ = std::fs::remove_file(stale.path());
        }
        atomic_file::write(&run_dir.join(LIVE_FILE), std::process::id().to_string().as_bytes())?;
        let done = Arc::new(AtomicBool::new(false));
        let refusals = Arc::new(Mutex::new(vec![]));
        let (flag, refused) = (done.clone(), refusals.clone());
        let thread = std::thread::Builder::new().name("difflab-inbox".into()).spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                for taken in take_all(&dir) {
                    match taken {
                        Ok(msg) => {
                            if tx.send(msg).is_err() {
                                return;
                            }
                        }
                        Err(why) => refused.lock().unwrap_or_else(|e| e.into_inner()).push(why),
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })?;
        Ok(Self { done, thread: Some(thread), run_dir: run_dir.to_path_buf(), refusals })
    }

    /// What the inbox refused since the last call, a line each.
    pub fn take_refusals(&self) -> Vec<String> {
        std::mem::take(&mut *self.refusals.lock().unwrap_or_else(|e| e.into_inner()))
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

/// Reads and deletes every complete control file, oldest first: a control, or why the file was
/// refused. Only regular files are read (a FIFO would block, a link lead elsewhere), without
/// blocking and at most `MAX_CONTROL_BYTES`; every file is removed (unlinked: a link's target is
/// left alone), since a file renamed into place whole cannot become valid later.
fn take_all(dir: &Path) -> Vec<Result<ControlMsg, String>> {
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
        .map(|p| {
            let taken = read_control(&p);
            let _ = std::fs::remove_file(&p);
            taken.map_err(|why| format!("refused {}: {why}", p.display()))
        })
        .collect()
}

fn read_control(path: &Path) -> Result<ControlMsg, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let meta = std::fs::symlink_metadata(path).map_err(|e| e.to_string())?;
    if !meta.file_type().is_file() {
        return Err("not a regular file (a link, FIFO or device); removed unread".into());
    }
    if meta.len() > MAX_CONTROL_BYTES {
        return Err(format!("{} bytes, more than a control's {MAX_CONTROL_BYTES}; removed unread", meta.len()));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    file.take(MAX_CONTROL_BYTES).read_to_string(&mut text).map_err(|e| e.to_string())?;
    serde_json::from_str(&text).map_err(|e| {
        format!("not a control ({e}); the controls are pause, resume, checkpoint_now, scale_lr with a factor in (0, 1], stop")
    })
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
