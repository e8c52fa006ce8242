//! NIfTI-1 reading and writing (see `io/mod.rs` for the behaviour).
//!
//! The header is parsed by the `nifti` crate (it handles byte order); voxels are read and
//! converted here, frame by frame, straight from the on-disk x-fastest order, so that scaling
//! follows the NIfTI rules (slope 0 or NaN = unscaled) and a short file is an error, not a panic.
//! Files are written by this module too, so that the temporary name and the header fields are
//! fully under our control.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, ErrorKind, Read, Write};
use std::path::{Path, PathBuf};

use flate2::bufread::MultiGzDecoder;
use flate2::write::GzEncoder;
use flate2::Compression;
use nifti::{Endianness, NiftiHeader};

use super::xform::{affine_to_qform, det3, qform_affine};
use crate::{Error, Geometry, Result, Volume};

/// What a NIfTI header says about the grid, without reading voxels.
#[derive(Clone, Debug)]
pub struct Header {
    /// Spatial dims and, for 4D files, the number of frames (1 for 3D files).
    pub dims: [usize; 3],
    pub frames: usize,
    pub geometry: Geometry,
    /// The on-disk data type is an integer type (before scaling).
    pub integer_type: bool,
}

/// A whole image: one or more 3D frames on one grid, values scaled to f32.
#[derive(Clone, Debug)]
pub struct Image {
    pub header: Header,
    /// One `Volume` per frame (a 3D file gives one).
    pub frames: Vec<Volume>,
}

/// Reads only the header of a `.nii` / `.nii.gz` file.
pub fn read_header(path: &Path) -> Result<Header> {
    let mut stream = open_stream(path)?;
    Ok(parse_header(path, &mut stream)?.header)
}

/// Reads a whole `.nii` / `.nii.gz` file, one `Volume` per frame, values scaled to f32.
pub fn read_image(path: &Path) -> Result<Image> {
    let mut stream = open_stream(path)?;
    let parsed = parse_header(path, &mut stream)?;
    let header = parsed.header.clone();
    let nvox = header.dims[0] * header.dims[1] * header.dims[2];
    let frame_bytes = nvox * parsed.dtype.size();

    if !stream.gzip {
        // An uncompressed file's length is known: report truncation before allocating.
        let data_bytes = (frame_bytes as u64).saturating_mul(header.frames as u64);
        let need = (parsed.vox_offset as u64).saturating_add(data_bytes);
        if stream.file_len < need {
            return Err(truncated(path, stream.file_len, need));
        }
    }
    skip_to_data(path, &mut stream, parsed.vox_offset)?;

    // Voxels are converted block by block through a small buffer that stays in cache, so the
    // only large allocation is the f32 output itself.
    let mut block = vec![0u8; BLOCK_BYTES.min(frame_bytes)];
    let mut frames = Vec::with_capacity(header.frames);
    for t in 0..header.frames {
        let mut data = Vec::new();
        // A compressed file's length says nothing about its content: reserve only a bounded
        // start, so that a header claiming a huge grid costs memory only as data arrives.
        let reserve = if stream.gzip {
            nvox.min(GZIP_RESERVE)
        } else {
            nvox
        };
        data.try_reserve_exact(reserve)
            .map_err(|_| too_big(path, nvox * 4))?;
        let mut left = frame_bytes;
        while left > 0 {
            let n = left.min(block.len());
            if let Err(e) = stream.reader.read_exact(&mut block[..n]) {
                return Err(data_read_error(path, e, t, header.frames));
            }
            decode(
                parsed.dtype,
                parsed.big_endian,
                &block[..n],
                parsed.scaling,
                &mut data,
            );
            left -= n;
        }
        frames.push(Volume {
            dims: header.dims,
            data,
            geometry: header.geometry.clone(),
        });
    }
    if stream.gzip {
        // The gzip checksum sits after the data: reading to the end is what verifies it, and a
        // damaged stream can otherwise inflate to plausible-looking garbage.
        std::io::copy(&mut stream.reader, &mut std::io::sink()).map_err(|e| {
            Error::input(
                path,
                format!("compressed data is corrupt ({e}); re-create or re-download the file"),
            )
        })?;
    }
    Ok(Image { header, frames })
}

/// Writes `vol` as float32 with its geometry (sform and qform), atomically.
pub fn write_volume(path: &Path, vol: &Volume) -> Result<()> {
    check_volume(path, vol)?;
    let layout = Layout::new(vol, 1, DataType::F32);
    atomic_write(path, |w| {
        w.write_all(&layout.header_bytes())?;
        write_values(w, &vol.data, |v, out| {
            out.extend_from_slice(&v.to_le_bytes())
        })
    })
}

/// Writes `frames` (one or more volumes on one grid) rounded to int16, atomically; a 4D file
/// when there are several frames.
pub fn write_volume_i16(path: &Path, frames: &[&Volume]) -> Result<()> {
    let first = frames.first().ok_or_else(|| {
        Error::Usage(format!(
            "cannot write {}: no volumes were given",
            path.display()
        ))
    })?;
    for (t, vol) in frames.iter().enumerate() {
        check_volume(path, vol)?;
        if vol.dims != first.dims || !same_affine(&vol.geometry.affine, &first.geometry.affine) {
            return Err(Error::Usage(format!(
                "cannot write {}: volume {t} has dims {:?} and affine {:?}, but volume 0 has \
                 dims {:?} and affine {:?}; all frames of a 4D file must share one grid",
                path.display(),
                vol.dims,
                vol.geometry.affine,
                first.dims,
                first.geometry.affine
            )));
        }
    }
    if frames.len() > i16::MAX as usize {
        return Err(Error::Usage(format!(
            "cannot write {}: {} frames exceed the NIfTI-1 limit of {}",
            path.display(),
            frames.len(),
            i16::MAX
        )));
    }
    let layout = Layout::new(first, frames.len(), DataType::I16);
    atomic_write(path, |w| {
        w.write_all(&layout.header_bytes())?;
        for vol in frames {
            write_values(w, &vol.data, |v, out| {
                out.extend_from_slice(&to_i16(v).to_le_bytes())
            })?;
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// Reading

/// Size of the NIfTI-1 header proper; a single-file image has 4 extension-flag bytes after it.
const HEADER_SIZE: usize = 348;
const NIFTI2_HEADER_SIZE: i32 = 540;
/// Read-and-convert block size: a multiple of every data type's size.
const BLOCK_BYTES: usize = 1 << 18;
/// Voxels reserved up front for a frame of a compressed file (64 MiB of f32).
const GZIP_RESERVE: usize = 1 << 24;

struct Stream {
    reader: Box<dyn Read>,
    gzip: bool,
    file_len: u64,
}

/// Opens a file, decompressing when it starts with the gzip magic (whatever its name says).
fn open_stream(path: &Path) -> Result<Stream> {
    let file = File::open(path).map_err(|e| match e.kind() {
        ErrorKind::NotFound => Error::input(
            path,
            "file does not exist; check the path (and the dataset layout)",
        ),
        _ => Error::io(path, e),
    })?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut buffered = BufReader::with_capacity(1 << 20, file);
    let head = buffered.fill_buf().map_err(|e| Error::io(path, e))?;
    let gzip = head.len() >= 2 && head[0] == 0x1f && head[1] == 0x8b;
    let reader: Box<dyn Read> = if gzip {
        Box::new(MultiGzDecoder::new(buffered))
    } else {
        Box::new(buffered)
    };
    Ok(Stream {
        reader,
        gzip,
        file_len,
    })
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum DataType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F32,
    F64,
}

impl DataType {
    /// The type of a NIfTI `datatype` code, or a message saying why it cannot be read.
    fn from_code(code: i16) -> std::result::Result<DataType, String> {
        let unsupported = |name: &str| {
            format!(
                "data type {name} (code {code}) is not supported; store magnitude and phase as \
                 separate real-valued images (integer or float)"
            )
        };
        Ok(match code {
            2 => DataType::U8,
            4 => DataType::I16,
            8 => DataType::I32,
            16 => DataType::F32,
            64 => DataType::F64,
            256 => DataType::I8,
            512 => DataType::U16,
            768 => DataType::U32,
            1024 => DataType::I64,
            1280 => DataType::U64,
            1 => return Err(unsupported("binary (1 bit)")),
            32 => return Err(unsupported("complex64")),
            1792 => return Err(unsupported("complex128")),
            2048 => return Err(unsupported("complex256")),
            128 => return Err(unsupported("RGB24")),
            2304 => return Err(unsupported("RGBA32")),
            1536 => return Err(unsupported("float128")),
            _ => {
                return Err(format!(
                    "unknown data type code {code}; the header is corrupt or not NIfTI-1 — \
                     re-export the image as NIfTI-1"
                ))
            }
        })
    }

    fn code(self) -> i16 {
        match self {
            DataType::U8 => 2,
            DataType::I16 => 4,
            DataType::I32 => 8,
            DataType::F32 => 16,
            DataType::F64 => 64,
            DataType::I8 => 256,
            DataType::U16 => 512,
            DataType::U32 => 768,
            DataType::I64 => 1024,
            DataType::U64 => 1280,
        }
    }

    fn size(self) -> usize {
        match self {
            DataType::U8 | DataType::I8 => 1,
            DataType::U16 | DataType::I16 => 2,
            DataType::U32 | DataType::I32 | DataType::F32 => 4,
            DataType::U64 | DataType::I64 | DataType::F64 => 8,
        }
    }

    fn is_integer(self) -> bool {
        !matches!(self, DataType::F32 | DataType::F64)
    }
}

struct Parsed {
    header: Header,
    dtype: DataType,
    big_endian: bool,
    vox_offset: usize,
    /// (slope, intercept), or `None` when values are used as stored.
    scaling: Option<(f64, f64)>,
}

fn parse_header(path: &Path, stream: &mut Stream) -> Result<Parsed> {
    let mut bytes = [0u8; HEADER_SIZE];
    let got =
        read_up_to(&mut stream.reader, &mut bytes).map_err(|e| data_read_error(path, e, 0, 1))?;
    if got == 0 {
        return Err(Error::input(
            path,
            "file is empty; it is not a NIfTI image — re-create or re-download it",
        ));
    }
    if got < HEADER_SIZE {
        return Err(Error::input(
            path,
            format!(
                "file is truncated or corrupt: only {got} bytes, shorter than a NIfTI-1 header \
                 ({HEADER_SIZE} bytes); re-create or re-download it"
            ),
        ));
    }
    let sizeof_hdr = i32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if sizeof_hdr == NIFTI2_HEADER_SIZE || sizeof_hdr.swap_bytes() == NIFTI2_HEADER_SIZE {
        return Err(Error::input(
            path,
            "this is a NIfTI-2 file, which is not supported; convert it to NIfTI-1 (e.g. \
             nibabel's Nifti1Image or `fslchfiletype NIFTI_GZ`)",
        ));
    }
    let h = NiftiHeader::from_reader(&bytes[..]).map_err(|_| not_nifti(path))?;
    if h.sizeof_hdr != HEADER_SIZE as i32 {
        return Err(not_nifti(path));
    }
    if &h.magic != b"n+1\0" {
        return Err(Error::input(
            path,
            "this is the header of a .hdr/.img pair; only single-file NIfTI-1 (.nii, .nii.gz) is \
             read — convert it (e.g. `fslchfiletype NIFTI_GZ`)",
        ));
    }

    // NIfTI stores dims as signed 16-bit; the crate reads them unsigned.
    let ndim = h.dim[0] as usize;
    let dim_of = |k: usize| -> Result<usize> {
        let d = h.dim[k] as i16;
        if d < 1 {
            return Err(Error::input(
                path,
                format!("header says dimension {k} has size {d}; the header is corrupt — re-create the file"),
            ));
        }
        Ok(d as usize)
    };
    if !(1..=7).contains(&ndim) {
        return Err(Error::input(
            path,
            format!("header says the image has {ndim} dimensions; the header is corrupt — re-create the file"),
        ));
    }
    if ndim < 3 {
        return Err(Error::input(
            path,
            format!("image is {ndim}D; a 3D volume or a 4D series of volumes is needed"),
        ));
    }
    let dims = [dim_of(1)?, dim_of(2)?, dim_of(3)?];
    let frames = if ndim >= 4 { dim_of(4)? } else { 1 };
    for k in 5..=ndim {
        // Trailing singleton dimensions are harmless; real 5D+ data is not something we model.
        if dim_of(k)? != 1 {
            return Err(Error::input(
                path,
                format!(
                    "image is {ndim}D (dims {:?}); only 3D volumes or 4D series (echoes along the \
                     4th axis) are supported — split or reshape it",
                    &h.dim[1..=ndim]
                ),
            ));
        }
    }

    let dtype = DataType::from_code(h.datatype).map_err(|msg| Error::input(path, msg))?;

    let vox_offset = if h.vox_offset.is_finite() && h.vox_offset >= HEADER_SIZE as f32 {
        h.vox_offset as usize
    } else {
        // Some writers leave it 0; the data of a single-file image then follows the header.
        tracing::warn!(file = %path.display(), vox_offset = h.vox_offset, "invalid vox_offset, assuming 352");
        HEADER_SIZE + 4
    };

    let slope = h.scl_slope as f64;
    let inter = if h.scl_inter.is_finite() {
        h.scl_inter as f64
    } else {
        0.0
    };
    // Slope 0 or NaN means "not scaled" (nibabel writes NaN by default); the intercept then too.
    let scaling = if slope == 0.0 || !slope.is_finite() || (slope == 1.0 && inter == 0.0) {
        None
    } else {
        Some((slope, inter))
    };

    let geometry = header_geometry(path, &h);
    Ok(Parsed {
        header: Header {
            dims,
            frames,
            geometry,
            integer_type: dtype.is_integer(),
        },
        dtype,
        big_endian: h.endianness == Endianness::Big,
        vox_offset,
        scaling,
    })
}

/// The voxel-to-world affine: sform if set and sound, else qform, else pixdim scaling.
fn header_geometry(path: &Path, h: &NiftiHeader) -> Geometry {
    if h.sform_code > 0 {
        let mut aff = [[0.0; 4]; 4];
        for (row, srow) in aff.iter_mut().zip([h.srow_x, h.srow_y, h.srow_z]) {
            for (a, s) in row.iter_mut().zip(srow) {
                *a = s as f64;
            }
        }
        aff[3][3] = 1.0;
        let m = [
            [aff[0][0], aff[0][1], aff[0][2]],
            [aff[1][0], aff[1][1], aff[1][2]],
            [aff[2][0], aff[2][1], aff[2][2]],
        ];
        let finite = aff.iter().flatten().all(|v| v.is_finite());
        if finite && det3(&m).abs() > 1e-12 {
            return Geometry::from_affine(aff);
        }
        tracing::warn!(file = %path.display(), "sform is set but not invertible; using the qform");
    }
    let pixdim = spacing(path, h);
    if h.qform_code > 0 {
        let quat = [h.quatern_b as f64, h.quatern_c as f64, h.quatern_d as f64];
        let offset = [h.quatern_x as f64, h.quatern_y as f64, h.quatern_z as f64];
        if quat.iter().chain(&offset).all(|v| v.is_finite()) {
            // qfac is pixdim[0]; anything but -1 means +1 (0 is common in old files).
            let qfac = if h.pixdim[0] < 0.0 { -1.0 } else { 1.0 };
            return Geometry::from_affine(qform_affine(quat, qfac, pixdim, offset));
        }
        tracing::warn!(file = %path.display(), "qform is set but not finite; using pixdim only");
    }
    let mut aff = [[0.0; 4]; 4];
    for (k, &d) in pixdim.iter().enumerate() {
        aff[k][k] = d;
    }
    aff[3][3] = 1.0;
    Geometry::from_affine(aff)
}

/// pixdim[1..=3], made positive; a zero or non-finite spacing becomes 1 mm.
fn spacing(path: &Path, h: &NiftiHeader) -> [f64; 3] {
    let mut out = [1.0; 3];
    for (k, o) in out.iter_mut().enumerate() {
        let p = (h.pixdim[k + 1] as f64).abs();
        if p.is_finite() && p > 0.0 {
            *o = p;
        } else {
            tracing::warn!(file = %path.display(), axis = k, pixdim = p, "invalid voxel size, assuming 1 mm");
        }
    }
    out
}

/// Discards the bytes between the end of the header and the voxel data (extensions).
fn skip_to_data(path: &Path, stream: &mut Stream, vox_offset: usize) -> Result<()> {
    let gap = (vox_offset - HEADER_SIZE) as u64;
    let skipped = std::io::copy(&mut (&mut stream.reader).take(gap), &mut std::io::sink())
        .map_err(|e| data_read_error(path, e, 0, 1))?;
    if skipped < gap {
        return Err(truncated(
            path,
            HEADER_SIZE as u64 + skipped,
            vox_offset as u64,
        ));
    }
    Ok(())
}

/// Like `read_exact`, but returns how many bytes were read when the source ends early.
fn read_up_to(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Converts raw voxels to f32, applying the scaling in f64 so large integers keep precision.
fn decode(dtype: DataType, big: bool, raw: &[u8], scaling: Option<(f64, f64)>, out: &mut Vec<f32>) {
    macro_rules! convert {
        ($t:ty, $n:expr) => {{
            // chunks_exact yields exactly $n bytes, so the conversion to an array cannot fail.
            let values = raw.chunks_exact($n).map(|c| {
                let b: [u8; $n] = c.try_into().unwrap_or([0; $n]);
                if big {
                    <$t>::from_be_bytes(b)
                } else {
                    <$t>::from_le_bytes(b)
                }
            });
            match scaling {
                None => out.extend(values.map(|v| v as f32)),
                Some((s, i)) => out.extend(values.map(|v| (v as f64 * s + i) as f32)),
            }
        }};
    }
    match dtype {
        DataType::U8 => convert!(u8, 1),
        DataType::I8 => convert!(i8, 1),
        DataType::U16 => convert!(u16, 2),
        DataType::I16 => convert!(i16, 2),
        DataType::U32 => convert!(u32, 4),
        DataType::I32 => convert!(i32, 4),
        DataType::U64 => convert!(u64, 8),
        DataType::I64 => convert!(i64, 8),
        DataType::F32 => convert!(f32, 4),
        DataType::F64 => convert!(f64, 8),
    }
}

fn not_nifti(path: &Path) -> Error {
    Error::input(
        path,
        "not a NIfTI-1 image (no valid NIfTI-1 header); check that the file is a .nii or .nii.gz \
         image and not damaged",
    )
}

fn truncated(path: &Path, have: u64, need: u64) -> Error {
    Error::input(
        path,
        format!(
            "file is truncated or corrupt: the header needs {need} bytes but the file has {have}; \
             re-create or re-download it"
        ),
    )
}

fn too_big(path: &Path, bytes: usize) -> Error {
    Error::input(
        path,
        format!(
            "header declares {bytes} bytes per volume, more than can be allocated; the header is \
             corrupt or the image too large for this machine"
        ),
    )
}

/// An error while reading voxel data: a short or damaged stream is the file's fault.
fn data_read_error(path: &Path, e: std::io::Error, frame: usize, frames: usize) -> Error {
    match e.kind() {
        ErrorKind::UnexpectedEof => Error::input(
            path,
            format!(
                "file is truncated or corrupt: the data ends inside volume {} of {frames}; \
                 re-create or re-download it",
                frame + 1
            ),
        ),
        ErrorKind::InvalidData | ErrorKind::InvalidInput => Error::input(
            path,
            format!("compressed data is corrupt ({e}); re-create or re-download the file"),
        ),
        _ => Error::io(path, e),
    }
}

// ---------------------------------------------------------------------------------------------
// Writing

/// The header fields of a file we write.
struct Layout {
    dims: [usize; 3],
    frames: usize,
    dtype: DataType,
    affine: [[f64; 4]; 4],
}

/// Byte offsets of the NIfTI-1 header fields we set (also used by the tests to patch files).
mod offset {
    pub const SIZEOF_HDR: usize = 0;
    pub const DIM: usize = 40;
    pub const DATATYPE: usize = 70;
    pub const BITPIX: usize = 72;
    pub const PIXDIM: usize = 76;
    pub const VOX_OFFSET: usize = 108;
    pub const SCL_SLOPE: usize = 112;
    pub const SCL_INTER: usize = 116;
    pub const XYZT_UNITS: usize = 123;
    pub const DESCRIP: usize = 148;
    pub const QFORM_CODE: usize = 252;
    pub const SFORM_CODE: usize = 254;
    pub const QUATERN_B: usize = 256;
    pub const SROW_X: usize = 280;
    pub const MAGIC: usize = 344;
}

/// NIFTI_XFORM_SCANNER_ANAT: the geometry carries no finer code, and scanner space is what a
/// pipeline reading raw acquisitions means.
const XFORM_SCANNER: i16 = 1;
/// NIFTI_UNITS_MM | NIFTI_UNITS_SEC.
const UNITS_MM_SEC: u8 = 2 | 8;

impl Layout {
    fn new(vol: &Volume, frames: usize, dtype: DataType) -> Layout {
        Layout {
            dims: vol.dims,
            frames,
            dtype,
            affine: vol.geometry.affine,
        }
    }

    /// The 348-byte header plus the 4-byte "no extensions" flag, little-endian.
    fn header_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_SIZE + 4];
        let put_i16 =
            |b: &mut [u8], at: usize, v: i16| b[at..at + 2].copy_from_slice(&v.to_le_bytes());
        let put_f32 = |b: &mut [u8], at: usize, v: f64| {
            b[at..at + 4].copy_from_slice(&(v as f32).to_le_bytes())
        };
        b[offset::SIZEOF_HDR..4].copy_from_slice(&(HEADER_SIZE as i32).to_le_bytes());
        let ndim: i16 = if self.frames > 1 { 4 } else { 3 };
        let dim = [
            ndim,
            self.dims[0] as i16,
            self.dims[1] as i16,
            self.dims[2] as i16,
            self.frames as i16,
            1,
            1,
            1,
        ];
        for (k, &d) in dim.iter().enumerate() {
            put_i16(&mut b, offset::DIM + 2 * k, d);
        }
        put_i16(&mut b, offset::DATATYPE, self.dtype.code());
        put_i16(&mut b, offset::BITPIX, (self.dtype.size() * 8) as i16);

        let geometry = Geometry::from_affine(self.affine);
        let qform = affine_to_qform(&self.affine);
        let mut pixdim = [1.0f64; 8];
        pixdim[0] = qform.as_ref().map_or(1.0, |q| q.qfac);
        pixdim[1..4].copy_from_slice(&qform.as_ref().map_or(geometry.voxel_size, |q| q.pixdim));
        for (k, &p) in pixdim.iter().enumerate() {
            put_f32(&mut b, offset::PIXDIM + 4 * k, p);
        }
        put_f32(&mut b, offset::VOX_OFFSET, (HEADER_SIZE + 4) as f64);
        put_f32(&mut b, offset::SCL_SLOPE, 1.0);
        put_f32(&mut b, offset::SCL_INTER, 0.0);
        b[offset::XYZT_UNITS] = UNITS_MM_SEC;
        let descrip = format!("chimap {}", crate::VERSION);
        b[offset::DESCRIP..offset::DESCRIP + descrip.len()].copy_from_slice(descrip.as_bytes());

        // A sheared affine has no quaternion form: leave the qform unset rather than approximate.
        if let Some(q) = &qform {
            put_i16(&mut b, offset::QFORM_CODE, XFORM_SCANNER);
            let params = [
                q.quat[0],
                q.quat[1],
                q.quat[2],
                q.offset[0],
                q.offset[1],
                q.offset[2],
            ];
            for (k, &v) in params.iter().enumerate() {
                put_f32(&mut b, offset::QUATERN_B + 4 * k, v);
            }
        }
        put_i16(&mut b, offset::SFORM_CODE, XFORM_SCANNER);
        for (r, row) in self.affine.iter().take(3).enumerate() {
            for (c, &v) in row.iter().enumerate() {
                put_f32(&mut b, offset::SROW_X + 16 * r + 4 * c, v);
            }
        }
        b[offset::MAGIC..offset::MAGIC + 4].copy_from_slice(b"n+1\0");
        b
    }
}

/// Rejects volumes that cannot be written as NIfTI-1 (inconsistent or too large dims, a
/// singular or non-finite affine) before anything touches the disk.
fn check_volume(path: &Path, vol: &Volume) -> Result<()> {
    let n = vol.dims.iter().product::<usize>();
    if vol.data.len() != n || n == 0 {
        return Err(Error::Usage(format!(
            "cannot write {}: {} values for dims {:?}",
            path.display(),
            vol.data.len(),
            vol.dims
        )));
    }
    if vol.dims.iter().any(|&d| d > i16::MAX as usize) {
        return Err(Error::Usage(format!(
            "cannot write {}: dims {:?} exceed the NIfTI-1 limit of {} per axis",
            path.display(),
            vol.dims,
            i16::MAX
        )));
    }
    if !vol.geometry.affine.iter().flatten().all(|v| v.is_finite()) {
        return Err(Error::Usage(format!(
            "cannot write {}: the affine {:?} has non-finite entries",
            path.display(),
            vol.geometry.affine
        )));
    }
    Ok(())
}

fn same_affine(a: &[[f64; 4]; 4], b: &[[f64; 4]; 4]) -> bool {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .all(|(x, y)| (x - y).abs() <= 1e-6 * (1.0 + x.abs()))
}

/// Rounds to the nearest int16; out-of-range values saturate and NaN becomes 0.
fn to_i16(v: f32) -> i16 {
    // `as` saturates and maps NaN to 0, which is what a scanner-style integer image wants.
    v.round() as i16
}

/// Streams values to `w` in blocks, encoding each with `encode`.
fn write_values(
    w: &mut dyn Write,
    data: &[f32],
    encode: impl Fn(f32, &mut Vec<u8>),
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1 << 18);
    for block in data.chunks(1 << 16) {
        buf.clear();
        for &v in block {
            encode(v, &mut buf);
        }
        w.write_all(&buf)?;
    }
    Ok(())
}

/// Whether `path` asks for gzip, from its name; other extensions are refused.
fn output_kind(path: &Path) -> Result<bool> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name.ends_with(".nii.gz") {
        Ok(true)
    } else if name.ends_with(".nii") {
        Ok(false)
    } else {
        Err(Error::Usage(format!(
            "cannot write {}: the file name must end in .nii or .nii.gz",
            path.display()
        )))
    }
}

/// A hidden sibling of `path` that keeps its extension, unique to this process and host.
fn temp_path(path: &Path, gzip: bool) -> PathBuf {
    let ext = if gzip { ".nii.gz" } else { ".nii" };
    super::partial::partial_path(path, ext)
}

/// Writes through `body` to a temporary file next to `path`, then renames it into place, so
/// readers never see a half-written image; the temporary file is removed on any failure.
fn atomic_write(
    path: &Path,
    body: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let gzip = output_kind(path)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(Error::io(
            path,
            std::io::Error::new(
                ErrorKind::NotFound,
                format!(
                    "output directory {} does not exist; create it before writing",
                    dir.display()
                ),
            ),
        ));
    }
    let tmp = temp_path(path, gzip);
    let result = write_file(&tmp, gzip, body).and_then(|()| std::fs::rename(&tmp, path));
    result.map_err(|e| {
        // Best effort: the temporary may not exist if creating it was what failed.
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

fn write_file(
    tmp: &Path,
    gzip: bool,
    body: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let file = BufWriter::with_capacity(1 << 20, File::create(tmp)?);
    let file = if gzip {
        // Fast compression: float data gains little from higher levels, and they are slow.
        let mut enc = GzEncoder::new(file, Compression::fast());
        body(&mut enc)?;
        enc.finish()?
    } else {
        let mut file = file;
        body(&mut file)?;
        file
    };
    let file = file.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
