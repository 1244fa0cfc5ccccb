use crate::{Error, Result};
use common::dataset::{IMAGE_PIXELS, IMAGE_SIDE};
use image::{
    DynamicImage, ImageBuffer, ImageDecoder, ImageReader, Luma, LumaA,
    imageops::{self, FilterType},
};
use std::path::Path;

/// Grey levels in [0, 1], one per pixel.
type Plane = ImageBuffer<Luma<f32>, Vec<f32>>;

/// Side of the box a digit is fitted into before it is centred, as in MNIST.
pub const FIT_SIDE: u32 = 20;

/// Contrast (of [0, 1]) between the background and the strongest ink below which an image is
/// taken to hold no digit.
const MIN_CONTRAST: f32 = 0.2;

/// Ink (after the background is removed and the contrast stretched) from which a pixel
/// counts when cropping to the digit.
const INK: f32 = 0.2;

/// Ink below which a pixel is set to background: paper texture and compression noise.
const NOISE: f32 = 0.05;

/// A person's image of a digit turned into what the models were trained on: white ink on
/// black, the digit fitted into 20x20 keeping its aspect ratio and centred by mass in 28x28.
///
/// The steps are MNIST's own: grayscale (transparent parts count as white paper), invert when
/// the border is light, subtract the background and stretch the contrast, crop to the ink,
/// resize to fit 20x20 (Lanczos3, which averages when shrinking), and shift so that the
/// centre of mass lies at the centre of the 28x28 field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digit {
    pixels: Vec<u8>,
}

impl Digit {
    /// Reads a PNG or JPEG file (the format is found from the contents), turns it upright as
    /// its EXIF orientation says, and preprocesses it.
    pub fn open(path: &Path) -> Result<Digit> {
        let problem = |problem: String| Error::Image {
            path: path.to_path_buf(),
            problem,
        };
        let unreadable =
            |e: image::ImageError| problem(format!("not a readable PNG or JPEG image: {e}"));
        let mut decoder = ImageReader::open(path)
            .map_err(|e| Error::io(path, e))?
            .with_guessed_format()
            .map_err(|e| Error::io(path, e))?
            .into_decoder()
            .map_err(unreadable)?;
        // Phones store photos sideways with an EXIF orientation: a 7 must stand upright.
        let orientation = decoder.orientation().map_err(unreadable)?;
        let mut image = DynamicImage::from_decoder(decoder).map_err(unreadable)?;
        image.apply_orientation(orientation);
        Digit::from_image(&image).ok_or_else(|| {
            problem(format!(
                "no digit found: the {}x{} image is blank (no ink differs from the background)",
                image.width(),
                image.height()
            ))
        })
    }

    /// Preprocesses a decoded image; `None` if it holds no ink at all.
    pub fn from_image(image: &DynamicImage) -> Option<Digit> {
        let ink = ink(&on_white(image))?;
        let (x, y, width, height) = ink_bounds(&ink)?;
        let crop = imageops::crop_imm(&ink, x, y, width, height).to_image();
        let fitted = fit(&crop);
        Some(Digit {
            pixels: centre_by_mass(&fitted),
        })
    }

    /// The 28x28 grey levels, row-major, 0 for background and 255 for full ink: MNIST's
    /// encoding, ready for [`common::dataset::Split::new`].
    pub fn pixels(&self) -> &[u8] {
        &self.pixels
    }
}

/// Luminance with transparent parts composited onto white paper: a drawing saved with a
/// transparent background is dark ink on nothing.
fn on_white(image: &DynamicImage) -> Plane {
    let grey = image.to_luma_alpha32f();
    Plane::from_fn(grey.width(), grey.height(), |x, y| {
        let LumaA([luma, alpha]) = *grey.get_pixel(x, y);
        Luma([luma * alpha + (1.0 - alpha)])
    })
}

/// The image as ink on a zero background with full ink at 1: inverted if the border is
/// mostly light, the border's level subtracted and the rest stretched. `None` if nothing
/// stands out from the background.
fn ink(grey: &Plane) -> Option<Plane> {
    let light_background = border_median(grey) > 0.5;
    let mut ink = grey.clone();
    if light_background {
        ink.pixels_mut().for_each(|p| p.0[0] = 1.0 - p.0[0]);
    }
    let background = border_median(&ink);
    let peak = ink.pixels().map(|p| p.0[0]).fold(0.0, f32::max);
    let contrast = peak - background;
    if contrast < MIN_CONTRAST {
        return None;
    }
    ink.pixels_mut().for_each(|p| {
        let v = ((p.0[0] - background) / contrast).clamp(0.0, 1.0);
        p.0[0] = if v < NOISE { 0.0 } else { v };
    });
    Some(ink)
}

/// The median of the outermost rows and columns: the paper, even where a stroke reaches the
/// edge.
fn border_median(plane: &Plane) -> f32 {
    let (width, height) = plane.dimensions();
    let mut border: Vec<f32> = plane
        .enumerate_pixels()
        .filter(|(x, y, _)| *x == 0 || *y == 0 || *x + 1 == width || *y + 1 == height)
        .map(|(_, _, p)| p.0[0])
        .collect();
    border.sort_by(f32::total_cmp);
    border[border.len() / 2]
}

/// `(x, y, width, height)` of the pixels with at least [`INK`].
fn ink_bounds(ink: &Plane) -> Option<(u32, u32, u32, u32)> {
    let mut bounds: Option<(u32, u32, u32, u32)> = None;
    for (x, y, p) in ink.enumerate_pixels() {
        if p.0[0] >= INK {
            let (x0, y0, x1, y1) = bounds.unwrap_or((x, y, x, y));
            bounds = Some((x0.min(x), y0.min(y), x1.max(x), y1.max(y)));
        }
    }
    bounds.map(|(x0, y0, x1, y1)| (x0, y0, x1 - x0 + 1, y1 - y0 + 1))
}

/// Resized so that the longer side is [`FIT_SIDE`], the aspect ratio kept, and stretched
/// again so that the strongest pixel is full ink (shrinking a thin stroke fades it).
fn fit(crop: &Plane) -> Plane {
    let (width, height) = crop.dimensions();
    let scale = FIT_SIDE as f32 / width.max(height) as f32;
    let side = |length: u32| ((length as f32 * scale).round() as u32).clamp(1, FIT_SIDE);
    let mut fitted = imageops::resize(crop, side(width), side(height), FilterType::Lanczos3);
    let peak = fitted.pixels().map(|p| p.0[0]).fold(0.0, f32::max);
    if peak > 0.0 {
        fitted.pixels_mut().for_each(|p| p.0[0] /= peak);
    }
    fitted
}

/// Pastes `fitted` into a 28x28 field so that its centre of mass falls on the field's centre,
/// as near as a whole-pixel shift allows without cutting off ink.
fn centre_by_mass(fitted: &Plane) -> Vec<u8> {
    let (width, height) = fitted.dimensions();
    let (mut mass, mut moment_x, mut moment_y) = (0.0f64, 0.0f64, 0.0f64);
    for (x, y, p) in fitted.enumerate_pixels() {
        let v = f64::from(p.0[0]);
        mass += v;
        // Pixel x covers [x, x + 1): its centre is x + 0.5.
        moment_x += v * (f64::from(x) + 0.5);
        moment_y += v * (f64::from(y) + 0.5);
    }
    let centre = IMAGE_SIDE as f64 / 2.0;
    let offset = |moment: f64, length: u32| {
        let wanted = (centre - moment / mass.max(f64::MIN_POSITIVE)).round() as i64;
        wanted.clamp(0, IMAGE_SIDE as i64 - i64::from(length)) as usize
    };
    let (dx, dy) = (offset(moment_x, width), offset(moment_y, height));
    let mut pixels = vec![0u8; IMAGE_PIXELS];
    for (x, y, p) in fitted.enumerate_pixels() {
        let index = (y as usize + dy) * IMAGE_SIDE + x as usize + dx;
        pixels[index] = (p.0[0] * 255.0).round() as u8;
    }
    pixels
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::GrayImage;

    /// A canvas of `width`x`height` with `paper` everywhere and `ink` on the rectangle
    /// `(x, y, w, h)`, plus a one-pixel notch so that the shape has a direction.
    fn canvas(
        width: u32,
        height: u32,
        rect: (u32, u32, u32, u32),
        paper: u8,
        ink: u8,
    ) -> GrayImage {
        let (rx, ry, rw, rh) = rect;
        GrayImage::from_fn(width, height, |x, y| {
            let inside = (rx..rx + rw).contains(&x) && (ry..ry + rh).contains(&y);
            Luma([if inside { ink } else { paper }])
        })
    }

    fn centre_of_mass(pixels: &[u8]) -> (f64, f64) {
        let (mut mass, mut mx, mut my) = (0.0, 0.0, 0.0);
        for (i, &p) in pixels.iter().enumerate() {
            let (x, y) = ((i % IMAGE_SIDE) as f64 + 0.5, (i / IMAGE_SIDE) as f64 + 0.5);
            mass += f64::from(p);
            mx += f64::from(p) * x;
            my += f64::from(p) * y;
        }
        (mx / mass, my / mass)
    }

    /// `(width, height)` of the pixels of at least half ink.
    fn ink_size(pixels: &[u8]) -> (usize, usize) {
        let inked: Vec<(usize, usize)> = (0..IMAGE_PIXELS)
            .filter(|&i| pixels[i] >= 128)
            .map(|i| (i % IMAGE_SIDE, i / IMAGE_SIDE))
            .collect();
        let span =
            |values: Vec<usize>| values.iter().max().unwrap() - values.iter().min().unwrap() + 1;
        (
            span(inked.iter().map(|p| p.0).collect()),
            span(inked.iter().map(|p| p.1).collect()),
        )
    }

    fn digit(image: GrayImage) -> Digit {
        Digit::from_image(&DynamicImage::ImageLuma8(image)).expect("a digit")
    }

    #[test]
    fn centre_of_mass_lands_at_the_centre() {
        // An L shape far in a corner of a large canvas: its mass is off the box's centre.
        let mut image = canvas(300, 200, (230, 20, 12, 60), 0, 255);
        for x in 230..270 {
            for y in 68..80 {
                image.put_pixel(x, y, Luma([255]));
            }
        }
        let digit = digit(image);
        let (x, y) = centre_of_mass(digit.pixels());
        assert!(
            (x - 14.0).abs() <= 1.0 && (y - 14.0).abs() <= 1.0,
            "{x}, {y}"
        );
    }

    #[test]
    fn aspect_ratio_is_kept() {
        // A bar 4 times as tall as wide becomes 20 tall and 5 wide.
        let digit = digit(canvas(64, 64, (10, 5, 10, 40), 0, 255));
        assert_eq!(ink_size(digit.pixels()), (5, 20));
        let wide = self::digit(canvas(90, 30, (5, 10, 80, 8), 0, 200));
        assert_eq!(ink_size(wide.pixels()), (20, 2));
    }

    #[test]
    fn dark_ink_on_light_paper_is_inverted() {
        let light = digit(canvas(50, 50, (20, 10, 8, 30), 230, 20));
        let dark = digit(canvas(50, 50, (20, 10, 8, 30), 0, 255));
        assert_eq!(light, dark);
        // Ink is bright, the background zero, as in MNIST.
        assert_eq!(light.pixels()[0], 0);
        assert_eq!(*light.pixels().iter().max().unwrap(), 255);
    }

    #[test]
    fn transparent_background_counts_as_paper() {
        // Black ink on fully transparent black: without compositing it would be all black.
        let image = image::RgbaImage::from_fn(40, 40, |x, y| {
            let ink = (12..20).contains(&x) && (5..35).contains(&y);
            image::Rgba([0, 0, 0, if ink { 255 } else { 0 }])
        });
        let digit = Digit::from_image(&DynamicImage::ImageRgba8(image)).expect("a digit");
        assert_eq!(ink_size(digit.pixels()).1, 20);
    }

    #[test]
    fn blank_images_hold_no_digit() {
        for level in [0, 128, 255] {
            let image = DynamicImage::ImageLuma8(GrayImage::from_pixel(30, 30, Luma([level])));
            assert_eq!(Digit::from_image(&image), None, "level {level}");
        }
        // Faint noise is not a digit either.
        let faint = canvas(30, 30, (10, 10, 5, 5), 120, 140);
        assert_eq!(Digit::from_image(&DynamicImage::ImageLuma8(faint)), None);
    }

    #[test]
    fn unreadable_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("not-an-image.png");
        std::fs::write(&path, b"plain text").unwrap();
        let err = Digit::open(&path).unwrap_err();
        assert!(err.to_string().contains("not-an-image.png"), "{err}");
        let missing = dir.path().join("missing.png");
        assert!(
            Digit::open(&missing)
                .unwrap_err()
                .to_string()
                .contains("missing.png")
        );
    }
}
