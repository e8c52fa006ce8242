//! Unit conventions, written down once.
//!
//! The field is expressed relative to B0: `ppm = Hz / (γ̄ · B0) · 10⁶`, with
//! γ̄ = 42.577478 MHz/T. Phase accrues as `φ = 2π · f_Hz · TE`.

use std::f64::consts::PI;

/// γ/2π of the proton, in Hz per tesla.
pub const GAMMA_BAR_HZ_PER_T: f64 = 42.577478e6;

/// Chemical shift of the main fat resonance (methylene, ≈ 1.3 ppm on the proton scale)
/// relative to water, ppm of B0: fat precesses slower, so its phase runs behind water's by
/// `2π · FAT_SHIFT_PPM · hz_per_ppm(B0) · TE` on top of the field's (−434 Hz at 3 T).
pub const FAT_SHIFT_PPM: f64 = -3.4;

/// Hz corresponding to 1 ppm of the field at `b0_tesla`.
pub fn hz_per_ppm(b0_tesla: f64) -> f64 {
    GAMMA_BAR_HZ_PER_T * b0_tesla * 1e-6
}

pub fn hz_to_ppm(hz: f64, b0_tesla: f64) -> f64 {
    hz / hz_per_ppm(b0_tesla)
}

pub fn ppm_to_hz(ppm: f64, b0_tesla: f64) -> f64 {
    ppm * hz_per_ppm(b0_tesla)
}

/// Phase (rad) accrued at echo time `te` (s) by a frequency offset `hz`.
pub fn hz_to_rad(hz: f64, te: f64) -> f64 {
    2.0 * PI * hz * te
}

pub fn rad_to_hz(rad: f64, te: f64) -> f64 {
    rad / (2.0 * PI * te)
}

/// Angular frequency (rad/s) to Hz.
pub fn rad_per_s_to_hz(w: f64) -> f64 {
    w / (2.0 * PI)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_ppm_at_3t_is_about_128_hz() {
        assert!((hz_per_ppm(3.0) - 127.732434).abs() < 1e-6);
        assert!((hz_to_ppm(ppm_to_hz(0.37, 7.0), 7.0) - 0.37).abs() < 1e-12);
    }

    #[test]
    fn phase_and_frequency_round_trip() {
        let te = 0.012;
        assert!((rad_to_hz(hz_to_rad(10.0, te), te) - 10.0).abs() < 1e-12);
        // 1/TE Hz accrues one full turn.
        assert!((hz_to_rad(1.0 / te, te) - 2.0 * PI).abs() < 1e-12);
        assert!((rad_per_s_to_hz(2.0 * PI * 5.0) - 5.0).abs() < 1e-12);
    }
}
