//! The dataset the models train on: MNIST-shaped IDX files (28x28 grey images, labels 0-9)
//! held in memory as bytes and turned into normalised tensors one batch at a time.
//!
//! Any data with MNIST's shapes loads (Fashion-MNIST, a subset, more images); [`Dataset::digest`]
//! lets machines check they hold the same data before they train together.

use crate::idx::{self, IdxImages};
use crate::{Error, IdxProblem, Result};
use candle_core::{Device, Tensor};
use sha2::{Digest, Sha256};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

/// The four files of a dataset, in the order [`dataset_files`] returns them: training images
/// and labels, then test images and labels. Each may also be stored as `NAME.gz`.
pub const FILE_NAMES: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];

/// Height and width of every image, in pixels.
pub const IMAGE_SIDE: usize = 28;

/// Pixels in one image.
pub const IMAGE_PIXELS: usize = IMAGE_SIDE * IMAGE_SIDE;

/// Number of classes; labels run from 0 to `CLASSES - 1`.
pub const CLASSES: usize = 10;

/// Mean of MNIST's training pixels scaled to [0, 1]; subtracted before training.
pub const PIXEL_MEAN: f32 = 0.1307;

/// Standard deviation of MNIST's training pixels scaled to [0, 1]; divided by before training.
pub const PIXEL_STD: f32 = 0.3081;

/// Normalised value of each grey level, so a batch is a table look-up per pixel and every
/// machine computes bit-identical inputs.
static NORMALISED: LazyLock<[f32; 256]> =
    LazyLock::new(|| std::array::from_fn(|p| (p as f32 / 255.0 - PIXEL_MEAN) / PIXEL_STD));

/// Paths of the four dataset files in `dir`, in [`FILE_NAMES`] order. Each is `NAME` if that
/// exists, else `NAME.gz`.
pub fn dataset_files(dir: &Path) -> Result<[PathBuf; 4]> {
    let found = FILE_NAMES.map(|name| {
        let raw = dir.join(name);
        let gz = dir.join(format!("{name}.gz"));
        [raw, gz].into_iter().find(|path| path.is_file())
    });
    let missing: Vec<&str> = FILE_NAMES
        .iter()
        .zip(&found)
        .filter(|(_, path)| path.is_none())
        .map(|(name, _)| *name)
        .collect();
    if !missing.is_empty() {
        return Err(Error::Dataset {
            dir: dir.to_path_buf(),
            problem: format!("missing {} (raw or .gz)", missing.join(", ")),
        });
    }
    Ok(found.map(|path| path.expect("checked above")))
}

/// Labelled 28x28 images: the training or the test set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    images: Vec<u8>,
    labels: Vec<u8>,
}

impl Split {
    /// A split from `images` (28x28 grey levels, image after image) and one label per image.
    ///
    /// Fails with [`Error::InvalidSplit`] if the pixel count is not 784 per label or a label
    /// is not a digit 0-9.
    pub fn new(images: Vec<u8>, labels: Vec<u8>) -> Result<Split> {
        if Some(images.len()) != labels.len().checked_mul(IMAGE_PIXELS) {
            return Err(Error::InvalidSplit(format!(
                "{} pixels for {} labels, expected {IMAGE_PIXELS} per label",
                images.len(),
                labels.len()
            )));
        }
        if let Some(index) = labels.iter().position(|&l| usize::from(l) >= CLASSES) {
            return Err(Error::InvalidSplit(format!(
                "label {} at index {index} is outside 0-{}",
                labels[index],
                CLASSES - 1
            )));
        }
        Ok(Split { images, labels })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the split has no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The 784 grey levels of image `i`, row-major.
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn image(&self, i: usize) -> &[u8] {
        &self.images[i * IMAGE_PIXELS..(i + 1) * IMAGE_PIXELS]
    }

    /// The label of image `i`.
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn label(&self, i: usize) -> u8 {
        self.labels[i]
    }

    /// All grey levels, image after image.
    pub fn pixels(&self) -> &[u8] {
        &self.images
    }

    /// All labels, in image order.
    pub fn labels(&self) -> &[u8] {
        &self.labels
    }

    /// The images at `indices` as normalised `f32` of shape `(b, 1, 28, 28)` and their labels
    /// as `u32` of shape `(b,)`, on `device`.
    pub fn batch(&self, indices: &[u32], device: &Device) -> Result<(Tensor, Tensor)> {
        let len = self.len();
        let mut images = Vec::with_capacity(indices.len() * IMAGE_PIXELS);
        let mut labels = Vec::with_capacity(indices.len());
        for &index in indices {
            let index = index as usize;
            if index >= len {
                return Err(Error::IndexOutOfRange { index, len });
            }
            images.extend(
                self.image(index)
                    .iter()
                    .map(|&p| NORMALISED[usize::from(p)]),
            );
            labels.push(u32::from(self.labels[index]));
        }
        to_tensors(images, labels, device)
    }

    /// The contiguous images `range`, as [`Split::batch`] returns them; for evaluation.
    pub fn range_batch(&self, range: Range<usize>, device: &Device) -> Result<(Tensor, Tensor)> {
        let len = self.len();
        if range.end > len {
            return Err(Error::IndexOutOfRange {
                index: range.end - 1,
                len,
            });
        }
        // A reversed range is empty, as it is for slices' iterators.
        let range = range.start.min(range.end)..range.end;
        let images = self.images[range.start * IMAGE_PIXELS..range.end * IMAGE_PIXELS]
            .iter()
            .map(|&p| NORMALISED[usize::from(p)])
            .collect();
        let labels = self.labels[range].iter().map(|&l| u32::from(l)).collect();
        to_tensors(images, labels, device)
    }
}

fn to_tensors(images: Vec<f32>, labels: Vec<u32>, device: &Device) -> Result<(Tensor, Tensor)> {
    let b = labels.len();
    let images = Tensor::from_vec(images, (b, 1, IMAGE_SIDE, IMAGE_SIDE), device)?;
    let labels = Tensor::from_vec(labels, b, device)?;
    Ok((images, labels))
}

/// A training set and a test set of 28x28 digits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dataset {
    /// Images the models learn from.
    pub train: Split,
    /// Images the models are evaluated on.
    pub test: Split,
}

impl Dataset {
    /// Loads the four [`FILE_NAMES`] (raw or gzip) from `dir`.
    ///
    /// Images must be 28x28 ([`IdxProblem::WrongDimensions`]) and each labels file must have
    /// as many labels as its images file has images ([`IdxProblem::CountMismatch`]).
    pub fn load(dir: &Path) -> Result<Dataset> {
        let [train_images, train_labels, test_images, test_labels] = dataset_files(dir)?;
        Ok(Dataset {
            train: load_split(&train_images, &train_labels)?,
            test: load_split(&test_images, &test_labels)?,
        })
    }

    /// A dataset of two splits built in memory.
    pub fn from_splits(train: Split, test: Split) -> Dataset {
        Dataset { train, test }
    }

    /// Hex SHA-256 of the decoded contents (per split, training first: the image count as a
    /// little-endian `u64`, the pixels, the labels), so machines can check they hold the same
    /// data whatever its file names or compression.
    pub fn digest(&self) -> String {
        let mut hasher = Sha256::new();
        for split in [&self.train, &self.test] {
            hasher.update((split.len() as u64).to_le_bytes());
            hasher.update(&split.images);
            hasher.update(&split.labels);
        }
        hex::encode(hasher.finalize())
    }
}

fn load_split(images_path: &Path, labels_path: &Path) -> Result<Split> {
    let IdxImages {
        count,
        rows,
        cols,
        pixels,
    } = idx::read_images(images_path)?;
    if (rows, cols) != (IMAGE_SIDE, IMAGE_SIDE) {
        return Err(Error::Idx {
            path: images_path.to_path_buf(),
            problem: IdxProblem::WrongDimensions {
                rows,
                cols,
                expected_rows: IMAGE_SIDE,
                expected_cols: IMAGE_SIDE,
            },
        });
    }
    let labels = idx::read_labels(labels_path)?;
    if labels.len() != count {
        return Err(Error::Idx {
            path: labels_path.to_path_buf(),
            problem: IdxProblem::CountMismatch {
                images: count,
                labels: labels.len(),
            },
        });
    }
    Split::new(pixels, labels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::idx::{write_images, write_labels};

    /// A split of `n` images whose pixels all equal their index and whose labels cycle 0-9.
    fn split(n: usize) -> Split {
        let images = (0..n).flat_map(|i| [i as u8; IMAGE_PIXELS]).collect();
        let labels = (0..n).map(|i| (i % CLASSES) as u8).collect();
        Split::new(images, labels).unwrap()
    }

    fn write_split(dir: &Path, images_name: &str, labels_name: &str, split: &Split) {
        let images = IdxImages {
            count: split.len(),
            rows: IMAGE_SIDE,
            cols: IMAGE_SIDE,
            pixels: split.pixels().to_vec(),
        };
        write_images(&dir.join(images_name), &images).unwrap();
        write_labels(&dir.join(labels_name), split.labels()).unwrap();
    }

    fn write_dataset(dir: &Path, dataset: &Dataset) {
        write_split(dir, FILE_NAMES[0], FILE_NAMES[1], &dataset.train);
        write_split(dir, FILE_NAMES[2], FILE_NAMES[3], &dataset.test);
    }

    #[test]
    fn split_new_validates() {
        assert!(matches!(
            Split::new(vec![0; IMAGE_PIXELS + 1], vec![1]),
            Err(Error::InvalidSplit(_))
        ));
        assert!(matches!(
            Split::new(vec![0; IMAGE_PIXELS], vec![10]),
            Err(Error::InvalidSplit(_))
        ));
        let split = split(3);
        assert_eq!(split.len(), 3);
        assert_eq!(split.image(2), &[2; IMAGE_PIXELS][..]);
        assert_eq!(split.label(2), 2);
    }

    #[test]
    fn batch_normalises_and_keeps_order() -> Result<()> {
        let split = split(5);
        let (images, labels) = split.batch(&[4, 0, 4], &Device::Cpu)?;
        assert_eq!(images.dims(), &[3, 1, IMAGE_SIDE, IMAGE_SIDE]);
        assert_eq!(labels.to_vec1::<u32>()?, vec![4, 0, 4]);
        let firsts = images.flatten_from(1)?.narrow(1, 0, 1)?.flatten_all()?;
        let expected = [4.0f32, 0.0, 4.0].map(|p| (p / 255.0 - PIXEL_MEAN) / PIXEL_STD);
        assert_eq!(firsts.to_vec1::<f32>()?, expected);
        Ok(())
    }

    #[test]
    fn range_batch_matches_batch() -> Result<()> {
        let split = split(6);
        let (a, la) = split.range_batch(2..5, &Device::Cpu)?;
        let (b, lb) = split.batch(&[2, 3, 4], &Device::Cpu)?;
        assert_eq!(
            a.flatten_all()?.to_vec1::<f32>()?,
            b.flatten_all()?.to_vec1::<f32>()?
        );
        assert_eq!(la.to_vec1::<u32>()?, lb.to_vec1::<u32>()?);
        let (empty, _) = split.range_batch(6..6, &Device::Cpu)?;
        assert_eq!(empty.dims(), &[0, 1, IMAGE_SIDE, IMAGE_SIDE]);
        Ok(())
    }

    #[test]
    fn out_of_range_indices() {
        let split = split(4);
        assert!(matches!(
            split.batch(&[0, 4], &Device::Cpu),
            Err(Error::IndexOutOfRange { index: 4, len: 4 })
        ));
        assert!(matches!(
            split.range_batch(2..6, &Device::Cpu),
            Err(Error::IndexOutOfRange { index: 5, len: 4 })
        ));
    }

    #[test]
    fn load_round_trips_raw_and_gzip() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let dataset = Dataset::from_splits(split(12), split(3));
        write_dataset(dir.path(), &dataset);
        // Compress one file to check raw and .gz mix.
        let raw = dir.path().join(FILE_NAMES[3]);
        let bytes = std::fs::read(&raw).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &bytes).unwrap();
        std::fs::write(
            dir.path().join(format!("{}.gz", FILE_NAMES[3])),
            gz.finish().unwrap(),
        )
        .unwrap();
        std::fs::remove_file(&raw).unwrap();

        let files = dataset_files(dir.path())?;
        assert!(files[3].to_string_lossy().ends_with(".gz"));
        let loaded = Dataset::load(dir.path())?;
        assert_eq!(loaded, dataset);
        assert_eq!(loaded.digest(), dataset.digest());
        Ok(())
    }

    #[test]
    fn digest_sees_every_part() {
        let base = Dataset::from_splits(split(4), split(2)).digest();
        assert_eq!(base.len(), 64);
        let other_label = {
            let mut train = split(4);
            train.labels[3] = 0;
            Dataset::from_splits(train, split(2)).digest()
        };
        // Moving an image from one split to the other keeps the bytes but not the lengths.
        let moved = Dataset::from_splits(split(5), split(1)).digest();
        assert_ne!(base, other_label);
        assert_ne!(base, moved);
    }

    #[test]
    fn missing_file_names_file_and_dir() {
        let dir = tempfile::tempdir().unwrap();
        write_dataset(dir.path(), &Dataset::from_splits(split(2), split(2)));
        std::fs::remove_file(dir.path().join(FILE_NAMES[1])).unwrap();
        let err = Dataset::load(dir.path()).unwrap_err();
        let Error::Dataset {
            dir: in_dir,
            problem,
        } = &err
        else {
            panic!("expected a dataset error, got {err:?}");
        };
        assert_eq!(in_dir, dir.path());
        assert!(problem.contains(FILE_NAMES[1]), "{problem}");
    }

    #[test]
    fn wrong_dimensions_name_the_images_file() {
        let dir = tempfile::tempdir().unwrap();
        write_dataset(dir.path(), &Dataset::from_splits(split(2), split(2)));
        let path = dir.path().join(FILE_NAMES[2]);
        let images = IdxImages {
            count: 2,
            rows: 32,
            cols: 32,
            pixels: vec![0; 2 * 32 * 32],
        };
        write_images(&path, &images).unwrap();
        match Dataset::load(dir.path()) {
            Err(Error::Idx {
                path: p,
                problem:
                    IdxProblem::WrongDimensions {
                        rows: 32, cols: 32, ..
                    },
            }) => assert_eq!(p, path),
            other => panic!("expected wrong dimensions, got {other:?}"),
        }
    }

    #[test]
    fn count_mismatch_names_the_labels_file() {
        let dir = tempfile::tempdir().unwrap();
        write_dataset(dir.path(), &Dataset::from_splits(split(3), split(2)));
        let path = dir.path().join(FILE_NAMES[1]);
        write_labels(&path, &[1, 2]).unwrap();
        match Dataset::load(dir.path()) {
            Err(Error::Idx {
                path: p,
                problem:
                    IdxProblem::CountMismatch {
                        images: 3,
                        labels: 2,
                    },
            }) => assert_eq!(p, path),
            other => panic!("expected a count mismatch, got {other:?}"),
        }
    }
}
