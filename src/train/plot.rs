//! The loss-curve PNG: a tiny line rasteriser (no text; the CSV has the numbers), log-scale
//! loss against epoch, one colour per series, grey lines at each power of ten.

use std::path::Path;

use crate::{Error, Result};

const W: usize = 640;
const H: usize = 400;
const MARGIN: usize = 30;

/// An RGB canvas.
struct Canvas {
    px: Vec<[u8; 3]>,
}

impl Canvas {
    fn new() -> Self {
        Canvas {
            px: vec![[255; 3]; W * H],
        }
    }

    fn dot(&mut self, x: i64, y: i64, c: [u8; 3]) {
        if (0..W as i64).contains(&x) && (0..H as i64).contains(&y) {
            self.px[y as usize * W + x as usize] = c;
        }
    }

    /// A line two pixels wide (Bresenham).
    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3]) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.dot(x, y, c);
            self.dot(x + 1, y, c);
            self.dot(x, y + 1, c);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    fn png(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, W as u32, H as u32);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            let mut writer = enc
                .write_header()
                .map_err(|e| Error::Numerics(format!("PNG encoding: {e}")))?;
            let flat: Vec<u8> = self.px.iter().flatten().copied().collect();
            writer
                .write_image_data(&flat)
                .map_err(|e| Error::Numerics(format!("PNG encoding: {e}")))?;
        }
        Ok(out)
    }
}

/// Colours of the series, in order (training loss blue, validation loss orange, …).
pub const COLOURS: [[u8; 3]; 3] = [[31, 119, 180], [255, 127, 14], [44, 160, 44]];

/// Draws each series of (epoch, loss > 0) points; non-positive losses are skipped.
pub fn render(series: &[Vec<(f64, f64)>]) -> Result<Vec<u8>> {
    let mut c = Canvas::new();
    let pts = series
        .iter()
        .flatten()
        .filter(|p| p.1 > 0.0 && p.1.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y.log10());
        y1 = y1.max(y.log10());
    }
    if x0 > x1 {
        return c.png();
    }
    if x1 - x0 < 1e-9 {
        x1 = x0 + 1.0;
    }
    // Whole decades, so the grey lines bracket the data.
    let (y0, y1) = (y0.floor(), y1.ceil().max(y0.floor() + 1.0));
    let (pw, ph) = ((W - 2 * MARGIN) as f64, (H - 2 * MARGIN) as f64);
    let to_px = |x: f64, ly: f64| -> (i64, i64) {
        (
            (MARGIN as f64 + (x - x0) / (x1 - x0) * pw).round() as i64,
            (MARGIN as f64 + (y1 - ly) / (y1 - y0) * ph).round() as i64,
        )
    };
    let mut decade = y0;
    while decade <= y1 + 1e-9 {
        c.line(to_px(x0, decade), to_px(x1, decade), [220; 3]);
        decade += 1.0;
    }
    let black = [0; 3];
    c.line(to_px(x0, y0), to_px(x1, y0), black);
    c.line(to_px(x0, y0), to_px(x0, y1), black);
    for (s, colour) in series.iter().zip(COLOURS.iter().cycle()) {
        let p: Vec<(i64, i64)> = s
            .iter()
            .filter(|p| p.1 > 0.0 && p.1.is_finite())
            .map(|&(x, y)| to_px(x, y.log10()))
            .collect();
        for w in p.windows(2) {
            c.line(w[0], w[1], *colour);
        }
        for &(x, y) in &p {
            for d in -2..=2 {
                c.dot(x + d, y, *colour);
                c.dot(x, y + d, *colour);
            }
        }
    }
    c.png()
}

/// [`render`] written atomically to `path`.
pub fn write(path: &Path, series: &[Vec<(f64, f64)>]) -> Result<()> {
    crate::io::write_atomic(path, &render(series)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8]) -> (usize, usize, Vec<[u8; 3]>) {
        let dec = png::Decoder::new(bytes);
        let mut r = dec.read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size()];
        let info = r.next_frame(&mut buf).unwrap();
        let px = buf[..info.buffer_size()]
            .chunks(3)
            .map(|c| [c[0], c[1], c[2]])
            .collect();
        (info.width as usize, info.height as usize, px)
    }

    #[test]
    fn curves_are_drawn_where_their_values_lie() {
        // Training loss falling over three decades, validation flat at the top.
        let train: Vec<(f64, f64)> = (0..10)
            .map(|e| (e as f64, 10f64.powf(-(e as f64) / 3.0)))
            .collect();
        let val: Vec<(f64, f64)> = (0..10).map(|e| (e as f64, 1.0)).collect();
        let (w, h, px) = decode(&render(&[train, val]).unwrap());
        assert_eq!((w, h), (W, H));
        let at = |x: usize, y: usize| px[y * W + x];
        // First and last training points: top-left and bottom-right corners of the plot.
        assert_eq!(at(MARGIN + 1, MARGIN), COLOURS[1]); // validation drawn over training at 1.0
        assert_eq!(at(W - MARGIN, H - MARGIN - 1), COLOURS[0]);
        // Validation at 10⁰ (the top decade) all the way across.
        assert_eq!(at(W / 2, MARGIN), COLOURS[1]);
        // Nothing drawn in the upper-right quarter except the validation line and grid.
        let stray = (MARGIN + 5..H / 3)
            .flat_map(|y| (W / 2..W - MARGIN).map(move |x| (x, y)))
            .filter(|&(x, y)| at(x, y) == COLOURS[0])
            .count();
        assert_eq!(stray, 0);
        // No data: a blank canvas, still a valid PNG.
        let (_, _, blank) = decode(&render(&[]).unwrap());
        assert!(blank.iter().all(|&p| p == [255; 3]));
    }
}
