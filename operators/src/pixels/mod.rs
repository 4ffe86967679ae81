//! Image decoding, resizing and cropping: the pixel work of `image_transform`.

pub mod buckets;
pub mod decode;
pub mod geometry;
pub mod resize;

pub use decode::{decode, DecodeOptions, Rejected, Rgb};
pub use resize::{resize_crop, CropPlan, Filter};
