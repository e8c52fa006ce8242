"""Where a χ map's error lies: demeaned NRMSE over the brain mask, and the squared error split by
depth in the mask (Euclidean distance to its outside) and by label, each in 1e-4 of the
reference's energy (so the parts add up to NRMSE², in %²).

    python error_by_depth.py TRUTH_CHIMAP BRAIN_MASK SEG CHIMAP [CHIMAP ...]

Needs numpy, nibabel and scipy (`pip install numpy nibabel scipy`)."""

import sys

import nibabel as nib
import numpy as np
from scipy import ndimage

BINS_MM = [0, 2, 4, 8, 15, np.inf]


def main(truth, brain, seg, maps):
    ref = nib.load(truth).get_fdata()
    img = nib.load(brain)
    mask = img.get_fdata() > 0.5
    labels = nib.load(seg).get_fdata().astype(int)[mask]
    depth = ndimage.distance_transform_edt(mask, sampling=img.header.get_zooms()[:3])[mask]
    r = ref[mask] - ref[mask].mean()
    energy = (r**2).sum()
    for path in maps:
        x = nib.load(path).get_fdata()[mask]
        e = (x - x.mean()) - r
        part = lambda sel: 1e4 * (e[sel] ** 2).sum() / energy
        by_depth = " / ".join(
            f"{part((depth > a) & (depth <= b)):.1f}" for a, b in zip(BINS_MM, BINS_MM[1:])
        )
        by_label = " ".join(f"{l}:{part(labels == l):.1f}" for l in np.unique(labels) if l > 0)
        nrmse = 100 * np.sqrt((e**2).sum() / energy)
        print(f"{path}\n  NRMSE {nrmse:.2f} %; by depth 0-2/2-4/4-8/8-15/>15 mm: {by_depth}; by label: {by_label}")


if __name__ == "__main__":
    if len(sys.argv) < 5:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
