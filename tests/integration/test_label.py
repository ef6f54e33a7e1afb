"""The auto-labeler against a real (tiny) BLIP model read from disk.

- images without a caption get one; metadata.csv lists every image.
- captions from an existing metadata.csv are kept, and so are its extra columns.
- captions from .txt sidecars are kept; new captions also get sidecars in that mode.
- overwrite re-captions everything.
- a missing model folder, a missing data folder, or a folder without images raises a LabelError.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from lora_trainer import tiny
from lora_trainer.errors import EXIT_NOINPUT
from lora_trainer.label import LabelError, LabelReport, ModelNotFound, NoImages, label_dataset


@pytest.fixture(scope="module")
def blip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.build_tiny_blip(tmp_path_factory.mktemp("blip") / "model")


def _rows(data: Path) -> dict[str, dict[str, str]]:
    with (data / "metadata.csv").open(newline="") as f:
        return {r["file_name"]: r for r in csv.DictReader(f)}


def _bare_dataset(path: Path, n: int = 4) -> Path:
    tiny.build_tiny_dataset(path, n=n, captions="txt")
    for txt in path.glob("*.txt"):
        txt.unlink()
    return path


def test_tiny_blip_captions_are_words(blip: Path) -> None:
    from PIL import Image
    from transformers import BlipForConditionalGeneration, BlipProcessor

    processor = BlipProcessor.from_pretrained(blip, local_files_only=True)
    model = BlipForConditionalGeneration.from_pretrained(blip, local_files_only=True)
    inputs = processor(images=[Image.new("RGB", (40, 50), (200, 30, 30))], return_tensors="pt")
    text = processor.batch_decode(model.generate(**inputs, max_new_tokens=5), skip_special_tokens=True)[0]
    assert len(text.split()) == 5 and set(text.split()) <= set(tiny.WORDS)


def test_labels_unlabeled_images(tmp_path: Path, blip: Path) -> None:
    data = _bare_dataset(tmp_path / "data")
    report = label_dataset(data, blip, max_new_tokens=6, batch_size=3)
    assert report == LabelReport(labeled=4, kept=0, total=4)
    rows = _rows(data)
    assert sorted(rows) == sorted(p.name for p in data.glob("*.png"))
    assert all(len(r["text"].split()) == 6 for r in rows.values())
    assert not list(data.glob("*.txt"))  # the folder did not use sidecars


def test_keeps_csv_captions_and_columns(tmp_path: Path, blip: Path) -> None:
    data = _bare_dataset(tmp_path / "data")
    names = sorted(p.name for p in data.glob("*.png"))
    with (data / "metadata.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "text", "source"])
        w.writerow([names[0], "my own caption", "hand"])
        w.writerow([names[1], "", "hand"])  # a blank caption counts as missing
    report = label_dataset(data, blip, max_new_tokens=4)
    assert report == LabelReport(labeled=3, kept=1, total=4)
    rows = _rows(data)
    assert rows[names[0]] == {"file_name": names[0], "text": "my own caption", "source": "hand"}
    assert rows[names[1]]["source"] == "hand" and rows[names[1]]["text"]
    assert list(rows)[:2] == names[:2]  # existing rows keep their place


def test_keeps_txt_captions(tmp_path: Path, blip: Path) -> None:
    data = tiny.build_tiny_dataset(tmp_path / "data", n=4, captions="txt")
    names = sorted(p.name for p in data.glob("*.png"))
    originals = {n: (data / n).with_suffix(".txt").read_text().strip() for n in names}
    (data / names[2]).with_suffix(".txt").unlink()
    report = label_dataset(data, blip, max_new_tokens=4)
    assert report == LabelReport(labeled=1, kept=3, total=4)
    rows = _rows(data)
    for n in (names[0], names[1], names[3]):
        assert rows[n]["text"] == originals[n]
        assert (data / n).with_suffix(".txt").read_text().strip() == originals[n]
    new_txt = (data / names[2]).with_suffix(".txt").read_text().strip()
    assert new_txt == rows[names[2]]["text"] and new_txt != originals[names[2]]


def test_overwrite(tmp_path: Path, blip: Path) -> None:
    data = tiny.build_tiny_dataset(tmp_path / "data", n=3, captions="csv")
    before = _rows(data)
    report = label_dataset(data, blip, overwrite=True, max_new_tokens=4)
    assert report == LabelReport(labeled=3, kept=0, total=3)
    after = _rows(data)
    assert after.keys() == before.keys()
    assert all(after[n]["text"] != before[n]["text"] for n in before)
    # A second run without overwrite has nothing to do and changes nothing.
    assert label_dataset(data, blip) == LabelReport(labeled=0, kept=3, total=3)
    assert _rows(data) == after


def test_errors(tmp_path: Path, blip: Path) -> None:
    data = tiny.build_tiny_dataset(tmp_path / "data", n=1)
    with pytest.raises(ModelNotFound, match="not found") as exc:
        label_dataset(data, tmp_path / "no-model")
    assert isinstance(exc.value, LabelError) and exc.value.exit_code == EXIT_NOINPUT
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(NoImages, match="no images"):
        label_dataset(empty, blip)
    with pytest.raises(NoImages, match="not found"):
        label_dataset(tmp_path / "missing", blip)
    not_blip = tmp_path / "not-blip"
    not_blip.mkdir()
    with pytest.raises(ModelNotFound, match="cannot load"):
        label_dataset(_bare_dataset(tmp_path / "bare", n=1), not_blip)
