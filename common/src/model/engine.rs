use super::conv_op::{self, GROUP, Geometry};
use super::dropout::fill_mask;
use super::linear::Dense;
use super::parallel::{as_uninit, for_each_piece, on_pool, worth_splitting_product};
use super::wide_conv::WideConv;
use super::{Layer, ModelKind, loss, mlp_dropout, pool, relu, tanh};
use crate::dataset::{CLASSES, IMAGE_PIXELS};
use crate::error::check_len;
use crate::simd::Isa;
use crate::{Error, Result};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Mutex;

/// Images per piece of an evaluation batch: each piece runs the whole network on its own
/// buffers, and pieces go to the threads.
const EVAL_PIECE: usize = 64;

/// A network's training step and forward pass on the CPU in f32, straight from the flat
/// parameter buffer to the flat gradient, with the kernels of this module and no candle graph.
///
/// candle's backward pass gives every tensor of the graph a zero gradient and then adds the
/// op's gradient onto it, and the parameters go in and the gradients come out through one
/// tensor each: a sixth of a LeNet step and more than a third of an MLP step went there. The
/// engine keeps every buffer from one step to the next and runs the layers of [`Layer`]:
///
/// - the convolutional part image by image: each task takes a fixed group of
///   8 images through every convolution, activation and pool (forward, or backward
///   with the group's partial weight gradients), so a thread keeps whole images in its cache
///   and the threads meet once per pass; the partial sums are added in group order. Only the
///   outputs the backward pass reads are kept for the batch: a pool keeps
///   the position of each window's maximum, so neither its input nor a tanh before it needs
///   keeping, and the layers' gradients never leave the task's scratch;
/// - the dense part on the whole batch, each product cut into pieces of columns fixed by the
///   layer's shape; a convolution with few output pixels (the CNN's last, 3x3) belongs to it
///   too, as one product over the batch;
/// - the loss fused with its gradient.
///
/// So, as everywhere in this module, no value depends on the thread count. The network's
/// candle `forward` is the reference the tests hold the engine to.
#[derive(Debug)]
pub struct Engine {
    kind: ModelKind,
    image: Vec<Stage<ImageOp>>,
    dense: Vec<Stage<DenseOp>>,
    params: usize,
    /// The training step's buffers, kept between steps (taken out while a step runs).
    training: Option<Box<Training>>,
    /// Buffers of evaluation pieces, one per piece running at once.
    spare: Mutex<Vec<Activations>>,
}

/// One layer with the floats it reads and writes per image.
#[derive(Debug, Clone, Copy)]
struct Stage<Op> {
    op: Op,
    input: usize,
    output: usize,
    /// Whether the output is kept for the whole batch: when the backward pass needs it (the
    /// next layer is a convolution or a ReLU, or this one is a tanh not fused into a pool) or
    /// the dense part reads it. Otherwise it lives in a task's scratch for one image.
    stored: bool,
}

/// A layer of the convolutional part, applied image by image.
#[derive(Debug, Clone, Copy)]
enum ImageOp {
    /// Weight and bias at these offsets of the flat parameters.
    Conv {
        g: Geometry,
        weight: usize,
        bias: usize,
    },
    /// 2x2 max-pooling of planes of `h` by `w`, keeping each window's [`pool::Code`]; with
    /// `tanh_before`, the layer before is a tanh whose backward pass this one does too.
    Pool {
        h: usize,
        w: usize,
        tanh_before: bool,
    },
    Tanh,
    Relu,
}

/// A layer of the dense part, applied to the whole batch.
#[derive(Debug, Clone, Copy)]
enum DenseOp {
    Linear {
        layer: Dense,
        weight: usize,
        bias: usize,
    },
    /// A convolution with few output pixels, as one product over the batch.
    Conv {
        conv: WideConv,
        weight: usize,
        bias: usize,
    },
    Tanh,
    Relu,
    Dropout(f32),
}

/// What a forward pass of `n` images keeps: the stored layers' outputs, the pools' codes, the
/// dense layers' outputs and dropout masks, and each group's scratch.
#[derive(Debug, Default)]
struct Activations {
    image: Vec<Vec<f32>>,
    codes: Vec<Vec<pool::Code>>,
    dense: Vec<Vec<f32>>,
    masks: Vec<Vec<f32>>,
    /// The im2col matrix of each whole-batch convolution, and their scratch.
    dense_cols: Vec<Vec<f32>>,
    wide: Vec<f32>,
    scratch: Vec<Scratch>,
}

/// One group's buffers for one image at a time: the im2col matrix and its gradient, two
/// buffers for the outputs that are not stored, two for the layers' gradients.
#[derive(Debug, Default)]
struct Scratch {
    cols: Vec<f32>,
    cols_grad: Vec<f32>,
    values: [Vec<f32>; 2],
    grads: [Vec<f32>; 2],
}

/// A training step's buffers besides the activations: the gradient of the dense part's input,
/// of every dense layer's output, and each group's partial weight gradients per convolution.
#[derive(Debug, Default)]
struct Training {
    acts: Activations,
    dense_input_grad: Vec<f32>,
    dense_grads: Vec<Vec<f32>>,
    partials: Vec<Vec<f32>>,
    /// Scratch of the whole-batch convolutions' backward passes.
    wide_cols_grad: Vec<f32>,
    wide_partial: Vec<f32>,
}

/// Where a layer's input for the current image is.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Place {
    /// The image itself (the first layer's input).
    Image,
    /// Layer `i`'s stored output.
    Stored(usize),
    /// One of the two scratch buffers.
    Scratch(usize),
}

/// Where a layer writes its output for the current image.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Target {
    /// Its stored output (this layer's index).
    Stored(usize),
    /// One of the two scratch buffers.
    Scratch(usize),
}

/// Grows `buffer` to at least `len` elements; buffers never shrink, so after the first step of
/// a size nothing is allocated.
fn fit<T: Clone + Default>(buffer: &mut Vec<T>, len: usize) {
    if buffer.len() < len {
        buffer.resize(len, T::default());
    }
}

fn fit_all<T: Clone + Default>(
    buffers: &mut Vec<Vec<T>>,
    lens: impl ExactSizeIterator<Item = usize>,
) {
    buffers.resize_with(lens.len(), Vec::new);
    for (buffer, len) in buffers.iter_mut().zip(lens) {
        fit(buffer, len);
    }
}

impl Engine {
    /// The engine for `kind`, whose parameters are laid out as `layout` says (a
    /// [`crate::params::ParamSet::layout`]); every parameter must belong to one layer.
    pub fn new(kind: ModelKind, layout: &[(String, Vec<usize>)]) -> Result<Engine> {
        let mut offsets = HashMap::new();
        let mut offset = 0;
        for (name, dims) in layout {
            let len: usize = dims.iter().product();
            offsets.insert(name.as_str(), (offset, dims.as_slice()));
            offset += len;
        }
        let mut used = 0;
        let mut param = |name: &str, part: &str, dims: &[usize]| {
            let full = format!("{name}.{part}");
            match offsets.get(full.as_str()) {
                Some(&(at, found)) if found == dims => {
                    used += 1;
                    Ok(at)
                }
                Some((_, found)) => Err(Error::Config(format!(
                    "{kind}: parameter {full} has shape {found:?}, its layer needs {dims:?}"
                ))),
                None => Err(Error::Config(format!("{kind}: no parameter {full}"))),
            }
        };
        let (mut image, mut dense) = (Vec::new(), Vec::new());
        let (mut c, mut h, mut w) = (1, 28, 28);
        let split = dense_part_start(kind.layers());
        for (index, &layer) in kind.layers().iter().enumerate() {
            let input = c * h * w;
            let flat = index >= split;
            match layer {
                Layer::Conv {
                    name,
                    inputs,
                    outputs,
                    kernel: k,
                } => {
                    if inputs != c || h < k || w < k || k == 0 {
                        return Err(Error::Config(format!(
                            "{kind}: convolution {name} does not fit an input ({c}, {h}, {w})"
                        )));
                    }
                    let g = Geometry {
                        n: 1,
                        c,
                        h,
                        w,
                        out: outputs,
                        k,
                    };
                    let weight = param(name, "weight", &[outputs, inputs, k, k])?;
                    let bias = param(name, "bias", &[outputs])?;
                    (c, h, w) = (outputs, g.oh(), g.ow());
                    if flat {
                        dense.push(Stage {
                            op: DenseOp::Conv {
                                conv: WideConv { g },
                                weight,
                                bias,
                            },
                            input,
                            output: c * h * w,
                            stored: true,
                        });
                    } else {
                        image.push(Stage {
                            op: ImageOp::Conv { g, weight, bias },
                            input,
                            output: c * h * w,
                            stored: false,
                        });
                    }
                }
                Layer::MaxPool2x2 if !flat => {
                    let op = ImageOp::Pool {
                        h,
                        w,
                        tanh_before: false,
                    };
                    (h, w) = (h / 2, w / 2);
                    image.push(Stage {
                        op,
                        input,
                        output: c * h * w,
                        stored: false,
                    });
                }
                Layer::Tanh | Layer::Relu if !flat => {
                    let op = if layer == Layer::Tanh {
                        ImageOp::Tanh
                    } else {
                        ImageOp::Relu
                    };
                    image.push(Stage {
                        op,
                        input,
                        output: input,
                        stored: false,
                    });
                }
                Layer::Linear {
                    name,
                    inputs,
                    outputs,
                } => {
                    if inputs != input {
                        return Err(Error::Config(format!(
                            "{kind}: layer {name} takes {inputs} inputs, gets {input}"
                        )));
                    }
                    let op = DenseOp::Linear {
                        layer: Dense { inputs, outputs },
                        weight: param(name, "weight", &[outputs, inputs])?,
                        bias: param(name, "bias", &[outputs])?,
                    };
                    (c, h, w) = (outputs, 1, 1);
                    dense.push(Stage {
                        op,
                        input,
                        output: outputs,
                        stored: true,
                    });
                }
                Layer::Tanh | Layer::Relu | Layer::Dropout(_) if flat => {
                    let op = match layer {
                        Layer::Tanh => DenseOp::Tanh,
                        Layer::Relu => DenseOp::Relu,
                        Layer::Dropout(p) => DenseOp::Dropout(p),
                        _ => unreachable!("matched above"),
                    };
                    dense.push(Stage {
                        op,
                        input,
                        output: input,
                        stored: true,
                    });
                }
                other => {
                    return Err(Error::Config(format!(
                        "{kind}: the engine cannot run {other:?} here"
                    )));
                }
            }
        }
        plan_storage(&mut image);
        if dense.last().map(|s| s.output) != Some(CLASSES) {
            return Err(Error::Config(format!(
                "{kind}: the layers do not end in {CLASSES} logits"
            )));
        }
        if used != layout.len() {
            return Err(Error::Config(format!(
                "{kind}: {} parameters belong to no layer",
                layout.len() - used
            )));
        }
        Ok(Engine {
            kind,
            image,
            dense,
            params: offset,
            training: None,
            spare: Mutex::new(Vec::new()),
        })
    }

    /// The network this engine runs.
    pub fn kind(&self) -> ModelKind {
        self.kind
    }

    /// The training step's computation: the gradient of the mean cross-entropy of `images`
    /// (`(n, 28 * 28)` normalised pixels) against `labels` at `params`, written to `grad`, with
    /// the dropout masks of `dropout_seed`. Returns the sum of the images' losses and how many
    /// were classified correctly (with dropout). An empty batch gives a zero gradient.
    pub fn gradient(
        &mut self,
        params: &[f32],
        images: &[f32],
        labels: &[u32],
        dropout_seed: u64,
        grad: &mut [f32],
    ) -> Result<(f64, u64)> {
        on_pool(|| self.gradient_on_pool(params, images, labels, dropout_seed, grad))
    }

    fn gradient_on_pool(
        &mut self,
        params: &[f32],
        images: &[f32],
        labels: &[u32],
        dropout_seed: u64,
        grad: &mut [f32],
    ) -> Result<(f64, u64)> {
        let n = labels.len();
        self.check(params, images, n)?;
        check_len("gradient", self.params, grad.len())?;
        if let Some(&label) = labels.iter().find(|&&l| l as usize >= CLASSES) {
            return Err(Error::InvalidSplit(format!("label {label} is not a digit")));
        }
        if n == 0 {
            grad.fill(0.0);
            return Ok((0.0, 0));
        }
        let mut training = self.training.take().unwrap_or_default();
        self.fit_training(&mut training, n);
        let mut rng = mlp_dropout::dropout_rng(dropout_seed);
        self.forward(params, images, n, &mut training.acts, Some(&mut rng));
        let last = self.dense.len() - 1;
        let (loss_sum, correct) = loss::softmax_cross_entropy(
            &training.acts.dense[last][..n * CLASSES],
            CLASSES,
            labels,
            Some(&mut training.dense_grads[last][..n * CLASSES]),
        );
        self.backward(params, images, n, &mut training, grad);
        self.training = Some(training);
        Ok((loss_sum, correct))
    }

    /// The logits `(n, 10)` of `images` (`(n, 28 * 28)`), without dropout, in pieces of 64
    /// images spread over the threads.
    pub fn logits(&self, params: &[f32], images: &[f32]) -> Result<Vec<f32>> {
        on_pool(|| self.logits_on_pool(params, images))
    }

    fn logits_on_pool(&self, params: &[f32], images: &[f32]) -> Result<Vec<f32>> {
        let n = images.len() / IMAGE_PIXELS;
        self.check(params, images, n)?;
        let mut logits = vec![0.0; n * CLASSES];
        let pieces: Vec<&mut [f32]> = logits.chunks_mut(EVAL_PIECE * CLASSES).collect();
        let parallel = pieces.len() > 1 && rayon::current_num_threads() > 1;
        for_each_piece(pieces, parallel, |piece, out| {
            let m = out.len() / CLASSES;
            let first = piece * EVAL_PIECE;
            let mut acts = self
                .spare
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop()
                .unwrap_or_default();
            self.fit_activations(&mut acts, m);
            let images = &images[first * IMAGE_PIXELS..(first + m) * IMAGE_PIXELS];
            self.forward(params, images, m, &mut acts, None);
            out.copy_from_slice(&acts.dense[self.dense.len() - 1][..m * CLASSES]);
            self.spare
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(acts);
        });
        Ok(logits)
    }

    /// Class probabilities `(n, 10)` of `images`, without dropout.
    pub fn probabilities(&self, params: &[f32], images: &[f32]) -> Result<Vec<f32>> {
        let mut logits = self.logits(params, images)?;
        loss::softmax_rows(&mut logits, CLASSES);
        Ok(logits)
    }

    fn check(&self, params: &[f32], images: &[f32], n: usize) -> Result<()> {
        check_len("parameters", self.params, params.len())?;
        check_len("images", n * IMAGE_PIXELS, images.len())
    }

    fn fit_activations(&self, acts: &mut Activations, n: usize) {
        let stored = |s: &Stage<ImageOp>| if s.stored { n * s.output } else { 0 };
        fit_all(&mut acts.image, self.image.iter().map(stored));
        let codes = self.image.iter().map(|s| match s.op {
            ImageOp::Pool { .. } => n * s.output,
            _ => 0,
        });
        fit_all(&mut acts.codes, codes);
        fit_all(&mut acts.dense, self.dense.iter().map(|s| n * s.output));
        let masks = self.dense.iter().map(|s| match s.op {
            DenseOp::Dropout(_) => n * s.output,
            _ => 0,
        });
        fit_all(&mut acts.masks, masks);
        let wide_convs = || {
            self.dense.iter().map(|s| match s.op {
                DenseOp::Conv { conv, .. } => Some(conv),
                _ => None,
            })
        };
        let cols = wide_convs().map(|c| c.map_or(0, |c| c.cols_len(n)));
        fit_all(&mut acts.dense_cols, cols);
        let wide = wide_convs().flatten().map(|c| c.wide_len(n)).max();
        fit(&mut acts.wide, wide.unwrap_or(0));
        let groups = if self.image.is_empty() {
            0
        } else {
            n.div_ceil(GROUP)
        };
        if acts.scratch.len() < groups {
            acts.scratch.resize_with(groups, Scratch::default);
        }
        let cols = self
            .convs()
            .map(|(g, _, _)| g.cols_len())
            .max()
            .unwrap_or(0);
        let values = self
            .image
            .iter()
            .filter(|s| !s.stored)
            .map(|s| s.output)
            .max()
            .unwrap_or(0);
        for scratch in &mut acts.scratch[..groups] {
            fit(&mut scratch.cols, cols);
            for buffer in &mut scratch.values {
                fit(buffer, values);
            }
        }
    }

    fn fit_training(&self, training: &mut Training, n: usize) {
        self.fit_activations(&mut training.acts, n);
        let groups = if self.image.is_empty() {
            0
        } else {
            n.div_ceil(GROUP)
        };
        fit(
            &mut training.dense_input_grad,
            self.image.last().map_or(0, |s| n * s.output),
        );
        fit_all(
            &mut training.dense_grads,
            self.dense.iter().map(|s| n * s.output),
        );
        let cols_grad = self
            .convs()
            .map(|(g, _, _)| g.patch() * g.pixels())
            .max()
            .unwrap_or(0);
        let grads = self
            .image
            .iter()
            .map(|s| s.input.max(s.output))
            .max()
            .unwrap_or(0);
        for scratch in &mut training.acts.scratch[..groups] {
            fit(&mut scratch.cols_grad, cols_grad);
            for buffer in &mut scratch.grads {
                fit(buffer, grads);
            }
        }
        let partials = self.image.iter().map(|s| match s.op {
            ImageOp::Conv { g, .. } => groups * g.out * (g.patch() + 1),
            _ => 0,
        });
        fit_all(&mut training.partials, partials);
        for stage in &self.dense {
            if let DenseOp::Conv { conv, .. } = stage.op {
                fit(&mut training.wide_cols_grad, conv.cols_grad_len(n));
                fit(&mut training.wide_partial, conv.partial_len());
            }
        }
    }

    /// Every convolution's geometry and parameter offsets.
    fn convs(&self) -> impl Iterator<Item = (Geometry, usize, usize)> + '_ {
        self.image.iter().filter_map(|s| match s.op {
            ImageOp::Conv { g, weight, bias } => Some((g, weight, bias)),
            _ => None,
        })
    }

    /// Multiply-adds of the convolutions for `n` images, one pass.
    fn conv_work(&self, n: usize) -> usize {
        n * self.convs().map(|(g, _, _)| g.work()).sum::<usize>()
    }

    /// Runs the network on `n` images into `acts`; dropout draws its masks from `rng` when
    /// there is one (training), and is the identity otherwise.
    fn forward(
        &self,
        params: &[f32],
        images: &[f32],
        n: usize,
        acts: &mut Activations,
        mut rng: Option<&mut ChaCha8Rng>,
    ) {
        let isa = Isa::current();
        if !self.image.is_empty() {
            // One task per group of images, with its chunk of every stored output and of
            // every pool's codes, and its scratch.
            let mut outs: Vec<_> = acts
                .image
                .iter_mut()
                .zip(&self.image)
                .map(|(buffer, s)| group_chunks(buffer, n, s.output, s.stored))
                .collect();
            let mut codes: Vec<_> = acts
                .codes
                .iter_mut()
                .zip(&self.image)
                .map(|(buffer, s)| {
                    let pool = matches!(s.op, ImageOp::Pool { .. });
                    group_chunks(buffer, n, s.output, pool)
                })
                .collect();
            let tasks: Vec<_> = acts
                .scratch
                .iter_mut()
                .take(n.div_ceil(GROUP))
                .map(|scratch| {
                    let outs: Vec<&mut [f32]> =
                        outs.iter_mut().map(|c| c.next().unwrap()).collect();
                    let codes: Vec<&mut [pool::Code]> =
                        codes.iter_mut().map(|c| c.next().unwrap()).collect();
                    (outs, codes, scratch)
                })
                .collect();
            let parallel = worth_splitting_product(self.conv_work(n));
            for_each_piece(tasks, parallel, |group, (mut outs, mut codes, scratch)| {
                let images_in_group = (n - group * GROUP).min(GROUP);
                for j in 0..images_in_group {
                    let b = group * GROUP + j;
                    let image = &images[b * IMAGE_PIXELS..(b + 1) * IMAGE_PIXELS];
                    self.forward_image(isa, params, image, j, (&mut outs, &mut codes), scratch);
                }
            });
        }
        for i in 0..self.dense.len() {
            let stage = self.dense[i];
            let (before, after) = acts.dense.split_at_mut(i);
            let input: &[f32] = match i {
                0 => match self.image.last() {
                    Some(last) => &acts.image[self.image.len() - 1][..n * last.output],
                    None => &images[..n * IMAGE_PIXELS],
                },
                _ => &before[i - 1][..n * stage.input],
            };
            let out = &mut after[0][..n * stage.output];
            match stage.op {
                DenseOp::Linear {
                    layer,
                    weight,
                    bias,
                } => layer.forward(
                    input,
                    n,
                    &params[weight..weight + layer.inputs * layer.outputs],
                    &params[bias..bias + layer.outputs],
                    out,
                ),
                DenseOp::Conv { conv, weight, bias } => conv.forward(
                    input,
                    n,
                    &params[weight..weight + conv.g.out * conv.g.patch()],
                    &params[bias..bias + conv.g.out],
                    &mut acts.dense_cols[i],
                    &mut acts.wide,
                    out,
                ),
                DenseOp::Tanh => tanh::tanh_into(isa, input, as_uninit(out)),
                DenseOp::Relu => relu::relu_into(isa, input, as_uninit(out)),
                DenseOp::Dropout(p) => match rng.as_deref_mut() {
                    Some(rng) => {
                        let mask = &mut acts.masks[i][..n * stage.output];
                        fill_mask(p, rng, mask);
                        for ((y, &x), &m) in out.iter_mut().zip(input).zip(mask.iter()) {
                            *y = x * m;
                        }
                    }
                    None => out.copy_from_slice(input),
                },
            }
        }
    }

    /// Image `j` of a group through the convolutional part: `outs[i]` is the group's chunk of
    /// layer `i`'s stored output (empty if it is not stored), `codes[i]` of a pool's codes.
    fn forward_image(
        &self,
        isa: Isa,
        params: &[f32],
        image: &[f32],
        j: usize,
        (outs, codes): (&mut [&mut [f32]], &mut [&mut [pool::Code]]),
        scratch: &mut Scratch,
    ) {
        let mut from = Place::Image;
        for i in 0..self.image.len() {
            let stage = self.image[i];
            let to = match (stage.stored, from) {
                (true, _) => Target::Stored(i),
                (false, Place::Scratch(k)) => Target::Scratch(1 - k),
                (false, _) => Target::Scratch(0),
            };
            let (input, out) = places(image, outs, &mut scratch.values, from, to, stage, j);
            match stage.op {
                ImageOp::Conv { g, weight, bias } => {
                    let out = conv_op::fill_bias(as_uninit(out), &params[bias..], g.pixels());
                    let weight = &params[weight..weight + g.out * g.patch()];
                    conv_op::forward_image(input, weight, g, &mut scratch.cols, out);
                }
                ImageOp::Pool { h, w, .. } => {
                    let codes = &mut codes[i][j * stage.output..(j + 1) * stage.output];
                    pool::forward_planes_with_codes(isa, input, h, w, out, codes);
                }
                ImageOp::Tanh => tanh::tanh_into(isa, input, as_uninit(out)),
                ImageOp::Relu => relu::relu_into(isa, input, as_uninit(out)),
            }
            from = match to {
                Target::Stored(i) => Place::Stored(i),
                Target::Scratch(k) => Place::Scratch(k),
            };
        }
    }

    /// The backward pass of the step whose forward pass is in `training.acts`, from the
    /// gradient of the logits (in the last dense layer's gradient buffer) to `grad`.
    fn backward(
        &self,
        params: &[f32],
        images: &[f32],
        n: usize,
        training: &mut Training,
        grad: &mut [f32],
    ) {
        let isa = Isa::current();
        let Training {
            acts,
            dense_input_grad,
            dense_grads,
            partials,
            wide_cols_grad,
            wide_partial,
        } = training;
        let Activations {
            image: image_acts,
            codes,
            dense: dense_acts,
            masks,
            dense_cols,
            wide,
            scratch,
        } = acts;
        for i in (0..self.dense.len()).rev() {
            let stage = self.dense[i];
            let (before, after) = dense_grads.split_at_mut(i);
            let dy = &after[0][..n * stage.output];
            let input: &[f32] = match (i, self.image.len()) {
                (0, 0) => &images[..n * IMAGE_PIXELS],
                (0, len) => &image_acts[len - 1][..n * stage.input],
                _ => &dense_acts[i - 1][..n * stage.input],
            };
            let dx: Option<&mut [f32]> = match (i, self.image.len()) {
                (0, 0) => None,
                (0, _) => Some(&mut dense_input_grad[..n * stage.input]),
                _ => Some(&mut before[i - 1][..n * stage.input]),
            };
            match (stage.op, dx) {
                (
                    DenseOp::Linear {
                        layer,
                        weight,
                        bias,
                    },
                    dx,
                ) => {
                    let (dweight, dbias) = two_mut(
                        grad,
                        weight..weight + layer.inputs * layer.outputs,
                        bias..bias + layer.outputs,
                    );
                    let weight = &params[weight..weight + layer.inputs * layer.outputs];
                    layer.backward(input, n, weight, dy, dweight, dbias, dx);
                }
                (DenseOp::Conv { conv, weight, bias }, dx) => {
                    let len = conv.g.out * conv.g.patch();
                    let (dweight, dbias) =
                        two_mut(grad, weight..weight + len, bias..bias + conv.g.out);
                    let scratch = (
                        &mut wide[..],
                        &mut wide_cols_grad[..],
                        &mut wide_partial[..],
                    );
                    let weight = &params[weight..weight + len];
                    conv.backward(n, weight, dy, &dense_cols[i], scratch, dweight, dbias, dx);
                }
                (DenseOp::Tanh, Some(dx)) => {
                    let ys = &dense_acts[i][..n * stage.output];
                    tanh::tanh_grad_into(isa, dy, ys, as_uninit(dx));
                }
                (DenseOp::Relu, Some(dx)) => relu::relu_grad_into(isa, dy, input, as_uninit(dx)),
                (DenseOp::Dropout(_), Some(dx)) => {
                    let mask = &masks[i][..n * stage.output];
                    for ((dx, &g), &m) in dx.iter_mut().zip(dy).zip(mask) {
                        *dx = g * m;
                    }
                }
                // A first layer without parameters: the images need no gradient.
                (_, None) => {}
            }
        }
        let Some(last) = self.image.last() else {
            return;
        };

        // One task per group: its scratch and its partial weight gradients of every
        // convolution; what it reads (stored outputs, codes, the dense part's input gradient)
        // it reads for its images only.
        let groups = n.div_ceil(GROUP);
        let mut partial_chunks: Vec<_> = partials
            .iter_mut()
            .zip(&self.image)
            .map(|(buffer, stage)| {
                let len = match stage.op {
                    ImageOp::Conv { g, .. } => g.out * (g.patch() + 1),
                    _ => 0,
                };
                let mut chunks: Vec<&mut [f32]> =
                    buffer[..groups * len].chunks_mut(len.max(1)).collect();
                chunks.resize_with(groups, Default::default);
                chunks.into_iter()
            })
            .collect();
        let tasks: Vec<_> = scratch
            .iter_mut()
            .take(groups)
            .map(|scratch| {
                let partials: Vec<&mut [f32]> = partial_chunks
                    .iter_mut()
                    .map(|c| c.next().unwrap())
                    .collect();
                (partials, scratch)
            })
            .collect();
        let saved = Saved {
            outputs: image_acts,
            codes,
            dense_input_grad: &dense_input_grad[..n * last.output],
        };
        let parallel = worth_splitting_product(3 * self.conv_work(n));
        for_each_piece(tasks, parallel, |group, (mut partials, scratch)| {
            for partial in &mut partials {
                partial.fill(0.0);
            }
            let images_in_group = (n - group * GROUP).min(GROUP);
            for j in 0..images_in_group {
                let b = group * GROUP + j;
                let image = &images[b * IMAGE_PIXELS..(b + 1) * IMAGE_PIXELS];
                self.backward_image(isa, params, &saved, image, b, &mut partials, scratch);
            }
        });

        // Each convolution's gradient: its groups' partial sums, added in group order.
        for (stage, partials) in self.image.iter().zip(partials.iter()) {
            if let ImageOp::Conv { g, weight, bias } = stage.op {
                let partial_len = g.out * (g.patch() + 1);
                let (dweight, dbias) =
                    two_mut(grad, weight..weight + g.out * g.patch(), bias..bias + g.out);
                conv_op::sum_partials(
                    &partials[..groups * partial_len],
                    groups,
                    g,
                    as_uninit(dweight),
                    as_uninit(dbias),
                );
            }
        }
    }

    /// Image `b` backwards through the convolutional part, from its share of the dense part's
    /// input gradient: the layers' gradients go through the scratch, each convolution's
    /// weight gradient onto the group's `partials[i]`.
    #[allow(clippy::too_many_arguments)]
    fn backward_image(
        &self,
        isa: Isa,
        params: &[f32],
        saved: &Saved,
        image: &[f32],
        b: usize,
        partials: &mut [&mut [f32]],
        scratch: &mut Scratch,
    ) {
        let Scratch {
            cols,
            cols_grad,
            grads,
            ..
        } = scratch;
        let stored = |i: usize| -> &[f32] {
            let output = self.image[i].output;
            &saved.outputs[i][b * output..(b + 1) * output]
        };
        let last = self.image.len() - 1;
        // The gradient of layer `i`'s output: `None` for the dense part's input, else the
        // scratch buffer holding it.
        let mut dy_at: Option<usize> = None;
        let mut i = last;
        loop {
            let stage = self.image[i];
            // The layer whose output gradient this one writes: the one before, or, for a pool
            // that does a tanh's backward pass too, the one before the tanh.
            let below = match stage.op {
                ImageOp::Pool {
                    tanh_before: true, ..
                } => i.checked_sub(2),
                _ => i.checked_sub(1),
            };
            let k = dy_at.map_or(0, |k| 1 - k);
            let (dy_buffer, dx_buffer) = match k {
                0 => {
                    let (a, b) = grads.split_at_mut(1);
                    (&b[0], &mut a[0])
                }
                _ => {
                    let (a, b) = grads.split_at_mut(1);
                    (&a[0], &mut b[0])
                }
            };
            let dy: &[f32] = match dy_at {
                None => &saved.dense_input_grad[b * stage.output..(b + 1) * stage.output],
                Some(_) => &dy_buffer[..stage.output],
            };
            let dx = below.map(|_| &mut dx_buffer[..stage.input]);
            let input: &[f32] = match i {
                0 => image,
                _ if self.image[i - 1].stored => stored(i - 1),
                _ => &[],
            };
            match (stage.op, dx) {
                (ImageOp::Conv { g, weight, .. }, dx) => {
                    let weight = &params[weight..weight + g.out * g.patch()];
                    let input_grad = dx.map(|dx| (dx, &mut cols_grad[..]));
                    conv_op::backward_image(input, weight, dy, g, cols, partials[i], input_grad);
                }
                (ImageOp::Pool { h, w, tanh_before }, Some(dx)) => {
                    let codes = &saved.codes[i][b * stage.output..(b + 1) * stage.output];
                    let pooled = tanh_before.then(|| stored(i));
                    pool::backward_planes_from_codes(isa, codes, dy, pooled, h, w, dx);
                }
                (ImageOp::Tanh, Some(dx)) => {
                    tanh::tanh_grad_into(isa, dy, stored(i), as_uninit(dx))
                }
                (ImageOp::Relu, Some(dx)) => relu::relu_grad_into(isa, dy, input, as_uninit(dx)),
                (_, None) => {}
            }
            match below {
                Some(below) => {
                    i = below;
                    dy_at = Some(k);
                }
                None => break,
            }
        }
    }
}

/// What a training step's backward pass reads of its forward pass, shared by the tasks.
struct Saved<'a> {
    outputs: &'a [Vec<f32>],
    codes: &'a [Vec<pool::Code>],
    dense_input_grad: &'a [f32],
}

/// The group chunks of a batch buffer of `n` images of `len` elements, or, when the buffer is
/// not kept (`kept` false), empty chunks for every group.
fn group_chunks<T>(
    buffer: &mut [T],
    n: usize,
    len: usize,
    kept: bool,
) -> std::vec::IntoIter<&mut [T]> {
    let groups = n.div_ceil(GROUP);
    let mut chunks: Vec<&mut [T]> = if kept {
        buffer[..n * len].chunks_mut(GROUP * len).collect()
    } else {
        Vec::new()
    };
    chunks.resize_with(groups, Default::default);
    chunks.into_iter()
}

/// The input and output slices of a layer for image `j` of a group: from the image, a stored
/// output (its group chunk in `outs`) or a scratch buffer, to a stored output or the other
/// scratch buffer.
fn places<'a>(
    image: &'a [f32],
    outs: &'a mut [&mut [f32]],
    values: &'a mut [Vec<f32>; 2],
    from: Place,
    to: Target,
    stage: Stage<ImageOp>,
    j: usize,
) -> (&'a [f32], &'a mut [f32]) {
    let (input, output) = (stage.input, stage.output);
    match to {
        Target::Stored(i) => {
            let (before, after) = outs.split_at_mut(i);
            let out = &mut after[0][j * output..(j + 1) * output];
            let input: &[f32] = match from {
                Place::Image => image,
                Place::Stored(p) => &before[p][j * input..(j + 1) * input],
                Place::Scratch(k) => &values[k][..input],
            };
            (input, out)
        }
        Target::Scratch(k) => {
            let (first, second) = values.split_at_mut(1);
            let (out, other) = if k == 0 {
                (&mut first[0], &second[0])
            } else {
                (&mut second[0], &first[0])
            };
            let input: &[f32] = match from {
                Place::Image => image,
                Place::Stored(p) => &outs[p][j * input..(j + 1) * input],
                Place::Scratch(_) => &other[..input],
            };
            (input, &mut out[..output])
        }
    }
}

/// Output pixels per image up to which a convolution runs over the whole batch as one product
/// ([`WideConv`]) rather than image by image.
const WIDE_PIXELS: usize = 16;

/// The first layer of the dense part, which runs on the whole batch: the layers from there on
/// are dense layers, activations, dropout and convolutions of at most [`WIDE_PIXELS`] output
/// pixels; every pool, and every convolution with more pixels, comes before.
fn dense_part_start(layers: &[Layer]) -> usize {
    let (mut h, mut w): (usize, usize) = (28, 28);
    let mut start = 0;
    for (i, layer) in layers.iter().enumerate() {
        match *layer {
            Layer::Conv { kernel, .. } => {
                (h, w) = (
                    (h + 1).saturating_sub(kernel),
                    (w + 1).saturating_sub(kernel),
                );
                if h * w > WIDE_PIXELS {
                    start = i + 1;
                }
            }
            Layer::MaxPool2x2 => {
                (h, w) = (h / 2, w / 2);
                start = i + 1;
            }
            Layer::Linear { .. } => (h, w) = (1, 1),
            Layer::Tanh | Layer::Relu | Layer::Dropout(_) => {}
        }
    }
    start
}

/// Decides which image layers keep their outputs for the batch (see [`Stage::stored`]) and
/// fuses each tanh followed by a pool into the pool's backward pass.
fn plan_storage(image: &mut [Stage<ImageOp>]) {
    let len = image.len();
    for i in 0..len {
        let next = image.get(i + 1).map(|s| s.op);
        let fused_tanh =
            matches!(image[i].op, ImageOp::Tanh) && matches!(next, Some(ImageOp::Pool { .. }));
        if fused_tanh && let ImageOp::Pool { tanh_before, .. } = &mut image[i + 1].op {
            *tanh_before = true;
        }
        image[i].stored = i + 1 == len
            || matches!(next, Some(ImageOp::Conv { .. } | ImageOp::Relu))
            || (matches!(image[i].op, ImageOp::Tanh) && !fused_tanh)
            || matches!(
                image[i].op,
                ImageOp::Pool {
                    tanh_before: true,
                    ..
                }
            );
    }
}

/// Two disjoint ranges of one buffer, mutably.
fn two_mut(values: &mut [f32], a: Range<usize>, b: Range<usize>) -> (&mut [f32], &mut [f32]) {
    assert!(
        a.end <= b.start || b.end <= a.start,
        "{a:?} and {b:?} overlap"
    );
    if a.start < b.start {
        let (low, high) = values.split_at_mut(b.start);
        (&mut low[a], &mut high[..b.end - b.start])
    } else {
        let (low, high) = values.split_at_mut(a.start);
        (&mut high[..a.end - a.start], &mut low[b])
    }
}
