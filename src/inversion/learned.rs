//! The learned methods (LP-CNN, LoopNet, U-net) behind the [`Method`] trait.
//!
//! Each runs from the weights shipped in the binary for it ([`crate::nn::shipped`]) unless
//! `--weights FILE` (or `inversion.weights`) names others. The architecture is read from the
//! weights' metadata (the published one for files without it); weights that do not fit it
//! are an input error naming the file and the tensor.

use std::path::PathBuf;

use candle_core::{Device, Tensor};

use super::sstv::{self, SsTv};
use super::{Method, MethodName, Problem};
use crate::nn::device::{self, DeviceChoice};
use crate::nn::dipole::DipoleSet;
use crate::nn::loopnet::{self, LoopNet};
use crate::nn::lpcnn::{self, LpCnn};
use crate::nn::weights::{self, Provenance, Weights};
use crate::nn::{shipped, tensor_dims};
use crate::{Error, Result};

pub struct Learned {
    kind: MethodName,
    weights: Weights,
    /// Hex SHA-256 of the weights, so that a Chimap names exactly the model behind it.
    sha256: String,
    /// The weights' metadata (architecture, provenance), read once when the method is built.
    meta: std::collections::HashMap<String, String>,
    device: Device,
    /// Activation memory allowed for the CNN parts before they run in tiles.
    max_memory: usize,
    /// The SS-TV that gives the start (and LP-CNN's data) when the pipeline has the total
    /// field (`inversion.learned_from_total`); `None` when off. U-nets that start from the
    /// field (not TV's map) ignore it.
    total_start: Option<SsTv>,
    /// Whether the last inversion started from SS-TV, for the sidecar.
    started_from_total: std::sync::atomic::AtomicBool,
}

impl Learned {
    /// `kind` must be one of the learned methods; `device` is opened here, so that a
    /// `--device cuda` that cannot be served fails before any processing.
    pub fn new(
        kind: MethodName,
        weights: Option<PathBuf>,
        device: DeviceChoice,
        max_memory_gib: f64,
        total_start: Option<sstv::Config>,
    ) -> Result<Self> {
        let max_memory = device::budget_bytes(max_memory_gib)?;
        let weights = match weights {
            Some(path) if !path.is_file() => {
                return Err(Error::input(
                    &path,
                    "weights file not found; pass an existing safetensors file to --weights, \
                     or leave --weights out for the shipped default",
                ))
            }
            Some(path) => Weights::open(&path)?,
            None => {
                let s = shipped::default_for(kind.as_str()).ok_or_else(|| {
                    Error::Usage(format!(
                        "--method {} has no shipped weights; pass --weights FILE",
                        kind.as_str()
                    ))
                })?;
                Weights::embedded(s)
            }
        };
        let sha256 = weights.sha256();
        // Read now, so that weights of another model fail before any processing.
        let meta = weights.metadata()?;
        if let Some(model) = meta.get(weights::MODEL_KEY) {
            if model != kind.as_str() {
                return Err(Error::input(
                    &weights.label,
                    format!(
                        "holds {model} weights, not {}; pass --method {model} or {} weights",
                        kind.as_str(),
                        kind.as_str()
                    ),
                ));
            }
        }
        Ok(Learned {
            kind,
            weights,
            sha256,
            meta,
            device: device::open(device)?,
            max_memory,
            total_start: total_start.map(SsTv::new),
            started_from_total: Default::default(),
        })
    }

    /// The start from the total field: SS-TV's χ. SS-TV fits the total field with the
    /// background removed in the same step, so its map keeps the harmonic part of the local
    /// field that a separate background removal loses.
    fn sstv_start(&self, sstv: &SsTv, p: &Problem) -> Result<Tensor> {
        let [d, h, w] = tensor_dims(p.dims);
        let chi = sstv.invert(p)?;
        self.started_from_total
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Tensor::from_vec(chi, (1, 1, d, h, w), &self.device).map_err(|e| numerics(self.name(), e))
    }
}

fn numerics(name: &str, e: candle_core::Error) -> Error {
    Error::Numerics(format!("{name} inference failed: {e}"))
}

impl Method for Learned {
    fn name(&self) -> &'static str {
        self.kind.as_str()
    }

    fn invert(&self, p: &Problem) -> Result<Vec<f32>> {
        let dev = &self.device;
        tracing::debug!("{} on {}", self.name(), device::name(dev));
        let [d, h, w] = tensor_dims(p.dims);
        let nv = d * h * w;
        let n = p.orientations.len();
        self.started_from_total
            .store(false, std::sync::atomic::Ordering::Relaxed);
        let err = |e| numerics(self.name(), e);
        let mut data = Vec::with_capacity(n * nv);
        for o in &p.orientations {
            data.extend_from_slice(o.field);
        }
        let fields = Tensor::from_vec(data, (1, n, d, h, w), dev).map_err(err)?;
        let mask: Vec<f32> = p.mask.iter().map(|&m| m as u8 as f32).collect();
        let mask = Tensor::from_vec(mask, (1, 1, d, h, w), dev).map_err(err)?;
        let chi = match self.kind {
            MethodName::Lpcnn => {
                let cfg: lpcnn::Config =
                    weights::architecture(&self.weights.label, &self.meta)?.unwrap_or_default();
                let net = self
                    .weights
                    .build("LP-CNN", dev, |vb| LpCnn::new(&cfg, vb))?;
                let b0: Vec<[f64; 3]> = p.orientations.iter().map(|o| o.b0).collect();
                let ops = DipoleSet::new(p.dims, p.voxel_size, &b0);
                match (&self.total_start, &p.total) {
                    (Some(sstv), Some(_)) if n == 1 => {
                        // Its data term is SS-TV's own field of the brain, `M · D χ`: fitting
                        // the background-removed field instead pulled the map back towards
                        // what removal loses (MNI head from raw phase: 28.1 % against
                        // 27.1 %, `weights/lpcnn-default.md`).
                        let start = self.sstv_start(sstv, p)?;
                        let fit = ops
                            .forward(&start)
                            .and_then(|f| f.broadcast_mul(&mask))
                            .map_err(err)?;
                        net.infer_from(&fit, &start, &ops, &mask, self.max_memory)
                            .map_err(err)?
                    }
                    _ => net
                        .infer(&fields, &ops, &mask, self.max_memory)
                        .map_err(err)?,
                }
            }
            MethodName::Loopnet | MethodName::Unet => {
                let cfg = match weights::architecture(&self.weights.label, &self.meta)? {
                    Some(cfg) => cfg,
                    None if self.kind == MethodName::Unet => loopnet::Config::unet(),
                    None => loopnet::Config::default(),
                };
                let net = self
                    .weights
                    .build(self.name(), dev, |vb| LoopNet::new(&cfg, vb))?;
                // Single-orientation networks: the mean of the per-orientation estimates.
                let mut sum: Option<Tensor> = None;
                // A U-net that refines TV's map refines SS-TV's where the total field is given.
                let sstv = match (&self.total_start, &p.total) {
                    (Some(sstv), Some(_)) if cfg.start == loopnet::Start::Tv && n == 1 => {
                        Some(sstv)
                    }
                    _ => None,
                };
                for (i, o) in p.orientations.iter().enumerate() {
                    let f = fields.narrow(1, i, 1).map_err(err)?;
                    let ops = DipoleSet::new(p.dims, p.voxel_size, &[o.b0]);
                    let x = match sstv {
                        Some(sstv) => self.sstv_start(sstv, p)?,
                        None => net.input(&f, &ops, &mask).map_err(err)?,
                    };
                    let chi = net.infer(&x, &mask, self.max_memory).map_err(err)?;
                    sum = Some(match sum {
                        None => chi,
                        Some(s) => (s + chi).map_err(err)?,
                    });
                }
                let sum = sum.ok_or_else(|| Error::Numerics("no orientation".into()))?;
                ((sum / n as f64).map_err(err)? * &mask).map_err(err)?
            }
            MethodName::Tkd
            | MethodName::Cfl2
            | MethodName::Ilsqr
            | MethodName::Tv
            | MethodName::Cosmos
            | MethodName::Rts
            | MethodName::Medi
            | MethodName::Tfi
            | MethodName::Sstv => unreachable!("not a learned method"),
        };
        chi.flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(err)
    }

    /// Which weights, exactly (name, sha256), what architecture, and how they were trained.
    fn parameters(&self) -> serde_json::Value {
        // Lenient: the sidecar records the architecture when it is readable (building the
        // network reports it when it is not).
        let architecture =
            weights::architecture::<serde_json::Value>(&self.weights.label, &self.meta)
                .ok()
                .flatten();
        serde_json::json!({
            "Weights": self.weights.label.display().to_string(),
            "WeightsName": self.weights.name(),
            "WeightsShipped": self.weights.shipped.is_some(),
            "ModelCard": self.weights.shipped.map(|s| s.card()),
            "WeightsSha256": self.sha256,
            "Architecture": architecture,
            "Training": Provenance::from_metadata(&self.meta).to_json(),
            "StartedFromTotalField": self.total_start.as_ref().filter(|_| {
                self.started_from_total.load(std::sync::atomic::Ordering::Relaxed)
            }).map(|sstv| serde_json::json!({
                "Start": "SS-TV of the total field (inversion.sstv)",
                "Data": if self.kind == MethodName::Lpcnn {
                    "field of the SS-TV χ inside the brain mask, in place of the background-removed local field"
                } else {
                    "the SS-TV χ is the network's input, in place of TV's map of the background-removed local field"
                },
                "SsTv": sstv.parameters(),
            })),
        })
    }

    /// LP-CNN's gradient step sums over orientations, so a set is one problem for it.
    fn joint_orientations(&self) -> bool {
        self.kind == MethodName::Lpcnn
    }

    /// A learned method wants the total field when it may start from SS-TV.
    fn one_step(&self) -> bool {
        self.total_start.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inversion::Orientation;
    use candle_core::DType;
    use candle_nn::{VarBuilder, VarMap};

    /// A learned method on the CPU, with the default memory budget and no SS-TV start.
    fn on_cpu(kind: MethodName, weights: Option<PathBuf>) -> crate::Result<Learned> {
        Learned::new(kind, weights, DeviceChoice::Cpu, 3.0, None)
    }

    /// One orientation, B0 along z, on an 8³ grid of 1 mm voxels.
    fn cube<'a>(field: &'a [f32], mask: &'a crate::Mask) -> Problem<'a> {
        Problem {
            dims: [8, 8, 8],
            voxel_size: [1.0; 3],
            orientations: vec![Orientation {
                field,
                b0: [0.0, 0.0, 1.0],
            }],
            mask,
            weight: None,
            magnitude: None,
            total: None,
            csf: None,
        }
    }

    /// From a total field, LP-CNN starts from SS-TV and fits SS-TV's field, so it keeps the
    /// harmonic part of the local field that background removal loses: it beats LP-CNN on
    /// the background-removed field of the same data, and the sidecar says which it did.
    /// The shipped U-net (which refines TV's map) refines SS-TV's there, and gains as much.
    #[test]
    fn learned_methods_start_from_sstv_when_given_the_total_field() {
        use crate::inversion::sstv::tests::{brain_field, problem, vsharp, with_background, B0};
        use crate::inversion::testing::nrmse_demeaned;
        let (chi, mask, local) = brain_field();
        let total = with_background(&local, &mask);
        let removed = vsharp(&total, &mask);
        // The V-SHARP local field, with or without the total field beside it.
        let two_step = |with_total: bool| Problem {
            orientations: vec![Orientation {
                field: &removed.field.data,
                b0: B0,
            }],
            total: problem(&total, &mask).total.filter(|_| with_total),
            ..problem(&total, &mask)
        };
        let p = two_step(true);
        for kind in [MethodName::Lpcnn, MethodName::Unet] {
            let method = |from_total: bool| {
                let sstv = from_total.then(sstv::Config::default);
                Learned::new(kind, None, DeviceChoice::Cpu, 3.0, sstv).unwrap()
            };
            let (on, off) = (method(true), method(false));
            assert!(on.one_step() && !off.one_step());
            let e_on = nrmse_demeaned(&on.invert(&p).unwrap(), &chi, &mask);
            let e_off = nrmse_demeaned(&off.invert(&p).unwrap(), &chi, &mask);
            let name = kind.as_str();
            eprintln!("{name} from the total field {e_on:.3}, from the local field {e_off:.3}");
            assert!(
                e_on < 0.8 * e_off,
                "{name}: total {e_on:.3}, local {e_off:.3}"
            );
            assert!(on.parameters()["StartedFromTotalField"]["SsTv"].is_object());
            assert!(off.parameters()["StartedFromTotalField"].is_null());
            // Without a total field (a local field map) it runs as `off` does.
            let local_only = two_step(false);
            let (a, b) = (
                on.invert(&local_only).unwrap(),
                off.invert(&local_only).unwrap(),
            );
            assert_eq!(a, b, "{name}");
            assert!(on.parameters()["StartedFromTotalField"].is_null(), "{name}");
        }
    }

    /// With no `--weights`, each learned method runs its shipped default and names it in
    /// the sidecar; a missing file passed with `--weights` is an error naming it.
    #[test]
    fn runs_the_shipped_default_without_a_weights_file() {
        let field = crate::nn::testing::random(512, 3);
        let mask: Vec<bool> = (0..512).map(|i| i % 5 != 0).collect();
        let problem = cube(&field, &mask);
        for kind in [MethodName::Lpcnn, MethodName::Loopnet, MethodName::Unet] {
            let method = on_cpu(kind, None).unwrap();
            let chi = method.invert(&problem).unwrap();
            assert!(chi
                .iter()
                .zip(&mask)
                .all(|(c, &m)| c.is_finite() && (m || *c == 0.0)));
            assert!(chi.iter().any(|&c| c != 0.0), "{}", kind.as_str());
            let p = method.parameters();
            let s = shipped::default_for(kind.as_str()).unwrap();
            assert_eq!(p["WeightsName"], s.name);
            assert_eq!(p["WeightsShipped"], true);
            assert_eq!(p["WeightsSha256"], weights::sha256_of(s.bytes));
            assert!(p["Architecture"].is_object(), "{p}");
            assert!(p["Training"]["Steps"].as_u64().unwrap() > 0, "{p}");
        }
        let err = on_cpu(MethodName::Unet, Some("/no/such.safetensors".into()))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("/no/such.safetensors"), "{err}");
    }

    #[test]
    fn runs_each_method_from_a_weights_file_and_rejects_the_wrong_one() {
        let dir = tempfile::tempdir().unwrap();
        let save = |name: &str, build: &dyn Fn(VarBuilder) -> candle_core::Result<()>| {
            let vm = VarMap::new();
            build(VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
            let path = dir.path().join(name);
            vm.save(&path).unwrap();
            path
        };
        let unet = save("unet.safetensors", &|vb| {
            LoopNet::new(&loopnet::Config::unet(), vb).map(|_| ())
        });
        let lp = save("lpcnn.safetensors", &|vb| {
            LpCnn::new(&lpcnn::Config::default(), vb).map(|_| ())
        });
        let field = crate::nn::testing::random(512, 1);
        let mask: Vec<bool> = (0..512).map(|i| i % 7 != 0).collect();
        let problem = cube(&field, &mask);
        let chi = on_cpu(MethodName::Unet, Some(unet.clone()))
            .unwrap()
            .invert(&problem)
            .unwrap();
        assert_eq!(chi.len(), 512);
        assert!(chi.iter().zip(&mask).all(|(c, &m)| m || *c == 0.0));
        let err = on_cpu(MethodName::Lpcnn, Some(unet))
            .unwrap()
            .invert(&problem)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unet.safetensors") && err.contains("LP-CNN"),
            "{err}"
        );
        let method = on_cpu(MethodName::Lpcnn, Some(lp.clone())).unwrap();
        let recorded = method.parameters()["WeightsSha256"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(recorded, weights::sha256_of(&std::fs::read(&lp).unwrap()));
        assert_eq!(recorded.len(), 64);
        let chi = method.invert(&problem).unwrap();
        assert!(chi
            .iter()
            .zip(&mask)
            .all(|(c, &m)| c.is_finite() && (m || *c == 0.0)));
    }

    /// Weights written by `chimap train` carry their architecture: a reduced LP-CNN runs
    /// without configuration, and a file for another method is refused by name when the
    /// method is built.
    #[test]
    fn reads_the_architecture_from_the_weights_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("small.safetensors");
        let cfg = lpcnn::Config {
            channels: 4,
            blocks: 1,
            ..lpcnn::Config::default()
        };
        let vm = VarMap::new();
        LpCnn::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
        let tensors = vm
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        let meta = std::collections::HashMap::from([
            (weights::MODEL_KEY.to_string(), "lpcnn".to_string()),
            (
                weights::MODEL_CONFIG_KEY.to_string(),
                serde_json::to_string(&cfg).unwrap(),
            ),
        ]);
        weights::save(&path, tensors, meta).unwrap();
        let field = crate::nn::testing::random(512, 2);
        let mask = vec![true; 512];
        let problem = cube(&field, &mask);
        let chi = on_cpu(MethodName::Lpcnn, Some(path.clone()))
            .unwrap()
            .invert(&problem)
            .unwrap();
        assert!(chi.iter().all(|c| c.is_finite()) && chi.iter().any(|&c| c != 0.0));
        // Refused when the method is built, before any processing.
        let err = on_cpu(MethodName::Loopnet, Some(path))
            .err()
            .expect("lpcnn weights accepted for loopnet")
            .to_string();
        assert!(
            err.contains("small.safetensors") && err.contains("--method lpcnn"),
            "{err}"
        );
    }
}
