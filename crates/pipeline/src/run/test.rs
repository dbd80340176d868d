//! Stage 6: every condition (unsteered, then each tuned method at its strength) on the test
//! prompts, and the recipes of the methods that kept every limit.

use super::fit::Fit;
use super::folder::Stage;
use super::methods::MethodSpec;
use super::outcome::{Evaluation, Tuned};
use super::tune::{answered, TRIAL_SETS};
use super::{Ctx, Splits};
use crate::evaluate::{choice_accuracy, mean_kl, rate, Judges, UnsteeredLogprobs};
use crate::recipe::Recipe;
use anyhow::{Context, Result};
use std::collections::BTreeMap;

/// The test rates of every condition, and the recipe of every method evaluated (by name).
pub fn test(
    ctx: &Ctx,
    splits: &Splits,
    fit: &Fit,
    tuned: &[Tuned],
    judges: &mut Judges,
    log: &mut dyn FnMut(&str),
) -> Result<(Vec<Evaluation>, BTreeMap<String, Recipe>)> {
    let mut evaluations = Vec::new();
    let mut recipes = BTreeMap::new();
    let mut kl_prompts = Vec::new();
    let mut baseline_answers = BTreeMap::new();
    // The unsteered next-token rows of the KL prompts and capability items, read once.
    let mut unsteered = UnsteeredLogprobs::default();
    let conditions = std::iter::once(None).chain(tuned.iter().map(Some));
    for t in conditions {
        let name = t.map_or("baseline", |t| t.method.as_str());
        let recipe = match t {
            None => None,
            Some(t) if t.strength.is_none() => {
                log(&format!(
                    "{name}: no strength kept every limit; not evaluated"
                ));
                continue;
            }
            Some(t) => {
                let method = MethodSpec::by_name(name).expect("tuned methods are known");
                Some(ctx.recipe(
                    method,
                    fit,
                    &t.points,
                    t.strength.expect("checked"),
                    Some(t),
                )?)
            }
        };
        let strength = t.and_then(|t| t.strength);
        let answered_sets = ctx.answers(
            splits,
            Stage::Test,
            name,
            strength,
            recipe.as_ref(),
            &baseline_answers,
        )?;
        let mut rates = BTreeMap::new();
        for (set, answers) in TRIAL_SETS.into_iter().zip(answered_sets) {
            let assessed = judges.assess(&answers)?;
            if set == "benign" && recipe.is_none() {
                kl_prompts = answered(&splits.prompts[set].test, &assessed);
            }
            rates.insert(set.to_string(), rate(&assessed).with_gate(&answers));
            if recipe.is_none() {
                baseline_answers.insert(set, answers);
            }
        }
        let (batch, format) = (ctx.config.batch, &ctx.format);
        let kl = match &recipe {
            Some(r) => Some(mean_kl(
                ctx.model,
                &kl_prompts,
                format,
                batch,
                Some(r),
                &mut unsteered,
            )?),
            None => None,
        };
        let capability_accuracy = choice_accuracy(
            ctx.model,
            &splits.capability.test,
            format,
            batch,
            recipe.as_ref(),
            &mut unsteered,
        )?;
        log(&format!(
            "{name}: target {}  safety {}  benign {}  capability {:.0}%",
            rates["target"].percent(),
            rates["safety"].percent(),
            rates["benign"].percent(),
            100.0 * capability_accuracy
        ));
        if let Some(recipe) = recipe {
            recipes.insert(name.to_string(), recipe);
        }
        evaluations.push(Evaluation {
            condition: name.to_string(),
            strength,
            points: t.map(|t| t.points.clone()).unwrap_or_default(),
            rates,
            kl,
            capability_accuracy,
        });
    }
    Ok((evaluations, recipes))
}

/// One recipe per evaluated method, the recommended one copied beside them; a resumed run
/// whose methods or recommendation changed leaves no old one behind.
pub fn write_recipes(
    ctx: &Ctx,
    recipes: &BTreeMap<String, Recipe>,
    recommended: Option<&str>,
) -> Result<()> {
    let dir = ctx.folder.recipes();
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("removing old recipes in {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    for (method, recipe) in recipes {
        recipe.save(&ctx.folder.recipe(method))?;
    }
    let file = ctx.folder.recommended();
    match recommended.and_then(|m| recipes.get(m)) {
        Some(recipe) => recipe.save(&file)?,
        None if file.exists() => std::fs::remove_file(&file)?,
        None => {}
    }
    Ok(())
}
