use super::{figure::Figure, font::centred};
use common::dataset::CLASSES;
use plotters::{coord::Shift, prelude::*};

/// Side of one cell, in pixels.
const CELL: i32 = 52;
/// Left of the grid: the axis title and the row labels.
const LEFT: i32 = 100;
/// Above the grid: the figure's title, the axis title and the column labels.
const TOP: i32 = 130;

/// Counts of (true digit, predicted digit) over the test set.
pub struct ConfusionMatrix {
    /// The line under the title "Confusion matrix".
    pub subtitle: String,
    /// `counts[true][predicted]`.
    pub counts: [[u64; CLASSES]; CLASSES],
}

impl ConfusionMatrix {
    /// The matrix of `predicted` against `labels`.
    pub fn new(subtitle: String, labels: &[u8], predicted: &[u8]) -> ConfusionMatrix {
        let mut counts = [[0; CLASSES]; CLASSES];
        for (&label, &prediction) in labels.iter().zip(predicted) {
            counts[usize::from(label)][usize::from(prediction)] += 1;
        }
        ConfusionMatrix { subtitle, counts }
    }
}

impl Figure for ConfusionMatrix {
    fn name(&self) -> &'static str {
        "confusion_matrix"
    }

    fn size(&self) -> (u32, u32) {
        let side = CELL * CLASSES as i32;
        ((LEFT + side + 40) as u32, (TOP + side + 70) as u32)
    }

    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
    ) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
        root.fill(&WHITE)?;
        let (width, _) = self.size();
        let side = CELL * CLASSES as i32;
        root.draw(&Text::new(
            "Confusion matrix",
            (width as i32 / 2, 22),
            centred(22),
        ))?;
        root.draw(&Text::new(
            self.subtitle.clone(),
            (width as i32 / 2, 48),
            centred(16),
        ))?;
        root.draw(&Text::new(
            "predicted digit",
            (LEFT + side / 2, TOP - 52),
            centred(18),
        ))?;
        root.draw(&Text::new(
            "true digit",
            (LEFT - 70, TOP + side / 2),
            centred(18).transform(FontTransform::Rotate270),
        ))?;
        for digit in 0..CLASSES as i32 {
            let middle = digit * CELL + CELL / 2;
            let label = digit.to_string();
            root.draw(&Text::new(
                label.clone(),
                (LEFT + middle, TOP - 20),
                centred(18),
            ))?;
            root.draw(&Text::new(label, (LEFT - 24, TOP + middle), centred(18)))?;
        }
        for (row, counts) in self.counts.iter().enumerate() {
            let total = counts.iter().sum::<u64>().max(1) as f64;
            for (column, &count) in counts.iter().enumerate() {
                let x = LEFT + column as i32 * CELL;
                let y = TOP + row as i32 * CELL;
                // A square root makes the few mistakes of a good model visible beside
                // the diagonal's hundreds.
                let shade = (count as f64 / total).sqrt();
                root.draw(&Rectangle::new(
                    [(x, y), (x + CELL, y + CELL)],
                    blend(shade).filled(),
                ))?;
                if count > 0 {
                    let ink = if shade > 0.55 { WHITE } else { BLACK };
                    root.draw(&Text::new(
                        count.to_string(),
                        (x + CELL / 2, y + CELL / 2),
                        centred(15).color(&ink),
                    ))?;
                }
            }
        }
        root.draw(&Rectangle::new(
            [(LEFT, TOP), (LEFT + side, TOP + side)],
            BLACK.stroke_width(1),
        ))?;
        root.draw(&Text::new(
            "colour: square root of the row's share (of the images of that true digit)",
            (LEFT + side / 2, TOP + side + 30),
            centred(14).color(&BLACK.mix(0.7)),
        ))?;
        Ok(())
    }
}

/// White for 0, dark blue for 1.
fn blend(shade: f64) -> RGBColor {
    let mix = |dark: u8| (255.0 - shade * (255.0 - f64::from(dark))).round() as u8;
    RGBColor(mix(8), mix(48), mix(107))
}
