//! Typed device buffers: a handle plus its element count, so launches can check sizes against
//! the `LoraLayout` before anything reaches the device.
//!
//! A buffer can also be a *view*: a sub-range of a larger allocation (cubecl's
//! `Handle::offset_start` / `offset_end`, which both the wgpu and the CUDA runtime honour when
//! binding, reading and writing). The executor carves its activation arena and its per-step
//! metadata block into views, so the ops keep their exact-length checks while nothing is
//! allocated per step. View starts are multiples of [`VIEW_ALIGN`] bytes.

use std::marker::PhantomData;

use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::error::{LoraError, Result};

/// Byte alignment of a view's start inside its allocation. wgpu binds a storage buffer only at
/// multiples of `min_storage_buffer_offset_alignment`, which WebGPU caps at 256 (Vulkan's
/// `minStorageBufferOffsetAlignment` as well); CUDA's widest vector loads need 16.
pub const VIEW_ALIGN: u64 = 256;

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

    /// Bytes of device memory behind this buffer (its view's range, not the allocation's).
    pub fn size_bytes(&self) -> u64 {
        self.handle.size_in_used()
    }

    /// Elements `start..start + len` as a buffer of their own: the same device memory, no copy
    /// and no allocation. `start · size_of::<E>()` must be a multiple of [`VIEW_ALIGN`]. A
    /// zero-length view keeps one element of storage behind it where there is one, as
    /// [`DeviceBuffer::empty`] does (kernels are never bound to an empty range).
    pub fn slice(&self, start: usize, len: usize) -> Result<Self> {
        let elem = size_of::<E>() as u64;
        let end = start.checked_add(len).filter(|&end| end <= self.len);
        let Some(end) = end else {
            return Err(LoraError::View(format!("elements {start}..{start}+{len} of a buffer of {}", self.len)));
        };
        let byte_start = start as u64 * elem;
        if !byte_start.is_multiple_of(VIEW_ALIGN) {
            return Err(LoraError::View(format!("start {byte_start} B is not a multiple of {VIEW_ALIGN} B")));
        }
        let used = self.handle.size_in_used();
        let stored = if len == 0 && (end as u64 + 1) * elem <= used { 1 } else { len as u64 };
        let byte_end = byte_start + stored * elem;
        let handle = self.handle.clone().offset_start(byte_start).offset_end(used - byte_end);
        Ok(DeviceBuffer { handle, len, _elem: PhantomData })
    }

    /// The first `len` elements (see [`DeviceBuffer::slice`]).
    pub fn prefix(&self, len: usize) -> Result<Self> {
        self.slice(0, len)
    }

    /// The same bytes read as another element type of the same size (an `i32` view of a `u32`
    /// metadata block).
    pub(crate) fn reinterpret<T: CubeElement>(&self) -> Result<DeviceBuffer<T>> {
        if size_of::<T>() != size_of::<E>() {
            return Err(LoraError::View(format!("{} B elements read as {} B elements", size_of::<E>(), size_of::<T>())));
        }
        Ok(DeviceBuffer { handle: self.handle.clone(), len: self.len, _elem: PhantomData })
    }

    /// `self[offset..offset + data.len()] = data`, in place.
    ///
    /// cubecl 0.10's `ComputeClient` offers no host→device write into an existing handle
    /// (`ComputeServer::write` is reached only through `create*`, which reserves a new slice
    /// first), so the bytes travel through one temporary pool slice that a copy kernel moves
    /// into place; the temporary goes back to the pool when this returns, and a later write of
    /// the same size reuses it (the device memory reserved does not grow).
    pub fn write_at<R: Runtime>(&self, client: &ComputeClient<R>, offset: usize, data: &[E]) -> Result<()>
    where
        E: CubePrimitive,
    {
        let end = offset.checked_add(data.len()).filter(|&end| end <= self.len && end < u32::MAX as usize);
        if end.is_none() {
            return Err(LoraError::View(format!("write of {} elements at {offset} into a buffer of {}", data.len(), self.len)));
        }
        if data.is_empty() {
            return Ok(());
        }
        let staging = DeviceBuffer::upload(client, data);
        // Safety: `offset + len ≤ self.len` was checked above and the kernel stops at `len`.
        unsafe {
            copy_kernel::launch_unchecked::<E, R>(
                client,
                crate::ops::grid_1d(data.len().div_ceil(COPY_THREADS as usize)),
                CubeDim::new_1d(COPY_THREADS),
                staging.arg(1),
                self.arg(1),
                offset as u32,
                data.len() as u32,
            );
        }
        Ok(())
    }

    pub(crate) fn check_len(&self, name: &'static str, expected: usize) -> Result<()> {
        if self.len != expected {
            return Err(LoraError::BufferSize { name, expected, actual: self.len });
        }
        Ok(())
    }

    /// Array argument viewed as vectors of `vector_size` elements; the caller has checked the
    /// length against the layout, which is what makes the unchecked launch sound. The length
    /// given is in elements: cubecl divides it by the vector width, so that `len()` in the
    /// kernel counts vectors (the split-K expands find a copy's length from it).
    pub(crate) fn arg<R: Runtime>(&self, vector_size: usize) -> ArrayArg<R> {
        unsafe { ArrayArg::from_raw_parts(self.handle.clone(), self.len.max(vector_size)) }
    }
}

/// One device allocation carved into typed views at [`VIEW_ALIGN`]-aligned byte offsets (the
/// executor's activation arena).
#[derive(Debug, Clone)]
pub struct DeviceArena {
    handle: Handle,
    bytes: u64,
}

impl DeviceArena {
    /// Uninitialised storage of `bytes` bytes (at least one word).
    pub fn new<R: Runtime>(client: &ComputeClient<R>, bytes: u64) -> Self {
        let bytes = bytes.max(4);
        DeviceArena { handle: client.empty(bytes as usize), bytes }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// `len` elements of `E` starting `byte_offset` bytes into the arena.
    pub fn view<E: CubeElement>(&self, byte_offset: u64, len: usize) -> Result<DeviceBuffer<E>> {
        let elem = size_of::<E>() as u64;
        if !byte_offset.is_multiple_of(elem) {
            return Err(LoraError::View(format!("arena offset {byte_offset} B is not a multiple of the {elem} B element")));
        }
        let whole = DeviceBuffer::<E> { handle: self.handle.clone(), len: (self.bytes / elem) as usize, _elem: PhantomData };
        whole.slice((byte_offset / elem) as usize, len)
    }
}

const COPY_THREADS: u32 = 256;

#[cube(launch_unchecked)]
fn copy_kernel<E: CubePrimitive>(src: &Array<E>, dst: &mut Array<E>, offset: u32, len: u32) {
    let i = crate::ops::linear_cube() * COPY_THREADS as usize + UNIT_POS as usize;
    if i >= len as usize {
        terminate!();
    }
    dst[offset as usize + i] = src[i];
}
