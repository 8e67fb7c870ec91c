//! The DCP sink: the pipeline's ordered output streamed into a [`DcpWriter`].
//!
//! A DCP output holds each tensor as chunks (the newest member's, so the trainer reloads with
//! the same parallelism), and the writer takes them file by file, in
//! [`DcpWriter::chunk_order`]. The caller runs the pipeline over exactly that order
//! ([`super::run_pipeline_ordered`]), so each job continues the chunk being written: the first
//! job of a chunk's region begins it, every job appends its bytes, and the job that reaches the
//! region's end closes it. A chunk larger than a job spans several jobs and streams through the
//! writer's bounded buffers; nothing holds a whole chunk.
//!
//! Chunks with no elements get no jobs, but the writer still expects their (empty) items: the
//! sink writes them as it passes them, and at the end.

use pma_format::dcp_out::{DcpWriteSummary, DcpWriter};

use super::{Job, OutputRegion, Sink};
use crate::error::Result;

/// Writes one of each job's outputs into a DCP checkpoint, chunk by chunk, in the writer's
/// order; [`Sink::finish`] writes `.metadata` last.
#[derive(Debug)]
pub struct DcpSink {
    writer: Option<DcpWriter>,
    output: usize,
    summary: Option<DcpWriteSummary>,
}

impl DcpSink {
    /// A sink writing output `output` of every job through `writer`. Job `tensor` indices are
    /// indices into the writer's [`pma_format::dcp_out::DcpLayout::tensors`], and the jobs must
    /// come in [`DcpWriter::chunk_order`].
    pub fn new(writer: DcpWriter, output: usize) -> DcpSink {
        DcpSink {
            writer: Some(writer),
            output,
            summary: None,
        }
    }

    /// What the writer wrote (files, lengths, CRC-32s), once [`Sink::finish`] has run; run the
    /// pipeline into `&mut sink` to read it afterwards.
    pub fn summary(&self) -> Option<&DcpWriteSummary> {
        self.summary.as_ref()
    }

    /// The output regions of `writer`'s layout in the order it writes them (file by file):
    /// the order to run the pipeline in for this sink.
    pub fn job_order(writer: &DcpWriter) -> Vec<OutputRegion> {
        writer
            .chunk_order()
            .into_iter()
            .map(|(t, c)| OutputRegion {
                tensor: t,
                region: writer.layout().tensors[t].chunks[c].region.clone(),
            })
            .collect()
    }

    fn writer(&mut self) -> &mut DcpWriter {
        self.writer
            .as_mut()
            .expect("the writer is taken only by finish, after the last job")
    }

    /// Writes the empty items of zero-element chunks until the next expected chunk has data
    /// (or none is left).
    fn skip_empty_chunks(&mut self) -> Result<()> {
        let w = self.writer();
        while let Some((t, c)) = w.next_chunk() {
            let tensor = &w.layout().tensors[t];
            if tensor.chunks[c].region.numel() > 0 {
                break;
            }
            let (fqn, region) = (tensor.fqn.clone(), tensor.chunks[c].region.clone());
            w.begin_chunk(&fqn, &region)?;
            w.end_chunk()?;
        }
        Ok(())
    }
}

impl Sink for DcpSink {
    fn write(&mut self, job: &Job<'_>, outputs: &[Vec<u8>]) -> Result<()> {
        if job.elems.start == 0 {
            self.skip_empty_chunks()?;
            let w = self.writer();
            // The writer checks this is the chunk it expects (name and box), so a job order that
            // strays from chunk_order fails here rather than writing a wrong file.
            let fqn = w.layout().tensors[job.tensor].fqn.clone();
            w.begin_chunk(&fqn, job.region)?;
        }
        let output = self.output;
        let w = self.writer();
        w.write(&outputs[output])?;
        if job.elems.end == job.region.numel() {
            w.end_chunk()?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        self.skip_empty_chunks()?;
        let summary = self
            .writer
            .take()
            .expect("finish is called once")
            .finish()?;
        self.summary = Some(summary);
        Ok(())
    }
}

impl Sink for &mut DcpSink {
    fn write(&mut self, job: &Job<'_>, outputs: &[Vec<u8>]) -> Result<()> {
        (**self).write(job, outputs)
    }

    fn finish(&mut self) -> Result<()> {
        (**self).finish()
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use pma_format::dcp::DcpCheckpoint;
    use pma_format::dcp_out::{DcpChunk, DcpLayout, DcpTensor};
    use pma_format::{Dtype, Region, TensorSource};

    use super::*;
    use crate::pipeline::{
        run_pipeline_ordered, Emitter, Kernel, PipelineOptions, Scratch, JOB_ELEMS,
    };

    /// Element i (global, 1-D) of tensor t is the f32 value t·10⁷ + i.
    struct Numbered;

    impl Kernel for Numbered {
        fn compute(&self, job: &Job<'_>, _: &mut Scratch, out: &mut Emitter<'_>) -> Result<()> {
            let mut b = out.buffer((job.elems.end - job.elems.start) as usize * 4);
            let base = job.region.offsets.first().copied().unwrap_or(0);
            for (k, e) in job.elems.clone().enumerate() {
                let v = (job.tensor as u64 * 10_000_000 + base + e) as f32;
                b[4 * k..4 * k + 4].copy_from_slice(&v.to_le_bytes());
            }
            out.emit(b);
            Ok(())
        }

        fn member_path(&self, member: usize) -> PathBuf {
            PathBuf::from(format!("member-{member}"))
        }

        fn tensor_name(&self, tensor: usize) -> String {
            format!("t{tensor}")
        }
    }

    fn chunk(offset: u64, size: u64, file: &str) -> DcpChunk {
        DcpChunk {
            region: Region {
                offsets: vec![offset],
                sizes: vec![size],
            },
            file: file.into(),
        }
    }

    #[test]
    fn chunks_larger_than_a_job_and_empty_chunks_stream_in_writer_order() {
        // Tensor 0's first chunk spans three jobs; tensor 1 has an empty chunk in each file.
        let n0 = 2 * JOB_ELEMS + 9;
        let n1 = 5;
        let layout = DcpLayout {
            tensors: vec![
                DcpTensor {
                    fqn: "big".into(),
                    dtype: Dtype::F32,
                    shape: vec![n0],
                    chunks: vec![
                        chunk(0, n0 - 4, "__0_0.distcp"),
                        chunk(n0 - 4, 4, "__1_0.distcp"),
                    ],
                },
                DcpTensor {
                    fqn: "small".into(),
                    dtype: Dtype::F32,
                    shape: vec![n1],
                    chunks: vec![chunk(n1, 0, "__0_0.distcp"), chunk(0, n1, "__1_0.distcp")],
                },
            ],
            ..DcpLayout::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let writer = DcpWriter::create(dir.path(), layout).unwrap();
        let order = DcpSink::job_order(&writer);
        let opts = PipelineOptions {
            threads: 3,
            cancel: None,
            allow_nonfinite: false,
            progress: &crate::NoProgress,
        };
        run_pipeline_ordered(&order, &Numbered, DcpSink::new(writer, 0), &opts).unwrap();

        let got = DcpCheckpoint::open(dir.path()).unwrap();
        let mut scratch = Vec::new();
        for (t, (name, n)) in [("big", n0), ("small", n1)].into_iter().enumerate() {
            let tensor = got.tensor(name).unwrap();
            let full = Region::full(&[n]);
            let bytes = tensor.read(&full, 0..n, &mut scratch).unwrap();
            let want: Vec<u8> = (0..n)
                .flat_map(|i| ((t as u64 * 10_000_000 + i) as f32).to_le_bytes())
                .collect();
            assert!(bytes == want.as_slice(), "{name}");
        }
    }
}
