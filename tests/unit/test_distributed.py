"""Pure parts of several training processes (lora_trainer.launch, lora_trainer.distributed).

Behaviours tested:
- launch_plan: a world of one (or an existing worker) trains itself; LORA_NPROC_PER_NODE ×
  LORA_NNODES > 1 plans a launch (one pod: 127.0.0.1 and a free port; a group: the leader's
  address, required); bad values are ConfigErrors naming the variable;
- most_telling_exit: a 64-78 code but 75 beats a failure, a failure beats 75, 75 beats a signal,
  a signal beats 0; a stopped launcher counts killed workers as preempted;
- ShardedStream: rank r reads the r-th batch_size of each global batch of the one seeded order a
  single process reads, and every rank's position is the same after each batch;
- every real stream's advance() moves its position exactly as reading the batch does;
- check_world_size: the same size passes, another is ResumeRefused (65) naming both, unless allowed;
- the world of one is a no-op (seeds, streams) so a single process trains as before;
- spec.training.allowWorldSizeChange maps to the trainer's allow_world_size_change.
"""

from __future__ import annotations

import signal

import pytest

from lora_trainer import contract
from lora_trainer.data import Position
from lora_trainer.distributed import SINGLE, ShardedStream, check_world_size
from lora_trainer.errors import ConfigError, ResumeRefused
from lora_trainer.launch import LaunchPlan, launch_plan, most_telling_exit

NPROC, NNODES, RANK, ADDR, PORT = (contract.ENV_NPROC_PER_NODE, contract.ENV_NNODES, contract.ENV_NODE_RANK,
                                   contract.ENV_MASTER_ADDR, contract.ENV_MASTER_PORT)


@pytest.mark.parametrize(("env", "plan"), [
    ({}, None),
    ({NPROC: "1"}, None),
    ({NPROC: "4", "RANK": "0", "WORLD_SIZE": "4"}, None),  # already a worker (ours, or a user's torchrun)
    ({NPROC: "2"}, LaunchPlan(2, 1, 0, "127.0.0.1", 0)),
    ({NPROC: "2", PORT: "29400"}, LaunchPlan(2, 1, 0, "127.0.0.1", 29400)),
    ({NPROC: "8", NNODES: "2", RANK: "1", ADDR: "job-0.job"}, LaunchPlan(8, 2, 1, "job-0.job", 29500)),
    ({NNODES: "2", RANK: "0", ADDR: "job-0.job", PORT: "1234"}, LaunchPlan(1, 2, 0, "job-0.job", 1234)),
])
def test_launch_plan(env: dict[str, str], plan: LaunchPlan | None) -> None:
    assert launch_plan(env) == plan


@pytest.mark.parametrize(("env", "named"), [
    ({NPROC: "0"}, NPROC),
    ({NPROC: "two"}, NPROC),
    ({NNODES: "2", RANK: "2", ADDR: "a"}, RANK),
    ({NNODES: "2", RANK: "1"}, ADDR),
    ({NPROC: "2", PORT: "70000"}, PORT),
])
def test_launch_plan_refuses_bad_values(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        launch_plan(env)


KILL, TERM = -signal.SIGKILL, -signal.SIGTERM


@pytest.mark.parametrize(("codes", "signaled", "chosen"), [
    ({0: 0, 1: 0}, False, (0, 0)),
    ({0: 75, 1: 75}, True, (0, 75)),
    ({0: 1, 1: 71}, False, (1, 71)),  # rank 1 ran out of memory; rank 0 only saw its peer vanish
    ({0: 65, 1: 1}, False, (0, 65)),
    ({0: 75, 1: 3}, False, (1, 3)),
    ({0: 75, 1: KILL}, False, (0, 75)),
    ({0: 0, 1: KILL}, False, (1, 137)),
    ({0: None, 1: 0}, False, (0, 137)),  # no report: killed
    ({0: 75, 1: None}, True, (0, 75)),
    ({0: TERM, 1: None}, True, (0, 75)),  # stopped at start-up, before any handler
    ({0: 78, 1: 73}, False, (0, 78)),  # two documented codes: the lowest rank
])
def test_most_telling_exit(codes: dict[int, int | None], signaled: bool, chosen: tuple[int, int]) -> None:
    assert most_telling_exit(codes, signaled) == chosen


class Counting:
    """A stream over sample numbers 0..n-1 in order, epochs wrapping (data.BatchStream's position rules)."""

    def __init__(self, n: int):
        self.n, self.position, self.loaded = n, Position(), 0

    def next_samples(self, batch_size: int) -> list[tuple[int, int]]:
        out, pos = [], self.position
        for _ in range(batch_size):
            pos = pos.advanced(1, self.n)
            out.append((pos.epoch, pos.index - 1))
        self.position, self.loaded = pos, self.loaded + batch_size
        return out

    def advance(self, batch_size: int) -> None:
        self.position = self.position.advanced(batch_size, self.n)


def test_sharded_stream_splits_the_global_order() -> None:
    alone = Counting(7)
    global_batches = [alone.next_samples(6) for _ in range(3)]  # batch_size 3 × 2 ranks
    ranks = [ShardedStream(Counting(7), rank, 2) for rank in range(2)]
    for batch in global_batches:
        parts = [r.next_samples(3) for r in ranks]
        assert parts[0] + parts[1] == batch
        assert ranks[0].position == ranks[1].position
    assert [r.stream.loaded for r in ranks] == [9, 9]  # each rank loads only its share
    assert ranks[0].position == alone.position


def test_a_world_of_one_changes_nothing() -> None:
    stream = Counting(3)
    assert SINGLE.shard(stream) is stream
    assert SINGLE.step_seed(7, 1, 0) == (7, 1, 0)
    assert SINGLE.any(True) and not SINGLE.any(False)
    assert SINGLE.broadcast_int(5) == 5


def test_world_size_rule() -> None:
    check_world_size(10, 2, 2, allow=False)
    with pytest.raises(ResumeRefused, match=r"made by 2 training process\(es\), this run has 4") as err:
        check_world_size(10, 2, 4, allow=False)
    assert err.value.exit_code == 65 and "allow_world_size_change" in err.value.message
    check_world_size(10, 2, 4, allow=True)  # allowed: a warning, no error


def test_crd_opt_in_reaches_the_trainer_config() -> None:
    from lora_operator.spec import parse_spec, to_train_config
    from tests.unit.test_spec import MINIMAL_SPEC

    assert not to_train_config(parse_spec(MINIMAL_SPEC)).allow_world_size_change
    spec = {**MINIMAL_SPEC, "training": {**MINIMAL_SPEC.get("training", {}), "allowWorldSizeChange": True}}
    assert to_train_config(parse_spec(spec)).allow_world_size_change


def real_streams(tmp_path) -> list:
    """The three real streams (square images, buckets, text), each over 7 samples."""
    from PIL import Image

    from lora_trainer.buckets import BucketStream, bucket_resolutions
    from lora_trainer.data import BatchStream, Sample
    from lora_trainer.textdata import Example, TextStream

    samples = []
    for i, (w, h) in enumerate([(64, 32), (32, 64), (48, 48), (80, 40), (40, 80), (64, 64), (96, 30)]):
        Image.new("RGB", (w, h), (i * 30, 90, 90)).save(tmp_path / f"{i}.png")
        samples.append(Sample(tmp_path / f"{i}.png", f"image {i}"))
    return [BatchStream(samples, 32, True, False, seed=3),
            BucketStream(samples, bucket_resolutions(32, 16, 64, 16), 2, True, False, seed=3),
            TextStream([Example((i, i + 1), (i, i + 1)) for i in range(7)], pad_id=0, seed=3)]


def test_advance_moves_each_real_stream_as_reading_does(tmp_path) -> None:
    for read, skipped in zip(real_streams(tmp_path), real_streams(tmp_path), strict=True):
        for _ in range(9):  # past an epoch's end
            read.next_samples(2)
            skipped.advance(2)
            assert skipped.position == read.position, type(read).__name__
