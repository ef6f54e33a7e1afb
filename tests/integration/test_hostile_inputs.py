"""Hostile and broken inputs (issue 18): each ends with its documented exit code and one line.

Every row of the table runs `lora-train` (its `main`, in-process: the subprocess rows below show
the same on a real stderr) and asserts
- the exit code, and the one-line message naming the field or file (no traceback logged);
- that nothing was created, changed or deleted outside the output and the cache (a snapshot of
  the test's folder, a sentinel in a user's work_dir, no ESCAPED.txt from a hostile S3 key).

Behaviours:
- S3 keys with `..` or a leading `/`, `x` beside `x/y`: refused (65 dataset, 66 model), nothing written;
- `s3://bucket/../x`: 78 naming the field; output_dir equal to / inside an input: 78;
- work_dir: an unmarked non-empty folder is refused (78) and kept; work_dir == output_dir: 78;
- output_dir that is a file: 78; `--set seed=[unclosed`: 78; a YAML alias bomb: 78, fast;
- dataset: a 100000x100000 PNG header, non-UTF-8 CSV, a 1 MB caption, a duplicate row, a symlink
  out of the folder, a metadata_path outside it: 65 naming the file;
- a missing bucket: 77 (StorageRejected); a hanging endpoint: 3 within storage_retry_seconds + a margin;
- resume: latest.json naming a vanished step with no other checkpoint: 65; a checkpoint whose
  manifest verifies but whose state does not load, or names an absurd step, falls back to the
  previous one with a warning; none usable: 65.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lora_trainer import contract
from lora_trainer.checkpoint import MANIFEST_FILE, Manifest, sha256_file
from lora_trainer.cli import main
from lora_trainer.errors import (
    EXIT_CONFIG,
    EXIT_DATAERR,
    EXIT_NOINPUT,
    EXIT_NOPERM,
    EXIT_OK,
    EXIT_STORAGE,
)
from lora_trainer.workdir import MARKER
from tests.support.s3 import S3Env

# ---- helpers ------------------------------------------------------------------------------------


@dataclass
class Case:
    """One hostile input: how to arrange it, the exit code and a needle of the one-line message."""

    name: str
    code: int
    needle: str
    arrange: Callable[[Path, dict[str, Any]], Any]
    argv: list[str] = field(default_factory=list)
    s3: bool = False


def snapshot(root: Path, skip: tuple[Path, ...]) -> dict[str, str]:
    """sha256 of every file under root (symlinks as their target), outside the `skip` folders."""
    out = {}
    for path in sorted(root.rglob("*")):
        if any(path == s or s in path.parents for s in skip):
            continue
        if path.is_symlink():
            out[path.relative_to(root).as_posix()] = f"-> {path.readlink()}"
        elif path.is_file():
            out[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with no pixel data (a decompression bomb's start)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def alias_bomb() -> str:
    """Billion laughs: 9 levels of 9 aliases each, a few hundred bytes, under an unknown key."""
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        lines.append(f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\nbogus_key: *l8\n"


def put_objects(s3: S3Env, objects: dict[str, bytes]) -> None:
    client = s3.client()
    for key, body in objects.items():
        client.put_object(Bucket=s3.bucket, Key=key, Body=body)


def dataset_objects(data: Path, prefix: str) -> dict[str, bytes]:
    return {f"{prefix}/{p.name}": p.read_bytes() for p in sorted(data.iterdir())}


# ---- arrangements (each returns extra asserts to run after, or None) ------------------------------

def _dotdot_key(tmp: Path, cfg: dict[str, Any]) -> None:
    s3: S3Env = cfg.pop("_s3")
    escape = "../" * 40 + str(tmp).lstrip("/") + "/ESCAPED.txt"
    put_objects(s3, {**dataset_objects(Path(cfg["train_data_dir"]), "evilds"), f"evilds/{escape}": b"x"})
    cfg["train_data_dir"] = s3.uri("evilds")


def _absolute_key(tmp: Path, cfg: dict[str, Any]) -> None:
    s3: S3Env = cfg.pop("_s3")
    put_objects(s3, {**dataset_objects(Path(cfg["train_data_dir"]), "evilds"), f"evilds/{tmp}/ABSOLUTE.txt": b"x"})
    cfg["train_data_dir"] = s3.uri("evilds")


def _file_and_folder(tmp: Path, cfg: dict[str, Any]) -> None:
    s3: S3Env = cfg.pop("_s3")
    model = Path(cfg["base_model"])
    objects = {f"model/{p.relative_to(model).as_posix()}": p.read_bytes() for p in model.rglob("*") if p.is_file()}
    put_objects(s3, {**objects, "model/x": b"file", "model/x/y": b"file below it"})
    cfg["base_model"] = s3.uri("model")


def _dotdot_uri(tmp: Path, cfg: dict[str, Any]) -> None:
    cfg["train_data_dir"] = "s3://bucket/../other/x"


def _no_bucket(tmp: Path, cfg: dict[str, Any]) -> None:
    cfg.pop("_s3")
    cfg["train_data_dir"] = "s3://no-such-bucket-here/data"


def _output_is_dataset(tmp: Path, cfg: dict[str, Any]) -> None:
    cfg["output_dir"] = str(Path(cfg["train_data_dir"]) / "out")


def _output_is_file(tmp: Path, cfg: dict[str, Any]) -> None:
    Path(cfg["output_dir"]).write_text("a file the user keeps")


def _work_is_output(tmp: Path, cfg: dict[str, Any]) -> None:
    cfg["work_dir"] = cfg["output_dir"]


def _unmarked_work_dir(tmp: Path, cfg: dict[str, Any]) -> None:
    work = tmp / "mywork"
    work.mkdir()
    (work / "thesis.tex").write_text("years of work")
    cfg["work_dir"] = str(work)


def _bad_caption_extension(tmp: Path, cfg: dict[str, Any]) -> None:
    cfg["caption_extension"] = "../txt"


def _png_bomb(tmp: Path, cfg: dict[str, Any]) -> None:
    (Path(cfg["train_data_dir"]) / "bomb.png").write_bytes(png_header(100_000, 100_000))


def _over_pixel_cap(tmp: Path, cfg: dict[str, Any]) -> None:
    cfg["max_image_pixels"] = 32 * 32 - 1  # the tiny images are 32x32


def _non_utf8_csv(tmp: Path, cfg: dict[str, Any]) -> None:
    (Path(cfg["train_data_dir"]) / "metadata.csv").write_bytes("file_name,text\nimg_0000.png,caf\xe9\n".encode("latin-1"))


def _huge_caption(tmp: Path, cfg: dict[str, Any]) -> None:
    csv_path = Path(cfg["train_data_dir"]) / "metadata.csv"
    csv_path.write_text(csv_path.read_text() + "img_0001.png," + "a" * 1_000_000 + "\n")


def _duplicate_row(tmp: Path, cfg: dict[str, Any]) -> None:
    csv_path = Path(cfg["train_data_dir"]) / "metadata.csv"
    csv_path.write_text(csv_path.read_text() + "img_0003.png,another caption\n")


def _symlink_out(tmp: Path, cfg: dict[str, Any]) -> None:
    secret = tmp / "secret.png"
    shutil.copy(Path(cfg["train_data_dir"]) / "img_0000.png", secret)
    (Path(cfg["train_data_dir"]) / "zz_link.png").symlink_to(secret)


def _metadata_absolute(tmp: Path, cfg: dict[str, Any]) -> None:
    (tmp / "passwd").write_text("file_name,text\nimg_0000.png,root:x:0:0\n")
    cfg["metadata_path"] = str(tmp / "passwd")


def _metadata_dotdot(tmp: Path, cfg: dict[str, Any]) -> None:
    (tmp / "other.csv").write_text("file_name,text\nimg_0000.png,x\n")
    cfg["metadata_path"] = "../other.csv"


def _latest_without_step(tmp: Path, cfg: dict[str, Any]) -> None:
    out = Path(cfg["output_dir"])
    (out / "checkpoints").mkdir(parents=True)
    pointer = contract.LatestPointer(step=5, attempt=1, path="checkpoints/step-000000005")
    (out / contract.LATEST_FILE).write_text(pointer.model_dump_json())


def _alias_bomb(tmp: Path, cfg: dict[str, Any]) -> None:
    cfg["_yaml"] = alias_bomb()


CASES = [
    Case("s3 key with ..", EXIT_DATAERR, "has a '..' segment", _dotdot_key, s3=True),
    Case("s3 key absolute", EXIT_DATAERR, "is absolute", _absolute_key, s3=True),
    Case("s3 x and x/y", EXIT_NOINPUT, "objects 'x' and 'x/y' need 'x' to be a file and a folder", _file_and_folder, s3=True),
    Case("s3 uri with ..", EXIT_CONFIG, "train_data_dir: s3://bucket/../other/x has a '..' segment", _dotdot_uri),
    Case("no such bucket", EXIT_NOPERM, "the bucket does not exist", _no_bucket, s3=True),
    Case("output inside dataset", EXIT_CONFIG, "output_dir:", _output_is_dataset),
    Case("output is a file", EXIT_CONFIG, "is a file, not a folder", _output_is_file),
    Case("work_dir is output", EXIT_CONFIG, "work_dir:", _work_is_output),
    Case("work_dir unmarked", EXIT_CONFIG, f"has no {MARKER} marker", _unmarked_work_dir),
    Case("caption_extension", EXIT_CONFIG, "caption_extension: write a file extension", _bad_caption_extension),
    Case("png bomb", EXIT_DATAERR, "bomb.png is over max_image_pixels", _png_bomb),
    Case("over pixel cap", EXIT_DATAERR, "(32x32) is over max_image_pixels (1023)", _over_pixel_cap),
    Case("non-utf8 csv", EXIT_DATAERR, "metadata.csv: not UTF-8", _non_utf8_csv),
    Case("1 MB caption", EXIT_DATAERR, "metadata.csv: unreadable CSV", _huge_caption),
    Case("duplicate row", EXIT_DATAERR, "file_name 'img_0003.png' appears on lines", _duplicate_row),
    Case("symlink out", EXIT_DATAERR, "image zz_link.png resolves to", _symlink_out),
    Case("metadata absolute", EXIT_DATAERR, "metadata_path:", _metadata_absolute),
    Case("metadata ..", EXIT_DATAERR, "metadata_path: ../other.csv resolves outside", _metadata_dotdot),
    Case("latest without step", EXIT_DATAERR, "latest.json names step 5", _latest_without_step),
    Case("set unclosed", EXIT_CONFIG, "--set seed: not valid YAML", lambda t, c: None, argv=["--set", "seed=[unclosed"]),
    Case("yaml alias bomb", EXIT_CONFIG, "YAML refused", _alias_bomb),
]


@pytest.fixture
def s3_maybe(request: pytest.FixtureRequest) -> S3Env | None:
    return request.getfixturevalue("s3_env") if request.node.callspec.params["case"].s3 else None


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    """Run `lora-train --config` in-process; returns (exit code, ERROR lines, termination message)."""
    (tmp_path / "run").mkdir()
    term = tmp_path / "run/termination"
    monkeypatch.setenv(contract.ENV_TERMINATION_LOG, str(term))
    monkeypatch.delenv(contract.ENV_ATTEMPT, raising=False)

    def run(config_text: str, argv: list[str]) -> tuple[int, list[str], dict[str, Any]]:
        path = tmp_path / "run/config.yaml"
        path.write_text(config_text)
        caplog.clear()
        with caplog.at_level(logging.INFO):
            code = main(["--config", str(path), *argv])
        tracebacks = [r for r in caplog.records if r.exc_info]
        assert not tracebacks, f"a traceback was logged: {tracebacks[0].getMessage()}"
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        message = json.loads(term.read_text()) if term.exists() else {}
        return code, errors, message

    return run


def base_config(tmp: Path, tiny_sd: Path, tiny_data: Path) -> dict[str, Any]:
    data = tmp / "data"
    shutil.copytree(tiny_data, data)
    return {
        "base_model": str(tiny_sd), "train_data_dir": str(data), "output_dir": str(tmp / "out"),
        "cache_dir": str(tmp / "cache"), "resolution": 32, "lora_rank": 4, "batch_size": 2,
        "max_train_steps": 1, "storage_retry_seconds": 2,
    }


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_hostile_input(case: Case, s3_maybe: S3Env | None, runner, tmp_path: Path, tiny_sd: Path,
                       tiny_data: Path) -> None:
    cfg = base_config(tmp_path, tiny_sd, tiny_data)
    if s3_maybe is not None:
        cfg["_s3"] = s3_maybe
        cfg["s3"] = s3_maybe.s3.model_dump(mode="json")
    case.arrange(tmp_path, cfg)
    text = cfg.pop("_yaml", None) or json.dumps(cfg)
    allowed = (tmp_path / "out", tmp_path / "cache", tmp_path / "run")  # run/: config and termination log
    before = snapshot(tmp_path, allowed)
    started = time.monotonic()
    code, errors, message = runner(text, case.argv)
    assert code == case.code, errors
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert case.needle in errors[0], errors[0]
    assert len(errors[0]) < 1500, errors[0][:300]
    assert case.needle in message["message"]
    assert time.monotonic() - started < 60
    assert snapshot(tmp_path, allowed) == before, "files outside out/ and cache/ changed"
    assert not list(tmp_path.rglob("ESCAPED.txt")) and not list(tmp_path.rglob("ABSOLUTE.txt"))


def test_caption_extension_without_dot_is_normalised(runner, tmp_path: Path, tiny_sd: Path, tiny_data: Path) -> None:
    cfg = base_config(tmp_path, tiny_sd, tiny_data)
    data = Path(cfg["train_data_dir"])
    for row in (data / "metadata.csv").read_text().splitlines()[1:]:
        name, text = row.split(",", 1)
        (data / name).with_suffix(".txt").write_text(text)
    (data / "metadata.csv").unlink()
    code, errors, _ = runner(json.dumps({**cfg, "caption_extension": "txt"}), [])
    assert code == EXIT_OK, errors
    assert (tmp_path / "out" / contract.FINAL_WEIGHTS).is_file()


def test_marked_work_dir_is_cleaned_and_reused(runner, tmp_path: Path, tiny_sd: Path, tiny_data: Path) -> None:
    cfg = {**base_config(tmp_path, tiny_sd, tiny_data), "work_dir": str(tmp_path / "work")}
    assert runner(json.dumps(cfg), [])[0] == EXIT_OK
    assert (tmp_path / "work" / MARKER).is_file()
    (tmp_path / "work" / "leftover").write_text("from a killed attempt")
    assert runner(json.dumps({**cfg, "output_dir": str(tmp_path / "out2")}), [])[0] == EXIT_OK
    assert not (tmp_path / "work" / "leftover").exists()


# ---- a hanging store ----------------------------------------------------------------------------

@pytest.fixture
def hanging_endpoint() -> Iterator[str]:
    """A TCP server on 127.0.0.1 that accepts connections and never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_hanging_endpoint_exits_3_within_the_retry_budget(
    runner, hanging_endpoint: str, tmp_path: Path, tiny_sd: Path, tiny_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_EC2_METADATA_DISABLED": "true",
                        "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}.items():
        monkeypatch.setenv(name, value)
    retry = 3.0
    cfg = {**base_config(tmp_path, tiny_sd, tiny_data), "train_data_dir": "s3://bucket/data",
           "storage_retry_seconds": retry, "s3": {"endpoint_url": hanging_endpoint, "region": "us-east-1"}}
    started = time.monotonic()
    code, errors, _ = runner(json.dumps(cfg), [])
    elapsed = time.monotonic() - started
    assert code == EXIT_STORAGE, errors
    assert "fetching train_data_dir: storage still unavailable" in errors[-1]
    assert elapsed < retry + 5, elapsed  # was 295 s with storage_retry_seconds: 5


# ---- resume never restarts silently -------------------------------------------------------------

def _rewrite(folder: Path, name: str, content: bytes) -> None:
    """Replace a checkpoint file and re-sign the MANIFEST, so the folder still verifies."""
    (folder / name).write_bytes(content)
    manifest = Manifest.model_validate_json((folder / MANIFEST_FILE).read_text())
    files = dict(manifest.files)
    files[name] = files[name].model_copy(update={"sha256": sha256_file(folder / name), "size": len(content)})
    (folder / MANIFEST_FILE).write_bytes(manifest.model_copy(update={"files": files}).to_json())


@pytest.mark.parametrize(
    ("tamper", "why"),
    [
        (("optimizer.json", b"{not json"), "its state does not load (JSONDecodeError"),
        (("trainer_state.json", json.dumps({"step": 10**12, "epoch": 0, "index": 0}).encode()), "its state does not load"),
        (("trainer_state.json", json.dumps({"step": 3, "epoch": 0, "index": 2}).encode()), "says step 3, the folder is step 4"),
    ],
    ids=["bad-optimizer-json", "absurd-step", "step-mismatch"],
)
def test_unloadable_checkpoint_falls_back_then_refuses(
    tamper: tuple[str, bytes], why: str, runner, tmp_path: Path, tiny_sd: Path, tiny_data: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = {**base_config(tmp_path, tiny_sd, tiny_data), "max_train_steps": 4, "save_steps": 2, "keep_last": 0}
    assert runner(json.dumps(cfg), [])[0] == EXIT_OK
    out = tmp_path / "out"
    newest = out / "checkpoints/step-000000004"
    _rewrite(newest, *tamper)
    (out / contract.FINAL_WEIGHTS).unlink()
    longer = {**cfg, "max_train_steps": 6, "allow_config_change": True}
    code, errors, _ = runner(json.dumps(longer), [])
    assert code == EXIT_OK, errors
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("checkpoint step 4 is not usable" in w and why in w for w in warnings), warnings
    assert any("resumed from step 2" in r.getMessage() for r in caplog.records)
    # Every checkpoint unusable: exit 65 naming why, never a silent restart at step 0.
    for folder in (out / "checkpoints").glob("step-*"):
        _rewrite(folder, *tamper)
    code, errors, _ = runner(json.dumps(longer), [])
    assert code == EXIT_DATAERR, errors
    assert len(errors) == 1, errors
    assert why in errors[0], errors[0]


# ---- the same on a real stderr ------------------------------------------------------------------

@pytest.mark.parametrize(
    ("arrange", "extra", "code", "needle"),
    [
        ("bomb", [], EXIT_CONFIG, "YAML refused"),
        ("set", ["--set", "seed=[unclosed"], EXIT_CONFIG, "--set seed: not valid YAML"),
        ("png", [], EXIT_DATAERR, "bomb.png is over max_image_pixels"),
    ],
)
def test_subprocess_one_line(arrange: str, extra: list[str], code: int, needle: str, tmp_path: Path,
                             tiny_sd: Path, tiny_data: Path) -> None:
    cfg = base_config(tmp_path, tiny_sd, tiny_data)
    text = json.dumps(cfg)
    if arrange == "bomb":
        text = alias_bomb()
    elif arrange == "png":
        (Path(cfg["train_data_dir"]) / "bomb.png").write_bytes(png_header(100_000, 100_000))
    (tmp_path / "c.yaml").write_text(text)
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", contract.ENV_TERMINATION_LOG: str(tmp_path / "term")}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "lora_trainer", "--config", str(tmp_path / "c.yaml"), *extra],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(error_lines) == 1 and needle in error_lines[0], proc.stderr
    if arrange == "bomb":
        assert time.monotonic() - started < 30 and len(proc.stderr) < 2000
