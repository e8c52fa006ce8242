//! The local field of an acquisition kept in `--work-dir`, so that a run killed during the
//! inversion (the longest stage for MEDI, TV or TFI on a big grid) resumes there instead of
//! preprocessing again, and gives the same χ bit for bit.
//!
//! One file per acquisition and configuration, `<name>_<key>.local-field`, written atomically: a JSON manifest (the
//! key, the maps' geometry and sidecars, parameters, checks) followed by the raw arrays
//! (little-endian f32; masks as bytes). The key hashes chimap's version, the whole
//! configuration and every input file's path, size and modification time: any change makes
//! the checkpoint unusable and it is recomputed. It is removed once the Chimap is written.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::acquisition::{LocalField, Output, Total};
use super::Config;
use crate::bids::Acquisition;
use crate::volume::Geometry;
use crate::{Mask, Volume};

const MAGIC: &[u8] = b"chimap local field 1\n";

/// Where one acquisition's checkpoint lives, and the key it must carry.
pub(super) struct Checkpoint {
    path: PathBuf,
    key: String,
}

impl Checkpoint {
    /// The checkpoint of `acq` in `work_dir` under this configuration (`one_step`: whether the
    /// total field is kept too).
    pub fn new(
        work_dir: &Path,
        acq: &Acquisition,
        root: &Path,
        config: &Config,
        b0_tesla: Option<f64>,
        one_step: bool,
    ) -> Self {
        let mut h = Sha256::new();
        h.update(crate::VERSION.as_bytes());
        h.update(config.to_yaml().as_bytes());
        h.update(format!("{b0_tesla:?} {one_step}").as_bytes());
        let inputs = acq
            .inputs
            .iter()
            .map(|p| root.join(p))
            .chain(acq.user_mask.iter().map(|m| m.path.clone()));
        for p in inputs {
            h.update(p.to_string_lossy().as_bytes());
            if let Ok(m) = std::fs::metadata(&p) {
                let modified = m
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos());
                h.update(format!(" {} {modified}\n", m.len()).as_bytes());
            }
        }
        let key: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        // The key in the name too: runs of other configurations sharing the folder keep
        // their own.
        Checkpoint {
            path: work_dir.join(format!("{}_{}.local-field", acq.name(), &key[..12])),
            key,
        }
    }

    /// The saved local field, if there is one for this key; a missing, foreign or damaged
    /// file is `None` (and logged when it is not simply missing).
    pub fn load(&self) -> Option<LocalField> {
        let file = std::fs::File::open(&self.path).ok()?;
        match decode(&mut std::io::BufReader::new(file), &self.key) {
            Ok(l) => l,
            Err(why) => {
                tracing::warn!(
                    "{}: not used ({why}); preprocessing again",
                    self.path.display()
                );
                None
            }
        }
    }

    /// Saves `local` (atomically: a temporary name, then a rename). A failure is only a
    /// warning: the run goes on without.
    pub fn save(&self, local: &LocalField) {
        let tmp = crate::io::partial::partial_path(&self.path, ".local-field");
        let result = (|| -> std::io::Result<()> {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let mut w = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
            encode(local, &self.key, &mut w)?;
            w.into_inner()?.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            tracing::warn!(
                "--work-dir: could not keep the local field in {}: {e}",
                self.path.display()
            );
        }
    }

    /// Removes the checkpoint once its acquisition is finished.
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The arrays of a checkpoint, in file order, borrowed until written.
#[derive(Default)]
struct Arrays<'a> {
    list: Vec<Value>,
    data: Vec<ArrayRef<'a>>,
}

enum ArrayRef<'a> {
    F32(&'a [f32]),
    Mask(&'a [bool]),
}

impl<'a> Arrays<'a> {
    fn f32(&mut self, data: &'a [f32]) -> usize {
        self.list.push(json!({ "kind": "f32", "len": data.len() }));
        self.data.push(ArrayRef::F32(data));
        self.list.len() - 1
    }
    fn mask(&mut self, m: &'a [bool]) -> usize {
        self.list.push(json!({ "kind": "mask", "len": m.len() }));
        self.data.push(ArrayRef::Mask(m));
        self.list.len() - 1
    }
    fn volume(&mut self, v: &'a Volume) -> Value {
        json!({
            "dims": v.dims,
            "affine": v.geometry.affine,
            "voxel_size": v.geometry.voxel_size,
            "data": self.f32(&v.data),
        })
    }
}

/// Streams `l` to `w` (no second copy of the maps in memory).
fn encode(l: &LocalField, key: &str, w: &mut impl Write) -> std::io::Result<()> {
    let mut a = Arrays::default();
    let outputs: Vec<Value> = l
        .outputs
        .iter()
        .map(|o| json!({ "path": o.path, "volume": a.volume(&o.volume), "sidecar": o.sidecar }))
        .collect();
    let mut manifest = json!({
        "key": key,
        "dims": l.dims,
        "field": a.volume(&l.field),
        "mask": a.mask(&l.mask),
        "outputs": outputs,
        "parameters": l.parameters,
        "void_chi": l.void_chi.as_ref().map(|v| a.f32(v)),
        "weight": l.weight.as_ref().map(|v| a.f32(v)),
        "magnitude": l.magnitude.as_ref().map(|v| a.f32(v)),
        "magnitude_first": l.magnitude_first.as_ref().map(|v| a.f32(v)),
        // Values by their bits: JSON has no NaN, and a check may be NaN.
        "checks": l.checks.iter().map(|c| {
            let mut finite = c.clone();
            finite.value = 0.0;
            json!({ "check": finite, "value_bits": c.value.to_bits() })
        }).collect::<Vec<_>>(),
        "total": l.total.as_ref().map(|t| json!({
            "field": a.f32(&t.field),
            "support": a.mask(&t.support),
            "weight": t.weight.as_ref().map(|v| a.f32(v)),
            "brain": a.mask(&t.brain),
        })),
        "csf": l.csf.as_ref().map(|c| a.mask(c)),
    });
    manifest["arrays"] = Value::Array(std::mem::take(&mut a.list));
    let text = manifest.to_string();
    w.write_all(MAGIC)?;
    w.write_all(&(text.len() as u64).to_le_bytes())?;
    w.write_all(text.as_bytes())?;
    for array in &a.data {
        match array {
            ArrayRef::F32(d) => {
                for v in *d {
                    w.write_all(&v.to_le_bytes())?;
                }
            }
            ArrayRef::Mask(m) => {
                let bytes: Vec<u8> = m.iter().map(|&b| b as u8).collect();
                w.write_all(&bytes)?;
            }
        }
    }
    w.flush()
}

/// The arrays of a file being read.
enum Array {
    F32(Vec<f32>),
    Mask(Mask),
}

type Decoded<T> = std::result::Result<T, String>;

/// `Ok(None)` when the key differs (another configuration or changed inputs).
fn decode(r: &mut impl Read, key: &str) -> Decoded<Option<LocalField>> {
    let io = |e: std::io::Error| e.to_string();
    let mut magic = vec![0u8; MAGIC.len()];
    r.read_exact(&mut magic).map_err(io)?;
    if magic != MAGIC {
        return Err("not a chimap local-field checkpoint".into());
    }
    let mut len = [0u8; 8];
    r.read_exact(&mut len).map_err(io)?;
    let len = u64::from_le_bytes(len);
    if len > 1 << 30 {
        return Err("damaged header".into());
    }
    let mut text = vec![0u8; len as usize];
    r.read_exact(&mut text).map_err(io)?;
    let m: Value = serde_json::from_slice(&text).map_err(|e| e.to_string())?;
    if m["key"].as_str() != Some(key) {
        return Ok(None);
    }
    let mut arrays = Vec::new();
    for spec in m["arrays"].as_array().ok_or("no array list")? {
        let n = spec["len"].as_u64().ok_or("array without length")? as usize;
        // Read in bounded chunks: a damaged length fails at the end of the file, not in
        // an allocation.
        let size = if spec["kind"] == "f32" { 4 * n } else { n };
        let mut bytes = Vec::new();
        r.by_ref()
            .take(size as u64)
            .read_to_end(&mut bytes)
            .map_err(io)?;
        if bytes.len() != size {
            return Err("truncated".into());
        }
        arrays.push(if spec["kind"] == "f32" {
            Array::F32(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            )
        } else {
            Array::Mask(bytes.iter().map(|&b| b != 0).collect())
        });
    }
    if r.read(&mut [0u8; 1]).map_err(io)? != 0 {
        return Err("trailing bytes".into());
    }
    let mut take = |v: &Value| -> Decoded<Array> {
        let i = v.as_u64().ok_or("bad array index")? as usize;
        let slot = arrays.get_mut(i).ok_or("array index out of range")?;
        Ok(std::mem::replace(slot, Array::F32(Vec::new())))
    };
    let mut f32s = |v: &Value| -> Decoded<Vec<f32>> {
        match take(v)? {
            Array::F32(d) => Ok(d),
            Array::Mask(_) => Err("expected values, found a mask".into()),
        }
    };
    let volume = |v: &Value, f32s: &mut dyn FnMut(&Value) -> Decoded<Vec<f32>>| {
        let dims: [usize; 3] =
            serde_json::from_value(v["dims"].clone()).map_err(|e| e.to_string())?;
        let geometry = Geometry {
            affine: serde_json::from_value(v["affine"].clone()).map_err(|e| e.to_string())?,
            voxel_size: serde_json::from_value(v["voxel_size"].clone())
                .map_err(|e| e.to_string())?,
        };
        let data = f32s(&v["data"])?;
        if data.len() != dims.iter().product::<usize>() {
            return Err("a map's size does not match its grid".to_string());
        }
        Ok(Volume {
            dims,
            data,
            geometry,
        })
    };
    let optional = |v: &Value, f32s: &mut dyn FnMut(&Value) -> Decoded<Vec<f32>>| {
        if v.is_null() {
            Ok(None)
        } else {
            f32s(v).map(Some)
        }
    };
    let field = volume(&m["field"], &mut f32s)?;
    let mut outputs = Vec::new();
    for o in m["outputs"].as_array().ok_or("no outputs")? {
        outputs.push(Output {
            path: serde_json::from_value(o["path"].clone()).map_err(|e| e.to_string())?,
            volume: volume(&o["volume"], &mut f32s)?,
            sidecar: o["sidecar"].clone(),
        });
    }
    let void_chi = optional(&m["void_chi"], &mut f32s)?;
    let weight = optional(&m["weight"], &mut f32s)?;
    let magnitude = optional(&m["magnitude"], &mut f32s)?;
    let magnitude_first = optional(&m["magnitude_first"], &mut f32s)?;
    let total_f32 = match &m["total"] {
        Value::Null => None,
        t => Some((f32s(&t["field"])?, optional(&t["weight"], &mut f32s)?)),
    };
    let mut masks = |v: &Value| -> Decoded<Mask> {
        match take(v)? {
            Array::Mask(d) => Ok(d),
            Array::F32(_) => Err("expected a mask, found values".into()),
        }
    };
    let mask = masks(&m["mask"])?;
    let total = match total_f32 {
        None => None,
        Some((field, weight)) => Some(Total {
            field,
            weight,
            support: masks(&m["total"]["support"])?,
            brain: masks(&m["total"]["brain"])?,
        }),
    };
    let csf = match &m["csf"] {
        Value::Null => None,
        c => Some(masks(c)?),
    };
    Ok(Some(LocalField {
        dims: serde_json::from_value(m["dims"].clone()).map_err(|e| e.to_string())?,
        field,
        mask,
        outputs,
        parameters: m["parameters"].clone(),
        void_chi,
        weight,
        magnitude,
        magnitude_first,
        checks: checks(&m["checks"])?,
        total,
        csf,
    }))
}

fn checks(v: &Value) -> Decoded<Vec<crate::qc::Check>> {
    let mut out = Vec::new();
    for c in v.as_array().ok_or("no checks")? {
        let mut check: crate::qc::Check =
            serde_json::from_value(c["check"].clone()).map_err(|e| e.to_string())?;
        check.value = f64::from_bits(c["value_bits"].as_u64().ok_or("a check without value")?);
        out.push(check);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(with_total: bool) -> LocalField {
        let dims = [3, 4, 5];
        let n = 60;
        let geometry = Geometry {
            affine: [
                [0.9, 0.1, 0.0, -10.0],
                [0.0, 1.0, 0.2, 5.5],
                [0.0, 0.0, 1.1, 3.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
            voxel_size: [0.9, 1.0, 1.1],
        };
        let values = |k: f32| -> Vec<f32> { (0..n).map(|i| (i as f32 * k).sin() / 3.0).collect() };
        let mask: Mask = (0..n).map(|i| i % 3 != 0).collect();
        let field = Volume {
            dims,
            data: values(0.7),
            geometry: geometry.clone(),
        };
        LocalField {
            dims: [3, 4, 4],
            outputs: vec![Output {
                path: "sub-1/anat/sub-1_desc-brain_mask.nii.gz".into(),
                volume: field.with_data(values(1.3)),
                sidecar: json!({ "Units": "ppm", "Nested": { "a": [1, 2] } }),
            }],
            field,
            mask: mask.clone(),
            parameters: json!({ "unwrap": "romeo", "lambda": 1e-3 }),
            void_chi: Some(values(2.1)),
            weight: None,
            magnitude: Some(values(0.2)),
            magnitude_first: Some(values(0.3)),
            checks: vec![
                crate::qc::Check::new(
                    "residual",
                    0.25,
                    crate::qc::Limits::default(),
                    "fine".into(),
                ),
                crate::qc::Check::new(
                    "coherence",
                    f64::NAN,
                    crate::qc::Limits::default(),
                    "".into(),
                ),
            ],
            total: with_total.then(|| Total {
                field: values(0.9),
                support: mask.iter().map(|m| !m).collect(),
                weight: Some(values(0.4)),
                brain: mask.clone(),
            }),
            csf: with_total.then(|| mask.iter().map(|m| !m).collect()),
        }
    }

    fn bytes(l: &LocalField, key: &str) -> Vec<u8> {
        let mut out = Vec::new();
        encode(l, key, &mut out).unwrap();
        out
    }

    fn same(a: &LocalField, b: &LocalField) {
        assert_eq!(a.dims, b.dims);
        assert_eq!(a.field.dims, b.field.dims);
        assert_eq!(a.field.geometry, b.field.geometry);
        // Bit for bit: a resumed run must give the same χ.
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a.field.data), bits(&b.field.data));
        assert_eq!(a.mask, b.mask);
        assert_eq!(a.parameters, b.parameters);
        assert_eq!(a.void_chi, b.void_chi);
        assert_eq!(a.weight, b.weight);
        assert_eq!(a.magnitude, b.magnitude);
        assert_eq!(a.magnitude_first, b.magnitude_first);
        assert_eq!(a.checks.len(), b.checks.len());
        for (x, y) in a.checks.iter().zip(&b.checks) {
            assert_eq!(x.value.to_bits(), y.value.to_bits());
            assert_eq!(
                (&x.name, x.verdict, &x.message),
                (&y.name, y.verdict, &y.message)
            );
        }
        assert_eq!(a.outputs.len(), b.outputs.len());
        for (x, y) in a.outputs.iter().zip(&b.outputs) {
            assert_eq!(x.path, y.path);
            assert_eq!(x.sidecar, y.sidecar);
            assert_eq!(bits(&x.volume.data), bits(&y.volume.data));
            assert_eq!(x.volume.geometry, y.volume.geometry);
        }
        assert_eq!(a.csf, b.csf);
        assert_eq!(a.total.is_some(), b.total.is_some());
        if let (Some(x), Some(y)) = (&a.total, &b.total) {
            assert_eq!(x.field, y.field);
            assert_eq!(x.support, y.support);
            assert_eq!(x.weight, y.weight);
            assert_eq!(x.brain, y.brain);
        }
    }

    #[test]
    fn a_local_field_round_trips_exactly() {
        for with_total in [false, true] {
            let l = local(with_total);
            let file = bytes(&l, "k1");
            let back = decode(&mut file.as_slice(), "k1").unwrap().unwrap();
            same(&l, &back);
        }
    }

    #[test]
    fn another_key_or_a_damaged_file_is_not_used() {
        let file = bytes(&local(true), "k1");
        assert!(decode(&mut file.as_slice(), "k2").unwrap().is_none());
        for cut in [0, 5, MAGIC.len() + 4, file.len() / 2, file.len() - 1] {
            assert!(decode(&mut &file[..cut], "k1").is_err(), "cut at {cut}");
        }
        let mut longer = file.clone();
        longer.push(0);
        assert!(decode(&mut longer.as_slice(), "k1").is_err());
        let mut other = file;
        other[0] ^= 1;
        assert!(decode(&mut other.as_slice(), "k1").is_err());
    }

    #[test]
    fn the_checkpoint_is_saved_loaded_and_removed_under_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let c = Checkpoint {
            path: dir.path().join("sub-1_x.local-field"),
            key: "k1".into(),
        };
        assert!(c.load().is_none());
        let l = local(false);
        c.save(&l);
        same(&l, &c.load().unwrap());
        let other = Checkpoint {
            path: c.path.clone(),
            key: "k2".into(),
        };
        assert!(other.load().is_none());
        c.remove();
        assert!(!c.path.exists());
        // Nothing temporary is left beside it.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
