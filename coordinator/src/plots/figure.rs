use super::font;
use crate::{Error, Result};
use image::codecs::png::{CompressionType, FilterType as PngFilter, PngEncoder};
use plotters::{
    coord::Shift,
    prelude::{
        BitMapBackend, DrawingArea, DrawingAreaErrorKind, DrawingBackend, IntoDrawingArea,
        SVGBackend,
    },
};
use std::{
    fs,
    path::{Path, PathBuf},
};

/// A picture that can be drawn on any plotters backend, and so saved both as PNG and SVG.
pub trait Figure {
    /// The file name without extension.
    fn name(&self) -> &'static str;

    /// Width and height in pixels.
    fn size(&self) -> (u32, u32);

    /// Draws the whole picture on `root`, which is [`Figure::size`] large.
    fn draw<DB: DrawingBackend>(
        &self,
        root: &DrawingArea<DB, Shift>,
    ) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>>;
}

/// Writes `dir/NAME.png` and `dir/NAME.svg`, each through a temporary file and a rename.
pub fn save(figure: &impl Figure, dir: &Path) -> Result<[PathBuf; 2]> {
    font::register();
    let name = figure.name();
    let failed = |problem: String| Error::Plot {
        name: name.to_string(),
        problem,
    };
    let (width, height) = figure.size();

    let mut rgb = vec![0u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (width, height)).into_drawing_area();
        figure.draw(&root).map_err(|e| failed(e.to_string()))?;
        root.present().map_err(|e| failed(e.to_string()))?;
    }
    let image = image::RgbImage::from_raw(width, height, rgb).expect("the buffer fits the size");
    let mut png = Vec::new();
    // The best compression: the plots are small and go into READMEs and reports.
    let encoder =
        PngEncoder::new_with_quality(&mut png, CompressionType::Best, PngFilter::Adaptive);
    image
        .write_with_encoder(encoder)
        .map_err(|e| failed(format!("encoding PNG: {e}")))?;
    let png_path = dir.join(format!("{name}.png"));
    write_whole(&png_path, &png)?;

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        figure.draw(&root).map_err(|e| failed(e.to_string()))?;
        root.present().map_err(|e| failed(e.to_string()))?;
    }
    let svg_path = dir.join(format!("{name}.svg"));
    write_whole(&svg_path, svg.as_bytes())?;
    Ok([png_path, svg_path])
}

/// Writes through a temporary name and a rename, so that readers never see half a file.
fn write_whole(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    fs::write(&temporary, bytes).map_err(|e| Error::io(&temporary, e))?;
    fs::rename(&temporary, path).map_err(|e| Error::io(path, e))
}
