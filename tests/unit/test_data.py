"""Dataset checks and the exact, resumable batch order."""

from pathlib import Path

import pytest
from PIL import Image

from lora_trainer.data import BatchStream, Position, check_dataset, derive_seed, epoch_order, read_captions
from lora_trainer.errors import EXIT_DATAERR, EXIT_NOINPUT, DatasetError, InputMissing


def make_images(folder: Path, names: list[str], size: int = 40) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (size, size + i), (i * 40 % 255, 80, 120)).save(folder / name)


def test_metadata_csv_captions(tmp_path: Path) -> None:
    make_images(tmp_path, ["a.png", "b.png"])
    (tmp_path / "metadata.csv").write_text("file_name,text\na.png,a cat\nb.png, a dog \n")
    report = check_dataset(tmp_path, 32)
    assert [(s.path.name, s.caption) for s in report.samples] == [("a.png", "a cat"), ("b.png", "a dog")]
    assert report.warnings == [] and report.fatal is None


def test_sidecar_captions_and_every_warning(tmp_path: Path) -> None:
    make_images(tmp_path, ["ok.png", "small.png", "nocap.png"])
    Image.new("RGB", (8, 8)).save(tmp_path / "small.png")
    (tmp_path / "ok.txt").write_text("fine")
    (tmp_path / "small.txt").write_text("tiny")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "corrupt.txt").write_text("broken")
    report = check_dataset(tmp_path, 32)
    assert [s.path.name for s in report.samples] == ["ok.png", "small.png"]
    text = report.summary()
    assert "corrupt.png: unreadable image" in text
    assert "nocap.png: no caption" in text
    assert "small.png: 8x8 is smaller than resolution 32" in text


@pytest.mark.parametrize(
    ("setup", "error", "code", "needle"),
    [
        ("missing", InputMissing, EXIT_NOINPUT, "is not a folder"),
        ("bad_csv", DatasetError, EXIT_DATAERR, "missing column(s) text"),
        ("bad_metadata_path", DatasetError, EXIT_DATAERR, "metadata_path"),
    ],
)
def test_fatal_dataset_problems(tmp_path: Path, setup: str, error: type, code: int, needle: str) -> None:
    folder, metadata = tmp_path / "d", None
    if setup != "missing":
        make_images(folder, ["a.png"])
    if setup == "bad_csv":
        (folder / "metadata.csv").write_text("file_name,caption\na.png,x\n")
    if setup == "bad_metadata_path":
        metadata = "captions.csv"
    with pytest.raises(error) as info:
        check_dataset(folder, 32, metadata)
    assert needle in str(info.value) and info.value.exit_code == code


def test_empty_dataset_is_fatal(tmp_path: Path) -> None:
    make_images(tmp_path, ["a.png"])
    report = check_dataset(tmp_path, 32)
    assert report.samples == [] and "no usable captioned images" in (report.fatal or "")


def test_read_captions_prefers_csv(tmp_path: Path) -> None:
    make_images(tmp_path, ["a.png"])
    (tmp_path / "a.txt").write_text("sidecar")
    (tmp_path / "metadata.csv").write_text("file_name,text\na.png,from csv\n")
    assert read_captions(tmp_path, None, ".txt") == {"a.png": "from csv"}


def test_epoch_order_is_a_seeded_permutation() -> None:
    assert sorted(epoch_order(10, 1, 0)) == list(range(10))
    assert epoch_order(10, 1, 0) == epoch_order(10, 1, 0)
    assert epoch_order(10, 1, 0) != epoch_order(10, 1, 1)
    assert derive_seed(1, 2) != derive_seed(2, 1)


def test_stream_resumes_exactly_from_a_position(tmp_path: Path) -> None:
    make_images(tmp_path, [f"{i}.png" for i in range(5)], size=48)
    (tmp_path / "metadata.csv").write_text("file_name,text\n" + "".join(f"{i}.png,img {i}\n" for i in range(5)))
    samples = check_dataset(tmp_path, 32).samples
    full = BatchStream(samples, 32, center_crop=False, random_flip=True, seed=3)
    batches = [full.next_batch(2) for _ in range(6)]  # crosses two epoch boundaries
    assert full.position == Position(epoch=2, index=2)
    resumed = BatchStream(samples, 32, center_crop=False, random_flip=True, seed=3)
    resumed.position = Position(epoch=1, index=1)
    first = BatchStream(samples, 32, center_crop=False, random_flip=True, seed=3)
    for _ in range(3):
        first.next_batch(2)
    assert first.position == Position(epoch=1, index=1)
    for expected in batches[3:]:
        images, captions = resumed.next_batch(2)
        assert captions == expected[1]
        assert images.equal(expected[0])
