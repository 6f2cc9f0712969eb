"""The pieces together, as phase 2's training step will call them, on the tiny SD1 teacher."""

import pytest
import torch

from library.distill.features import FeatureHooks, feature_pairs
from library.distill.hybrid import TheseusUNet
from library.distill.loss import DistillWeights, distill_loss
from library.distill.students import build_student, student_config
from library.distill.teacher import FrozenTeacher
from library.training.theseus import TheseusController, parse_replacement_schedule


def batch():
    generator = torch.Generator().manual_seed(4)
    latents = torch.randn(2, 4, 16, 16, generator=generator)
    noise = torch.randn(2, 4, 16, 16, generator=generator)
    context = torch.randn(2, 77, 64, generator=generator)
    return latents + noise, torch.tensor([100, 600]), context, noise


@pytest.mark.parametrize("theseus", [False, True])
def test_a_few_steps_reduce_the_loss_and_train_only_the_student(sd1_teacher, theseus):
    student, _ = build_student(sd1_teacher, student_config(sd1_teacher.config, "bk_tiny"))
    student.train().enable_gradient_checkpointing()
    pairs = feature_pairs(student, sd1_teacher)
    teacher = FrozenTeacher(sd1_teacher, [p.teacher for p in pairs])
    hooks = FeatureHooks(student, [p.student for p in pairs])
    net = student
    if theseus:
        net = TheseusUNet(sd1_teacher, student).train()
        controller = TheseusController(net.units, parse_replacement_schedule("linear:0.5,0.5"), seed=0)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    teacher_before = {k: v.clone() for k, v in sd1_teacher.state_dict().items()}
    noisy, timesteps, context, noise = batch()
    losses = []
    for step in range(4):
        if theseus:
            controller.step(step)
        targets = teacher(noisy, timesteps, context)
        with hooks.capture(require_all=not theseus) as features:
            prediction = net(noisy, timesteps, context).sample
        loss = distill_loss(
            prediction, targets.prediction, noise, features, targets.features, pairs, DistillWeights(1, 1, 1, True)
        )
        optimizer.zero_grad()
        loss.total.backward()  # checkpoint recomputation runs here, outside capture
        optimizer.step()
        losses.append(loss.total.item())
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(torch.equal(v, teacher_before[k]) for k, v in sd1_teacher.state_dict().items())
    assert all(p.grad is None for p in sd1_teacher.parameters())
    hooks.remove()
    teacher.hooks.remove()
