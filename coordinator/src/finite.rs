//! The last guard before a number reaches a file: serde_json writes NaN and infinity as
//! `null`, which the plots and `--resume` then cannot read. Everything the coordinator writes
//! (`metrics.jsonl`, `progress.jsonl`, `summary.json`, checkpoint metadata, the resume
//! checkpoint's state) goes through [`non_finite_field`] first, and is refused with the
//! field's name rather than written with a hole in it. The workers' reports are checked
//! long before (`trainer.rs`), so this should never fire.

use serde::{Serialize, ser};
use std::fmt;

/// The path (`epochs[2].test_loss`) of the first NaN or infinite float in `value`, if any.
pub fn non_finite_field(value: &impl Serialize) -> Option<String> {
    let mut finder = Finder { path: Vec::new() };
    match value.serialize(&mut finder) {
        Ok(()) => None,
        Err(Stop::Found(path)) => Some(path),
        // Something serde_json would refuse as well (a map with non-string keys): not ours
        // to judge here.
        Err(Stop::Other(_)) => None,
    }
}

/// Walks a value, keeping the path to where it is.
struct Finder {
    path: Vec<String>,
}

impl Finder {
    fn float(&mut self, value: f64) -> Result<(), Stop> {
        if value.is_finite() {
            return Ok(());
        }
        let mut path = String::new();
        for part in &self.path {
            if !part.starts_with('[') && !path.is_empty() {
                path.push('.');
            }
            path.push_str(part);
        }
        Err(Stop::Found(if path.is_empty() {
            "the value".into()
        } else {
            path
        }))
    }

    fn at<T: Serialize + ?Sized>(&mut self, part: String, value: &T) -> Result<(), Stop> {
        self.path.push(part);
        value.serialize(&mut *self)?;
        self.path.pop();
        Ok(())
    }
}

#[derive(Debug)]
enum Stop {
    Found(String),
    Other(String),
}

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stop::Found(path) => write!(f, "{path} is not finite"),
            Stop::Other(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for Stop {}

impl ser::Error for Stop {
    fn custom<T: fmt::Display>(message: T) -> Self {
        Stop::Other(message.to_string())
    }
}

/// Sequences and maps: each element under its index (map values under their key's index,
/// keys are not floats worth naming).
struct Elements<'a> {
    finder: &'a mut Finder,
    index: usize,
}

impl Elements<'_> {
    fn next<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Stop> {
        let part = format!("[{}]", self.index);
        self.index += 1;
        self.finder.at(part, value)
    }
}

macro_rules! elements {
    ($($trait:ident :: $method:ident),*) => {$(
        impl ser::$trait for Elements<'_> {
            type Ok = ();
            type Error = Stop;
            fn $method<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Stop> {
                self.next(value)
            }
            fn end(self) -> Result<(), Stop> {
                Ok(())
            }
        }
    )*};
}

elements!(
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field
);

impl ser::SerializeMap for Elements<'_> {
    type Ok = ();
    type Error = Stop;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, _key: &T) -> Result<(), Stop> {
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Stop> {
        self.next(value)
    }
    fn end(self) -> Result<(), Stop> {
        Ok(())
    }
}

/// Structs: each field under its name.
struct Fields<'a>(&'a mut Finder);

macro_rules! fields {
    ($($trait:ident),*) => {$(
        impl ser::$trait for Fields<'_> {
            type Ok = ();
            type Error = Stop;
            fn serialize_field<T: Serialize + ?Sized>(
                &mut self,
                name: &'static str,
                value: &T,
            ) -> Result<(), Stop> {
                self.0.at(name.to_string(), value)
            }
            fn end(self) -> Result<(), Stop> {
                Ok(())
            }
        }
    )*};
}

fields!(SerializeStruct, SerializeStructVariant);

macro_rules! ignore {
    ($($method:ident($type:ty)),*) => {$(
        fn $method(self, _value: $type) -> Result<(), Stop> {
            Ok(())
        }
    )*};
}

impl<'a> ser::Serializer for &'a mut Finder {
    type Ok = ();
    type Error = Stop;
    type SerializeSeq = Elements<'a>;
    type SerializeTuple = Elements<'a>;
    type SerializeTupleStruct = Elements<'a>;
    type SerializeTupleVariant = Elements<'a>;
    type SerializeMap = Elements<'a>;
    type SerializeStruct = Fields<'a>;
    type SerializeStructVariant = Fields<'a>;

    ignore!(
        serialize_bool(bool),
        serialize_i8(i8),
        serialize_i16(i16),
        serialize_i32(i32),
        serialize_i64(i64),
        serialize_u8(u8),
        serialize_u16(u16),
        serialize_u32(u32),
        serialize_u64(u64),
        serialize_char(char),
        serialize_str(&str),
        serialize_bytes(&[u8])
    );

    fn serialize_f32(self, value: f32) -> Result<(), Stop> {
        self.float(f64::from(value))
    }
    fn serialize_f64(self, value: f64) -> Result<(), Stop> {
        self.float(value)
    }
    fn serialize_none(self) -> Result<(), Stop> {
        Ok(())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), Stop> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<(), Stop> {
        Ok(())
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<(), Stop> {
        Ok(())
    }
    fn serialize_unit_variant(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
    ) -> Result<(), Stop> {
        Ok(())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        value: &T,
    ) -> Result<(), Stop> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), Stop> {
        self.at(variant.to_string(), value)
    }
    fn serialize_seq(self, _len: Option<usize>) -> Result<Elements<'a>, Stop> {
        Ok(Elements {
            finder: self,
            index: 0,
        })
    }
    fn serialize_tuple(self, _len: usize) -> Result<Elements<'a>, Stop> {
        self.serialize_seq(None)
    }
    fn serialize_tuple_struct(
        self,
        _name: &'static str,
        _len: usize,
    ) -> Result<Elements<'a>, Stop> {
        self.serialize_seq(None)
    }
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Elements<'a>, Stop> {
        self.serialize_seq(None)
    }
    fn serialize_map(self, _len: Option<usize>) -> Result<Elements<'a>, Stop> {
        self.serialize_seq(None)
    }
    fn serialize_struct(self, _name: &'static str, _len: usize) -> Result<Fields<'a>, Stop> {
        Ok(Fields(self))
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        _variant: &'static str,
        _len: usize,
    ) -> Result<Fields<'a>, Stop> {
        Ok(Fields(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Epoch {
        epoch: u32,
        test_loss: f64,
        per_class: Option<Vec<f64>>,
        lr: f32,
    }

    #[derive(Serialize)]
    struct Run {
        name: String,
        epochs: Vec<Epoch>,
    }

    fn run(loss: f64, class: f64, lr: f32) -> Run {
        let epoch = |test_loss, per_class| Epoch {
            epoch: 1,
            test_loss,
            per_class,
            lr: 0.1,
        };
        Run {
            name: "job".into(),
            epochs: vec![
                epoch(0.5, None),
                Epoch {
                    lr,
                    ..epoch(loss, Some(vec![0.9, class]))
                },
            ],
        }
    }

    #[test]
    fn the_first_non_finite_float_is_named_by_its_path() {
        assert_eq!(non_finite_field(&run(0.4, 0.8, 0.1)), None);
        assert_eq!(
            non_finite_field(&run(f64::INFINITY, 0.8, 0.1)).as_deref(),
            Some("epochs[1].test_loss")
        );
        assert_eq!(
            non_finite_field(&run(0.4, f64::NAN, 0.1)).as_deref(),
            Some("epochs[1].per_class[1]")
        );
        assert_eq!(
            non_finite_field(&run(0.4, 0.8, f32::NEG_INFINITY)).as_deref(),
            Some("epochs[1].lr")
        );
        assert_eq!(non_finite_field(&f64::NAN).as_deref(), Some("the value"));
    }
}
