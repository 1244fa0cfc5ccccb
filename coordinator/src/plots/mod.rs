//! Pictures of a run, as PNG and SVG in `RUN_DIR/plots/`: learning curves, the confusion
//! matrix, a grid of test digits and the most confident mistakes. Written at the end of
//! training and by `coordinator plot RUN_DIR`.

mod command;
mod confusion_matrix;
mod digit_grid;
mod figure;
mod font;
mod learning_curves;
mod run_plots;

pub use command::{PlotArgs, main};
pub use run_plots::{PLOTS_DIR, write_plots, write_plots_after_training};
