//! Test data shared by the tests of the kernels and of the code compiled per level
//! (`stats/sums.rs`, `adapter/rows.rs`).

use crate::dtype::FloatDtype;

/// xorshift64, for test data.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Values of one format as raw bits: any pattern (NaN, ±inf and subnormals included), with
/// ordinary numbers most often.
pub(crate) fn some_bits(rng: &mut Rng, d: FloatDtype) -> u64 {
    let width = 8 * d.size() as u32;
    let any = rng.next() >> (64 - width);
    match (rng.below(4), d) {
        (0, _) => any,
        // Subnormal or zero.
        (1, FloatDtype::BF16) => any & 0x807f,
        (1, FloatDtype::F16) => any & 0x83ff,
        (1, FloatDtype::F32) => any & 0x807f_ffff,
        (1, _) => any & 0x800f_ffff_ffff_ffff,
        // Around 1.
        (_, FloatDtype::BF16) => 0x3f00 | (any & 0x80ff),
        (_, FloatDtype::F16) => 0x3800 | (any & 0x87ff),
        (_, FloatDtype::F32) => 0x3f00_0000 | (any & 0x80ff_ffff),
        (_, _) => 0x3fe0_0000_0000_0000 | (any & 0x801f_ffff_ffff_ffff),
    }
}
