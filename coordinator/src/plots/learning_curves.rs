use super::{figure::Figure, font::FAMILY};
use crate::metrics::EpochRecord;
use plotters::{coord::Shift, prelude::*};

const TRAIN: RGBColor = RGBColor(31, 119, 180);
const TEST: RGBColor = RGBColor(214, 39, 40);

/// Loss and accuracy per epoch, training against test, from `metrics.jsonl`.
pub struct LearningCurves {
    /// The title's first words, e.g. the model's name.
    pub title: String,
    pub records: Vec<EpochRecord>,
}

/// One panel: a quantity per epoch for training and for test.
struct Panel<'a> {
    caption: &'a str,
    y_label: &'a str,
    train: Vec<(f64, f64)>,
    test: Vec<(f64, f64)>,
    /// Where the y axis must reach whatever the values (100 for accuracy).
    y_bound: Option<f64>,
    /// A corner the curves keep clear of.
    legend: SeriesLabelPosition,
}

impl Figure for LearningCurves {
    fn name(&self) -> &'static str {
        "learning_curves"
    }

    fn size(&self) -> (u32, u32) {
        (1200, 500)
    }

    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
    ) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
        root.fill(&WHITE)?;
        let epochs = self.records.len();
        let title = format!(
            "{}: loss and accuracy per epoch ({epochs} epoch{})",
            self.title,
            if epochs == 1 { "" } else { "s" }
        );
        let body = root.titled(&title, (FAMILY, 26))?;
        let (left, right) = body.split_horizontally(body.dim_in_pixel().0 / 2);
        let per_epoch = |value: fn(&EpochRecord) -> f64| {
            self.records
                .iter()
                .map(|r| (f64::from(r.epoch), value(r)))
                .collect::<Vec<_>>()
        };
        draw_panel(
            &left,
            Panel {
                caption: "Loss",
                y_label: "mean cross-entropy",
                train: per_epoch(|r| r.train_loss),
                test: per_epoch(|r| r.test_loss),
                y_bound: Some(0.0),
                legend: SeriesLabelPosition::UpperRight,
            },
        )?;
        draw_panel(
            &right,
            Panel {
                caption: "Accuracy",
                y_label: "correct (%)",
                train: per_epoch(|r| r.train_accuracy * 100.0),
                test: per_epoch(|r| r.test_accuracy * 100.0),
                y_bound: Some(100.0),
                legend: SeriesLabelPosition::LowerRight,
            },
        )
    }
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    panel: Panel<'_>,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let points = panel.train.iter().chain(&panel.test);
    let first_epoch = points.clone().map(|p| p.0).fold(f64::INFINITY, f64::min);
    let last_epoch = points
        .clone()
        .map(|p| p.0)
        .fold(f64::NEG_INFINITY, f64::max);
    let (mut low, mut high) = points
        .map(|p| p.1)
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if let Some(bound) = panel.y_bound {
        low = low.min(bound);
        high = high.max(bound);
    }
    let margin = ((high - low) * 0.05).max(1e-3);
    let x_range = (first_epoch - 0.5)..(last_epoch + 0.5);
    let y_range = (low - margin)..(high + margin);
    let epochs = (last_epoch - first_epoch) as usize + 1;

    let mut chart = ChartBuilder::on(area)
        .caption(panel.caption, (FAMILY, 22))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(x_range, y_range)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc(panel.y_label)
        // One label per epoch, whole numbers only, at most a dozen.
        .x_labels(epochs.min(12) + 1)
        .x_label_formatter(&|x| {
            if (x - x.round()).abs() < 1e-9 {
                format!("{x:.0}")
            } else {
                String::new()
            }
        })
        .label_style((FAMILY, 16))
        .light_line_style(BLACK.mix(0.04))
        .axis_desc_style((FAMILY, 18))
        .draw()?;

    for (points, colour, label) in [
        (&panel.train, TRAIN, "train (during the epoch)"),
        (&panel.test, TEST, "test (after the epoch)"),
    ] {
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                colour.stroke_width(2),
            ))?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], colour.stroke_width(2))
            });
        chart.draw_series(
            points
                .iter()
                .map(|&point| Circle::new(point, 4, colour.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .position(panel.legend)
        .label_font((FAMILY, 16))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.4))
        .draw()
}
