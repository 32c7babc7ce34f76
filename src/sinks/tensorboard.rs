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
use crate::events::{Event, Histogram};

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
    #[prost(oneof = "Value", tags = "2, 4, 5")]
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
    SummaryValue { tag: tag.into(), value: Some(Value::SimpleValue(v as f32)) }
}

/// Our histogram (counts over [edges[i], edges[i+1]]) as TensorBoard buckets.
pub fn histogram(tag: &str, h: &Histogram) -> SummaryValue {
    let num: u64 = h.counts.iter().sum();
    SummaryValue {
        tag: tag.into(),
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
}
