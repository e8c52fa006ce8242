//! The trained weights that ship inside the binary: one default per learned method, so that
//! `--method lpcnn` (or `loopnet`, `unet`) needs no file, in a container as on a laptop.
//! Each is a `chimap train` output kept in `weights/` beside its model card; `--weights FILE`
//! overrides it.

/// One embedded weights file.
pub struct Shipped {
    /// The file's name under `weights/` without `.safetensors`; its card is `weights/<name>.md`.
    pub name: &'static str,
    /// The model the file holds (`chimap.model` in its metadata).
    pub model: &'static str,
    pub bytes: &'static [u8],
}

impl Shipped {
    /// Where the file and its model card live in the source tree.
    pub fn file(&self) -> String {
        format!("weights/{}.safetensors", self.name)
    }

    pub fn card(&self) -> String {
        format!("weights/{}.md", self.name)
    }
}

/// Every shipped model, one per learned method.
pub const SHIPPED: &[Shipped] = &[
    Shipped {
        name: "lpcnn-default",
        model: "lpcnn",
        bytes: include_bytes!("../../weights/lpcnn-default.safetensors"),
    },
    Shipped {
        name: "loopnet-default",
        model: "loopnet",
        bytes: include_bytes!("../../weights/loopnet-default.safetensors"),
    },
    Shipped {
        name: "unet-default",
        model: "unet",
        bytes: include_bytes!("../../weights/unet-default.safetensors"),
    },
];

/// The default weights of `model` (`lpcnn`, `loopnet`, `unet`).
pub fn default_for(model: &str) -> Option<&'static Shipped> {
    SHIPPED.iter().find(|s| s.model == model)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::weights;

    /// Each shipped file says it holds the model it is the default for, carries its
    /// architecture and training provenance, and has a model card beside it.
    #[test]
    fn every_shipped_file_is_the_model_it_claims_with_a_card() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        for s in SHIPPED {
            let meta = weights::metadata_of_bytes(std::path::Path::new(&s.file()), s.bytes)
                .unwrap_or_else(|e| panic!("{}: {e}", s.name));
            assert_eq!(meta[weights::MODEL_KEY], s.model, "{}", s.name);
            assert!(meta.contains_key(weights::MODEL_CONFIG_KEY), "{}", s.name);
            let p = weights::Provenance::from_metadata(&meta);
            assert!(p.steps.is_some_and(|n| n > 0), "{}: no step count", s.name);
            assert!(
                p.cpu_seconds.is_some_and(|s| s > 0.0),
                "{}: no CPU time",
                s.name
            );
            let card = std::fs::read_to_string(root.join(s.card()))
                .unwrap_or_else(|e| panic!("{}: {e}", s.card()));
            assert!(
                card.contains(&weights::sha256_of(s.bytes)),
                "{} does not give the file's sha256",
                s.card()
            );
        }
        assert!(default_for("lpcnn").is_some() && default_for("tv").is_none());
    }
}
