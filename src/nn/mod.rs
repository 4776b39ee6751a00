//! The layers we train through, built from candle ops that carry a backward.

pub mod activation;
pub mod attention;
pub mod attention_cpu;
pub mod attention_recompute;
pub mod checkpoint;
pub mod conv;
pub mod conv_cpu;
pub mod conv_gemm;
pub mod cpu;
pub mod embedding;
pub mod fused;
mod gemm;
pub mod gpu_plan;
pub mod im2col;
pub mod layout;
pub mod linear;
mod linear_cpu;
pub mod lora;
pub mod norm;
pub mod precision;
pub mod store;
pub mod torch_pickle;
pub mod upsample;
pub mod vmath;
pub mod weights;

pub use activation::{Activation, gelu, quick_gelu, sigmoid, silu};
pub use attention::{causal_mask, scaled_dot_product_attention, softmax_last_dim};
pub use conv::Conv2d;
pub use embedding::{Embedding, timestep_embedding};
pub use linear::Linear;
pub use lora::Lora;
pub use norm::{GroupNorm, LayerNorm};
pub use precision::Precision;
pub use store::{Init, Vb, read_safetensors, save_safetensors};
pub use upsample::{upsample_nearest, upsample_nearest_2x};
pub use weights::{WeightsReader, read_weights};
