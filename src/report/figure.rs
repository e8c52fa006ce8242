//! PNG montages: three orthogonal planes through a point (axial, coronal, sagittal, left to
//! right), drawn at true aspect with nearest-neighbour sampling, a colour bar strip beneath
//! for signed maps, and optionally a mask outline.

use std::path::Path;

use crate::preprocess::util::quantile;
use crate::{Error, Result, Volume};

/// How values become colours.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Style {
    /// Black to white over [0, the 99th percentile].
    Grey,
    /// Blue–white–red, symmetric about 0 over ± the 99th percentile of |value| in the mask.
    Diverging,
}

/// An RGB image.
#[derive(Clone, Debug)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
}

impl Image {
    fn new(width: usize, height: usize) -> Self {
        Image {
            width,
            height,
            rgb: vec![0; width * height * 3],
        }
    }

    fn put(&mut self, x: usize, y: usize, c: [u8; 3]) {
        let o = 3 * (y * self.width + x);
        self.rgb[o..o + 3].copy_from_slice(&c);
    }

    pub fn get(&self, x: usize, y: usize) -> [u8; 3] {
        let o = 3 * (y * self.width + x);
        [self.rgb[o], self.rgb[o + 1], self.rgb[o + 2]]
    }

    /// Encodes as PNG and writes atomically.
    pub fn write_png(&self, path: &Path) -> Result<()> {
        let mut bytes = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut bytes, self.width as u32, self.height as u32);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            let mut w = enc
                .write_header()
                .map_err(|e| Error::input(path, format!("cannot encode PNG: {e}")))?;
            w.write_image_data(&self.rgb)
                .map_err(|e| Error::input(path, format!("cannot encode PNG: {e}")))?;
        }
        crate::io::write_atomic(path, &bytes)
    }
}

/// Colour of `t` in [0, 1] on the diverging map (blue, white, red).
pub fn diverging(t: f32) -> [u8; 3] {
    let t = t.clamp(0.0, 1.0);
    let (blue, white, red) = (
        [33.0, 102.0, 172.0],
        [247.0, 247.0, 247.0],
        [178.0, 24.0, 43.0],
    );
    let (a, b, s) = if t < 0.5 {
        (blue, white, t / 0.5)
    } else {
        (white, red, (t - 0.5) / 0.5)
    };
    [0, 1, 2].map(|i| (a[i] + (b[i] - a[i]) * s).round() as u8)
}

fn grey(t: f32) -> [u8; 3] {
    let g = (t.clamp(0.0, 1.0) * 255.0).round() as u8;
    [g, g, g]
}

const OUTLINE: [u8; 3] = [255, 215, 0];
/// Pixels per mm are chosen so the largest extent of the volume is about this wide.
const TARGET_PX: f64 = 220.0;
const GAP: usize = 4;
const BAR_HEIGHT: usize = 14;

/// The display range of `v` for `style`: (low, high).
pub fn display_range(v: &Volume, style: Style, mask: Option<&[bool]>) -> (f32, f32) {
    match style {
        Style::Grey => (0.0, quantile(&v.data, None, 0.99).unwrap_or(1.0).max(1e-12)),
        Style::Diverging => {
            let abs: Vec<f32> = v.data.iter().map(|x| x.abs()).collect();
            let nonzero: Vec<bool> = match mask {
                Some(m) => m.to_vec(),
                None => v.data.iter().map(|&x| x != 0.0).collect(),
            };
            let l = quantile(&abs, Some(&nonzero), 0.99)
                .unwrap_or(1.0)
                .max(1e-12);
            (-l, l)
        }
    }
}

/// The centroid of `mask` (voxel indices), or the grid's centre for an empty mask.
pub fn centre_of(mask: &[bool], dims: [usize; 3]) -> [usize; 3] {
    let (mut s, mut n) = ([0.0f64; 3], 0usize);
    for (c, _) in mask.iter().enumerate().filter(|(_, &m)| m) {
        s[0] += (c % dims[0]) as f64;
        s[1] += ((c / dims[0]) % dims[1]) as f64;
        s[2] += (c / (dims[0] * dims[1])) as f64;
        n += 1;
    }
    if n == 0 {
        return dims.map(|d| d / 2);
    }
    [0, 1, 2].map(|a| ((s[a] / n as f64).round() as usize).min(dims[a] - 1))
}

/// A plane: the two in-plane axes (u to the right, v upwards) and the fixed axis.
const PLANES: [(usize, usize, usize); 3] = [(0, 1, 2), (0, 2, 1), (1, 2, 0)];

/// The montage of `v` through `centre`, with `range` mapped by `style`, `outline` drawn
/// where the mask's edge crosses each plane, and a colour bar strip for diverging maps.
pub fn montage(
    v: &Volume,
    style: Style,
    range: (f32, f32),
    centre: [usize; 3],
    outline: Option<&[bool]>,
) -> Image {
    let colour = |c: usize| {
        let t = (v.data[c] - range.0) / (range.1 - range.0);
        match style {
            Style::Grey => grey(t),
            Style::Diverging => diverging(t),
        }
    };
    let bar = style == Style::Diverging;
    planes(v.dims, v.geometry.voxel_size, centre, outline, bar, colour)
}

/// Two volumes on one grid in one montage (no colour bar): `a` in magenta and `b` in green,
/// each black to full over its range. Where they agree the result is grey; an edge of one
/// that lies off the other's shows as a magenta or green fringe, which is how a
/// registration is judged by eye. `b` must have `a`'s dimensions.
pub fn fusion_montage(
    a: &Volume,
    b: &Volume,
    range_a: (f32, f32),
    range_b: (f32, f32),
    centre: [usize; 3],
) -> Image {
    let level = |x: f32, r: (f32, f32)| grey((x - r.0) / (r.1 - r.0))[0];
    let colour = |c: usize| {
        let (m, g) = (level(a.data[c], range_a), level(b.data[c], range_b));
        [m, g, m]
    };
    planes(a.dims, a.geometry.voxel_size, centre, None, false, colour)
}

/// The three planes through `centre` with each voxel `c` drawn in `colour(c)`, the edge of
/// `outline` drawn over, and for `bar` the diverging colour bar strip beneath.
fn planes(
    dims: [usize; 3],
    vox: [f64; 3],
    centre: [usize; 3],
    outline: Option<&[bool]>,
    bar: bool,
    colour: impl Fn(usize) -> [u8; 3],
) -> Image {
    let extent = (0..3).map(|a| dims[a] as f64 * vox[a]).fold(0.0, f64::max);
    let px_per_mm = TARGET_PX / extent.max(1e-6);
    let size = |a: usize| ((dims[a] as f64 * vox[a] * px_per_mm).round() as usize).max(1);
    let widths: Vec<usize> = PLANES.iter().map(|&(u, _, _)| size(u)).collect();
    let heights: Vec<usize> = PLANES.iter().map(|&(_, w, _)| size(w)).collect();
    let plane_h = *heights.iter().max().unwrap_or(&1);
    let width = widths.iter().sum::<usize>() + GAP * 2;
    let height = plane_h + if bar { GAP + BAR_HEIGHT } else { 0 };
    let mut img = Image::new(width, height);
    let mut x0 = 0;
    for (p, &(u, w, fixed)) in PLANES.iter().enumerate() {
        let (pw, ph) = (widths[p], heights[p]);
        let y0 = plane_h - ph; // planes sit on a common baseline
                               // Voxel index of every pixel along u and (flipped, so up is +) along w.
        let iu: Vec<usize> = (0..pw)
            .map(|x| (x * dims[u] / pw).min(dims[u] - 1))
            .collect();
        let iw: Vec<usize> = (0..ph)
            .map(|y| ((ph - 1 - y) * dims[w] / ph).min(dims[w] - 1))
            .collect();
        let index = |x: usize, y: usize| {
            let mut ijk = [0usize; 3];
            ijk[u] = iu[x];
            ijk[w] = iw[y];
            ijk[fixed] = centre[fixed];
            ijk[0] + dims[0] * (ijk[1] + dims[1] * ijk[2])
        };
        for y in 0..ph {
            for x in 0..pw {
                let c = index(x, y);
                let mut rgb = colour(c);
                if let Some(m) = outline {
                    let inside = m[c];
                    let edge = inside
                        && [
                            (x.wrapping_sub(1), y),
                            (x + 1, y),
                            (x, y.wrapping_sub(1)),
                            (x, y + 1),
                        ]
                        .iter()
                        .any(|&(a, b)| a >= pw || b >= ph || !m[index(a, b)]);
                    if edge {
                        rgb = OUTLINE;
                    }
                }
                img.put(x0 + x, y0 + y, rgb);
            }
        }
        x0 += pw + GAP;
    }
    if bar {
        for x in 0..width {
            let t = x as f32 / (width - 1).max(1) as f32;
            let c = diverging(t);
            for y in plane_h + GAP..height {
                img.put(x, y, c);
            }
        }
        // Tick at zero, in black.
        for y in plane_h + GAP..height {
            img.put(width / 2, y, [0, 0, 0]);
        }
    }
    img
}

/// The minimum over voxels `k0..k1` along z of every (x, y) column, counting only voxels
/// inside `mask` (all when `None`); NaN where a column has none. Veins are dark in the
/// magnitude, so its slab minimum traces them through the slab (as in SWI); χ's shows the
/// most diamagnetic tissue and any negative streaking.
pub fn min_projection(
    data: &[f32],
    dims: [usize; 3],
    mask: Option<&[bool]>,
    k0: usize,
    k1: usize,
) -> Vec<f32> {
    let plane = dims[0] * dims[1];
    let mut out = vec![f32::NAN; plane];
    for k in k0..k1.min(dims[2]) {
        for (o, v) in out.iter_mut().enumerate() {
            let c = o + plane * k;
            if mask.is_none_or(|m| m[c]) && (v.is_nan() || data[c] < *v) {
                *v = data[c];
            }
        }
    }
    out
}

/// Axial slabs of about `slab_mm` for a minimum-intensity projection: `count` adjacent
/// slabs centred on z index `centre`, clipped to the grid, as (first, end) z indices.
pub fn slabs(
    dims: [usize; 3],
    voxel_size: [f64; 3],
    slab_mm: f64,
    count: usize,
    centre: usize,
) -> Vec<(usize, usize)> {
    let n = ((slab_mm / voxel_size[2]).round() as usize).clamp(1, dims[2].max(1));
    let total = n * count;
    let start = centre
        .saturating_sub(total / 2)
        .min(dims[2].saturating_sub(total));
    (0..count)
        .map(|i| (start + i * n, (start + (i + 1) * n).min(dims[2])))
        .filter(|(a, b)| a < b)
        .collect()
}

/// The axial minimum-intensity projections of `v` over `slabs`, side by side (inferior
/// left), at true aspect, with `range` mapped by `style` and the colour bar of the montages;
/// columns without mask voxels are black.
pub fn min_projection_row(
    v: &Volume,
    style: Style,
    range: (f32, f32),
    mask: Option<&[bool]>,
    slabs: &[(usize, usize)],
) -> Image {
    let dims = v.dims;
    let vox = v.geometry.voxel_size;
    // The same scale as the montages, so a slab looks like their axial plane.
    let extent = (0..3).map(|a| dims[a] as f64 * vox[a]).fold(0.0, f64::max);
    let px_per_mm = TARGET_PX / extent.max(1e-6);
    let size = |a: usize| ((dims[a] as f64 * vox[a] * px_per_mm).round() as usize).max(1);
    let (pw, ph) = (size(0), size(1));
    let count = slabs.len().max(1);
    let width = pw * count + GAP * (count - 1);
    let bar = style == Style::Diverging;
    let height = ph + if bar { GAP + BAR_HEIGHT } else { 0 };
    let mut img = Image::new(width, height);
    for (s, &(k0, k1)) in slabs.iter().enumerate() {
        let mip = min_projection(&v.data, dims, mask, k0, k1);
        let x0 = s * (pw + GAP);
        for y in 0..ph {
            let j = ((ph - 1 - y) * dims[1] / ph).min(dims[1] - 1);
            for x in 0..pw {
                let i = (x * dims[0] / pw).min(dims[0] - 1);
                let value = mip[i + dims[0] * j];
                let t = (value - range.0) / (range.1 - range.0);
                let rgb = match style {
                    _ if value.is_nan() => [0, 0, 0],
                    Style::Grey => grey(t),
                    Style::Diverging => diverging(t),
                };
                img.put(x0 + x, y, rgb);
            }
        }
    }
    if bar {
        for x in 0..width {
            let c = diverging(x as f32 / (width - 1).max(1) as f32);
            for y in ph + GAP..height {
                img.put(x, y, c);
            }
        }
        for y in ph + GAP..height {
            img.put(width / 2, y, [0, 0, 0]);
        }
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Geometry;

    #[test]
    fn diverging_map_runs_blue_white_red_and_grey_is_monotone() {
        assert_eq!(diverging(0.0), [33, 102, 172]);
        assert_eq!(diverging(0.5), [247, 247, 247]);
        assert_eq!(diverging(1.0), [178, 24, 43]);
        assert!(diverging(0.25)[0] < diverging(0.75)[0]);
        assert!((0..10).all(|i| grey(i as f32 / 10.0)[0] < grey((i + 1) as f32 / 10.0)[0]));
    }

    #[test]
    fn montage_has_true_aspect_orientation_outline_and_a_png_round_trip() {
        // 20 × 10 × 5 voxels of 1 × 2 × 4 mm: 20 × 20 × 20 mm, so every plane is square.
        let dims = [20, 10, 5];
        let g = Geometry::from_voxel_size([1.0, 2.0, 4.0]);
        let n = 1000;
        // Value = +1 in the upper half of y (j ≥ 5), −1 below.
        let data: Vec<f32> = (0..n)
            .map(|c| if (c / 20) % 10 >= 5 { 1.0 } else { -1.0 })
            .collect();
        let v = Volume::new(dims, data, g);
        let mask: Vec<bool> = (0..n).map(|c| (c % 20) >= 5 && (c % 20) < 15).collect();
        let img = montage(&v, Style::Diverging, (-1.0, 1.0), [10, 5, 2], Some(&mask));
        let side = 220;
        assert_eq!(img.width, 3 * side + 2 * GAP);
        assert_eq!(img.height, side + GAP + BAR_HEIGHT);
        // Axial plane: up is +y, so the top is red (+1) and the bottom blue (−1), away
        // from the outline.
        assert_eq!(img.get(side / 2, 10), diverging(1.0));
        assert_eq!(img.get(side / 2, side - 10), diverging(0.0));
        // The mask spans x in [5, 15): its edge at x = 5 mm is outlined, outside is not.
        assert_eq!(img.get(5 * 11, side / 4), OUTLINE);
        assert_ne!(img.get(2 * 11, side / 4), OUTLINE);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.png");
        img.write_png(&p).unwrap();
        let decoder = png::Decoder::new(std::fs::File::open(&p).unwrap());
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!(
            (info.width as usize, info.height as usize),
            (img.width, img.height)
        );
        assert_eq!(&buf[..info.buffer_size()], &img.rgb[..]);
    }

    #[test]
    fn fusion_is_grey_where_the_images_agree_and_coloured_where_they_do_not() {
        let dims = [20, 20, 20];
        let g = Geometry::from_voxel_size([1.0; 3]);
        // A bright slab x < 10 in `a`, x < 12 in `b`: they disagree on 10 ≤ x < 12.
        let slab = |edge: usize| (0..8000).map(|c| ((c % 20) < edge) as u8 as f32).collect();
        let a = Volume::new(dims, slab(10), g.clone());
        let b = Volume::new(dims, slab(12), g);
        let img = fusion_montage(&a, &b, (0.0, 1.0), (0.0, 1.0), [10, 10, 10]);
        assert_eq!(img.height, 220, "no colour bar");
        // Axial plane at 11 px per mm: x = 5 both bright, x = 11 only b, x = 15 neither.
        assert_eq!(img.get(5 * 11, 100), [255, 255, 255]);
        assert_eq!(img.get(11 * 11 + 5, 100), [0, 255, 0]);
        assert_eq!(img.get(15 * 11, 100), [0, 0, 0]);
    }

    #[test]
    fn centre_is_the_mask_centroid() {
        let dims = [10, 10, 10];
        let mask: Vec<bool> = (0..1000)
            .map(|c| (2..5).contains(&(c % 10)) && (c / 100) == 7)
            .collect();
        assert_eq!(centre_of(&mask, dims), [3, 5, 7]);
        assert_eq!(centre_of(&[false; 1000], dims), [5, 5, 5]);
    }

    #[test]
    fn min_projection_is_the_naive_minimum_over_the_slab_inside_the_mask() {
        let dims = [3, 2, 5];
        let data: Vec<f32> = (0..30).map(|c| ((c * 7919) % 31) as f32 - 15.0).collect();
        let mask: Vec<bool> = (0..30).map(|c| c % 4 != 0).collect();
        for (k0, k1) in [(0, 5), (1, 3), (4, 5)] {
            let got = min_projection(&data, dims, Some(&mask), k0, k1);
            let all = min_projection(&data, dims, None, k0, k1);
            for o in 0..6 {
                let column = (k0..k1).map(|k| o + 6 * k);
                let naive = column
                    .clone()
                    .filter(|&c| mask[c])
                    .map(|c| data[c])
                    .fold(f32::INFINITY, f32::min);
                if naive.is_finite() {
                    assert_eq!(got[o], naive, "slab {k0}..{k1}, column {o}");
                } else {
                    assert!(got[o].is_nan());
                }
                let naive_all = column.map(|c| data[c]).fold(f32::INFINITY, f32::min);
                assert_eq!(all[o], naive_all);
            }
        }
    }

    #[test]
    fn slabs_are_adjacent_about_the_centre_and_inside_the_grid() {
        // 1 mm voxels, 10 mm slabs: 4 slabs of 10 voxels around z = 50.
        assert_eq!(
            slabs([8, 8, 100], [1.0; 3], 10.0, 4, 50),
            vec![(30, 40), (40, 50), (50, 60), (60, 70)]
        );
        // Near the edge they shift inwards; a short grid gives fewer.
        assert_eq!(
            slabs([8, 8, 100], [1.0; 3], 10.0, 2, 2),
            vec![(0, 10), (10, 20)]
        );
        assert_eq!(
            slabs([8, 8, 12], [2.0; 3], 10.0, 4, 6),
            vec![(0, 5), (5, 10), (10, 12)]
        );
        let v = Volume::new(
            [4, 4, 12],
            vec![1.0; 192],
            crate::Geometry::from_voxel_size([2.0; 3]),
        );
        let img = min_projection_row(&v, Style::Grey, (0.0, 1.0), None, &[(0, 5), (5, 10)]);
        assert_eq!(img.width, 2 * 73 + GAP);
        assert_eq!(img.get(1, 1), grey(1.0));
    }
}
