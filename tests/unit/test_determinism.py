"""determinism: exact | fast.

- settings_for: nothing on the CPU in either mode; on CUDA exact sets every documented control
  (deterministic algorithms, cuBLAS workspace, cuDNN deterministic without benchmark, math-only
  attention, no TF32) and fast the opposite.
- cublas_problem: unset before CUDA starts is fine (the trainer sets it), unset after is refused,
  an undocumented value is refused, fast needs nothing.
- apply: the CUDA exact settings really land in torch's globals (settable on a CPU build too),
  and a real op without a deterministic kernel (MaxUnpool2d, put_) under them comes out of the
  train loop's catch path as ConfigError, exit 78, naming the op and `determinism: fast`;
  another RuntimeError passes through untouched.
- the reproducibility record and what a resume warns about.
"""

from __future__ import annotations

import os

import pytest
import torch

from lora_trainer import determinism
from lora_trainer.config import TrainConfig
from lora_trainer.determinism import (
    CUBLAS_ENV,
    KernelSettings,
    cublas_problem,
    missing_kernel,
    missing_kernel_op,
    record_changes,
    reproducibility_record,
    settings_for,
)
from lora_trainer.errors import EXIT_CONFIG, ConfigError

EXACT_CUDA = KernelSettings(
    deterministic_algorithms=True, cublas_workspace=":4096:8", cudnn_deterministic=True, cudnn_benchmark=False,
    sdpa_backends=("math",), tf32=False,
)


@pytest.mark.parametrize(("device", "mode", "expected"), [
    ("cpu", "exact", KernelSettings()),
    ("cpu", "fast", KernelSettings()),
    ("mps", "exact", KernelSettings()),
    ("cuda", "exact", EXACT_CUDA),
    ("cuda", "fast", KernelSettings(
        deterministic_algorithms=False, cudnn_deterministic=False, cudnn_benchmark=True,
        sdpa_backends=("flash", "mem_efficient", "cudnn", "math"), tf32=True,
    )),
])
def test_settings_table(device: str, mode: str, expected: KernelSettings) -> None:
    assert settings_for(device, mode) == expected


@pytest.mark.parametrize(("env", "initialised", "problem"), [
    ({}, False, None),
    ({CUBLAS_ENV: ":4096:8"}, True, None),
    ({CUBLAS_ENV: ":16:8"}, True, None),
    ({}, True, "CUDA was initialised without it"),
    ({CUBLAS_ENV: ":0:0"}, False, "got ':0:0'"),
])
def test_cublas_problem_table(env: dict[str, str], initialised: bool, problem: str | None) -> None:
    got = cublas_problem(EXACT_CUDA, env, initialised)
    if problem is None:
        assert got is None
    else:
        assert got is not None and problem in got and "determinism: fast" in got and CUBLAS_ENV in got
    assert cublas_problem(settings_for("cuda", "fast"), env, initialised) is None


def test_config_default_is_exact() -> None:
    c = TrainConfig(base_model="m", train_data_dir="d", output_dir="o", max_train_steps=1)
    assert c.determinism == "exact"
    assert TrainConfig(base_model="m", train_data_dir="d", output_dir="o", max_train_steps=1,
                       determinism="fast").determinism == "fast"
    with pytest.raises(ValueError, match="determinism"):
        TrainConfig(base_model="m", train_data_dir="d", output_dir="o", max_train_steps=1, determinism="bitwise")


@pytest.fixture
def torch_globals(monkeypatch: pytest.MonkeyPatch):
    """Restore every global `apply` touches (the test process goes on running other tests)."""
    monkeypatch.delenv(CUBLAS_ENV, raising=False)
    cuda = torch.backends.cuda
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, cuda.flash_sdp_enabled(),
             cuda.mem_efficient_sdp_enabled(), cuda.cudnn_sdp_enabled(), cuda.math_sdp_enabled(),
             cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())
    yield
    det, warn, cudnn_det, bench, flash, mem, cudnn_sdp, math, matmul, conv, precision = saved
    torch.use_deterministic_algorithms(det, warn_only=warn)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_det, bench
    cuda.enable_flash_sdp(flash), cuda.enable_mem_efficient_sdp(mem)
    cuda.enable_cudnn_sdp(cudnn_sdp), cuda.enable_math_sdp(math)
    cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, conv
    torch.set_float32_matmul_precision(precision)


def test_apply_exact_sets_torch_globals(torch_globals) -> None:
    determinism.apply(settings_for("cuda", "exact"))
    assert os.environ[CUBLAS_ENV] == ":4096:8"
    assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    cuda = torch.backends.cuda
    assert (cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(), cuda.cudnn_sdp_enabled(),
            cuda.math_sdp_enabled()) == (False, False, False, True)
    assert not cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert torch.get_float32_matmul_precision() == "highest"
    # consistent with the new API too, and readable every way (libraries read either)
    assert cuda.matmul.fp32_precision == "ieee" and torch.backends.cudnn.conv.fp32_precision in ("ieee", "none")
    determinism.apply(settings_for("cuda", "fast"))
    assert cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32 and torch.backends.cudnn.benchmark
    assert torch.get_float32_matmul_precision() == "high" and not torch.are_deterministic_algorithms_enabled()
    determinism.apply(settings_for("cuda", "exact"))
    determinism.apply(settings_for("cpu", "exact"))  # the CPU changes nothing
    assert torch.are_deterministic_algorithms_enabled()


def test_apply_keeps_a_documented_value_and_refuses_another(torch_globals, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CUBLAS_ENV, ":16:8")
    determinism.apply(settings_for("cuda", "exact"))
    assert os.environ[CUBLAS_ENV] == ":16:8"
    monkeypatch.setenv(CUBLAS_ENV, "4096")
    with pytest.raises(ConfigError, match="CUBLAS_WORKSPACE_CONFIG") as info:
        determinism.apply(settings_for("cuda", "exact"))
    assert info.value.exit_code == EXIT_CONFIG


def _unpool() -> torch.Tensor:
    pooled, indices = torch.nn.MaxPool2d(2, return_indices=True)(torch.randn(1, 1, 4, 4))
    return torch.nn.MaxUnpool2d(2)(pooled, indices)


@pytest.mark.parametrize(("op", "name"), [
    (_unpool, "max_unpooling2d_forward_out"),
    (lambda: torch.zeros(4).put_(torch.tensor([0, 1]), torch.tensor([1.0, 2.0])), "put_"),
])
def test_missing_kernel_fails_with_the_op_and_the_way_out(torch_globals, op, name: str) -> None:
    op()  # without the exact settings it runs
    determinism.apply(settings_for("cuda", "exact"))
    with pytest.raises(RuntimeError) as raw:
        op()
    assert missing_kernel_op(str(raw.value)) == name  # torch's own wording, parsed
    with pytest.raises(ConfigError) as info, missing_kernel(step=7, device="cpu"):
        op()
    err = info.value
    assert err.exit_code == EXIT_CONFIG and err.reason == "InvalidConfig" and err.step == 6
    assert "\n" not in err.message
    assert name in err.message and "determinism: fast" in err.message and "step 7" in err.message


def test_other_runtime_errors_pass_through() -> None:
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"), missing_kernel(step=1, device="cpu"):
        torch.zeros(2, 3) @ torch.zeros(2, 3)
    assert missing_kernel_op("CUDA error: an illegal memory access") is None


def test_record_and_changes() -> None:
    versions = determinism.library_versions()
    assert set(versions) == {"torch", "diffusers", "peft", "transformers"}
    assert versions["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert determinism.library_versions(("no-such-package-xyz",)) == {"no-such-package-xyz": "absent"}
    rec = reproducibility_record("exact", "cuda", {"torch": "2.13.0", "peft": "0.17.0"})
    assert rec == {"determinism": "exact", "device": "cuda", "peft": "0.17.0", "torch": "2.13.0"}
    assert record_changes(rec, rec) == []
    assert record_changes({}, rec) == []  # a checkpoint from before the record: nothing to compare
    now = {**rec, "torch": "2.14.0", "determinism": "fast"}
    assert record_changes(rec, now) == ["determinism exact -> fast", "torch 2.13.0 -> 2.14.0"]
    assert record_changes(rec, {k: v for k, v in rec.items() if k != "peft"}) == ["peft 0.17.0 -> absent"]


@pytest.mark.parametrize(("mode", "device", "bitwise"), [
    ("exact", "cpu", True), ("fast", "cpu", True), ("exact", "cuda", True), ("fast", "cuda", False),
])
def test_guarantee(mode: str, device: str, bitwise: bool) -> None:
    assert determinism.guarantee(mode, device).startswith("bitwise" if bitwise else "not bitwise")
