"""In-stage checkpoints: a stage stopped after any step and restored from its checkpoint ends
exactly like an uninterrupted one; a non-finite loss stops the stage and leaves a resumable
checkpoint plus the offending batch's ids."""

import json

import pytest
import torch
from accelerate import Accelerator

from factmem.config import ModelConfig, StopConfig, TrainConfig
from factmem.data import build_source
from factmem.data.synthetic import KVRParams
from factmem.models import Formatter, load_model, load_tokenizer
from factmem.train import StageCallback, train_stage
from factmem.train.checkpoint import StageCheckpointer
from factmem.train.guard import FiniteGuard, NumericalError

FACTS = build_source("kvr", KVRParams(key_length=4, value_length=2), 10, 0, 0)


class Crash(Exception):
    pass


class CrashAt(StageCallback):
    """Stands in for a kill: raises right after step `at` (after the checkpointer ran)."""

    def __init__(self, at):
        self.at = at

    def on_step_end(self, ctx, row):
        if ctx.step == self.at:
            raise Crash


class NanAt(StageCallback):
    """A loss term that turns the loss and every gradient into NaN at step `at` (as an
    overflow in the forward pass would)."""

    def __init__(self, at):
        self.at = at

    def extra_loss(self, ctx, items, share):
        if ctx.step + 1 != self.at:
            return None
        return float("nan") * sum(p.sum() for p in ctx.model.parameters())


class NanLossOnly(StageCallback):
    """A logged loss of NaN at step 2 with finite gradients (the guard's second line)."""

    def on_step_end(self, ctx, row):
        if ctx.step == 2:
            row["loss"] = float("nan")


def run(model_dir, callbacks, stop):
    cfg = ModelConfig(name=str(model_dir))
    torch.manual_seed(0)
    model, fmt = load_model(cfg), Formatter(load_tokenizer(cfg))
    acc = Accelerator(cpu=True)
    train = TrainConfig(lr=3e-3, batch_size=4, warmup_fraction=0.2, stop=stop)
    result = train_stage(acc.prepare(model), acc, fmt, FACTS, train, seed=1, progress=False,
                         callbacks=callbacks)
    return result, {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("stop, crash_at", [
    (StopConfig(rule="epochs", epochs=3), 5),  # mid-epoch (3 batches of 4, 4, 2 per epoch)
    (StopConfig(rule="epochs", epochs=3), 6),  # on an epoch's last batch
    (StopConfig(rule="loss_below", threshold=1e9, patience=4, epochs=3), 2),  # counters restored
    (StopConfig(rule="until_memorized", epochs=2), 3),  # memorisation check after a restore
])
def test_restored_stage_ends_exactly_like_an_uninterrupted_one(tiny_model_dir, tmp_path, stop,
                                                               crash_at):
    ref, ref_params = run(tiny_model_dir, [], stop)
    ckpt = StageCheckpointer(tmp_path / "resume", every=1)
    with pytest.raises(Crash):
        run(tiny_model_dir, [ckpt, CrashAt(crash_at)], stop)
    assert ckpt.latest().name == f"step-{crash_at:06d}"
    ckpt = StageCheckpointer(tmp_path / "resume", every=1)
    got, got_params = run(tiny_model_dir, [ckpt], stop)
    assert ckpt.restored_step == crash_at
    assert got.log == ref.log  # every step's loss, accuracy and learning rate, bit for bit
    assert got.to_json() == ref.to_json()
    assert all(torch.equal(ref_params[n], p) for n, p in got_params.items())


def test_checkpoint_holds_safetensors_and_json_only(tiny_model_dir, tmp_path):
    ckpt = StageCheckpointer(tmp_path / "resume", every=2)
    run(tiny_model_dir, [ckpt], StopConfig(rule="epochs", epochs=1))
    (path,) = list((tmp_path / "resume").iterdir())
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "optimizer.safetensors",
                                                      "state.json"]
    state = json.loads((path / "state.json").read_text())
    assert state["step"] == 2 and state["epoch"] == 1 and state["position"] == 2
    assert set(state["rng"]) == {"python", "numpy"} and len(state["log"]) == 2


def test_nonfinite_loss_stops_with_ids_and_a_resumable_checkpoint(tiny_model_dir, tmp_path):
    ckpt = StageCheckpointer(tmp_path / "resume", every=None)  # the guard saves regardless
    with pytest.raises(NumericalError, match="non-finite loss or gradient at step 3"):
        run(tiny_model_dir, [FiniteGuard(ckpt), ckpt, NanAt(3)], StopConfig(epochs=2))
    info = json.loads((tmp_path / "resume" / "nonfinite.json").read_text())
    # 10 items in batches of 4, 4, 2: step 3 is the last batch of epoch 1
    assert (info["step"], info["epoch"], info["batch"], info["last_good_step"]) == (3, 1, 3, 2)
    assert len(info["batch_ids"]) in (2, 4)
    assert all(i.startswith("kvr:") for i in info["batch_ids"])
    assert ckpt.latest().name == "step-000002"
    # the saved state is the one before the bad step: continuing without the fault matches a
    # run that never had it
    ref, _ = run(tiny_model_dir, [], StopConfig(epochs=2))
    got, _ = run(tiny_model_dir, [StageCheckpointer(tmp_path / "resume", every=None)],
                 StopConfig(epochs=2))
    assert got.log == ref.log


def test_nonfinite_loss_with_finite_gradients_is_caught_after_the_step(tiny_model_dir, tmp_path):
    ckpt = StageCheckpointer(tmp_path / "resume", every=1)
    with pytest.raises(NumericalError, match="at step 2 .*the last checkpoint is .*step-000001"):
        run(tiny_model_dir, [NanLossOnly(), FiniteGuard(ckpt), ckpt], StopConfig(epochs=2))
    assert ckpt.latest().name == "step-000001"  # the bad step's state was never saved
    assert json.loads((tmp_path / "resume" / "nonfinite.json").read_text())["last_good_step"] == 1


@pytest.mark.parametrize("written, read", [(12.5, 12.5), (0, 0.0), (None, 0.0), ("12", 0.0),
                                           (-3.0, 0.0), (float("inf"), 0.0), (True, 0.0)])
def test_a_checkpoints_recorded_seconds_are_read_or_counted_as_unknown(written, read):
    """A checkpoint's training seconds (state.json "seconds", added to the resumed stage's
    time): missing, hand-edited or non-finite values count as 0, never as a crash or inf."""
    from factmem.train.checkpoint import recorded_seconds

    state = {} if written is None else {"seconds": written}
    assert recorded_seconds(state) == read
