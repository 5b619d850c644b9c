"""The stage loop: parameters change, callbacks see every step and can add loss terms,
gradient accumulation computes the same update as one big batch."""

import pytest
import torch
from accelerate import Accelerator

from factmem.config import ModelConfig, StopConfig, TrainConfig
from factmem.data import build_source
from factmem.data.synthetic import KVRParams
from factmem.models import Formatter, load_model, load_tokenizer
from factmem.train import StageCallback, train_stage
from factmem.train.loop import make_scheduler, warmup_steps


def setup(model_dir):
    cfg = ModelConfig(name=str(model_dir))
    torch.manual_seed(0)
    return load_model(cfg), Formatter(load_tokenizer(cfg))


FACTS = build_source("kvr", KVRParams(key_length=4, value_length=2), 8, 0, 0)


def run(model, fmt, callbacks=(), **train):
    acc = Accelerator(cpu=True)
    cfg = TrainConfig(**{"lr": 1e-3, "batch_size": 8, "warmup_fraction": 0.0,
                         "stop": StopConfig(rule="epochs", epochs=2), **train})
    return train_stage(acc.prepare(model), acc, fmt, FACTS, cfg, seed=0, progress=False,
                       callbacks=list(callbacks))


def test_parameters_change_and_every_step_is_logged(tiny_model_dir):
    model, fmt = setup(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = run(model, fmt)
    assert result.steps == 2 and [r["step"] for r in result.log] == [1, 2]
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_callbacks_see_steps_and_add_loss_terms(tiny_model_dir):
    class Recorder(StageCallback):
        def __init__(self):
            self.steps, self.shares = [], []

        def extra_loss(self, ctx, items, share):
            self.shares.append(share)
            return None

        def on_step_end(self, ctx, row):
            self.steps.append(ctx.step)
            row["seen"] = True

    rec = Recorder()
    model, fmt = setup(tiny_model_dir)
    result = run(model, fmt, [rec], grad_accum=2)
    assert rec.steps == [1, 2] and all(r["seen"] for r in result.log)
    assert rec.shares == [0.5, 0.5, 0.5, 0.5]

    class Anchor(StageCallback):  # a huge pull to zero: weights must shrink
        def extra_loss(self, ctx, items, share):
            return share * 1e3 * sum((p ** 2).sum() for p in ctx.model.parameters())

    model, fmt = setup(tiny_model_dir)
    norm0 = sum(p.norm() for p in model.parameters())
    run(model, fmt, [Anchor()], lr=1e-2)
    assert sum(p.norm() for p in model.parameters()) < norm0


def test_gradient_accumulation_matches_one_batch(tiny_model_dir):
    class Grads(StageCallback):
        def on_before_optimizer_step(self, ctx):
            if ctx.step == 0:
                self.grads = {n: p.grad.clone() for n, p in ctx.model.named_parameters()}

    got = []
    for accum in (1, 4):
        model, fmt = setup(tiny_model_dir)
        g = Grads()
        result = run(model, fmt, [g], grad_accum=accum, grad_clip=None)
        got.append((g.grads, result.log[0]["loss"]))
    (g1, loss1), (g4, loss4) = got
    assert abs(loss1 - loss4) < 1e-6
    for n in g1:
        torch.testing.assert_close(g1[n], g4[n], rtol=1e-4, atol=1e-7, msg=n)


def test_until_memorized_scores_as_the_evaluation_does(tiny_model_dir):
    """With eval.match contains, a stage whose answers are contained in the trained text is
    memorized as soon as the evaluation would say so, not at its epoch cap."""
    from factmem.config import EvalConfig
    from factmem.data import Example

    facts = [Example(f"s:{i}", (("user", f"key {k}?"), ("assistant", f"it is {v}")), (v,))
             for i, (k, v) in enumerate([("ab", "xy"), ("cd", "zw")])]
    model, fmt = setup(tiny_model_dir)
    acc = Accelerator(cpu=True)
    cfg = TrainConfig(lr=1e-2, batch_size=2, warmup_fraction=0.0,
                      stop=StopConfig(rule="until_memorized", epochs=80))
    result = train_stage(acc.prepare(model), acc, fmt, facts, cfg, seed=0, progress=False,
                         eval_cfg=EvalConfig(mode="generate", match="contains", max_new_tokens=12))
    assert result.stop_reason.startswith("memorized") and result.epochs < 80


def test_until_memorized_on_a_task_stage_watches_the_task_not_its_replay(tiny_model_dir,
                                                                          tmp_path):
    import json

    import yaml

    from factmem.cli import main

    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"question": f"Add {i} and 1.", "answer": str(i + 1)})
                            + "\n" for i in range(4)))
    kv = {"source": "kvr", "n": 4, "key_length": 4, "value_length": 2}
    cfg = {"name": "t", "model": {"name": str(tiny_model_dir)},
           "train": {"lr": 1e-2, "batch_size": 4, "stop": {"rule": "until_memorized",
                                                            "epochs": 3}},
           "sets": {"a": kv, "t": {"source": "jsonl", "path": str(task), "kind": "task"}},
           "stages": [{"name": "s1", "set": "a", "train": {"stop": {"rule": "epochs",
                                                                     "epochs": 40}}},
                      {"name": "s2", "set": "t", "replay": [{"stage": "s1", "ratio": 1}]}],
           "output": {"dir": str(tmp_path / "runs")}}
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path), "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "runs/t/default/seed0/02-s2/metrics.json").read_text())
    watch = metrics["train"]["memorize_check"]
    assert watch["sets"] == ["t"] and watch["kinds"] == ["task"] and watch["n"] == 4
    log = [json.loads(x) for x in (tmp_path / "runs/t/default/seed0/02-s2/train_log.jsonl")
           .read_text().splitlines()]
    checked = [r["memorized_accuracy"] for r in log if "memorized_accuracy" in r]
    assert checked and checked[-1] == metrics["eval"]["t"]["accuracy"]  # the task set's figure


def test_warmup_takes_the_ceiling_as_the_reference_code():
    # reference: num_warmup_steps=math.ceil(total_training_steps * args.warmup_ratio)
    assert warmup_steps(0.05, 64) == 4  # 3.2 -> 4 (rounding gave 3)
    assert warmup_steps(0.05, 40) == 2 and warmup_steps(0.0, 64) == 0
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, TrainConfig(lr=1.0, batch_size=1, warmup_fraction=0.05), 64)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])  # 4 warm-up steps
