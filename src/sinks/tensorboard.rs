//! TensorBoard event files, written by hand: TFRecord framing (length, masked CRC-32C of the
//! length, an `Event` proto, masked CRC-32C of the data), `brain.Event:2` first. About a
//! hundred lines instead of a stale crate or a `protoc` build step; TensorBoard's own reader
//! reads them back in the tests (`scripts/check_tensorboard.py`).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use prost::Message;

use super::figures::{self, History};
use super::Sink;
use crate::events::now;
use crate::events::{Event, Histogram, RunStatus};

// --- tensorboard/compat/proto/{event,summary,histogram}.proto, the fields we write

#[derive(Clone, PartialEq, Message)]
pub struct TbEvent {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(oneof = "What", tags = "3, 5")]
    pub what: Option<What>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum What {
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
}

#[derive(Clone, PartialEq, Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

#[derive(Clone, PartialEq, Message)]
pub struct SummaryValue {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(message, optional, tag = "9")]
    pub metadata: Option<SummaryMetadata>,
    #[prost(oneof = "Value", tags = "2, 4, 5, 8")]
    pub value: Option<Value>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Value {
    #[prost(float, tag = "2")]
    SimpleValue(f32),
    #[prost(message, tag = "4")]
    Image(Image),
    #[prost(message, tag = "5")]
    Histo(HistogramProto),
    #[prost(message, tag = "8")]
    Tensor(TensorProto),
}

#[derive(Clone, PartialEq, Message)]
pub struct SummaryMetadata {
    #[prost(message, optional, tag = "1")]
    pub plugin_data: Option<PluginData>,
}

#[derive(Clone, PartialEq, Message)]
pub struct PluginData {
    #[prost(string, tag = "1")]
    pub plugin_name: String,
    #[prost(bytes = "vec", tag = "2")]
    pub content: Vec<u8>,
}

/// The hparams plugin's empty tensor: DT_FLOAT, shape [0].
#[derive(Clone, PartialEq, Message)]
pub struct TensorProto {
    #[prost(int32, tag = "1")]
    pub dtype: i32,
    #[prost(message, optional, tag = "2")]
    pub tensor_shape: Option<TensorShape>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TensorShape {
    #[prost(message, repeated, tag = "2")]
    pub dim: Vec<TensorDim>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TensorDim {
    #[prost(int64, tag = "1")]
    pub size: i64,
}

// --- tensorboard/plugins/hparams/plugin_data.proto: a run is one session of the HParams
// dashboard, its settings the session's hyper-parameters

#[derive(Clone, PartialEq, Message)]
pub struct HParamsPluginData {
    #[prost(int32, tag = "1")]
    pub version: i32,
    #[prost(oneof = "HParamsData", tags = "3, 4")]
    pub data: Option<HParamsData>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum HParamsData {
    #[prost(message, tag = "3")]
    SessionStart(SessionStartInfo),
    #[prost(message, tag = "4")]
    SessionEnd(SessionEndInfo),
}

#[derive(Clone, PartialEq, Message)]
pub struct SessionStartInfo {
    #[prost(btree_map = "string, message", tag = "1")]
    pub hparams: std::collections::BTreeMap<String, ProtoValue>,
    #[prost(string, tag = "4")]
    pub group_name: String,
    #[prost(double, tag = "5")]
    pub start_time_secs: f64,
}

#[derive(Clone, PartialEq, Message)]
pub struct SessionEndInfo {
    /// 1 success, 2 failure, 0 unknown (a stop).
    #[prost(int32, tag = "1")]
    pub status: i32,
    #[prost(double, tag = "2")]
    pub end_time_secs: f64,
}

/// `google.protobuf.Value`: the kinds a setting takes.
#[derive(Clone, PartialEq, Message)]
pub struct ProtoValue {
    #[prost(oneof = "ProtoKind", tags = "2, 3, 4")]
    pub kind: Option<ProtoKind>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum ProtoKind {
    #[prost(double, tag = "2")]
    Number(f64),
    #[prost(string, tag = "3")]
    Text(String),
    #[prost(bool, tag = "4")]
    Bool(bool),
}

/// A summary value carrying hparams plugin data, as TensorBoard's own `hparams` API writes it.
fn hparams_value(tag: &str, data: HParamsData) -> SummaryValue {
    let content = HParamsPluginData { version: 0, data: Some(data) }.encode_to_vec();
    SummaryValue {
        tag: tag.into(),
        metadata: Some(SummaryMetadata { plugin_data: Some(PluginData { plugin_name: "hparams".into(), content }) }),
        value: Some(Value::Tensor(TensorProto {
            dtype: 1,
            tensor_shape: Some(TensorShape { dim: vec![TensorDim { size: 0 }] }),
        })),
    }
}

/// The settings a run is told apart by in the HParams dashboard: the model's shape and variant,
/// the optimisation, the schedule, the length, the seed and the data (a sweep's or study's
/// swept keys are among them).
fn session_start(config: &serde_json::Value, variant: &str) -> SummaryValue {
    use crate::config::keys::{Role, KEYS};
    let mut hparams: std::collections::BTreeMap<String, ProtoValue> = KEYS
        .iter()
        .filter(|k| {
            matches!(k.role, Role::Model | Role::Optimisation | Role::Batch | Role::Length | Role::Seed | Role::Data)
        })
        .filter_map(|k| {
            let kind = match &config[k.name] {
                serde_json::Value::Number(n) => ProtoKind::Number(n.as_f64()?),
                serde_json::Value::String(s) => ProtoKind::Text(s.clone()),
                serde_json::Value::Bool(b) => ProtoKind::Bool(*b),
                _ => return None,
            };
            Some((k.name.to_string(), ProtoValue { kind: Some(kind) }))
        })
        .collect();
    hparams.insert("variant".into(), ProtoValue { kind: Some(ProtoKind::Text(variant.into())) });
    hparams_value(
        "_hparams_/session_start_info",
        HParamsData::SessionStart(SessionStartInfo { hparams, group_name: String::new(), start_time_secs: now() }),
    )
}

/// How the session ended, in the plugin's `Status`: a failure is a failure, a finished run a
/// success, a stop (which resume continues) neither.
fn session_end(status: RunStatus) -> SummaryValue {
    let status = match status {
        RunStatus::Failed => 2,
        s if s.is_finished() => 1,
        _ => 0,
    };
    hparams_value(
        "_hparams_/session_end_info",
        HParamsData::SessionEnd(SessionEndInfo { status, end_time_secs: now() }),
    )
}

#[derive(Clone, PartialEq, Message)]
pub struct Image {
    #[prost(int32, tag = "1")]
    pub height: i32,
    #[prost(int32, tag = "2")]
    pub width: i32,
    /// 3 = RGB
    #[prost(int32, tag = "3")]
    pub colorspace: i32,
    #[prost(bytes = "vec", tag = "4")]
    pub encoded_image_string: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
pub struct HistogramProto {
    #[prost(double, tag = "1")]
    pub min: f64,
    #[prost(double, tag = "2")]
    pub max: f64,
    #[prost(double, tag = "3")]
    pub num: f64,
    #[prost(double, tag = "4")]
    pub sum: f64,
    #[prost(double, tag = "5")]
    pub sum_squares: f64,
    /// Bucket i covers (bucket_limit[i-1], bucket_limit[i]].
    #[prost(double, repeated, tag = "6")]
    pub bucket_limit: Vec<f64>,
    #[prost(double, repeated, tag = "7")]
    pub bucket: Vec<f64>,
}

/// CRC-32C, rotated and offset as TFRecord requires.
pub fn masked_crc(bytes: &[u8]) -> u32 {
    let c = crc32c::crc32c(bytes);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord: `u64 len | u32 masked_crc(len) | data | u32 masked_crc(data)`.
pub fn write_record(w: &mut impl Write, data: &[u8]) -> std::io::Result<()> {
    let len = (data.len() as u64).to_le_bytes();
    w.write_all(&len)?;
    w.write_all(&masked_crc(&len).to_le_bytes())?;
    w.write_all(data)?;
    w.write_all(&masked_crc(data).to_le_bytes())
}

pub struct EventWriter {
    out: BufWriter<File>,
    pub path: PathBuf,
}

impl EventWriter {
    /// A new event file in `dir`, named as TensorBoard's own writer names them.
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let name = format!("events.out.tfevents.{:010}.{host}.{}.0", now() as u64, std::process::id());
        let path = dir.join(name);
        let mut w = Self { out: BufWriter::new(File::create(&path)?), path };
        w.write(&TbEvent { wall_time: now(), step: 0, what: Some(What::FileVersion("brain.Event:2".into())) })?;
        Ok(w)
    }

    pub fn write(&mut self, event: &TbEvent) -> std::io::Result<()> {
        write_record(&mut self.out, &event.encode_to_vec())?;
        self.out.flush()
    }

    pub fn values(&mut self, step: u64, values: Vec<SummaryValue>) -> std::io::Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        self.write(&TbEvent {
            wall_time: now(),
            step: step as i64,
            what: Some(What::Summary(Summary { value: values })),
        })
    }
}

pub fn scalar(tag: &str, v: f64) -> SummaryValue {
    SummaryValue { tag: tag.into(), metadata: None, value: Some(Value::SimpleValue(v as f32)) }
}

/// Our histogram (counts over [edges[i], edges[i+1]]) as TensorBoard buckets.
pub fn histogram(tag: &str, h: &Histogram) -> SummaryValue {
    let num: u64 = h.counts.iter().sum();
    SummaryValue {
        tag: tag.into(),
        metadata: None,
        value: Some(Value::Histo(HistogramProto {
            min: h.edges.first().copied().unwrap_or(0.0),
            max: h.edges.last().copied().unwrap_or(0.0),
            num: num as f64,
            sum: h.sum,
            sum_squares: h.sum_squares,
            bucket_limit: h.edges[1..].to_vec(),
            bucket: h.counts.iter().map(|c| *c as f64).collect(),
        })),
    }
}

pub fn image(tag: &str, png: &figures::Png) -> SummaryValue {
    SummaryValue {
        tag: tag.into(),
        metadata: None,
        value: Some(Value::Image(Image {
            height: png.height as i32,
            width: png.width as i32,
            colorspace: 3,
            encoded_image_string: png.bytes.clone(),
        })),
    }
}

/// The run's scalars, the diff-norm histogram and (with `log_figures`) the figures, under the
/// tags the research code logs (README: Outputs), in `output_dir/runs/`.
pub struct TensorBoard {
    writer: EventWriter,
    figures: Option<History>,
}

impl TensorBoard {
    pub fn open(output_dir: &Path, with_figures: bool) -> std::io::Result<Self> {
        Ok(Self {
            writer: EventWriter::create(&output_dir.join("runs"))?,
            figures: with_figures.then(History::default),
        })
    }

    fn write_figures(&mut self, step: u64) -> std::io::Result<()> {
        let Some(history) = &self.figures else { return Ok(()) };
        let values =
            figures::render_all(history)?.iter().map(|(name, png)| image(&format!("figures/{name}"), png)).collect();
        self.writer.values(step, values)
    }
}

impl Sink for TensorBoard {
    fn handle(&mut self, event: &Event) -> std::io::Result<()> {
        if let Some(h) = self.figures.as_mut() {
            h.update(event);
        }
        match event {
            // the HParams dashboard's session: its settings now, its outcome at the end
            Event::TrainBegin(b) => self.writer.values(b.start_step, vec![session_start(&b.config, &b.variant)]),
            Event::TrainEnd(e) => {
                let mut v: Vec<SummaryValue> = [
                    ("hparams/final_eval_loss", e.eval_loss),
                    ("hparams/best_eval_loss", e.best_eval_loss),
                    ("hparams/final_perplexity", e.perplexity),
                ]
                .into_iter()
                .filter_map(|(tag, x)| Some(scalar(tag, x?)))
                .collect();
                v.push(session_end(e.status));
                self.writer.values(e.step, v)
            }
            Event::Progress(p) => {
                let mut v = vec![
                    scalar("train/loss", p.loss),
                    scalar("train/learning_rate", p.learning_rate),
                    scalar("train/grad_norm", p.grad_norm),
                    scalar("train/tokens_per_second", p.tokens_per_second),
                    scalar("train/epoch", p.epoch),
                ];
                let stats = [
                    ("mean", p.diff_norm_mean),
                    ("std", p.diff_norm_std),
                    ("min", p.diff_norm_min),
                    ("max", p.diff_norm_max),
                ];
                for (name, x) in stats {
                    if let Some(x) = x {
                        v.push(scalar(&format!("research/diff_norm_{name}"), x));
                    }
                }
                if let Some(h) = &p.diff_norm_hist {
                    v.push(histogram("research/diff_norm", h));
                }
                for layer in p.layers.iter().flatten() {
                    v.push(scalar(&format!("layers/grad_norm/{}", layer.name), layer.grad_norm));
                    v.push(scalar(&format!("layers/update_ratio/{}", layer.name), layer.update_ratio));
                }
                if let Some(m) = p.gpu_mib {
                    v.push(scalar("train/gpu_mib", m));
                }
                self.writer.values(p.step, v)
            }
            // another window length than the training one: its own tags, `eval/loss@1024`
            Event::Evaluate(e) if !e.at_training_length() => {
                let at = e.context_length.unwrap_or(0);
                let tags = vec![
                    scalar(&format!("eval/loss@{at}"), e.eval_loss),
                    scalar(&format!("eval/perplexity@{at}"), e.perplexity),
                ];
                self.writer.values(e.step, tags)
            }
            Event::Evaluate(e) => {
                self.writer.values(
                    e.step,
                    vec![
                        scalar("eval/loss", e.eval_loss),
                        scalar("eval/perplexity", e.perplexity),
                        // what the loss was computed on: fewer than all blocks is a partial eval
                        scalar("eval/blocks", e.eval_blocks as f64),
                    ],
                )?;
                self.write_figures(e.step)
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_test_vectors() {
        // tensorboard/data/server/masked_crc.rs
        assert_eq!(crc32c::crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(masked_crc(b"\x1a\x11CRC test, one two"), 0x5794_d08a);
        // and those bytes are exactly Event{file_version: "CRC test, one two"}
        let e = TbEvent { wall_time: 0.0, step: 0, what: Some(What::FileVersion("CRC test, one two".into())) };
        assert_eq!(e.encode_to_vec(), b"\x1a\x11CRC test, one two");
    }

    #[test]
    fn records_are_framed_and_checksummed() {
        let mut buf = vec![];
        write_record(&mut buf, b"abc").unwrap();
        assert_eq!(buf.len(), 8 + 4 + 3 + 4);
        assert_eq!(&buf[..8], &3u64.to_le_bytes());
        assert_eq!(&buf[8..12], &masked_crc(&3u64.to_le_bytes()).to_le_bytes());
        assert_eq!(&buf[12..15], b"abc");
        assert_eq!(&buf[15..], &masked_crc(b"abc").to_le_bytes());
    }

    /// The plugin's `Status`: 1 success, 2 failure, 0 unknown; a stop is not a success, since
    /// a resume may still finish it.
    #[test]
    fn session_end_status_follows_the_run_status() {
        let status_of = |s: RunStatus| {
            let value = session_end(s);
            let content = value.metadata.and_then(|m| m.plugin_data).map(|p| p.content).unwrap();
            match HParamsPluginData::decode(content.as_slice()).unwrap().data {
                Some(HParamsData::SessionEnd(end)) => end.status,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(status_of(RunStatus::Completed), 1);
        assert_eq!(status_of(RunStatus::EarlyStopped), 1);
        assert_eq!(status_of(RunStatus::Failed), 2);
        assert_eq!(status_of(RunStatus::Stopped), 0);
    }
}
