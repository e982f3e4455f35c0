//! Memory-mapped safetensors checkpoint (one file or shards): tensors looked up by name, their
//! shapes checked against what the plan needs, converted to the storage type on the host once.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use lorac_plan::DType;

use super::EngineElem;
use super::error::{ExecResult, ExecutorError};

/// Where a tensor lives: file index, dtype, shape, byte range inside the file's data section.
type Entry = (usize, Dtype, Vec<usize>, (usize, usize));

pub(crate) struct Checkpoint {
    dir: PathBuf,
    files: Vec<(PathBuf, Mmap, usize)>,
    /// Tensor name → where it lives.
    index: HashMap<String, Entry>,
}

impl Checkpoint {
    /// Maps every `*.safetensors` file of `dir` (sharded checkpoints included).
    pub(crate) fn open(dir: &Path) -> ExecResult<Checkpoint> {
        let io = |source| ExecutorError::Io { path: dir.to_path_buf(), source };
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        paths.sort();
        if paths.is_empty() {
            return Err(ExecutorError::Io {
                path: dir.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no *.safetensors file"),
            });
        }
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for path in paths {
            let file = File::open(&path).map_err(|source| ExecutorError::Io { path: path.clone(), source })?;
            // Safety: the checkpoint is read only; a file modified while mapped is the user's
            // error and at worst yields wrong weights, which the header checks cannot prevent.
            let map = unsafe { Mmap::map(&file) }.map_err(|source| ExecutorError::Io { path: path.clone(), source })?;
            let (header, meta) =
                SafeTensors::read_metadata(&map).map_err(|e| ExecutorError::Safetensors { path: path.clone(), message: e.to_string() })?;
            let data_start = 8 + header;
            for (name, info) in meta.tensors() {
                index.insert(name, (files.len(), info.dtype, info.shape.clone(), info.data_offsets));
            }
            files.push((path, map, data_start));
        }
        Ok(Checkpoint { dir: dir.to_path_buf(), files, index })
    }

    /// Bytes `name` occupies in its file (0 when absent): the unit of load progress.
    pub(crate) fn stored_bytes(&self, name: &str) -> u64 {
        self.index.get(name).map_or(0, |(_, _, _, (start, end))| (end - start) as u64)
    }

    pub(crate) fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// The tensor `name`'s little-endian bytes and dtype, refused unless its shape is `shape`.
    fn raw(&self, name: &str, shape: &[usize]) -> ExecResult<(&[u8], Dtype)> {
        let (file, dtype, actual, (start, end)) =
            self.index.get(name).ok_or_else(|| ExecutorError::MissingTensor { name: name.to_string(), dir: self.dir.clone() })?;
        if actual != shape {
            return Err(ExecutorError::TensorShape { name: name.to_string(), expected: shape.to_vec(), actual: actual.clone() });
        }
        let (path, map, data_start) = &self.files[*file];
        let bytes = map.get(data_start + start..data_start + end).ok_or_else(|| ExecutorError::Safetensors {
            path: path.clone(),
            message: format!("tensor `{name}` lies past the end of the file"),
        })?;
        let n: usize = shape.iter().product();
        let size = match dtype {
            Dtype::F32 => 4,
            Dtype::BF16 | Dtype::F16 => 2,
            other => return Err(ExecutorError::TensorDtype { name: name.to_string(), dtype: format!("{other:?}") }),
        };
        if bytes.len() != n * size {
            return Err(ExecutorError::Safetensors {
                path: path.clone(),
                message: format!("tensor `{name}` holds {} bytes for {n} elements of {dtype:?}", bytes.len()),
            });
        }
        Ok((bytes, *dtype))
    }

    /// The tensor `name` as f32 values, refused unless its shape is `shape`.
    pub(crate) fn tensor_f32(&self, name: &str, shape: &[usize]) -> ExecResult<Vec<f32>> {
        let (bytes, dtype) = self.raw(name, shape)?;
        Ok(match dtype {
            Dtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::BF16 => bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            _ => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        })
    }

    /// The tensor `name` in the engine's storage type: the stored bytes as they are when the
    /// checkpoint already holds that type (a bf16 checkpoint into a bf16 engine: no f32 pass
    /// over 16 GB), else through f32.
    pub(crate) fn tensor<F: EngineElem>(&self, name: &str, shape: &[usize]) -> ExecResult<Vec<F>> {
        let (bytes, dtype) = self.raw(name, shape)?;
        let same = matches!((dtype, F::DTYPE), (Dtype::F32, DType::F32) | (Dtype::BF16, DType::BF16));
        if same {
            return Ok(F::from_le_bytes(bytes));
        }
        Ok(self.tensor_f32(name, shape)?.into_iter().map(F::from_f32).collect())
    }
}
