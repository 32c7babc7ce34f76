//! Files from the Hugging Face Hub, through hf-hub, in the standard Hugging Face cache.
//!
//! The cache is the one Python uses (`HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`), laid out as
//! `<repo folder>/{refs,snapshots,blobs}`. A file already in the cache is read from there with
//! no network request. hf-hub has no `HF_HUB_OFFLINE`: we honour it here (and a failed
//! download falls back to the cache), so offline runs read only the cache.

use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Repo, RepoType};

use super::{DataError, Progress, ProgressFn};

/// A file in a hub repository at a revision.
#[derive(Debug, Clone)]
pub struct HubFile {
    pub repo_id: String,
    pub repo_type: RepoType,
    /// A commit sha (pinned) or a branch name.
    pub revision: String,
    pub filename: String,
}

impl HubFile {
    fn repo(&self) -> Repo {
        Repo::with_revision(self.repo_id.clone(), self.repo_type, self.revision.clone())
    }

    fn type_flag(&self) -> &'static str {
        match self.repo_type {
            RepoType::Dataset => " --repo-type dataset",
            RepoType::Space => " --repo-type space",
            RepoType::Model => "",
        }
    }

    /// How a user fetches it by hand (with Python's CLI, into the same cache).
    pub fn fetch_hint(&self) -> String {
        download_hint(std::slice::from_ref(self))
    }
}

/// The commands that fetch `files` into the cache: `hf download` (huggingface_hub's CLI since
/// 0.34), one per repository and revision, with `huggingface-cli download` as the older spelling.
pub fn download_hint(files: &[HubFile]) -> String {
    let mut groups: Vec<(&HubFile, Vec<&str>)> = vec![];
    for f in files {
        match groups.iter_mut().find(|(g, _)| g.repo_id == f.repo_id && g.revision == f.revision) {
            Some((_, names)) => names.push(&f.filename),
            None => groups.push((f, vec![&f.filename])),
        }
    }
    let commands: Vec<String> = groups
        .iter()
        .map(|(g, names)| format!("{}{} {} --revision {}", g.repo_id, g.type_flag(), names.join(" "), g.revision))
        .collect();
    format!(
        "run once with network access, or: {} (older huggingface_hub: `huggingface-cli download` with the same arguments)",
        commands.iter().map(|c| format!("`hf download {c}`")).collect::<Vec<_>>().join(" and ")
    )
}

/// The Hugging Face hub cache directory, resolved as `huggingface_hub` does.
pub fn cache_dir() -> PathBuf {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(p) = env("HF_HUB_CACHE").or_else(|| env("HUGGINGFACE_HUB_CACHE")) {
        return p;
    }
    if let Some(home) = env("HF_HOME") {
        return home.join("hub");
    }
    let base = env("XDG_CACHE_HOME")
        .or_else(|| env("HOME").map(|h| h.join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    base.join("huggingface").join("hub")
}

/// `HF_HUB_OFFLINE=1` (or `true`/`yes`), as huggingface_hub reads it.
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

/// The cached copy of `file`, if any: `snapshots/<sha>/<filename>` where `<sha>` is the
/// revision itself (a pinned commit) or what `refs/<revision>` names (a branch).
pub fn cached(cache: &Path, file: &HubFile) -> Option<PathBuf> {
    let folder = cache.join(file.repo().folder_name());
    let mut shas = vec![file.revision.clone()];
    if let Ok(sha) = std::fs::read_to_string(folder.join("refs").join(&file.revision)) {
        shas.insert(0, sha.trim().to_string());
    }
    shas.into_iter().map(|sha| folder.join("snapshots").join(sha).join(&file.filename)).find(|p| p.is_file())
}

/// The local path of `file`: from the cache, else downloaded into it (unless offline).
pub fn fetch(file: &HubFile, progress: &ProgressFn) -> Result<PathBuf, DataError> {
    let cache = cache_dir();
    if let Some(path) = cached(&cache, file) {
        return Ok(path);
    }
    let missing = |reason: String| DataError::HubMissing {
        file: format!("{}: `{}` (revision {})", file.repo_id, file.filename, file.revision),
        cache: cache.clone(),
        reason,
        hint: file.fetch_hint(),
    };
    if offline() {
        return Err(missing("HF_HUB_OFFLINE is set and the file is not in the cache".into()));
    }
    let mut builder = ApiBuilder::new().with_cache_dir(cache.clone()).with_progress(false).with_retries(2);
    if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
        builder = builder.with_endpoint(endpoint);
    }
    if let Some(token) = hf_token(&cache) {
        builder = builder.with_token(Some(token));
    }
    let api = builder.build().map_err(|e| missing(format!("cannot start the hub client: {e}")))?;
    let reporter = DownloadProgress { progress, label: format!("downloading {}", file.filename), done: 0, total: 0 };
    match api.repo(file.repo()).download_with_progress(&file.filename, reporter) {
        Ok(path) => Ok(path),
        Err(e) => {
            // a download that failed half-way may still have left a complete earlier copy
            cached(&cache, file).ok_or_else(|| missing(format!("the download failed: {e}")))
        }
    }
}

/// `HF_TOKEN`, else the token file beside the hub cache (`$HF_HOME/token`).
fn hf_token(cache: &Path) -> Option<String> {
    std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()).or_else(|| {
        let file = cache.parent()?.join("token");
        std::fs::read_to_string(file).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
    })
}

struct DownloadProgress<'a> {
    progress: &'a ProgressFn<'a>,
    label: String,
    done: u64,
    total: u64,
}

impl hf_hub::api::Progress for DownloadProgress<'_> {
    fn init(&mut self, size: usize, _filename: &str) {
        self.total = size as u64;
        (self.progress)(Progress::bytes(&self.label, 0, self.total));
    }
    fn update(&mut self, size: usize) {
        self.done += size as u64;
        (self.progress)(Progress::bytes(&self.label, self.done, self.total));
    }
    fn finish(&mut self) {
        (self.progress)(Progress::bytes(&self.label, self.total, self.total));
    }
}
