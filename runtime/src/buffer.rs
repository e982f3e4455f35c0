//! Typed device buffers: a handle plus its element count, so launches can check sizes against
//! the `LoraLayout` before anything reaches the device.

use std::marker::PhantomData;

use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::error::{LoraError, Result};

/// A device buffer of `len` elements of `E`.
#[derive(Debug)]
pub struct DeviceBuffer<E> {
    pub(crate) handle: Handle,
    len: usize,
    _elem: PhantomData<E>,
}

impl<E> Clone for DeviceBuffer<E> {
    fn clone(&self) -> Self {
        DeviceBuffer { handle: self.handle.clone(), len: self.len, _elem: PhantomData }
    }
}

impl<E: CubeElement> DeviceBuffer<E> {
    pub fn upload<R: Runtime>(client: &ComputeClient<R>, data: &[E]) -> Self {
        // A zero-length allocation is not portable; keep one padding element instead.
        let handle = if data.is_empty() { client.empty(size_of::<E>()) } else { client.create_from_slice(E::as_bytes(data)) };
        DeviceBuffer { handle, len: data.len(), _elem: PhantomData }
    }

    /// Uninitialised storage (scratch and outputs).
    pub fn empty<R: Runtime>(client: &ComputeClient<R>, len: usize) -> Self {
        DeviceBuffer { handle: client.empty(len.max(1) * size_of::<E>()), len, _elem: PhantomData }
    }

    /// Blocking read-back (tests and benchmarks only).
    pub fn read<R: Runtime>(&self, client: &ComputeClient<R>) -> Vec<E> {
        let bytes = client.read_one_unchecked(self.handle.clone());
        E::from_bytes(&bytes)[..self.len].to_vec()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn check_len(&self, name: &'static str, expected: usize) -> Result<()> {
        if self.len != expected {
            return Err(LoraError::BufferSize { name, expected, actual: self.len });
        }
        Ok(())
    }

    /// Array argument viewed as vectors of `vector_size` elements; the caller has checked the
    /// length against the layout, which is what makes the unchecked launch sound.
    pub(crate) fn arg<R: Runtime>(&self, vector_size: usize) -> ArrayArg<R> {
        unsafe { ArrayArg::from_raw_parts(self.handle.clone(), (self.len / vector_size).max(1)) }
    }
}
