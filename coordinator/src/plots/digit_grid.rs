use super::{figure::Figure, font::centred};
use common::dataset::IMAGE_SIDE;
use plotters::{coord::Shift, prelude::*};

/// Screen pixels per image pixel.
const SCALE: i32 = 4;
/// Width and height of one cell: the caption lines above the digit.
const CELL_WIDTH: i32 = 172;
const CELL_HEIGHT: i32 = IMAGE_SIDE as i32 * SCALE + 62;
/// Above the grid: the title.
const TOP: i32 = 70;
const MISTAKE: RGBColor = RGBColor(200, 0, 0);

/// Test digits in a grid, each captioned with what the model predicted; wrong ones in red.
pub struct DigitGrid {
    /// The file name without extension.
    pub name: &'static str,
    /// The figure's title.
    pub title: String,
    /// What to show when there are no cells.
    pub empty_note: String,
    pub columns: usize,
    pub cells: Vec<DigitCell>,
}

/// One digit of a [`DigitGrid`].
pub struct DigitCell {
    /// The 28x28 grey levels, 0 background.
    pub pixels: Vec<u8>,
    /// One or two lines above the digit.
    pub caption: Vec<String>,
    /// Marked in red.
    pub wrong: bool,
}

impl DigitGrid {
    fn rows(&self) -> usize {
        self.cells.len().div_ceil(self.columns).max(1)
    }
}

impl Figure for DigitGrid {
    fn name(&self) -> &'static str {
        self.name
    }

    fn size(&self) -> (u32, u32) {
        let width = (CELL_WIDTH * self.columns as i32 + 40).max(600);
        let height = TOP + CELL_HEIGHT * self.rows() as i32 + 20;
        (width as u32, height as u32)
    }

    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
    ) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
        root.fill(&WHITE)?;
        let (width, _) = self.size();
        let width = width as i32;
        root.draw(&Text::new(self.title.clone(), (width / 2, 30), centred(22)))?;
        if self.cells.is_empty() {
            root.draw(&Text::new(
                self.empty_note.clone(),
                (width / 2, TOP + CELL_HEIGHT / 2),
                centred(18),
            ))?;
            return Ok(());
        }
        let left = (width - CELL_WIDTH * self.columns as i32) / 2;
        let side = IMAGE_SIDE as i32 * SCALE;
        for (index, cell) in self.cells.iter().enumerate() {
            let x = left + (index % self.columns) as i32 * CELL_WIDTH;
            let y = TOP + (index / self.columns) as i32 * CELL_HEIGHT;
            let image_x = x + (CELL_WIDTH - side) / 2;
            let image_y = y + 48;
            // The caption sits just above the digit; its first line is the prediction.
            let lines = cell.caption.len() as i32;
            for (line, text) in cell.caption.iter().enumerate() {
                let colour = match (line, cell.wrong) {
                    (0, true) => MISTAKE,
                    (0, false) => BLACK,
                    _ => RGBColor(80, 80, 80),
                };
                root.draw(&Text::new(
                    text.clone(),
                    (
                        x + CELL_WIDTH / 2,
                        image_y - 14 - (lines - 1 - line as i32) * 19,
                    ),
                    centred(15).color(&colour),
                ))?;
            }
            // Dark ink on white paper; only inked pixels are drawn, which keeps the SVG small.
            for (i, &level) in cell.pixels.iter().enumerate() {
                if level == 0 {
                    continue;
                }
                let px = image_x + (i % IMAGE_SIDE) as i32 * SCALE;
                let py = image_y + (i / IMAGE_SIDE) as i32 * SCALE;
                let grey = 255 - level;
                root.draw(&Rectangle::new(
                    [(px, py), (px + SCALE, py + SCALE)],
                    RGBColor(grey, grey, grey).filled(),
                ))?;
            }
            let frame = if cell.wrong {
                MISTAKE.stroke_width(3)
            } else {
                RGBColor(200, 200, 200).stroke_width(1)
            };
            root.draw(&Rectangle::new(
                [
                    (image_x - 2, image_y - 2),
                    (image_x + side + 2, image_y + side + 2),
                ],
                frame,
            ))?;
        }
        Ok(())
    }
}
