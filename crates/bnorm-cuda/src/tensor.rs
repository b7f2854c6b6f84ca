//! Element types the kernels support and device buffers owned by the crate.

use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};

use bnorm::element::{bf16, f16, Element};
use bnorm::expert::Geometry;
use bnorm::Layout;

use crate::{CudaError, Gpu, Result};

/// The element types with GPU kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DTypeTag {
    /// `f32`.
    F32,
    /// IEEE half precision, stored as its bit pattern.
    F16,
    /// bfloat16, stored as its bit pattern.
    BF16,
}

impl DTypeTag {
    /// Every supported type.
    pub const ALL: [DTypeTag; 3] = [DTypeTag::F32, DTypeTag::F16, DTypeTag::BF16];

    /// Suffix of the kernel names (`bn_norm_bf16`).
    pub fn suffix(self) -> &'static str {
        match self {
            DTypeTag::F32 => "f32",
            DTypeTag::F16 => "f16",
            DTypeTag::BF16 => "bf16",
        }
    }

    /// The element type in the CUDA source.
    pub(crate) fn c_type(self) -> &'static str {
        match self {
            DTypeTag::F32 => "float",
            DTypeTag::F16 => "h16",
            DTypeTag::BF16 => "b16",
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for bnorm::element::f16 {}
    impl Sealed for bnorm::element::bf16 {}
}

/// A storage type with GPU kernels: `f32`, [`struct@f16`], [`struct@bf16`]. Statistics accumulate in
/// f64 and element-wise arithmetic runs in f32 whatever the storage type.
pub trait GpuElement: Element + sealed::Sealed {
    /// The type of the device buffer (the 16-bit types travel as their bit patterns).
    type Raw: DeviceRepr + ValidAsZeroBits + Copy + Unpin + 'static;
    /// Which kernels to launch.
    const TAG: DTypeTag;
    /// To the device representation.
    fn to_raw(self) -> Self::Raw;
    /// From the device representation.
    fn from_raw(raw: Self::Raw) -> Self;
}

impl GpuElement for f32 {
    type Raw = f32;
    const TAG: DTypeTag = DTypeTag::F32;
    fn to_raw(self) -> f32 {
        self
    }
    fn from_raw(raw: f32) -> f32 {
        raw
    }
}

impl GpuElement for f16 {
    type Raw = u16;
    const TAG: DTypeTag = DTypeTag::F16;
    fn to_raw(self) -> u16 {
        self.to_bits()
    }
    fn from_raw(raw: u16) -> f16 {
        f16::from_bits(raw)
    }
}

impl GpuElement for bf16 {
    type Raw = u16;
    const TAG: DTypeTag = DTypeTag::BF16;
    fn to_raw(self) -> u16 {
        self.to_bits()
    }
    fn from_raw(raw: u16) -> bf16 {
        bf16::from_bits(raw)
    }
}

/// A batch in device memory: its buffer, shape and layout. Owned by this crate's
/// [`Gpu`]; upload and download copy synchronously with respect to the host.
///
/// ```no_run
/// use bnorm::Layout;
/// use bnorm_cuda::{DeviceTensor, Gpu};
/// let gpu = Gpu::new(0)?;
/// let x = DeviceTensor::upload(&gpu, &[1.0f32, 2.0, 3.0, 4.0], &[2, 2], Layout::NC)?;
/// assert_eq!(x.download()?, vec![1.0, 2.0, 3.0, 4.0]);
/// # Ok::<(), bnorm_cuda::CudaError>(())
/// ```
pub struct DeviceTensor<T: GpuElement> {
    pub(crate) buf: CudaSlice<T::Raw>,
    pub(crate) gpu: Gpu,
    shape: Vec<usize>,
    layout: Layout,
    geometry: Geometry,
}

impl<T: GpuElement> std::fmt::Debug for DeviceTensor<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceTensor")
            .field("dtype", &T::TAG)
            .field("shape", &self.shape)
            .field("layout", &self.layout)
            .finish()
    }
}

impl<T: GpuElement> DeviceTensor<T> {
    pub(crate) fn checked(shape: &[usize], layout: Layout) -> Result<Geometry> {
        let g = layout.geometry(shape)?;
        crate::plan::check_size(g)?;
        Ok(g)
    }

    /// A batch over a buffer (`g` checked from `shape` and `layout`).
    pub(crate) fn from_parts(
        buf: CudaSlice<T::Raw>,
        gpu: &Gpu,
        shape: &[usize],
        layout: Layout,
        geometry: Geometry,
    ) -> Self {
        DeviceTensor {
            buf,
            gpu: gpu.clone(),
            shape: shape.to_vec(),
            layout,
            geometry,
        }
    }

    /// The device address of the first element (what another library would take).
    pub fn device_address(&self) -> u64 {
        use cudarc::driver::DevicePtr;
        let (address, _sync) = self.buf.device_ptr(&self.gpu.stream);
        address
    }

    /// Copies `data` (`shape` in `layout`) to the device.
    pub fn upload(gpu: &Gpu, data: &[T], shape: &[usize], layout: Layout) -> Result<Self> {
        let geometry = Self::checked(shape, layout)?;
        if data.len() != geometry.len() {
            return Err(CudaError::Core(bnorm::Error::ShapeMismatch {
                what: "data",
                expected: vec![geometry.len()],
                got: vec![data.len()],
            }));
        }
        let mut raw: Vec<T::Raw> = data.iter().map(|v| v.to_raw()).collect();
        // An empty batch still owns one element: the driver refuses 0-byte allocations.
        if raw.is_empty() {
            raw.push(T::from_f64(0.0).to_raw());
        }
        let buf = gpu
            .stream
            .clone_htod(&raw)
            .map_err(CudaError::driver("upload"))?;
        Ok(DeviceTensor {
            buf,
            gpu: gpu.clone(),
            shape: shape.to_vec(),
            layout,
            geometry,
        })
    }

    /// A device batch with every element equal to `value` (`NaN` poisons an output
    /// buffer so unwritten elements show).
    pub fn filled(gpu: &Gpu, value: T, shape: &[usize], layout: Layout) -> Result<Self> {
        let g = Self::checked(shape, layout)?;
        Self::upload(gpu, &vec![value; g.len()], shape, layout)
    }

    /// A zero-filled device batch.
    pub fn zeros(gpu: &Gpu, shape: &[usize], layout: Layout) -> Result<Self> {
        let geometry = Self::checked(shape, layout)?;
        let buf = gpu
            .stream
            .alloc_zeros(geometry.len().max(1))
            .map_err(CudaError::driver("alloc"))?;
        Ok(DeviceTensor {
            buf,
            gpu: gpu.clone(),
            shape: shape.to_vec(),
            layout,
            geometry,
        })
    }

    /// Copies the batch back to the host (waits for pending work on the stream).
    pub fn download(&self) -> Result<Vec<T>> {
        let raw = self
            .gpu
            .stream
            .clone_dtoh(&self.buf)
            .map_err(CudaError::driver("download"))?;
        // (an empty batch's buffer holds one placeholder element)
        Ok(raw.into_iter().take(self.len()).map(T::from_raw).collect())
    }

    /// Device-to-device copy of `src` (same shape and layout) into this batch: the copy
    /// ceiling the benchmarks compare with.
    pub fn copy_from(&mut self, src: &DeviceTensor<T>) -> Result<()> {
        self.gpu.same(&src.gpu)?;
        if src.shape != self.shape || src.layout != self.layout {
            return Err(CudaError::Core(bnorm::Error::ShapeMismatch {
                what: "copy source",
                expected: self.shape.clone(),
                got: src.shape.clone(),
            }));
        }
        self.gpu
            .stream
            .memcpy_dtod(&src.buf, &mut self.buf)
            .map_err(CudaError::driver("copy"))
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The `(outer, channels, inner)` view of the shape.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.geometry.len()
    }

    /// Whether the batch holds no element.
    pub fn is_empty(&self) -> bool {
        self.geometry.is_empty()
    }

    /// Bytes of device memory the elements occupy.
    pub fn num_bytes(&self) -> usize {
        self.len() * std::mem::size_of::<T::Raw>()
    }

    /// The GPU that holds the batch.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_round_trip() {
        for v in [0.0f64, -1.5, 3.140625, 65504.0, f64::INFINITY] {
            let h = f16::from_f64(v);
            assert_eq!(f16::from_raw(h.to_raw()), h);
            let b = bf16::from_f64(v);
            assert_eq!(bf16::from_raw(b.to_raw()), b);
            let f = v as f32;
            assert_eq!(f32::from_raw(f.to_raw()), f);
        }
        assert!(f16::from_raw(f16::NAN.to_raw()).is_nan());
        assert_eq!(std::mem::size_of::<<bf16 as GpuElement>::Raw>(), 2);
    }

    #[test]
    fn tags() {
        assert_eq!(<f32 as GpuElement>::TAG.suffix(), "f32");
        assert_eq!(<f16 as GpuElement>::TAG.suffix(), "f16");
        assert_eq!(<bf16 as GpuElement>::TAG.suffix(), "bf16");
    }
}
