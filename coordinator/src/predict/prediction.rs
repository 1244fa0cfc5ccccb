use common::dataset::CLASSES;
use serde::Serialize;

/// What the model says about one image.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Prediction {
    /// The most probable digit.
    pub digit: u8,
    /// The three most probable digits, most probable first.
    pub top3: Vec<ClassProbability>,
}

/// One digit and the probability the model gives it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ClassProbability {
    pub digit: u8,
    pub probability: f32,
}

impl Prediction {
    /// The prediction of a model that gave `probabilities`; ties go to the smaller digit.
    pub fn from_probabilities(probabilities: &[f32; CLASSES]) -> Prediction {
        let mut ranked: Vec<ClassProbability> = (0..CLASSES)
            .map(|digit| ClassProbability {
                digit: digit as u8,
                probability: probabilities[digit],
            })
            .collect();
        // A stable sort keeps equal probabilities in digit order.
        ranked.sort_by(|a, b| b.probability.total_cmp(&a.probability));
        ranked.truncate(3);
        Prediction {
            digit: ranked[0].digit,
            top3: ranked,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top3_is_sorted_and_ties_go_to_the_smaller_digit() {
        let mut p = [0.05f32; CLASSES];
        p[7] = 0.4;
        p[2] = 0.1;
        p[9] = 0.1;
        let prediction = Prediction::from_probabilities(&p);
        assert_eq!(prediction.digit, 7);
        let digits: Vec<u8> = prediction.top3.iter().map(|c| c.digit).collect();
        assert_eq!(digits, [7, 2, 9]);
    }
}
