"""What ``amp="auto"`` means on a CPU: the native-bf16 check, the measured probe (with faked
capabilities and timings: nothing here times anything), its cache and records, and the bf16
convolutions it times."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from carmodels import conv_gemm, device
from carmodels.distributed import DistContext
from carmodels.models import ModelSpec, spec_for
from carmodels.train import TrainConfig, cpu_amp, load_checkpoint, train
from carmodels.train.cpu_amp import choose_amp
from tests.test_train import write_shards

CPU = torch.device("cpu")
SEED_128 = spec_for("seed", 128)  # 13.1 GFLOP per image: always above MIN_PROBE_GFLOP


@pytest.fixture(autouse=True)
def fresh_cache() -> Iterator[None]:
    cpu_amp.clear_probe_cache()
    yield
    cpu_amp.clear_probe_cache()


class FakeProbe:
    """Stands in for measure_fwd_bwd: fixed (fp32, bf16) seconds, and a record of its calls."""

    def __init__(self, fp32_s: float, bf16_s: float) -> None:
        self.times = (fp32_s, bf16_s)
        self.calls: list[tuple[ModelSpec, int, bool]] = []

    def __call__(self, spec: ModelSpec, batch: int, channels_last: bool) -> tuple[float, float]:
        self.calls.append((spec, batch, channels_last))
        return self.times


def fake_cpu(monkeypatch: pytest.MonkeyPatch, native_bf16: bool, probe: FakeProbe) -> None:
    monkeypatch.setattr(cpu_amp, "cpu_has_native_bf16", lambda: native_bf16)
    monkeypatch.setattr(cpu_amp, "measure_fwd_bwd", probe)


def test_native_bf16_is_read_from_torchs_cpu_capabilities(monkeypatch: pytest.MonkeyPatch) -> None:
    for capabilities, native in [
        ({"avx2": True, "avx512_f": True, "avx512_bf16": False, "amx_bf16": False}, False),
        ({"avx512_f": True, "avx512_bf16": True}, True),
        ({"amx_tile": True, "amx_bf16": True}, True),
        ({"neon": True, "bf16": True}, True),
        ({"neon": True, "bf16": False}, False),
    ]:
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda c=capabilities: c)
        assert device.cpu_has_native_bf16() is native, capabilities


def test_off_and_forced_bf16_never_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    probe = FakeProbe(1.0, 0.1)
    fake_cpu(monkeypatch, native_bf16=True, probe=probe)
    off = choose_amp("off", CPU, SEED_128, 32)
    assert off.dtype is None and off.mode == "fp32" and off.describe() == "amp off -> fp32 on CPU"
    assert choose_amp("bf16", CPU, SEED_128, 32).dtype is torch.bfloat16
    assert choose_amp("auto", torch.device("cuda"), SEED_128, 32).dtype is torch.bfloat16
    assert probe.calls == []


def test_a_cpu_without_native_bf16_stays_fp32_without_probing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    probe = FakeProbe(1.0, 0.1)  # bf16 would win by far, if it were measured
    fake_cpu(monkeypatch, native_bf16=False, probe=probe)
    choice = choose_amp("auto", CPU, SEED_128, 32)
    assert choice.dtype is None and probe.calls == []
    assert choice.describe() == "amp auto -> fp32 on CPU (no native bf16 on this CPU)"
    assert choice.probe_fp32_ms is None


@pytest.mark.parametrize(
    ("bf16_s", "chosen"),
    [
        (0.5, torch.bfloat16),  # 2x faster
        (cpu_amp.PROBE_MARGIN, torch.bfloat16),  # exactly at the margin
        (cpu_amp.PROBE_MARGIN + 0.01, None),  # faster, but within the noise
        (1.2, None),  # slower
    ],
)
def test_the_probe_picks_bf16_only_when_clearly_faster(
    monkeypatch: pytest.MonkeyPatch, bf16_s: float, chosen: torch.dtype | None
) -> None:
    fake_cpu(monkeypatch, native_bf16=True, probe=FakeProbe(1.0, bf16_s))
    choice = choose_amp("auto", CPU, SEED_128, 32)
    assert choice.dtype is chosen
    assert choice.probe_fp32_ms == 1000.0 and choice.probe_bf16_ms == round(bf16_s * 1e3, 1)


def test_the_decision_is_described_and_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    probe = FakeProbe(0.8123, 0.4011)
    fake_cpu(monkeypatch, native_bf16=True, probe=probe)
    choice = choose_amp("auto", CPU, SEED_128, 32)
    # 16 images of the seed model at 128 px are about PROBE_PASS_GFLOP.
    assert probe.calls == [(SEED_128, 16, True)]
    assert choice.describe() == (
        "amp auto -> bf16 on CPU (probe: fp32 812 ms, bf16 401 ms, batch 16)"
    )
    assert choice.to_dict() == {
        "setting": "auto",
        "mode": "bf16",
        "device": "cpu",
        "reason": "probe: fp32 812 ms, bf16 401 ms, batch 16",
        "probe_fp32_ms": 812.3,
        "probe_bf16_ms": 401.1,
        "probe_batch": 16,
    }


def test_the_probe_runs_once_per_spec_and_batch_size(monkeypatch: pytest.MonkeyPatch) -> None:
    probe = FakeProbe(1.0, 0.5)
    fake_cpu(monkeypatch, native_bf16=True, probe=probe)
    first = choose_amp("auto", CPU, SEED_128, 32)
    probe.times = (1.0, 2.0)  # a second measurement would now say fp32
    assert choose_amp("auto", CPU, SEED_128, 32) == first
    assert len(probe.calls) == 1
    choose_amp("auto", CPU, SEED_128, 4)  # another batch size: measured
    choose_amp("auto", CPU, spec_for("seed", 64), 32)  # another model: measured
    assert [(spec.image_size, batch) for spec, batch, _ in probe.calls] == [
        (128, 16),
        (128, 4),
        (64, 32),
    ]
    cpu_amp.clear_probe_cache()
    assert choose_amp("auto", CPU, SEED_128, 32).dtype is None
    assert len(probe.calls) == 4


def test_a_step_too_small_to_pay_for_bf16_is_not_probed(monkeypatch: pytest.MonkeyPatch) -> None:
    probe = FakeProbe(1.0, 0.5)
    fake_cpu(monkeypatch, native_bf16=True, probe=probe)
    choice = choose_amp("auto", CPU, spec_for("tiny", 64), 8)  # 0.37 GFLOP per step
    assert choice.dtype is None and probe.calls == []
    assert "too small to probe" in choice.reason


def test_ranks_decide_on_their_mean_timings(monkeypatch: pytest.MonkeyPatch) -> None:
    class TwoRanks(DistContext):
        def all_reduce_mean_(self, tensor: torch.Tensor) -> torch.Tensor:
            # This rank measured (1.0, 0.9), the other (1.0, 0.5): the mean says bf16.
            return tensor.add_(torch.tensor([1.0, 0.5], dtype=tensor.dtype)).div_(2)

    fake_cpu(monkeypatch, native_bf16=True, probe=FakeProbe(1.0, 0.9))
    choice = choose_amp("auto", CPU, SEED_128, 32, dist=TwoRanks(rank=1, world_size=2))
    assert choice.dtype is torch.bfloat16 and choice.probe_bf16_ms == 700.0


class FakePasses:
    """Stands in for cpu_amp._FwdBwd: returns the next scripted time of each mode."""

    def __init__(self, fp32: list[float], bf16: list[float]) -> None:
        self.left = {False: list(fp32), True: list(bf16)}
        self.order: list[str] = []

    def run(self, bf16: bool) -> float:
        self.order.append("bf16" if bf16 else "fp32")
        return self.left[bf16].pop(0)


@pytest.mark.parametrize("bf16_first", [0.5, 1.2])
def test_one_pass_each_decides_a_clear_case(
    monkeypatch: pytest.MonkeyPatch, bf16_first: float
) -> None:
    passes = FakePasses(fp32=[1.0], bf16=[bf16_first])
    monkeypatch.setattr(cpu_amp, "_FwdBwd", lambda *a: passes.run)
    assert cpu_amp.measure_fwd_bwd(SEED_128, 16, True) == (1.0, bf16_first)
    assert passes.order == ["bf16", "fp32"]


def test_a_close_case_takes_the_best_of_two_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    # 0.8 / 1.0 is within PROBE_NOISE of the margin: one more of each, in the other order.
    passes = FakePasses(fp32=[1.0, 1.1], bf16=[0.8, 0.6])
    monkeypatch.setattr(cpu_amp, "_FwdBwd", lambda *a: passes.run)
    assert cpu_amp.measure_fwd_bwd(SEED_128, 16, True) == (1.0, 0.6)
    assert passes.order == ["bf16", "fp32", "fp32", "bf16"]


def test_the_probe_models_leave_the_global_rng_alone() -> None:
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    cpu_amp._FwdBwd(spec_for("tiny", 16), 2, True)
    assert torch.equal(torch.rand(4), expected)


# -- the convolutions under CPU bf16 autocast ---------------------------------------------


@pytest.mark.parametrize(
    ("transposed", "in_channels", "out_channels", "side", "stride", "padding"),
    [
        (False, 8, 16, 16, 2, 1),
        (False, 16, 1, 4, 1, 0),
        (True, 16, 8, 8, 2, 1),
        (True, 10, 16, 1, 1, 0),  # the generator's projection from z
    ],
)
def test_bf16_convolutions_match_autocast(
    transposed: bool, in_channels: int, out_channels: int, side: int, stride: int, padding: int
) -> None:
    """Forward and input gradient are torch's own bf16 kernels; the weight gradient (a bf16
    matrix multiply) equals torch's up to the order of its fp32 sums."""
    torch.manual_seed(0)
    layer_type = conv_gemm.ConvTranspose2d if transposed else conv_gemm.Conv2d
    layer = layer_type(in_channels, out_channels, 4, stride, padding)
    layer = layer.to(memory_format=torch.channels_last)
    x = torch.randn(4, in_channels, side, side).contiguous(memory_format=torch.channels_last)
    results = []
    for ours in (True, False):
        layer.cpu_gemm = ours
        layer.zero_grad(set_to_none=True)
        x_in = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x_in)
        assert y.dtype == torch.bfloat16
        (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append((y, x_in.grad, layer.weight.grad, layer.bias.grad))
    (y, grad_x, grad_w, grad_b), (y_ref, grad_x_ref, grad_w_ref, grad_b_ref) = results
    assert torch.equal(y, y_ref) and torch.equal(grad_x, grad_x_ref)
    assert grad_w.dtype == torch.float32 and grad_w.shape == layer.weight.shape
    torch.testing.assert_close(grad_w, grad_w_ref, rtol=2e-2, atol=2e-2 * grad_w_ref.abs().max())
    torch.testing.assert_close(grad_b, grad_b_ref, rtol=2e-2, atol=1e-3)


def test_fp32_convolutions_do_not_take_the_bf16_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("the bf16 path ran outside bf16 autocast")

    monkeypatch.setattr(conv_gemm._ConvBf16, "apply", refuse)
    layer = conv_gemm.Conv2d(4, 8, 4, 2, 1)
    for side in (4, 32):  # the fp32 matrix-multiply path, and torch's own
        assert layer(torch.randn(2, 4, side, side)).dtype == torch.float32
    with conv_gemm.native_convolutions(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(2, 4, 32, 32)).dtype == torch.bfloat16  # torch's own kernels


# -- the trainer ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shards(tmp_path_factory.mktemp("shards"), n_images=24)


def tiny_run(**overrides: object) -> TrainConfig:
    base = TrainConfig(
        preset="tiny",
        image_size=32,
        epochs=1,
        batch_size=8,
        max_steps_per_epoch=2,
        device="cpu",
        tensorboard=False,
        seed=1,
    )
    return replace(base, **overrides)


def test_train_records_the_probed_decision(
    monkeypatch: pytest.MonkeyPatch, shards: Path, tmp_path: Path
) -> None:
    probe = FakeProbe(0.1, 0.05)
    fake_cpu(monkeypatch, native_bf16=True, probe=probe)
    monkeypatch.setattr(cpu_amp, "MIN_PROBE_GFLOP", 0.0)  # probe even the tiny model
    lines: list[str] = []
    result = train(shards, tmp_path, tiny_run(), log=lines.append)
    expected = "amp auto -> bf16 on CPU (probe: fp32 100 ms, bf16 50 ms, batch 8)"
    assert result.amp == expected
    assert any(expected in line for line in lines)
    assert result.checkpoint_path is not None
    recorded = load_checkpoint(result.checkpoint_path)["amp"]
    assert recorded["mode"] == "bf16" and recorded["probe_fp32_ms"] == 100.0
    assert all(torch.isfinite(torch.tensor(list(result.final_losses.values()))))


def test_train_with_amp_off_is_fp32_and_unprobed(
    monkeypatch: pytest.MonkeyPatch, shards: Path, tmp_path: Path
) -> None:
    probe = FakeProbe(1.0, 0.1)
    fake_cpu(monkeypatch, native_bf16=True, probe=probe)
    monkeypatch.setattr(cpu_amp, "MIN_PROBE_GFLOP", 0.0)
    off = train(shards, tmp_path / "off", tiny_run(amp="off"))
    assert off.amp == "amp off -> fp32 on CPU" and probe.calls == []
    assert load_checkpoint(off.checkpoint_path)["amp"]["mode"] == "fp32"
    # A CPU without native bf16 under "auto" trains exactly as "off".
    monkeypatch.setattr(cpu_amp, "cpu_has_native_bf16", lambda: False)
    auto = train(shards, tmp_path / "auto", tiny_run())
    assert probe.calls == []
    off_weights = load_checkpoint(off.checkpoint_path)["generator"]
    auto_weights = load_checkpoint(auto.checkpoint_path)["generator"]
    for name, tensor in off_weights.items():
        assert torch.equal(tensor, auto_weights[name]), name
