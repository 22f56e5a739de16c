"""A small real image-text collection for the bring-your-own-data test, built from Debian's Tango icons.

`tango-icon-theme` (installed by `make sysdeps`) ships 214 icons in 9 freedesktop categories, each drawn
by hand at 16, 22, 24 and 32 px (the 32 px drawings have more detail than the small ones; 24 px is
mostly the 22 px drawing with a 1 px border). An icon's file name and category make its caption:
`document-save-as.png` under `actions/` → "document save as, an action icon".

`build_icon_corpus(root)` writes what a user would have after crawling such pairs with img2dataset and
labelling a test folder by hand, and nothing scalelab-specific (no manifest, no tokenizer):
- `root/train/`: the 16, 22 and 24 px drawings (642 pairs) as img2dataset writes them — `00000.tar`, …
  with `{key}.jpg` (alpha composited on white, JPEG quality 95, as img2dataset's resizer does),
  `{key}.txt`, `{key}.json`, plus the per-shard `.parquet` metadata and `_stats.json` files — and three
  bad samples a crawl or a hand edit leaves behind (a cut-off JPEG, an empty caption, a missing caption);
- `root/heldout/`: the 32 px drawings (214 pairs, captions unique) in the same layout: images the
  model never saw, of icons whose captions it did see — retrieval among the 214 must find each one's
  caption, chance R@k = k/214;
- `root/zeroshot/`: the same 32 px drawings as an ImageFolder by category, OpenAI-style templates
  (`a {} icon.`) and no classnames.txt (the folder names are the class names: `file_type` → "file type");
- `root/zeroshot_c/`: the same images with `classnames.txt` and CLIP_benchmark-style `{c}` templates.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

TANGO_PACKAGE = "tango-icon-theme"
TANGO_DIR = Path("/usr/share/icons/Tango")
TRAIN_SIZES = ("16x16", "22x22", "24x24")
HELDOUT_SIZE = "32x32"
# Tango category folder -> the class name used in captions and for zero-shot (`animations` holds one
# sprite sheet, not an icon, and is left out).
CATEGORIES = {
    "actions": "action",
    "apps": "application",
    "categories": "category",
    "devices": "device",
    "emblems": "emblem",
    "emotes": "emoticon",
    "mimetypes": "file type",
    "places": "place",
    "status": "status",
}
TEMPLATES = ("a {} icon.", "an {} icon.", "the {} icon.", "{}, an icon.")
SAMPLES_PER_SHARD = 256
BAD_SAMPLES = {"undecodable_image": 1, "empty_caption": 1, "missing_caption": 1}


@dataclass(frozen=True)
class Icon:
    category: str  # Tango folder name
    name: str  # file stem

    @property
    def classname(self) -> str:
        return CATEGORIES[self.category]

    @property
    def caption(self) -> str:
        words = self.name.replace("-", " ").replace("_", " ").lower()
        article = "an" if self.classname[0] in "aeiou" else "a"
        return f"{words}, {article} {self.classname} icon"

    def path(self, size: str, theme: Path = TANGO_DIR) -> Path:
        return theme / size / self.category / f"{self.name}.png"


@dataclass(frozen=True)
class IconCorpus:
    """Where build_icon_corpus wrote each part, and the counts a test checks against."""

    root: Path
    train: Path
    heldout: Path
    zeroshot: Path
    zeroshot_c: Path
    n_train: int  # good training pairs
    n_heldout: int  # held-out pairs (= zero-shot images)
    class_counts: dict[str, int]  # held-out images per class name


def list_icons(theme: Path = TANGO_DIR) -> list[Icon]:
    """Icons drawn at every size used here (real files only: Tango's symlinks are alias names)."""
    icons = []
    for category in CATEGORIES:
        for path in sorted((theme / HELDOUT_SIZE / category).glob("*.png")):
            icon = Icon(category, path.stem)
            sizes = [icon.path(s, theme) for s in (*TRAIN_SIZES, HELDOUT_SIZE)]
            if all(p.is_file() and not p.is_symlink() for p in sizes):
                icons.append(icon)
    return icons


def rgb_on_white(path: Path) -> Image.Image:
    """The icon's pixels composited on white (transparent pixels would otherwise keep arbitrary RGB)."""
    with Image.open(path) as img:
        rgba = img.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, "white")
    canvas.alpha_composite(rgba)
    return canvas.convert("RGB")


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def build_icon_corpus(root: str | Path, theme: Path = TANGO_DIR, seed: int = 0) -> IconCorpus:
    """Write the parts described in the module docstring under `root`; FileNotFoundError without Tango."""
    if not (theme / HELDOUT_SIZE).is_dir():
        raise FileNotFoundError(f"{theme} missing: apt-get install {TANGO_PACKAGE} (`make sysdeps` as root)")
    root = Path(root)
    icons = list_icons(theme)
    captions = [icon.caption for icon in icons]
    if len(set(captions)) != len(captions):  # retrieval needs one positive per query
        raise ValueError("two icons share a caption")
    train = [(icon, size) for icon in icons for size in TRAIN_SIZES]
    random.Random(seed).shuffle(train)  # a crawl's URL list is in no particular order
    _write_img2dataset(root / "train", [(icon.path(s, theme), icon.caption) for icon, s in train], bad=True)
    _write_img2dataset(root / "heldout", [(icon.path(HELDOUT_SIZE, theme), icon.caption) for icon in icons])
    counts: dict[str, int] = {}
    for folder, curly in (("zeroshot", "{}"), ("zeroshot_c", "{c}")):
        out = root / folder
        for icon in icons:
            target = out / icon.classname.replace(" ", "_") / f"{icon.name}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            rgb_on_white(icon.path(HELDOUT_SIZE, theme)).save(target)
            if folder == "zeroshot":
                counts[icon.classname] = counts.get(icon.classname, 0) + 1
        (out / "templates.txt").write_text("".join(t.replace("{}", curly) + "\n" for t in TEMPLATES))
    classnames = sorted(CATEGORIES.values(), key=lambda c: c.replace(" ", "_"))  # sorted folder order
    (root / "zeroshot_c" / "classnames.txt").write_text("".join(f"{c}\n" for c in classnames))
    return IconCorpus(root, root / "train", root / "heldout", root / "zeroshot", root / "zeroshot_c",
                      n_train=len(train), n_heldout=len(icons), class_counts=counts)


# --------------------------------------------------------------------------- img2dataset's layout
def _write_img2dataset(out: Path, pairs: list[tuple[Path, str]], bad: bool = False) -> None:
    """Shards as img2dataset writes them (`--output_format webdataset --encode_format jpg`): keys are
    shard id + index (`000010003`), and each tar has a metadata `.parquet` and `_stats.json` beside it.
    With `bad`, three bad samples go into the second shard (see BAD_SAMPLES)."""
    out.mkdir(parents=True)
    rows = [(_jpeg(rgb_on_white(path)), caption, path) for path, caption in pairs]
    shards = [rows[i:i + SAMPLES_PER_SHARD] for i in range(0, len(rows), SAMPLES_PER_SHARD)]
    for shard_id, shard in enumerate(shards):
        samples = [(jpg, caption.encode(), path) for jpg, caption, path in shard]
        if bad and shard_id == min(1, len(shards) - 1):
            jpg, _, path = samples[0]
            samples[3:3] = [
                (jpg[:40], b"document print, an action icon", path),  # a download cut short
                (jpg, b"", path),  # alt-text that was empty
                (jpg, None, path),  # a caption lost on the way
            ]
        _write_shard(out, shard_id, samples)


def _write_shard(out: Path, shard_id: int, samples: list[tuple[bytes, bytes | None, Path]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta_rows = []
    with tarfile.open(out / f"{shard_id:05d}.tar", "w") as tf:
        for i, (jpg, caption, path) in enumerate(samples):
            key = f"{shard_id:05d}{i:04d}"
            with Image.open(path) as img:
                width, height = img.size
            meta = {"url": path.as_uri(), "key": key, "status": "success", "error_message": None,
                    "width": width, "height": height, "original_width": width, "original_height": height,
                    "caption": None if caption is None else caption.decode(),
                    "sha256": hashlib.sha256(jpg).hexdigest()}
            members = [("jpg", jpg), ("json", json.dumps(meta).encode())]
            if caption is not None:
                members.insert(1, ("txt", caption))
            for ext, data in members:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            meta_rows.append(meta)
    pq.write_table(pa.Table.from_pylist(meta_rows), out / f"{shard_id:05d}.parquet")
    stats = {"count": len(samples), "successes": len(samples), "failed_to_download": 0,
             "failed_to_resize": 0, "status_dict": {"success": len(samples)}}
    (out / f"{shard_id:05d}_stats.json").write_text(json.dumps(stats, indent=2))
