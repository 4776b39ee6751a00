//! Literal defaults for `#[serde(default = "…")]` on checkpoint configs
//! (`config.json` fields that transformers / diffusers may omit).

/// The integer `N`.
pub fn int<const N: usize>() -> usize {
    N
}

/// `true`.
pub fn yes() -> bool {
    true
}
