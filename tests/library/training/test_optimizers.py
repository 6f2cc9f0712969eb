"""kohya's optimizer names and scheduler options build the right objects."""

import argparse
import math

import pytest
import torch

from library.errors import ConfigError
from library.training.optimizers import make_lr_scheduler, make_optimizer, parse_optimizer_args, resolve_steps


def _args(**overrides):
    base = dict(
        optimizer_type="",
        optimizer_args=None,
        learning_rate=1e-3,
        lr_scheduler="constant",
        lr_warmup_steps=0,
        lr_decay_steps=0,
        lr_scheduler_num_cycles=1,
        lr_scheduler_power=1.0,
        lr_scheduler_min_lr_ratio=None,
        lr_scheduler_timescale=None,
        lr_scheduler_type="",
        lr_scheduler_args=None,
    )
    base.update(overrides)
    return argparse.Namespace(**base)


def _groups():
    return [{"params": [torch.nn.Parameter(torch.zeros(64, 64))], "lr": 1e-3}]


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("", "torch.optim.adamw.AdamW"),
        ("AdamW", "torch.optim.adamw.AdamW"),
        ("adamw8bit", "bitsandbytes.optim.adamw.AdamW8bit"),
        ("Lion", "lion_pytorch.lion_pytorch.Lion"),
        ("SGDNesterov", "torch.optim.sgd.SGD"),
        ("Prodigy", "prodigyopt.prodigy.Prodigy"),
        ("DAdaptAdam", "dadaptation.dadapt_adam.DAdaptAdam"),
        ("Adafactor", "transformers.optimization.Adafactor"),
        ("RMSprop", "torch.optim.rmsprop.RMSprop"),
        ("torch.optim.Adagrad", "torch.optim.adagrad.Adagrad"),
    ],
)
def test_optimizer_names(name, cls):
    logged, optimizer = make_optimizer(_args(optimizer_type=name), _groups())
    assert f"{type(optimizer).__module__}.{type(optimizer).__name__}" == cls
    assert logged.startswith(cls)


def test_sgd_nesterov_and_optimizer_args():
    logged, optimizer = make_optimizer(
        _args(optimizer_type="SGDNesterov", optimizer_args=["weight_decay=0.01"]), _groups()
    )
    assert optimizer.defaults["nesterov"] and optimizer.defaults["momentum"] == 0.9
    assert optimizer.defaults["weight_decay"] == 0.01
    assert "weight_decay=0.01" in logged


def test_adam_and_adamw_take_torchs_fused_kernel_unless_told_otherwise():
    logged, optimizer = make_optimizer(_args(optimizer_type="AdamW"), _groups())
    assert optimizer.defaults["fused"] is True and logged == "torch.optim.adamw.AdamW"  # ss_optimizer as kohya's
    _, optimizer = make_optimizer(_args(optimizer_type="torch.optim.Adam"), _groups())
    assert optimizer.defaults["fused"] is True
    for choice in (["fused=False"], ["foreach=True"]):
        logged, optimizer = make_optimizer(_args(optimizer_type="AdamW", optimizer_args=choice), _groups())
        assert not optimizer.defaults["fused"] and choice[0] in logged
    _, optimizer = make_optimizer(_args(optimizer_type="SGDNesterov"), _groups())
    assert "fused" not in optimizer.defaults or not optimizer.defaults["fused"]


def test_fused_adamw_takes_the_steps_of_torchs_default_implementation():
    torch.manual_seed(0)
    start = [torch.randn(16, 300), torch.randn(300, 16), torch.randn(7)]
    grads = [[torch.randn_like(t) for t in start] for _ in range(5)]
    results = []
    for optimizer_args in (None, ["fused=False"]):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        groups = [{"params": params[:2], "lr": 1e-3}, {"params": params[2:], "lr": 5e-4}]
        _, optimizer = make_optimizer(_args(optimizer_type="AdamW", optimizer_args=optimizer_args), groups)
        for step in grads:
            for param, grad in zip(params, step):
                param.grad = grad.clone()
            optimizer.step()
        results.append(params)
    for fused, reference, initial in zip(*results, start):
        torch.testing.assert_close(fused, reference, rtol=1e-6, atol=1e-7)
        assert (fused - initial).abs().mean() > 1e-4  # the steps moved the weights


def test_adafactor_relative_step_drops_group_lrs():
    _, optimizer = make_optimizer(_args(optimizer_type="Adafactor"), _groups())
    assert optimizer.defaults["relative_step"] and optimizer.param_groups[0]["lr"] is None
    scheduler = make_lr_scheduler(_args(optimizer_type="Adafactor"), optimizer, 10)
    assert type(scheduler).__name__ == "AdafactorSchedule"


def test_optimizer_args_are_python_literals():
    assert parse_optimizer_args(["betas=0.9,0.99", "eps=1e-8", "decouple=True", "mode=fast"]) == {
        "betas": (0.9, 0.99),
        "eps": 1e-8,
        "decouple": True,
        "mode": "fast",
    }


def test_unknown_optimizer_and_bad_args():
    with pytest.raises(ConfigError, match="'NoSuchOpt' is unknown"):
        make_optimizer(_args(optimizer_type="NoSuchOpt"), _groups())
    with pytest.raises(ConfigError, match="do not fit AdamW"):
        make_optimizer(_args(optimizer_args=["momentum_of_doom=1"]), _groups())


def _lrs(args, steps):
    _, optimizer = make_optimizer(args, _groups())
    scheduler = make_lr_scheduler(args, optimizer, steps)
    lrs = []
    for _ in range(steps):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return lrs


def test_constant_with_warmup_ratio():
    lrs = _lrs(_args(lr_scheduler="constant_with_warmup", lr_warmup_steps=0.1), 100)
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5e-3) and lrs[10:] == [1e-3] * 90
    assert resolve_steps(0.1, 100) == 10 and resolve_steps(7, 100) == 7


def test_cosine_with_restarts_cycles_and_polynomial_power():
    lrs = _lrs(_args(lr_scheduler="cosine_with_restarts", lr_scheduler_num_cycles=2), 100)
    assert lrs[0] == pytest.approx(1e-3) and lrs[50] == pytest.approx(1e-3)  # restarted
    assert lrs[25] == pytest.approx(0.5e-3, rel=1e-2)
    poly = _lrs(_args(lr_scheduler="polynomial", lr_scheduler_power=2.0), 100)
    expected = (1e-3 - 1e-7) * (1 - 50 / 100) ** 2 + 1e-7  # transformers' lr_end default
    assert poly[50] == pytest.approx(expected)


def test_unknown_scheduler():
    with pytest.raises(ConfigError, match="--lr_scheduler 'sometimes'"):
        _lrs(_args(lr_scheduler="sometimes"), 3)


def test_lr_scheduler_type_takes_bare_torch_names_and_dotted_paths():
    bare = _lrs(_args(lr_scheduler_type="CosineAnnealingLR", lr_scheduler_args=["T_max=10"]), 10)
    dotted = _lrs(
        _args(lr_scheduler_type="torch.optim.lr_scheduler.CosineAnnealingLR", lr_scheduler_args=["T_max=10"]), 10
    )
    reference = [1e-3 * (1 + math.cos(math.pi * step / 10)) / 2 for step in range(10)]
    assert bare == pytest.approx(reference) and dotted == pytest.approx(reference)


def test_lr_scheduler_type_errors_are_one_line():
    with pytest.raises(ConfigError, match="^--lr_scheduler_type NoSuchLR: cannot import torch.optim.lr_scheduler"):
        _lrs(_args(lr_scheduler_type="NoSuchLR"), 3)
    with pytest.raises(ConfigError, match="--lr_scheduler_args do not fit StepLR"):
        _lrs(_args(lr_scheduler_type="StepLR", lr_scheduler_args=["gamma=0.5"]), 3)
    with pytest.raises(ConfigError, match="--lr_warmup_steps"):
        _lrs(_args(lr_scheduler_type="StepLR", lr_scheduler_args=["step_size=2"], lr_warmup_steps=2), 3)


def test_dotted_optimizer_type_is_any_module_class():
    name, optimizer = make_optimizer(_args(optimizer_type="torch.optim.RMSprop"), _groups())
    assert type(optimizer) is torch.optim.RMSprop and name == "torch.optim.rmsprop.RMSprop"
    _, bare = make_optimizer(_args(optimizer_type="RMSprop"), _groups())  # kohya: torch.optim.<Name>
    assert type(bare) is torch.optim.RMSprop


def test_inverse_sqrt_timescale():
    lrs = _lrs(_args(lr_scheduler="inverse_sqrt", lr_warmup_steps=2, lr_scheduler_timescale=4), 10)
    # transformers' rule: after warmup, lr * 1 / sqrt((step + shift) / timescale), shift = timescale - warmup
    assert lrs[6] == pytest.approx(1e-3 / math.sqrt((6 + 2) / 4))


@pytest.mark.parametrize("name", ["AdamWScheduleFree", "SGDScheduleFree", "RAdamScheduleFree"])
def test_schedule_free_optimizers_start_in_train_mode_with_a_constant_schedule(name):
    import schedulefree

    logged, optimizer = make_optimizer(_args(optimizer_type=name, learning_rate=0.1), _groups())
    assert type(optimizer) is getattr(schedulefree, name)
    assert logged == f"{type(optimizer).__module__}.{name}"
    assert all(group["train_mode"] for group in optimizer.param_groups)
    scheduler = make_lr_scheduler(_args(optimizer_type=name, learning_rate=0.1), optimizer, 10)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr() == [1e-3]  # the group's own lr, never scheduled
