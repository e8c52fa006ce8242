//! CONTRACT STUB: BIDS entities parsed from a file name.
use std::collections::BTreeMap;

/// The key-value entities of a BIDS file name, in BIDS order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Entities {
    pub sub: String,
    pub ses: Option<String>,
    pub acq: Option<String>,
    pub rec: Option<String>,
    pub run: Option<String>,
    pub echo: Option<String>,
    pub part: Option<String>,
    pub desc: Option<String>,
    /// Any other entity, kept so that distinct series stay distinct.
    pub other: BTreeMap<String, String>,
}

impl Entities {
    /// `sub-X[_ses-Y][_acq-Z][_rec-..][_run-N]` plus other entities, without echo/part/desc.
    pub fn prefix(&self) -> String {
        unimplemented!("Entities::prefix")
    }
}
