//! The steering methods `run` compares, and the vector files they steer with.

use crate::config::Direction;
use crate::gate::Gate;
use crate::recipe::{ModelIdentity, Provenance, Recipe};
use crate::steering::{point_alphas, AlphaProfile, SteerMode, SteerPositions, Steering};
use anyhow::Result;
use refusal_steer_steer::SteeringVectors;
use std::collections::BTreeMap;

/// The vector files `run` fits, in the order they are fitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fitted {
    Md,
    Wrmd,
    /// WRMD with the safety direction (harmful minus benign train prompts) projected out.
    WrmdProtected,
}

impl Fitted {
    pub const ALL: [Fitted; 3] = [Fitted::Md, Fitted::Wrmd, Fitted::WrmdProtected];

    /// Its name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Fitted::Md => "md",
            Fitted::Wrmd => "wrmd",
            Fitted::WrmdProtected => "wrmd+protected",
        }
    }
}

/// Every fitted vector file of a run.
pub type FittedVectors = BTreeMap<Fitted, SteeringVectors>;

/// One way of steering that `run` compares.
#[derive(Debug, Clone, Copy)]
pub struct MethodSpec {
    /// Its name in the report; folders use it with '+' written '-'.
    pub name: &'static str,
    /// The fitted vector file it steers with.
    pub vectors: Fitted,
    /// `Add`: strengths along the vector at the points chosen by held-out AUC.
    /// `AblateAdd`: the span of the vector's and `ablate_with`'s directions projected out at
    /// every point (directional ablation, strength 0), then strengths added along the vector
    /// if ablation alone is not enough.
    pub mode: SteerMode,
    /// Another fitted vector file whose directions are ablated with the vector's.
    pub ablate_with: Option<Fitted>,
    /// Only prompts the topic gate lets through are steered.
    pub gated: bool,
}

/// The methods compared. Ablation only removes refusals, so induce runs skip it.
pub const METHODS: [MethodSpec; 6] = [
    MethodSpec::add("md", Fitted::Md, false),
    MethodSpec::add("wrmd", Fitted::Wrmd, false),
    MethodSpec::add("wrmd+protected", Fitted::WrmdProtected, false),
    MethodSpec::add("md+gated", Fitted::Md, true),
    MethodSpec::add("wrmd+gated", Fitted::Wrmd, true),
    // Refusal spreads over more than one direction, so both are ablated (the comparison is
    // in docs/results/ablation-heldout.md, made by scripts/ablation_heldout/compare.sh).
    MethodSpec {
        name: "ablation+gated",
        vectors: Fitted::Wrmd,
        mode: SteerMode::AblateAdd,
        ablate_with: Some(Fitted::Md),
        gated: true,
    },
];

impl MethodSpec {
    const fn add(name: &'static str, vectors: Fitted, gated: bool) -> Self {
        MethodSpec {
            name,
            vectors,
            mode: SteerMode::Add,
            ablate_with: None,
            gated,
        }
    }

    pub fn by_name(name: &str) -> Option<&'static MethodSpec> {
        METHODS.iter().find(|m| m.name == name)
    }

    /// Whether the method can move the target in `direction`.
    pub fn applies_to(&self, direction: Direction) -> bool {
        self.mode == SteerMode::Add || direction == Direction::Remove
    }

    /// How `run` steers with this method at `strength`, the same in tuning, in the test and
    /// in the recipe it writes: norm-scaled strengths at `points`, at every position, in the
    /// method's mode, behind the topic gate if the method is gated.
    pub fn recipe(
        &self,
        fitted: &FittedVectors,
        points: &[usize],
        strength: f64,
        gate: &Gate,
        made_for: &ModelIdentity,
        made_by: Provenance,
    ) -> Result<Recipe> {
        let vectors = &fitted[&self.vectors];
        let alphas = point_alphas(vectors, strength, &AlphaProfile::NormScaled)?;
        let ablate_with: Vec<&SteeringVectors> =
            self.ablate_with.iter().map(|f| &fitted[f]).collect();
        let steering = Steering {
            vectors,
            points,
            alphas: &alphas,
            mode: self.mode,
            positions: SteerPositions::All,
            ablate_with: &ablate_with,
        };
        Recipe::from_steering(made_for, &steering, self.gated.then_some(gate), made_by)
    }
}
