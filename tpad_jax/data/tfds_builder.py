"""The item table as a TFDS ArrayRecord dataset (DIR/data/tfds/), written and read without TensorFlow.

One record per item row, in row order: row, item_id, title, category ("" when none), has_image and the
image as encoded PNG/JPEG bytes (a 1x1 black PNG for text-only items). Images keep their stored size;
the pipeline resizes them. TFDS only needs pillow for `Image` features fed encoded bytes (numpy input
would import TensorFlow), and `as_data_source` reads them back without it.
"""

import io
import shutil
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

SPLIT = "train"  # the one split: the whole item table


def item_table_dir(workdir):
    """Where the item table of a workdir lives."""
    return Path(workdir) / "data" / "tfds"


class TpadItems(tfds.core.GeneratorBasedBuilder):
    """The item table of a PreparedData; construct with `data=` to build, without it to read."""

    name = "tpad_items"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Item rows with encoded images."}

    def __init__(self, *, data=None, **kwargs):
        self._data = data
        super().__init__(file_format="array_record", **kwargs)

    def _info(self):
        features = tfds.features.FeaturesDict({
            "row": np.int32,
            "item_id": tfds.features.Text(),
            "title": tfds.features.Text(),
            "category": tfds.features.Text(),
            "has_image": np.bool_,
            "image": tfds.features.Image(shape=(None, None, 3)),
        })
        # Keep generation order so record i is item row i.
        return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)

    def _split_generators(self, dl_manager):
        if self._data is None:
            raise ValueError("TpadItems builds only when constructed with data=PreparedData")
        return {SPLIT: self._generate_examples()}

    def _generate_examples(self):
        data = self._data
        for row in range(data.num_items):
            image_path = data.image_paths[row] if data.has_image[row] else None
            yield row, {
                "row": row,
                "item_id": data.item_ids[row],
                "title": data.titles[row],
                "category": data.categories[row] or "",
                "has_image": bool(data.has_image[row]),
                "image": encoded_image(image_path, item_id=data.item_ids[row]),
            }


def encoded_image(path, *, item_id):
    """PNG/JPEG bytes of an RGB image file as stored (else converted by `to_rgb` and encoded as PNG).

    A missing `path` (None) gives a 1x1 black PNG, the stand-in of a text-only item.
    """
    if path is None:
        return _png(Image.new("RGB", (1, 1)))
    try:
        raw = Path(path).read_bytes()
        with Image.open(io.BytesIO(raw)) as image:
            if image.format in ("PNG", "JPEG") and image.mode == "RGB":
                return raw
            return _png(to_rgb(image))
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{path}: field 'image' of item {item_id!r}: cannot read the image ({error})") from error


def to_rgb(image):
    """`image` (any PIL mode) as 8-bit RGB: transparent pixels on white, wider samples scaled to 8 bits.

    PIL's own `convert("RGB")` clips 16-bit samples at 255 (a 16-bit grayscale photo turns white) and
    drops the alpha band, showing whatever colour transparent pixels hold (often black); product photos
    with a transparent background are meant to be seen on white.
    """
    if image.mode.startswith("I"):  # I;16* (16-bit PNG/TIFF) and I (older Pillow reads 16-bit PNG so)
        samples = np.asarray(image, np.float64) / 257.0
        image = Image.fromarray(np.clip(np.round(samples), 0, 255).astype(np.uint8))
    if image.has_transparency_data:
        white = Image.new("RGBA", image.size, "white")
        image = Image.alpha_composite(white, image.convert("RGBA"))
    return image.convert("RGB")


def build_item_table(data, workdir):
    """Writes the item table of `data` to DIR/data/tfds/ unless it is there for the same fingerprint.

    Returns:
      The table directory.
    """
    root = item_table_dir(workdir)
    stamp = root / "fingerprint.txt"
    if stamp.exists() and stamp.read_text() == data.fingerprint:
        return root
    shutil.rmtree(root, ignore_errors=True)
    tfds.display_progress_bar(False)  # a build takes seconds; its tqdm bars only clutter the logs
    TpadItems(data=data, data_dir=root).download_and_prepare()
    stamp.write_text(data.fingerprint)
    return root


def item_table(data, workdir):
    """Random-access source over the item table (built on first use): record i is item row i."""
    build_item_table(data, workdir)
    source = TpadItems(data_dir=item_table_dir(workdir)).as_data_source(split=SPLIT)
    if len(source) != data.num_items:
        raise ValueError(f"{item_table_dir(workdir)}: {len(source)} records for {data.num_items} items")
    return source


def _png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
