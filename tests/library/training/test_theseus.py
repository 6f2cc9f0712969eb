import math

import pytest
import torch
from torch import nn

from library.errors import ConfigError
from library.training.theseus import (
    ReplacementSchedule,
    TheseusController,
    TheseusModule,
    collapse_to_successors,
    draw_replacements,
    parse_replacement_schedule,
    wrap_with_successors,
)


class Flag:
    use_successor = False


@pytest.mark.parametrize(
    "text, steps, expected",
    [
        ("constant:0.5", [0, 10, 10**6], [0.5, 0.5, 0.5]),
        ("linear:6e-4,0.3", [0, 500, 1000, 1167, 5000], [0.3, 0.6, 0.9, 1.0, 1.0]),
        ("linear:0,1", [0, 7], [1.0, 1.0]),
    ],
)
def test_schedules_give_min_one_k_t_plus_b(text, steps, expected):
    schedule = parse_replacement_schedule(text)
    for step, probability in zip(steps, expected):
        assert schedule.probability(step) == pytest.approx(min(1.0, probability), abs=1e-3)


@pytest.mark.parametrize(
    "text, message",
    [
        ("exponential:0.1", "is not a replacement schedule"),
        ("linear:0.1", "is not a replacement schedule"),
        ("constant:0.1,0.2", "is not a replacement schedule"),
        ("constant:", "is not a replacement schedule"),
        ("constant:half", "values must be numbers"),
        ("constant:1.5", "outside \\[0, 1\\]"),
        ("linear:-0.1,0.5", "outside \\[0, 1\\]"),
    ],
)
def test_bad_schedules_name_the_flag(text, message):
    with pytest.raises(ConfigError, match=f"--theseus_schedule '{text}'.*{message}"):
        parse_replacement_schedule(text)


def test_draws_agree_across_processes_and_resumes():
    first = [draw_replacements(16, 0.5, seed=7, step=s) for s in range(20)]
    # Another rank, or a resumed run, that starts at step 10 draws the same units.
    again = [draw_replacements(16, 0.5, seed=7, step=s) for s in range(10, 20)]
    assert all(torch.equal(a, b) for a, b in zip(first[10:], again))
    other_seed = [draw_replacements(16, 0.5, seed=8, step=s) for s in range(20)]
    assert not all(torch.equal(a, b) for a, b in zip(first, other_seed))
    assert not torch.equal(draw_replacements(16, 0.5, 7, 3, micro_step=1), first[3])


@pytest.mark.parametrize("probability", [0.1, 0.5, 0.9])
def test_replacement_rate_is_bernoulli_p(probability):
    units = [Flag() for _ in range(8)]
    controller = TheseusController(units, ReplacementSchedule(0.0, probability), seed=1)
    steps = 1500
    rates = [controller.step(s).rate for s in range(steps)]
    mean = sum(rates) / steps
    sigma = math.sqrt(probability * (1 - probability) / (steps * len(units)))
    assert abs(mean - probability) < 5 * sigma
    # Each unit is drawn independently, not all units together.
    assert any(0 < r < 1 for r in rates)
    assert controller.replacement_rate == rates[-1]
    assert [u.use_successor for u in units] == list(controller.last_state.use_successor)


def test_linear_schedule_raises_the_rate_until_all_units_are_replaced():
    units = [Flag() for _ in range(32)]
    controller = TheseusController(units, parse_replacement_schedule("linear:0.01,0.0"), seed=0)
    early = sum(controller.step(s).rate for s in range(0, 10)) / 10
    late = sum(controller.step(s).rate for s in range(60, 70)) / 10
    assert early < 0.2 < 0.5 < late
    state = controller.step(100)
    assert state.probability == 1.0 and state.rate == 1.0
    assert all(u.use_successor for u in units)


def test_finish_switches_every_unit_to_its_successor_for_good():
    units = [Flag() for _ in range(4)]
    controller = TheseusController(units, ReplacementSchedule(0.0, 0.0), seed=0)
    assert controller.step(0).rate == 0.0 and not any(u.use_successor for u in units)
    controller.finish()
    assert all(u.use_successor for u in units) and controller.replacement_rate == 1.0
    assert controller.step(1).rate == 1.0


def test_controller_needs_units():
    with pytest.raises(ConfigError, match="at least one replaceable unit"):
        TheseusController([], ReplacementSchedule(0.0, 0.5), seed=0)


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)))


def test_theseus_module_runs_the_drawn_module_and_the_successor_in_eval():
    model = make_model()
    x = torch.randn(3, 4)
    reference = model(x)
    narrow = nn.Linear(8, 8)
    units = wrap_with_successors(model, {"2.0": narrow})
    assert isinstance(model[2][0], TheseusModule) and not model[2][0].predecessor.weight.requires_grad
    torch.testing.assert_close(model(x), reference, rtol=0, atol=0)
    units[0].use_successor = True
    swapped = model[2][1](narrow(model[1](model[0](x))))
    torch.testing.assert_close(model(x), swapped, rtol=0, atol=0)
    units[0].use_successor = False
    model.eval()
    torch.testing.assert_close(model(x), swapped, rtol=0, atol=0)
    model.train()
    assert not model[2][0].predecessor.training


def test_collapse_leaves_only_successors():
    model = make_model()
    outer_successor = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    wrap_with_successors(model, {"0": nn.Linear(4, 8), "2": outer_successor})
    wrap_with_successors(outer_successor, {"1": nn.Linear(8, 4)})  # nested inside a successor
    x = torch.randn(3, 4)
    expected = model.eval()(x)
    compact = collapse_to_successors(model, inplace=False)
    assert not any(isinstance(m, TheseusModule) for m in compact.modules())
    assert any(isinstance(m, TheseusModule) for m in model.modules())
    torch.testing.assert_close(compact(x), expected, rtol=0, atol=0)
    assert collapse_to_successors(TheseusModule(nn.Identity(), nn.Tanh())).__class__ is nn.Tanh
