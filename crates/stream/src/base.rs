//! Where a stream stops: the base layer, and the backing link the top image
//! gets when streaming completes.

use std::any::Any;
use std::path::Path;
use std::sync::Arc;

use image::device::chain;
use image::open::{is_uri, resolve_backing_path};
use image::{BackingSpec, BlockDevice, Error, Image, Result};

/// The layer streaming stops at.
#[derive(Clone, Debug, Default)]
pub struct Base {
    /// Depth of the base in the top image's chain (1 = its backing); `None`
    /// streams everything and leaves the image without a backing.
    pub depth: Option<u32>,
    /// The link written into the top image on completion.
    pub link: Option<(BackingSpec, Arc<dyn BlockDevice>)>,
}

fn as_image(dev: &Arc<dyn BlockDevice>) -> Option<&Image> {
    (&**dev as &dyn Any).downcast_ref::<Image>()
}

/// Finds `base` (a path of an image in `top`'s chain; `None` = no base) and
/// the backing link `top` will carry: the name the layer above the base
/// recorded, made absolute when it is a relative path.
pub fn resolve_base(top: &Arc<Image>, base: Option<&Path>) -> Result<Base> {
    let Some(base) = base else {
        return Ok(Base::default());
    };
    let top_dev: Arc<dyn BlockDevice> = top.clone();
    let layers = chain(top_dev);
    let wanted = std::fs::canonicalize(base).map_err(|e| Error::io(base, "resolve base", e))?;
    for depth in 1..layers.len() {
        let dev = &layers[depth];
        let same = as_image(dev).is_some_and(|img| {
            std::fs::canonicalize(img.format().storage().path())
                .ok()
                .as_ref()
                == Some(&wanted)
        });
        if !same {
            continue;
        }
        let above = as_image(&layers[depth - 1]).ok_or_else(|| {
            Error::InvalidInput(format!(
                "{}: layer above the base is not an image",
                base.display()
            ))
        })?;
        let mut spec = above.backing_spec().ok_or_else(|| {
            Error::Internal(format!(
                "{}: image has a backing but no backing link",
                above.info().name
            ))
        })?;
        if !is_uri(&spec.name) {
            let path = resolve_backing_path(above.format().storage().path(), &spec.name);
            spec.name = std::fs::canonicalize(&path)
                .unwrap_or(path)
                .display()
                .to_string();
        }
        return Ok(Base {
            depth: Some(depth as u32),
            link: Some((spec, Arc::clone(dev))),
        });
    }
    Err(Error::InvalidInput(format!(
        "{}: not in the backing chain of {}",
        base.display(),
        top.info().name
    )))
}
