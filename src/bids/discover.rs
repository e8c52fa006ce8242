//! CONTRACT STUB
use std::path::Path;

use super::{Discovery, Filter};
use crate::Result;

pub fn discover(root: &Path, filter: &Filter) -> Result<Discovery> {
    let _ = (root, filter);
    unimplemented!("bids::discover")
}
