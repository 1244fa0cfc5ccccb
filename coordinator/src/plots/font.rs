use plotters::style::{
    FontStyle, IntoFont, TextStyle, register_font,
    text_anchor::{HPos, Pos, VPos},
};
use std::sync::Once;

/// The font family every plot's text names.
pub const FAMILY: &str = "sans-serif";

/// DejaVu Sans, embedded so that plots draw their text on machines without any fonts or
/// font libraries (see `assets/DejaVuSans-LICENSE.txt`).
static DEJAVU_SANS: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");

/// Makes [`FAMILY`] draw with the embedded font; plotters looks fonts up by name in a
/// process-wide table.
pub fn register() {
    static REGISTERED: Once = Once::new();
    REGISTERED.call_once(|| {
        let registered = register_font(FAMILY, FontStyle::Normal, DEJAVU_SANS).is_ok();
        assert!(registered, "the embedded font parses");
    });
}

/// Text of `size` pixels in [`FAMILY`], centred on the point it is drawn at.
pub fn centred(size: u32) -> TextStyle<'static> {
    TextStyle::from((FAMILY, size).into_font()).pos(Pos::new(HPos::Center, VPos::Center))
}
