//! The method's stages as library calls (`../shared/METHOD.md`): answer prompts, capture
//! activations, fit vectors, steer, and the `run` pipeline that chains them with the judge,
//! tunes layers and strengths on validation prompts and evaluates on test prompts.

pub mod analysis_report;
pub mod answers;
pub mod capture;
pub mod config;
pub mod evaluate;
pub mod fitting;
pub mod gate;
pub mod generator;
pub mod recipe;
pub mod report;
pub mod run;
pub mod sets;
pub mod steering;
#[cfg(test)]
mod testing;

pub use generator::Generator;
pub use recipe::Recipe;
