//! Where the pipeline's ordered output goes: the [`Sink`] trait and the safetensors sink.
//!
//! The writer thread hands a sink every job's output buffers in job order, so a sink decides
//! only *where* bytes go (which file, which part), never their order. [`SafetensorsSink`]
//! writes HF safetensors shards (and the shard index when there is more than one shard); a DCP
//! writer or an object-store multipart upload is another implementation. Sinks compose: a pair
//! of sinks receives every job (a watch update writes its state and its output in one pass), and
//! `None` receives nothing.

use std::collections::BTreeMap;
use std::path::PathBuf;

use pma_format::writer::DirectIo;
use pma_format::{StreamWriter, TensorSpec};

use super::Job;
use crate::error::Result;

/// Receives the pipeline's output, job by job, in job order, on the writer thread.
pub trait Sink: Send {
    /// Writes what the kernel emitted for `job` (`outputs[k]` is its k-th output).
    fn write(&mut self, job: &Job<'_>, outputs: &[Vec<u8>]) -> Result<()>;

    /// Called once after the last job: completes every file and makes it durable.
    fn finish(&mut self) -> Result<()>;
}

impl<A: Sink, B: Sink> Sink for (A, B) {
    fn write(&mut self, job: &Job<'_>, outputs: &[Vec<u8>]) -> Result<()> {
        self.0.write(job, outputs)?;
        self.1.write(job, outputs)
    }

    fn finish(&mut self) -> Result<()> {
        self.0.finish()?;
        self.1.finish()
    }
}

impl<S: Sink> Sink for Option<S> {
    fn write(&mut self, job: &Job<'_>, outputs: &[Vec<u8>]) -> Result<()> {
        self.as_mut().map_or(Ok(()), |s| s.write(job, outputs))
    }

    fn finish(&mut self) -> Result<()> {
        self.as_mut().map_or(Ok(()), |s| s.finish())
    }
}

/// One safetensors file of a [`SafetensorsSink`]: its path and the output tensors it holds, in
/// write order, with their specs (the header).
#[derive(Debug, Clone)]
pub struct ShardFile {
    /// Where to write it (a staging path).
    pub path: PathBuf,
    /// (output tensor index, spec) in write order.
    pub tensors: Vec<(usize, TensorSpec)>,
}

/// Writes one of each job's outputs into safetensors files, each tensor's bytes in order; with
/// more than one file, also `model.safetensors.index.json` beside them.
#[derive(Debug)]
pub struct SafetensorsSink {
    files: Vec<ShardFile>,
    /// File of each output tensor; `None` for tensors this sink does not hold.
    file_of: Vec<Option<usize>>,
    metadata: BTreeMap<String, String>,
    direct_io: DirectIo,
    output: usize,
    current: usize,
    writer: Option<StreamWriter>,
    /// Whether `finish` writes the shard index (off for one part of a partitioned merge, whose
    /// files are only some of the output's).
    index: bool,
}

impl SafetensorsSink {
    /// A sink writing output `output` of every job into `files` (in order; a tensor lives in
    /// one file), with `metadata` in every header.
    pub fn new(
        files: Vec<ShardFile>,
        metadata: BTreeMap<String, String>,
        direct_io: DirectIo,
        output: usize,
    ) -> SafetensorsSink {
        let n_tensors = files
            .iter()
            .flat_map(|f| f.tensors.iter().map(|(t, _)| t + 1))
            .max()
            .unwrap_or(0);
        let mut file_of = vec![None; n_tensors];
        for (i, f) in files.iter().enumerate() {
            for (t, _) in &f.tensors {
                file_of[*t] = Some(i);
            }
        }
        SafetensorsSink {
            files,
            file_of,
            metadata,
            direct_io,
            output,
            current: 0,
            writer: None,
            index: true,
        }
    }

    /// The same sink, but writing no shard index: its files are part of an output whose index
    /// is written elsewhere (see [`crate::partition`]).
    pub fn without_index(mut self) -> SafetensorsSink {
        self.index = false;
        self
    }

    /// Finishes files until `file` is the open one.
    fn advance_to(&mut self, file: usize) -> Result<&mut StreamWriter> {
        while self.writer.is_none() || self.current < file {
            if let Some(w) = self.writer.take() {
                w.finish()?;
                self.current += 1;
            }
            let f = &self.files[self.current];
            let specs: Vec<TensorSpec> = f.tensors.iter().map(|(_, s)| s.clone()).collect();
            self.writer = Some(StreamWriter::create_with(
                &f.path,
                &specs,
                &self.metadata,
                self.direct_io,
            )?);
        }
        Ok(self.writer.as_mut().expect("opened above"))
    }
}

impl Sink for SafetensorsSink {
    fn write(&mut self, job: &Job<'_>, outputs: &[Vec<u8>]) -> Result<()> {
        let Some(Some(file)) = self.file_of.get(job.tensor).copied() else {
            return Ok(());
        };
        let bytes = &outputs[self.output];
        self.advance_to(file)?.write(bytes)?;
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        if self.files.is_empty() {
            return Ok(());
        }
        // Files that hold only empty tensors get no jobs; write them too.
        let last = self.files.len() - 1;
        self.advance_to(last)?;
        self.writer.take().expect("opened above").finish()?;
        if self.index && self.files.len() > 1 {
            let dir = self.files[0]
                .path
                .parent()
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("."));
            let listing: Vec<(String, Vec<&TensorSpec>)> = self
                .files
                .iter()
                .map(|f| {
                    let name = f
                        .path
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    (name, f.tensors.iter().map(|(_, s)| s).collect())
                })
                .collect();
            pma_format::write_index(&dir, &listing)?;
        }
        Ok(())
    }
}
