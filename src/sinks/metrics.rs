//! `metrics.jsonl`: one JSON object per logged event, appended. Each line goes out in one
//! `write` on an `O_APPEND` file, so a kill leaves whole lines; a torn last line (a full disk)
//! is cut off when the file is opened again. Readers keep the last value per step, so a
//! resumed run draws cleanly.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::Sink;
use crate::events::Event;

pub const METRICS_FILE: &str = "metrics.jsonl";

pub struct MetricsLog {
    file: File,
    path: PathBuf,
}

impl MetricsLog {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        repair_torn_tail(path)?;
        // never through a link: the log is the run's own file (the folder's claim refuses links)
        let file = OpenOptions::new().create(true).append(true).custom_flags(libc::O_NOFOLLOW).open(path)?;
        Ok(Self { file, path: path.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Drops a last line without its newline (an interrupted write).
fn repair_torn_tail(path: &Path) -> std::io::Result<()> {
    let Ok(mut f) = OpenOptions::new().read(true).write(true).custom_flags(libc::O_NOFOLLOW).open(path) else {
        return Ok(());
    };
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(());
    }
    // find the last newline, scanning back in chunks
    let mut end = len;
    let mut buf = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let n = (end - start) as usize;
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(&mut buf[..n])?;
        if let Some(pos) = buf[..n].iter().rposition(|b| *b == b'\n') {
            let keep = start + pos as u64 + 1;
            if keep != len {
                f.set_len(keep)?;
            }
            return Ok(());
        }
        end = start;
    }
    f.set_len(0)
}

impl Sink for MetricsLog {
    fn handle(&mut self, event: &Event) -> std::io::Result<()> {
        if event.is_logged() {
            let mut line = event.to_json_line();
            line.push('\n');
            self.file.write_all(line.as_bytes())?;
        }
        Ok(())
    }

    fn finish(&mut self) -> std::io::Result<()> {
        self.file.sync_all()
    }
}

/// Reads a metrics file: every complete line that parses, in order.
pub fn read(path: &Path) -> std::io::Result<Vec<Event>> {
    let text = std::fs::read_to_string(path)?;
    Ok(parse_lines(&text))
}

pub fn parse_lines(text: &str) -> Vec<Event> {
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    complete.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Control, ControlOrigin, ControlRecord};

    #[test]
    fn a_torn_last_line_is_cut_and_appending_continues() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(METRICS_FILE);
        let ev = Event::Control(ControlRecord {
            step: 3,
            action: Control::Pause.action(),
            lr_scale: 1.0,
            origin: ControlOrigin::Ui,
        });
        {
            let mut log = MetricsLog::open(&path).unwrap();
            log.handle(&ev).unwrap();
        }
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"event\":\"prog").unwrap();
        let mut log = MetricsLog::open(&path).unwrap();
        log.handle(&ev).unwrap();
        let events = read(&path).unwrap();
        assert_eq!(events, vec![ev.clone(), ev]);
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()));
    }
}
