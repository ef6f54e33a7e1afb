"""The input policy's pure parts (issue 18): names, URIs, overlaps, bounded YAML, S3 timeouts, datasets.

- names with `..`, a leading `/`, NUL or backslash are refused; `a/./b//c` normalises to `a/b/c`;
- a listing with `x` and `x/y`, or two keys for one name, cannot become a folder;
- s3:// URIs normalise (`.`, `//`), `..` is refused, clean URIs keep their exact text (config hash);
- overlaps: equal / inside / contains, lexically and with symlinks resolved;
- the YAML loader refuses alias bombs and recursive aliases before building, and huge documents;
- messages echo at most ~200 characters of any value; `caption_extension: txt` means `.txt`;
- S3 client timeouts and attempts fit in half of storage_retry_seconds;
- datasets: BOM accepted, duplicate rows and non-UTF-8 sidecars refused, big images warned about.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from lora_trainer.config import (
    MAX_CONFIG_BYTES,
    S3Config,
    bounded_s3,
    load_yaml,
    parse_config,
    parse_yaml,
    short_repr,
)
from lora_trainer.data import check_dataset, read_captions
from lora_trainer.errors import ConfigError, DatasetError
from lora_trainer.paths import (
    is_inside,
    name_problem,
    normalise_name,
    normalise_s3_uri,
    overlap,
    s3_uri_problem,
    shorten,
    tree_problems,
)
from lora_trainer.workdir import MARKER, prepare_work_dir

BASE = {"base_model": "m", "train_data_dir": "d", "output_dir": "o", "max_train_steps": 1}


@pytest.mark.parametrize(
    ("name", "problem"),
    [("a/b.png", None), ("a/./b", None), ("", "is empty"), ("/etc/passwd", "is absolute"),
     ("../x", "'..'"), ("a/../../x", "'..'"), ("a\\..\\x", "backslash"), ("a\x00b", "NUL"), ("./", "is empty")],
)
def test_name_problem(name: str, problem: str | None) -> None:
    found = name_problem(name)
    assert (found is None) if problem is None else (problem in (found or "")), found


def test_normalise_name_and_tree_problems() -> None:
    assert normalise_name("a/./b//c") == "a/b/c"
    assert tree_problems(["a", "b/c", "b/d"]) == []
    problems = tree_problems(["x", "x/y", "a//b", "a/b", "../z"])
    assert any("'../z'" in p for p in problems)
    assert any("'x' and 'x/y'" in p for p in problems)
    assert any("'a//b' and 'a/b'" in p or "'a/b' and 'a//b'" in p for p in problems)


def test_s3_uris() -> None:
    assert normalise_s3_uri("s3://b/a/./b//c") == "s3://b/a/b/c"
    assert normalise_s3_uri("s3://models/sd15/") == "s3://models/sd15/"  # unchanged text: same config hash
    assert normalise_s3_uri("s3://b//a//") == "s3://b/a/"
    assert s3_uri_problem("s3://bucket/../other/x") and s3_uri_problem("s3://b/a/..")
    assert s3_uri_problem("s3://b/a..b/c") is None and s3_uri_problem("../local/ok") is None
    cfg = parse_config({**BASE, "train_data_dir": "s3://b/a/./b//c"})
    assert cfg.train_data_dir == "s3://b/a/b/c"
    with pytest.raises(ConfigError, match="base_model: s3://b/../x has a '..' segment"):
        parse_config({**BASE, "base_model": "s3://b/../x"})


def test_overlaps(tmp_path: Path) -> None:
    assert overlap("s3://b/x", "s3://b/x/") == "equal"
    assert overlap("s3://b/x/out", "s3://b/x") == "inside"
    assert overlap("s3://b/x", "s3://b/x/data") == "contains"
    assert overlap("s3://b/x", "s3://b/xy") is None and overlap("s3://b/x", "s3://c/x") is None
    assert overlap("/a/b", "/a/b/../b") == "equal"
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert overlap(str(tmp_path / "link/out"), str(tmp_path / "real")) is None
    assert overlap(str(tmp_path / "link/out"), str(tmp_path / "real"), resolve=True) == "inside"
    assert is_inside(tmp_path / "real", tmp_path / "link/x")
    assert not is_inside(tmp_path / "link", tmp_path / "x")


def test_config_overlaps_and_caption_extension() -> None:
    assert parse_config({**BASE, "caption_extension": "txt"}).caption_extension == ".txt"
    assert parse_config({**BASE, "caption_extension": ".caption"}).caption_extension == ".caption"
    for bad in ("../txt", "a/b", ".", "", "t" * 40):
        with pytest.raises(ConfigError, match="caption_extension"):
            parse_config({**BASE, "caption_extension": bad})
    for patch, needle in [({"output_dir": "d"}, "output_dir: d is the same place as train_data_dir"),
                          ({"output_dir": "m/lora"}, "output_dir: m/lora lies inside base_model"),
                          ({"output_dir": "."}, "output_dir: . contains train_data_dir"),
                          ({"work_dir": "o"}, "work_dir: o is the same place as output_dir"),
                          ({"work_dir": "d/w"}, "work_dir: d/w lies inside train_data_dir")]:
        with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
            parse_config({**BASE, **patch})


def test_yaml_bombs_are_refused_before_building() -> None:
    levels = ['a0: &a0 ["x","x","x","x","x","x","x","x","x"]']
    levels += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    with pytest.raises(ConfigError, match="YAML refused, over 100000 values"):
        parse_yaml("\n".join(levels), "c.yaml")
    with pytest.raises(ConfigError, match="recursive alias"):
        parse_yaml("x: &a [*a]", "c.yaml")
    with pytest.raises(ConfigError, match="characters, over the"):
        parse_yaml("x: " + "y" * MAX_CONFIG_BYTES, "c.yaml")
    with pytest.raises(ConfigError, match="nested too deeply"):
        parse_yaml("[" * 100_000, "c.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_yaml("[unclosed", "--set seed")
    assert load_yaml("a: &x [1, 2]\nb: *x") == {"a": [1, 2], "b": [1, 2]}


def test_messages_echo_bounded_values() -> None:
    assert len(short_repr("x" * 10**6)) < 260
    deep: list = ["y" * 1000] * 1000
    assert len(short_repr([deep] * 1000)) < 260
    assert shorten("abc", 2) == "ab...(1 more chars)"
    with pytest.raises(ConfigError) as info:
        parse_config({**BASE, "lora_rnak": "z" * 100_000, "target_modules": [[deep]] * 50})
    assert len(info.value.message) < 4000 and "more problems" in info.value.message


@pytest.mark.parametrize(
    ("retry", "read", "connect", "attempts"),
    [(300.0, 30.0, 5.0, 4), (5.0, 1.25, 0.625, 1), (1.0, 0.5, 0.5, 1), (3600.0, 30.0, 5.0, 8)],
)
def test_bounded_s3(retry: float, read: float, connect: float, attempts: int) -> None:
    s3 = bounded_s3(S3Config(endpoint_url="http://x"), retry)
    assert (s3.read_timeout, s3.connect_timeout, s3.max_attempts) == (read, connect, attempts)
    assert s3.endpoint_url == "http://x"


def _images(folder: Path, names: list[str], size: int = 40) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (size, size)).save(folder / name)


def test_csv_bom_accepted_duplicates_refused(tmp_path: Path) -> None:
    _images(tmp_path, ["a.png", "b.png"])
    (tmp_path / "metadata.csv").write_bytes("file_name,text\na.png,a cat\nb.png,a dog\n".encode("utf-8-sig"))
    assert read_captions(tmp_path, None, ".txt") == {"a.png": "a cat", "b.png": "a dog"}
    (tmp_path / "metadata.csv").write_text("file_name,text\na.png,a cat\nb.png,a dog\na.png,a cow\n")
    with pytest.raises(DatasetError, match="file_name 'a.png' appears on lines 2 and 4"):
        read_captions(tmp_path, None, ".txt")


def test_sidecar_and_metadata_path_policy(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _images(data, ["a.png"])
    (data / "a.txt").write_bytes(b"caf\xe9")
    with pytest.raises(DatasetError, match="a.txt: not UTF-8"):
        read_captions(data, None, ".txt")
    (tmp_path / "outside.txt").write_text("secret")
    (data / "a.txt").unlink()
    (data / "a.txt").symlink_to(tmp_path / "outside.txt")
    with pytest.raises(DatasetError, match="caption a.txt resolves to"):
        read_captions(data, None, ".txt")
    (data / "captions.csv").write_text("file_name,text\na.png,ok\n")
    assert read_captions(data, "captions.csv", ".txt") == {"a.png": "ok"}
    assert read_captions(data, str(data / "captions.csv"), ".txt") == {"a.png": "ok"}  # absolute, inside: fine
    with pytest.raises(DatasetError, match="metadata_path: /etc/passwd resolves outside"):
        read_captions(data, "/etc/passwd", ".txt")


def test_big_images_warn_and_over_cap_refused(tmp_path: Path) -> None:
    _images(tmp_path, ["a.png"], size=64)
    (tmp_path / "a.txt").write_text("x")
    report = check_dataset(tmp_path, 32, max_image_pixels=64 * 64 * 2)
    assert report.samples and any("64x64 is large" in w for w in report.warnings)
    with pytest.raises(DatasetError, match=r"a.png \(64x64\) is over max_image_pixels \(4095\)"):
        check_dataset(tmp_path, 32, max_image_pixels=64 * 64 - 1)


def test_work_dir_marker(tmp_path: Path) -> None:
    work = prepare_work_dir(tmp_path / "new")
    assert (work / MARKER).is_file()
    (work / "sub").mkdir()
    (work / "sub/f").write_text("x")
    (work / "link").symlink_to(tmp_path)  # cleaning unlinks a symlink, never follows it
    prepare_work_dir(work)
    assert [p.name for p in work.iterdir()] == [MARKER] and tmp_path.is_dir()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match=f"not empty and has no {MARKER} marker"):
        prepare_work_dir(mine)
    assert (mine / "keep.txt").read_text() == "mine" and not (mine / MARKER).exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        prepare_work_dir(tmp_path / "file")


def test_local_store_refuses_keys_out_of_its_folder(tmp_path: Path) -> None:
    from lora_trainer.storage import LocalStore, UnsafeKey

    store = LocalStore(tmp_path / "out")
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out/checkpoints").symlink_to(tmp_path / "elsewhere")
    for key in ("../x", "/etc/passwd", "checkpoints/latest.json"):
        with pytest.raises(UnsafeKey):
            store.put_bytes(key, b"x")
    assert not any((tmp_path / "elsewhere").iterdir())
    assert UnsafeKey("x").exit_code == 78
