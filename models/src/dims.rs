//! Bounded config integers. Every product the frontends and passes form from them (heads ×
//! head_dim, experts × width, ...) then fits in u32, so hostile or mistyped configs are
//! refused at parse time, naming the field, instead of overflowing later.

use std::num::NonZeroU32;

use serde::{Deserialize, Deserializer, de::Error};

/// Largest count: heads, experts, layers, groups, per-head widths, conv kernel sizes.
pub const MAX_COUNT: u32 = 1 << 12;
/// Largest width: hidden, vocab, intermediate and latent sizes.
pub const MAX_WIDTH: u32 = 1 << 20;

macro_rules! bounded {
    ($(#[$m:meta])* $name:ident, $max:expr, $what:literal) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub struct $name(NonZeroU32);

        impl $name {
            pub fn get(self) -> u32 {
                self.0.get()
            }
            pub fn new(value: u32) -> Option<Self> {
                NonZeroU32::new(value).filter(|v| v.get() <= $max).map($name)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let value = NonZeroU32::deserialize(d)?;
                $name::new(value.get()).ok_or_else(|| D::Error::custom(format!("{value} exceeds the largest supported {} ({})", $what, $max)))
            }
        }
    };
}

bounded!(/// 1 ..= [`MAX_COUNT`].
    Count, MAX_COUNT, "count");
bounded!(/// 1 ..= [`MAX_WIDTH`].
    Width, MAX_WIDTH, "width");

/// A config integer that may be 0 (shared experts, MTP layers) but not larger than `max`.
pub fn at_most(path: &std::path::Path, field: &str, value: u32, max: u32) -> Result<u32, crate::ModelError> {
    if value > max {
        return Err(crate::ModelError::field(path, field, format!("{value} exceeds the largest supported value ({max})")));
    }
    Ok(value)
}
