//! One run per `output_dir`. Before a run touches its folder: the folder must not be a file or
//! empty-named, must not hold another run (unless resuming, or `overwrite_output_dir` clears
//! it, as HF Trainer's flag does), and no other process may be training into it: an exclusive
//! `flock` on `.difflab.lock`, which the OS releases when the process dies. Leftovers of dead
//! processes (hidden `.checkpoint-N.*` folders) are removed once the lock is held.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::checkpoint;
use super::TrainError;
use crate::config::RunConfig;

pub const LOCK_FILE: &str = ".difflab.lock";

/// What marks a folder as holding a run.
const RUN_FILES: [&str; 3] = ["metrics.jsonl", "config.json", "trainer_state.json"];

/// The held lock: the folder is this process's until it is dropped (or the process ends).
#[derive(Debug)]
pub struct Claim {
    _lock: File,
    pub dir: PathBuf,
    /// The claim made the folder: a run that ends before writing anything removes it again.
    pub created: bool,
}

impl Claim {
    /// Undoes the claim of a run that wrote nothing (it was refused after the claim: too big,
    /// no data): the folder's lock, its empty control inbox, and the folder if the claim made
    /// it and it is empty now. A later run with the input fixed then finds it as it was.
    pub fn release_unused(self) {
        let Claim { _lock, dir, created } = self;
        let _ = fs::remove_dir(dir.join(super::remote::CONTROL_DIR)); // only when empty
        let _ = fs::remove_file(dir.join(LOCK_FILE));
        drop(_lock);
        if created {
            let _ = fs::remove_dir(&dir); // only when empty
        }
    }
}

/// Names a run writes in its folder: none of them may be a link (the run would write or delete
/// through it, outside the folder).
fn owned(name: &str) -> bool {
    const OWNED: [&str; 12] = [
        "metrics.jsonl",
        "control",
        "runs",
        "figures",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "trainer_state.json",
        "difflab_config.json",
        "checksums.json",
        "difflab.pid",
        LOCK_FILE,
    ];
    OWNED.contains(&name) || name.starts_with("checkpoint-")
}

#[derive(Debug, thiserror::Error)]
pub enum OutputDirError {
    #[error("output_dir is empty; give a folder for the run's files, e.g. --output_dir outputs/my-run")]
    Empty,
    #[error("output_dir {0} is a file, not a folder; choose another --output_dir")]
    NotAFolder(PathBuf),
    #[error("output_dir {dir} already holds a run ({what}); nothing was changed. Resume it with --resume_from_checkpoint latest, replace it with --overwrite_output_dir true, or choose another --output_dir")]
    Taken { dir: PathBuf, what: String },
    #[error("output_dir {dir} is in use: process {pid} is training into it; wait for it to finish, or choose another --output_dir (`difflab watch {dir}` shows it)")]
    InUse { dir: PathBuf, pid: String },
    #[error("output_dir {dir} cannot be written ({source}); choose a folder you can write, e.g. --output_dir outputs/my-run")]
    NotWritable { dir: PathBuf, source: std::io::Error },
    #[error("output_dir {dir}: {link} is a symbolic link; a run writes and deletes only its own files, never through a link. Remove the link, or choose another --output_dir")]
    Link { dir: PathBuf, link: PathBuf },
    #[error("{dir} is in use: process {pid} is running a study or sweep in it; wait for it to finish, or give this one another --output_dir")]
    ProcedureInUse { dir: PathBuf, pid: String },
    #[error("cannot prepare output_dir {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// A study's or sweep's folder, held (an exclusive `flock`) while the procedure runs: a second
/// one into the same folder is refused at once instead of both writing its runs and summary.
#[derive(Debug)]
pub struct ProcedureLock {
    file: File,
    path: PathBuf,
    /// The folder the lock made, if it made it.
    made: Option<PathBuf>,
    /// Whether the lock file is new (else it is a finished procedure's, left as it was).
    new_file: bool,
}

impl ProcedureLock {
    /// The procedure starts: the lock file names this process, for a second one's message.
    pub fn mark(&mut self) -> std::io::Result<()> {
        self.file.set_len(0)?;
        self.file.seek(SeekFrom::Start(0))?;
        self.file.write_all(std::process::id().to_string().as_bytes())
    }

    /// Gives the folder back as it was found (a procedure refused before it ran anything): the
    /// lock file, and the folder if the lock made it.
    pub fn abandon(self) {
        if self.new_file {
            let _ = fs::remove_file(&self.path);
        }
        if let Some(dir) = &self.made {
            let _ = fs::remove_dir(dir); // only when empty
        }
    }
}

pub const PROCEDURE_LOCK_FILE: &str = ".difflab-procedure.lock";

pub fn lock_procedure(dir: &Path) -> Result<ProcedureLock, OutputDirError> {
    let path = dir.join(PROCEDURE_LOCK_FILE);
    let made = (!dir.exists()).then(|| dir.to_path_buf());
    let new_file = !path.exists();
    fs::create_dir_all(dir).map_err(|source| match source.kind() {
        std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem => {
            OutputDirError::NotWritable { dir: dir.to_path_buf(), source }
        }
        _ => OutputDirError::Io { path: dir.to_path_buf(), source },
    })?;
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem => {
                OutputDirError::NotWritable { dir: dir.to_path_buf(), source }
            }
            _ => OutputDirError::Io { path: path.clone(), source },
        })?;
    if let Some(pid) = holder(&mut file) {
        return Err(OutputDirError::ProcedureInUse { dir: dir.to_path_buf(), pid });
    }
    Ok(ProcedureLock { file, path, made, new_file })
}

impl OutputDirError {
    /// Bad input (exit 2), or a failure of the file system (exit 1).
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, OutputDirError::Io { .. })
    }
}

/// What in `dir` belongs to an earlier run, if anything.
pub fn earlier_run(dir: &Path) -> Option<String> {
    let mut found: Vec<String> = RUN_FILES.iter().filter(|f| dir.join(f).exists()).map(|f| f.to_string()).collect();
    let checkpoints = checkpoint::list(dir);
    if let Some((step, _)) = checkpoints.last() {
        found.push(format!("{} checkpoint(s), the last at step {step}", checkpoints.len()));
    }
    (!found.is_empty()).then(|| found.join(", "))
}

/// Takes the exclusive lock on `lock`, or returns the PID written by the process holding it.
fn holder(lock: &mut File) -> Option<String> {
    // Safety: flock on a descriptor of an open file; the call has no memory effects.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return None;
    }
    let mut pid = String::new();
    let _ = lock.read_to_string(&mut pid);
    Some(if pid.trim().is_empty() { "unknown".into() } else { pid.trim().to_string() })
}

/// Claims `cfg.output_dir` for a training run (see the module's comment).
pub fn claim(cfg: &RunConfig) -> Result<Claim, TrainError> {
    Ok(claim_dir(Path::new(&cfg.output_dir), cfg.resume_from_checkpoint.is_some(), cfg.overwrite_output_dir)?)
}

fn claim_dir(dir: &Path, resuming: bool, overwrite: bool) -> Result<Claim, OutputDirError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| OutputDirError::Io { path, source }
    };
    if dir.as_os_str().is_empty() {
        return Err(OutputDirError::Empty);
    }
    if dir.exists() && !dir.is_dir() {
        return Err(OutputDirError::NotAFolder(dir.to_path_buf()));
    }
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if owned(&name) && entry.file_type().is_ok_and(|t| t.is_symlink()) {
            return Err(OutputDirError::Link { dir: dir.to_path_buf(), link: entry.path() });
        }
    }
    // read-only until the folder is created: a refused run leaves it as it was
    let lock_path = dir.join(LOCK_FILE);
    if let Ok(mut held) = File::open(&lock_path) {
        if let Some(pid) = holder(&mut held) {
            return Err(OutputDirError::InUse { dir: dir.to_path_buf(), pid });
        }
    }
    let earlier = if dir.is_dir() { earlier_run(dir) } else { None };
    if let (Some(what), false, false) = (&earlier, resuming, overwrite) {
        return Err(OutputDirError::Taken { dir: dir.to_path_buf(), what: what.clone() });
    }
    let created = !dir.exists();
    let not_writable = |source: std::io::Error| match source.kind() {
        std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem => {
            OutputDirError::NotWritable { dir: dir.to_path_buf(), source }
        }
        _ => OutputDirError::Io { path: dir.to_path_buf(), source },
    };
    fs::create_dir_all(dir).map_err(not_writable)?;
    let mut lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&lock_path)
        .map_err(not_writable)?;
    if let Some(pid) = holder(&mut lock) {
        return Err(OutputDirError::InUse { dir: dir.to_path_buf(), pid });
    }
    lock.set_len(0).and_then(|_| lock.seek(SeekFrom::Start(0))).map_err(io(&lock_path))?;
    lock.write_all(std::process::id().to_string().as_bytes()).map_err(io(&lock_path))?;
    let entries: Vec<PathBuf> = fs::read_dir(dir).map_err(io(dir))?.flatten().map(|e| e.path()).collect();
    for path in entries {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        // hidden checkpoint folders and temporary files of saves a kill cut short
        let leftover = name.starts_with(".checkpoint-") || crate::atomic_file::is_dead_temp(&name);
        let cleared = overwrite && earlier.is_some() && name != LOCK_FILE;
        if leftover || cleared {
            let removed = if path.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
            removed.map_err(io(&path))?;
        }
    }
    crate::atomic_file::remove_dead_temps(&dir.join("figures"));
    Ok(Claim { _lock: lock, dir: dir.to_path_buf(), created })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_claim_is_refused_naming_the_holder_and_released_on_drop() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        let first = claim_dir(&dir, false, false).unwrap();
        // flock locks belong to the open file description: a second open in this process is
        // refused just as another process would be
        let err = claim_dir(&dir, false, false).unwrap_err();
        assert!(matches!(&err, OutputDirError::InUse { pid, .. } if *pid == std::process::id().to_string()), "{err}");
        drop(first);
        claim_dir(&dir, false, false).unwrap();
    }

    #[test]
    fn leftovers_of_dead_processes_are_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let stale = tmp.path().join(".checkpoint-20.tmp-99999");
        fs::create_dir_all(&stale).unwrap();
        fs::write(stale.join("model.safetensors"), b"half").unwrap();
        let _claim = claim_dir(tmp.path(), false, false).unwrap();
        assert!(!stale.exists());
    }

    #[test]
    fn empty_names_and_files_are_refused() {
        assert!(matches!(claim_dir(Path::new(""), false, false), Err(OutputDirError::Empty)));
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("f");
        fs::write(&file, b"x").unwrap();
        assert!(matches!(claim_dir(&file, false, false), Err(OutputDirError::NotAFolder(_))));
    }
}
