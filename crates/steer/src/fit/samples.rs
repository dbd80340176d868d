//! The validated input of a fit: one layer's activations with a class and a weight per row.

use super::{Class, FitError};

/// One layer's activations, row-major `(n, d)`, with a class and a confidence weight per row.
///
/// Constructed only through [`Samples::new`], so every fit can trust the shapes and values.
#[derive(Debug, Clone, Copy)]
pub struct Samples<'a> {
    x: &'a [f32],
    d: usize,
    classes: &'a [Class],
    weights: &'a [f64],
    strata: Option<&'a [usize]>,
}

impl<'a> Samples<'a> {
    /// Checks the shapes (`x.len() == n * d`, one class and one weight per row), that every
    /// activation is finite and that every weight is finite and `>= 0`.
    pub fn new(
        x: &'a [f32],
        d: usize,
        classes: &'a [Class],
        weights: &'a [f64],
    ) -> Result<Self, FitError> {
        if d == 0 {
            return Err(FitError::ZeroDimension);
        }
        let rows = x.len() / d;
        if !x.len().is_multiple_of(d) {
            return Err(FitError::RaggedActivations { len: x.len(), d });
        }
        for (what, found) in [("classes", classes.len()), ("weights", weights.len())] {
            if found != rows {
                return Err(FitError::LengthMismatch { what, found, rows });
            }
        }
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            return Err(FitError::NonFiniteActivation {
                row: i / d,
                column: i % d,
                value: x[i],
            });
        }
        if let Some(row) = weights.iter().position(|w| !(w.is_finite() && *w >= 0.0)) {
            return Err(FitError::BadWeight {
                row,
                value: weights[row],
            });
        }
        Ok(Self {
            x,
            d,
            classes,
            weights,
            strata: None,
        })
    }

    /// Gives each row a stratum (e.g. its prompt's language). Weighted fits then give every
    /// stratum the same share of the refusal and of the compliance weight, so a difference
    /// between strata that the classes happen to be split along (English refused, Chinese
    /// answered) does not enter the direction.
    pub fn with_strata(self, strata: &'a [usize]) -> Result<Self, FitError> {
        if strata.len() != self.n_rows() {
            return Err(FitError::LengthMismatch {
                what: "strata",
                found: strata.len(),
                rows: self.n_rows(),
            });
        }
        Ok(Self {
            strata: Some(strata),
            ..self
        })
    }

    pub fn strata(&self) -> Option<&'a [usize]> {
        self.strata
    }

    /// Number of rows `n`.
    pub fn n_rows(&self) -> usize {
        self.classes.len()
    }

    /// The activations, row-major `(n, d)`.
    pub fn data(&self) -> &'a [f32] {
        self.x
    }

    /// Width of a row `d`.
    pub fn dim(&self) -> usize {
        self.d
    }

    pub fn classes(&self) -> &'a [Class] {
        self.classes
    }

    pub fn weights(&self) -> &'a [f64] {
        self.weights
    }

    pub(crate) fn row(&self, i: usize) -> &'a [f32] {
        &self.x[i * self.d..(i + 1) * self.d]
    }

    /// Indices of the rows of one class, in order.
    pub(crate) fn rows_of(&self, class: Class) -> Vec<usize> {
        (0..self.n_rows())
            .filter(|&i| self.classes[i] == class)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_shapes_and_values() {
        let c = [Class::Refusal, Class::Compliance];
        let w = [1.0, 1.0];
        assert!(matches!(
            Samples::new(&[0.0; 4], 0, &c, &w),
            Err(FitError::ZeroDimension)
        ));
        assert!(matches!(
            Samples::new(&[0.0; 5], 2, &c, &w),
            Err(FitError::RaggedActivations { len: 5, d: 2 })
        ));
        assert!(matches!(
            Samples::new(&[0.0; 6], 2, &c, &w),
            Err(FitError::LengthMismatch {
                what: "classes",
                found: 2,
                rows: 3
            })
        ));
        assert!(matches!(
            Samples::new(&[0.0; 4], 2, &c, &[1.0]),
            Err(FitError::LengthMismatch {
                what: "weights",
                found: 1,
                rows: 2
            })
        ));
        let err = Samples::new(&[0.0, 1.0, f32::NAN, 0.0], 2, &c, &w).unwrap_err();
        assert!(matches!(
            err,
            FitError::NonFiniteActivation {
                row: 1,
                column: 0,
                ..
            }
        ));
        assert!(err.to_string().contains("row 1, column 0"), "{err}");
        assert!(matches!(
            Samples::new(&[0.0; 4], 2, &c, &[1.0, -0.5]),
            Err(FitError::BadWeight { row: 1, .. })
        ));
        assert!(matches!(
            Samples::new(&[0.0; 4], 2, &c, &[f64::INFINITY, 1.0]),
            Err(FitError::BadWeight { row: 0, .. })
        ));
    }
}
