//! Reads the classic `mnist.pkl.gz` (a Python 2, protocol-2 pickle of numpy arrays) without
//! Python or numpy, so MNIST can come from a Python package when no mirror is reachable.
//!
//! A small pickle machine runs the opcodes such files use and builds a [`Value`] tree whose
//! byte strings borrow from the input, so the 157 MB of pixel data is never copied before it
//! is converted. Numpy arrays appear in a pickle as a call to
//! `numpy.core.multiarray._reconstruct` followed by a `BUILD` whose state holds the shape, the
//! dtype and the raw bytes; [`read_mnist_pickle`] recognises exactly that.

use crate::dataset::{CLASSES, IMAGE_PIXELS, Split};
use crate::{Error, Result};
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;

/// Decodes the uncompressed contents of `mnist.pkl.gz` into its training, validation and test
/// splits, in that order; `path` only names the file in errors.
///
/// The pickle holds `((train_x, train_y), (valid_x, valid_y), (test_x, test_y))` where images
/// are `float32` arrays of shape `(n, 784)` equal to `pixel / 256` and labels are `int64`
/// arrays of shape `(n,)`. Pixels are converted back exactly; any value that is not a multiple
/// of 1/256 in [0, 1), or any label outside 0-9, is an error.
pub fn read_mnist_pickle(bytes: &[u8], path: &Path) -> Result<[Split; 3]> {
    let fail = |problem: String| Error::Pickle {
        path: path.to_path_buf(),
        problem,
    };
    let value = Machine::new(bytes).run().map_err(fail)?;
    let pairs = value.tuple("the pickled object").map_err(fail)?;
    let [train, valid, test] = pairs else {
        return Err(fail(format!(
            "expected a tuple of 3 (images, labels) pairs, got {} items",
            pairs.len()
        )));
    };
    let split = |pair: &Value, name: &str| -> Result<Split> {
        let (images, labels) = decode_pair(pair, name).map_err(fail)?;
        Split::new(images, labels).map_err(|e| fail(format!("{name}: {e}")))
    };
    Ok([
        split(train, "training split")?,
        split(valid, "validation split")?,
        split(test, "test split")?,
    ])
}

/// What the pickle machine builds: the handful of Python values MNIST's pickle contains.
#[derive(Debug, Clone)]
enum Value<'a> {
    None,
    Bool(bool),
    Int(i64),
    /// A Python 2 `str` (bytes), borrowed from the input.
    Bytes(&'a [u8]),
    /// A Python `unicode`, borrowed from the input.
    Str(&'a str),
    Tuple(Rc<[Value<'a>]>),
    /// A `module.name` reference, the callable of a `REDUCE`.
    Global {
        module: &'a str,
        name: &'a str,
    },
    /// The result of calling a global; shared, because `BUILD` mutates the very object that
    /// the memo may hand out again (numpy dtypes are built once and then referenced).
    Object(Rc<RefCell<Object<'a>>>),
}

/// A call `callable(*args)` whose state a later `BUILD` set.
#[derive(Debug)]
struct Object<'a> {
    module: &'a str,
    name: &'a str,
    args: Rc<[Value<'a>]>,
    state: Option<Value<'a>>,
}

impl<'a> Value<'a> {
    fn tuple(&self, what: &str) -> Result<&[Value<'a>], String> {
        match self {
            Value::Tuple(items) => Ok(items),
            other => Err(format!("{what}: expected a tuple, got {}", other.kind())),
        }
    }

    fn int(&self, what: &str) -> Result<i64, String> {
        match self {
            Value::Int(i) => Ok(*i),
            other => Err(format!("{what}: expected an int, got {}", other.kind())),
        }
    }

    fn bool(&self, what: &str) -> Result<bool, String> {
        match self {
            Value::Bool(b) => Ok(*b),
            // Old pickles write booleans as the ints 0 and 1.
            Value::Int(i @ (0 | 1)) => Ok(*i == 1),
            other => Err(format!("{what}: expected a bool, got {}", other.kind())),
        }
    }

    /// The bytes of a Python 2 `str` or a `unicode`.
    fn text(&self, what: &str) -> Result<&'a [u8], String> {
        match self {
            Value::Bytes(b) => Ok(b),
            Value::Str(s) => Ok(s.as_bytes()),
            other => Err(format!("{what}: expected a string, got {}", other.kind())),
        }
    }

    fn kind(&self) -> String {
        match self {
            Value::None => "None".into(),
            Value::Bool(_) => "a bool".into(),
            Value::Int(_) => "an int".into(),
            Value::Bytes(_) | Value::Str(_) => "a string".into(),
            Value::Tuple(items) => format!("a tuple of {}", items.len()),
            Value::Global { module, name } => format!("the global {module}.{name}"),
            Value::Object(object) => {
                let object = object.borrow();
                format!("a {}.{} object", object.module, object.name)
            }
        }
    }
}

/// A pickle virtual machine: a stack, a stack of marks and a memo.
struct Machine<'a> {
    input: &'a [u8],
    pos: usize,
    stack: Vec<Value<'a>>,
    marks: Vec<usize>,
    // A map, not a vector: memo keys come from the file and may be arbitrarily large.
    memo: HashMap<u32, Value<'a>>,
}

impl<'a> Machine<'a> {
    fn new(input: &'a [u8]) -> Self {
        Machine {
            input,
            pos: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
        }
    }

    /// Runs to `STOP` and returns the value it leaves.
    fn run(mut self) -> Result<Value<'a>, String> {
        loop {
            let offset = self.pos;
            let opcode = self
                .take(1)
                .map_err(|e| format!("{e} at offset {offset}"))?[0];
            match self.step(opcode) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => return Err(format!("{e} (opcode {opcode:#04x} at offset {offset})")),
            }
        }
        let result = self.pop()?;
        if !self.stack.is_empty() || !self.marks.is_empty() {
            return Err("STOP leaves values or marks on the stack".into());
        }
        Ok(result)
    }

    /// Executes one opcode; `false` at `STOP`.
    fn step(&mut self, opcode: u8) -> Result<bool, String> {
        match opcode {
            // PROTO: the version needs no handling, since the opcodes speak for themselves.
            0x80 => {
                self.take(1)?;
            }
            b'.' => return Ok(false),
            // GLOBAL
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                self.stack.push(Value::Global { module, name });
            }
            // BINPUT, LONG_BINPUT
            b'q' => {
                let key = self.take(1)?[0].into();
                self.put(key)?;
            }
            b'r' => {
                let key = self.u32()?;
                self.put(key)?;
            }
            // BINGET, LONG_BINGET
            b'h' => {
                let key = self.take(1)?[0].into();
                self.get(key)?;
            }
            b'j' => {
                let key = self.u32()?;
                self.get(key)?;
            }
            // BININT, BININT1, BININT2
            b'J' => {
                let i = i32::from_le_bytes(self.array()?);
                self.stack.push(Value::Int(i.into()));
            }
            b'K' => {
                let i = self.take(1)?[0];
                self.stack.push(Value::Int(i.into()));
            }
            b'M' => {
                let i = u16::from_le_bytes(self.array()?);
                self.stack.push(Value::Int(i.into()));
            }
            // BINSTRING (a signed length), SHORT_BINSTRING
            b'T' => {
                let len = i32::from_le_bytes(self.array()?);
                let len = usize::try_from(len).map_err(|_| format!("negative length {len}"))?;
                let bytes = self.take(len)?;
                self.stack.push(Value::Bytes(bytes));
            }
            b'U' => {
                let len = self.take(1)?[0].into();
                let bytes = self.take(len)?;
                self.stack.push(Value::Bytes(bytes));
            }
            // BINUNICODE
            b'X' => {
                let len = self.u32()? as usize;
                let bytes = self.take(len)?;
                let text = std::str::from_utf8(bytes).map_err(|e| format!("bad UTF-8: {e}"))?;
                self.stack.push(Value::Str(text));
            }
            b'N' => self.stack.push(Value::None),
            // NEWTRUE, NEWFALSE
            0x88 => self.stack.push(Value::Bool(true)),
            0x89 => self.stack.push(Value::Bool(false)),
            b'(' => self.marks.push(self.stack.len()),
            // TUPLE, EMPTY_TUPLE, TUPLE1-3
            b't' => {
                let mark = self.marks.pop().ok_or("TUPLE without a MARK")?;
                let items = self.stack.split_off(mark);
                self.stack.push(Value::Tuple(items.into()));
            }
            b')' => self.stack.push(Value::Tuple(Rc::new([]))),
            0x85..=0x87 => {
                let n = usize::from(opcode - 0x84);
                let start = self
                    .stack
                    .len()
                    .checked_sub(n)
                    .filter(|&start| start >= self.floor())
                    .ok_or("tuple of more items than the stack holds")?;
                let items = self.stack.split_off(start);
                self.stack.push(Value::Tuple(items.into()));
            }
            // REDUCE
            b'R' => {
                let args = self.pop()?;
                let Value::Tuple(args) = args else {
                    return Err(format!("REDUCE arguments are {}", args.kind()));
                };
                let callable = self.pop()?;
                let Value::Global { module, name } = callable else {
                    return Err(format!("REDUCE calls {}", callable.kind()));
                };
                self.stack.push(Value::Object(Rc::new(RefCell::new(Object {
                    module,
                    name,
                    args,
                    state: None,
                }))));
            }
            // BUILD
            b'b' => {
                let state = self.pop()?;
                let Some(Value::Object(object)) = self.top() else {
                    return Err("BUILD applies only to the result of a REDUCE".into());
                };
                object.borrow_mut().state = Some(state);
            }
            _ => return Err("unsupported opcode".into()),
        }
        Ok(true)
    }

    /// Lowest stack index the current mark allows popping to.
    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> Result<Value<'a>, String> {
        if self.stack.len() <= self.floor() {
            return Err("stack underflow".into());
        }
        Ok(self.stack.pop().expect("checked above"))
    }

    fn top(&self) -> Option<&Value<'a>> {
        self.stack
            .last()
            .filter(|_| self.stack.len() > self.floor())
    }

    fn put(&mut self, key: u32) -> Result<(), String> {
        let top = self.top().ok_or("memo put with an empty stack")?.clone();
        self.memo.insert(key, top);
        Ok(())
    }

    fn get(&mut self, key: u32) -> Result<(), String> {
        let value = self
            .memo
            .get(&key)
            .ok_or_else(|| format!("memo key {key} was never put"))?;
        self.stack.push(value.clone());
        Ok(())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.input.len())
            .ok_or_else(|| format!("{n} bytes needed, {} left", self.input.len() - self.pos))?;
        let bytes = &self.input[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        Ok(self.take(N)?.try_into().expect("took N bytes"))
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    /// A newline-terminated ASCII argument, as `GLOBAL` takes.
    fn line(&mut self) -> Result<&'a str, String> {
        let rest = &self.input[self.pos..];
        let len = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("unterminated line")?;
        let line = std::str::from_utf8(&rest[..len]).map_err(|e| format!("bad line: {e}"))?;
        self.pos += len + 1;
        Ok(line)
    }
}

/// Element types of the arrays MNIST's pickle holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dtype {
    F32,
    I64,
}

impl Dtype {
    fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::I64 => 8,
        }
    }
}

/// A decoded numpy array: C-ordered little-endian elements, borrowed from the input.
struct NdArray<'a> {
    shape: Vec<usize>,
    dtype: Dtype,
    data: &'a [u8],
}

fn decode_pair(pair: &Value, name: &str) -> Result<(Vec<u8>, Vec<u8>), String> {
    let [images, labels] = pair.tuple(name)? else {
        return Err(format!("{name}: expected an (images, labels) pair"));
    };
    let images = ndarray(images).map_err(|e| format!("{name} images: {e}"))?;
    let labels = ndarray(labels).map_err(|e| format!("{name} labels: {e}"))?;
    let pixels = decode_pixels(&images).map_err(|e| format!("{name} images: {e}"))?;
    let labels = decode_labels(&labels).map_err(|e| format!("{name} labels: {e}"))?;
    Ok((pixels, labels))
}

fn decode_pixels(array: &NdArray) -> Result<Vec<u8>, String> {
    if array.dtype != Dtype::F32 || array.shape.len() != 2 || array.shape[1] != IMAGE_PIXELS {
        return Err(format!(
            "expected float32 of shape (n, {IMAGE_PIXELS}), got {:?} of shape {:?}",
            array.dtype, array.shape
        ));
    }
    array
        .data
        .chunks_exact(4)
        .enumerate()
        .map(|(i, b)| {
            let value = f32::from_le_bytes(b.try_into().expect("four bytes"));
            // Multiplying by a power of two is exact, so the check is exact too.
            let scaled = value * 256.0;
            if (0.0..256.0).contains(&scaled) && scaled.fract() == 0.0 {
                Ok(scaled as u8)
            } else {
                Err(format!(
                    "value {value} at index {i} is not a grey level / 256"
                ))
            }
        })
        .collect()
}

fn decode_labels(array: &NdArray) -> Result<Vec<u8>, String> {
    if array.dtype != Dtype::I64 || array.shape.len() != 1 {
        return Err(format!(
            "expected int64 of shape (n,), got {:?} of shape {:?}",
            array.dtype, array.shape
        ));
    }
    array
        .data
        .chunks_exact(8)
        .enumerate()
        .map(|(i, b)| {
            let label = i64::from_le_bytes(b.try_into().expect("eight bytes"));
            u8::try_from(label)
                .ok()
                .filter(|&l| usize::from(l) < CLASSES)
                .ok_or_else(|| format!("label {label} at index {i} is outside 0-{}", CLASSES - 1))
        })
        .collect()
}

/// Interprets `_reconstruct(ndarray, (0,), b'b')` with state
/// `(1, shape, dtype, is_fortran, raw_bytes)`.
fn ndarray<'a>(value: &Value<'a>) -> Result<NdArray<'a>, String> {
    let Value::Object(object) = value else {
        return Err(format!("expected a numpy array, got {}", value.kind()));
    };
    let object = object.borrow();
    // numpy 2 renamed `numpy.core` to `numpy._core`; both spellings are the same function.
    if !matches!(
        (object.module, object.name),
        (
            "numpy.core.multiarray" | "numpy._core.multiarray",
            "_reconstruct"
        )
    ) {
        return Err(format!(
            "expected a numpy array, got a {}.{} object",
            object.module, object.name
        ));
    }
    let state = object.state.as_ref().ok_or("array without state")?;
    let [version, shape, dtype, fortran, data] = state.tuple("array state")? else {
        return Err("array state: expected 5 items".into());
    };
    if version.int("array state version")? != 1 {
        return Err(format!("unsupported array state version {version:?}"));
    }
    let shape = shape
        .tuple("array shape")?
        .iter()
        .map(|dim| {
            let dim = dim.int("array dimension")?;
            usize::try_from(dim).map_err(|_| format!("negative dimension {dim}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let dtype = self::dtype(dtype)?;
    let data = data.text("array data")?;
    let elements = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or("array shape overflows")?;
    if Some(data.len()) != elements.checked_mul(dtype.size()) {
        return Err(format!(
            "shape {shape:?} of {dtype:?} needs {elements} elements, data has {} bytes",
            data.len()
        ));
    }
    // Fortran order only matters for arrays of more than one dimension with more than one
    // row, and MNIST's pickle has none; refusing it is simpler than transposing.
    if fortran.bool("array order")? && shape.len() > 1 {
        return Err("Fortran-ordered arrays are not supported".into());
    }
    Ok(NdArray { shape, dtype, data })
}

/// Interprets `numpy.dtype('f4' | 'i8', 0, 1)` with state `(3, '<', ...)`.
fn dtype(value: &Value) -> Result<Dtype, String> {
    let Value::Object(object) = value else {
        return Err(format!("expected a numpy dtype, got {}", value.kind()));
    };
    let object = object.borrow();
    if (object.module, object.name) != ("numpy", "dtype") {
        return Err(format!(
            "expected a numpy dtype, got a {}.{} object",
            object.module, object.name
        ));
    }
    let code = object.args.first().ok_or("dtype without arguments")?;
    let dtype = match code.text("dtype code")? {
        b"f4" => Dtype::F32,
        b"i8" => Dtype::I64,
        other => {
            return Err(format!(
                "unsupported dtype {:?}",
                String::from_utf8_lossy(other)
            ));
        }
    };
    // The byte order lives in the state; without one numpy means native, which is little
    // endian on every machine that wrote these files.
    if let Some(state) = &object.state {
        let order = state
            .tuple("dtype state")?
            .get(1)
            .ok_or("dtype state without a byte order")?
            .text("dtype byte order")?;
        if !matches!(order, b"<" | b"=" | b"|") {
            return Err(format!(
                "unsupported byte order {:?}",
                String::from_utf8_lossy(order)
            ));
        }
    }
    Ok(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes pickles opcode by opcode, as Python 2's `cPickle.dumps(obj, 2)` does for numpy.
    #[derive(Default)]
    struct Writer {
        bytes: Vec<u8>,
        next_memo: u8,
    }

    impl Writer {
        fn op(&mut self, op: u8) -> &mut Self {
            self.bytes.push(op);
            self
        }

        fn global(&mut self, module: &str, name: &str) -> &mut Self {
            self.op(b'c');
            self.bytes
                .extend_from_slice(format!("{module}\n{name}\n").as_bytes());
            self
        }

        fn int(&mut self, i: u32) -> &mut Self {
            if let Ok(i) = u8::try_from(i) {
                self.op(b'K').op(i)
            } else {
                self.op(b'J');
                self.bytes.extend_from_slice(&i.to_le_bytes());
                self
            }
        }

        fn string(&mut self, s: &[u8]) -> &mut Self {
            if let Ok(len) = u8::try_from(s.len()) {
                self.op(b'U').op(len);
            } else {
                self.op(b'T');
                self.bytes
                    .extend_from_slice(&(s.len() as u32).to_le_bytes());
            }
            self.bytes.extend_from_slice(s);
            self
        }

        fn put(&mut self) -> u8 {
            let key = self.next_memo;
            self.next_memo += 1;
            self.op(b'q').op(key);
            key
        }

        /// Pushes a dtype, defining it the first time and fetching it from the memo after.
        fn dtype(&mut self, code: &[u8], memo: &mut HashMap<Vec<u8>, u8>) -> &mut Self {
            if let Some(&key) = memo.get(code) {
                return self.op(b'h').op(key);
            }
            self.global("numpy", "dtype");
            self.string(code).int(0).int(1).op(0x87).op(b'R');
            memo.insert(code.to_vec(), self.put());
            self.op(b'(').int(3).string(b"<").op(b'N').op(b'N').op(b'N');
            self.int(u32::MAX).int(u32::MAX).int(0).op(b't').op(b'b')
        }

        fn array(
            &mut self,
            shape: &[u32],
            code: &[u8],
            data: &[u8],
            memo: &mut HashMap<Vec<u8>, u8>,
        ) -> &mut Self {
            self.global("numpy.core.multiarray", "_reconstruct");
            self.global("numpy", "ndarray");
            self.int(0).op(0x85).string(b"b").op(0x87).op(b'R');
            self.put();
            self.op(b'(').int(1);
            self.op(b'(');
            for &dim in shape {
                self.int(dim);
            }
            self.op(b't');
            self.dtype(code, memo)
                .op(0x89)
                .string(data)
                .op(b't')
                .op(b'b')
        }
    }

    fn images_bytes(pixels: &[u8]) -> Vec<u8> {
        pixels
            .iter()
            .flat_map(|&p| (f32::from(p) / 256.0).to_le_bytes())
            .collect()
    }

    fn labels_bytes(labels: &[u8]) -> Vec<u8> {
        labels
            .iter()
            .flat_map(|&l| i64::from(l).to_le_bytes())
            .collect()
    }

    /// A pickle of three splits with `counts` images each, pixels `(i * 7 + j) % 256`.
    fn mnist_like(counts: [usize; 3], tamper: impl Fn(&mut Vec<u8>, &mut Vec<u8>)) -> Vec<u8> {
        let mut w = Writer::default();
        let mut dtypes = HashMap::new();
        w.op(0x80).op(2);
        for (s, n) in counts.into_iter().enumerate() {
            let mut pixels: Vec<u8> = (0..n * IMAGE_PIXELS).map(|i| (i * 7 + s) as u8).collect();
            let mut labels: Vec<u8> = (0..n).map(|i| ((i + s) % 10) as u8).collect();
            tamper(&mut pixels, &mut labels);
            let (images, labels) = (images_bytes(&pixels), labels_bytes(&labels));
            w.array(
                &[n as u32, IMAGE_PIXELS as u32],
                b"f4",
                &images,
                &mut dtypes,
            );
            w.array(&[n as u32], b"i8", &labels, &mut dtypes);
            w.op(0x86);
            w.put();
        }
        w.op(0x87);
        w.put();
        w.op(b'.');
        w.bytes
    }

    fn problem(bytes: &[u8]) -> String {
        match read_mnist_pickle(bytes, Path::new("mnist.pkl")) {
            Err(Error::Pickle { problem, .. }) => problem,
            other => panic!("expected a pickle error, got {other:?}"),
        }
    }

    #[test]
    fn decodes_numpy_arrays() {
        let bytes = mnist_like([3, 2, 1], |_, _| {});
        let [train, valid, test] = read_mnist_pickle(&bytes, Path::new("mnist.pkl")).unwrap();
        assert_eq!([train.len(), valid.len(), test.len()], [3, 2, 1]);
        assert_eq!(train.image(1)[5], ((IMAGE_PIXELS + 5) * 7) as u8);
        assert_eq!(valid.image(0)[0], 1);
        assert_eq!(train.labels(), &[0, 1, 2]);
        assert_eq!(test.labels(), &[2]);
    }

    #[test]
    fn rejects_inexact_pixels_and_bad_labels() {
        let mut bytes = mnist_like([1, 1, 1], |_, _| {});
        // The first float of the first image array is little endian 0.0: make it 0.5/256.
        let first = (0.5f32 / 256.0).to_le_bytes();
        let zero = images_bytes(&[0, 7]);
        let at = bytes.windows(8).position(|w| w == zero).unwrap();
        bytes[at..at + 4].copy_from_slice(&first);
        assert!(
            problem(&bytes).contains("not a grey level"),
            "{}",
            problem(&bytes)
        );

        let bytes = mnist_like([1, 1, 1], |_, labels| labels[0] = 12);
        assert!(problem(&bytes).contains("label 12"), "{}", problem(&bytes));
    }

    #[test]
    fn rejects_unknown_opcodes_and_truncation() {
        let bytes = mnist_like([1, 1, 1], |_, _| {});
        let mut unknown = bytes.clone();
        unknown.insert(2, b'}'); // EMPTY_DICT
        let message = problem(&unknown);
        assert!(message.contains("opcode 0x7d at offset 2"), "{message}");

        let message = problem(&bytes[..bytes.len() / 2]);
        assert!(message.contains("bytes needed"), "{message}");
    }

    #[test]
    fn rejects_wrong_structure() {
        let mut w = Writer::default();
        w.op(0x80).op(2).int(1).int(2).op(0x86).op(b'.');
        assert!(problem(&w.bytes).contains("3 (images, labels) pairs"));

        let mut w = Writer::default();
        w.op(0x80).op(2).op(b'(').op(0x86);
        assert!(problem(&w.bytes).contains("more items than the stack"));
    }
}
