import pytest
import torch

from library.distill.features import FeaturePair
from library.distill.loss import DistillWeights, distill_loss, feature_kd_loss

PAIRS = [FeaturePair("down_blocks.0", "down_blocks.0"), FeaturePair("down_blocks.2", "up_blocks.0")]


def tensors():
    generator = torch.Generator().manual_seed(3)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator) * scale

    student = {"down_blocks.0": randn(2, 8, 4, 4).requires_grad_(), "down_blocks.2": randn(2, 16, 2, 2, scale=30.0)}
    teacher = {"down_blocks.0": randn(2, 8, 4, 4), "up_blocks.0": randn(2, 16, 2, 2, scale=30.0)}
    preds = randn(2, 4, 8, 8).requires_grad_(), randn(2, 4, 8, 8), randn(2, 4, 8, 8)
    return student, teacher, preds


def mse(a, b):
    return ((a.double() - b.double()) ** 2).mean()


@pytest.mark.parametrize("weights", [DistillWeights(), DistillWeights(task=1.0, output_kd=0.5, feature_kd=0.25)])
def test_loss_terms_are_the_weighted_mses(weights):
    student_features, teacher_features, (student_pred, teacher_pred, target) = tensors()
    loss = distill_loss(student_pred, teacher_pred, target, student_features, teacher_features, PAIRS, weights)

    task, output_kd = mse(student_pred, target), mse(student_pred, teacher_pred)
    features = mse(student_features["down_blocks.0"], teacher_features["down_blocks.0"]) + mse(
        student_features["down_blocks.2"], teacher_features["up_blocks.0"]
    )
    expected = weights.task * task + weights.output_kd * output_kd + weights.feature_kd * features
    torch.testing.assert_close(loss.task.double(), task)
    torch.testing.assert_close(loss.output_kd.double(), output_kd)
    torch.testing.assert_close(loss.feature_kd.double(), features)
    torch.testing.assert_close(loss.total.double(), expected)
    assert loss.total.dtype == torch.float32
    loss.total.backward()
    assert student_pred.grad is not None and student_features["down_blocks.0"].grad is not None


def test_a_given_task_loss_replaces_the_plain_mse_and_keeps_its_weight():
    student_features, teacher_features, (student_pred, teacher_pred, target) = tensors()
    weights = DistillWeights(task=0.5, output_kd=1.0, feature_kd=0.0)
    weighted_task = torch.tensor(3.0)  # e.g. a min-SNR-weighted or Huber task term computed by the script
    loss = distill_loss(
        student_pred, teacher_pred, target, student_features, teacher_features, PAIRS, weights, task_loss=weighted_task
    )
    assert loss.task is weighted_task
    torch.testing.assert_close(loss.total.double(), 0.5 * 3.0 + mse(student_pred, teacher_pred))


def test_normalized_feature_terms_are_divided_by_the_teacher_mean_square():
    student_features, teacher_features, _ = tensors()
    total, terms = feature_kd_loss(student_features, teacher_features, PAIRS, normalize=True)
    big = (
        mse(student_features["down_blocks.2"], teacher_features["up_blocks.0"])
        / (teacher_features["up_blocks.0"].double() ** 2).mean()
    )
    small = (
        mse(student_features["down_blocks.0"], teacher_features["down_blocks.0"])
        / (teacher_features["down_blocks.0"].double() ** 2).mean()
    )
    torch.testing.assert_close(terms["down_blocks.2"].double(), big)
    torch.testing.assert_close(total.double(), big + small)
    # Unnormalised, the 30x-larger block dominates by orders of magnitude; normalised it does not.
    _, plain = feature_kd_loss(student_features, teacher_features, PAIRS)
    assert plain["down_blocks.2"] > 100 * plain["down_blocks.0"]
    assert terms["down_blocks.2"] < 10 * terms["down_blocks.0"]


def test_pairs_whose_student_block_did_not_run_are_left_out():
    student_features, teacher_features, _ = tensors()
    del student_features["down_blocks.0"]
    total, terms = feature_kd_loss(student_features, teacher_features, PAIRS)
    assert list(terms) == ["down_blocks.2"]
    torch.testing.assert_close(total.double(), mse(student_features["down_blocks.2"], teacher_features["up_blocks.0"]))
    empty_total, empty = feature_kd_loss({}, teacher_features, PAIRS)
    assert empty == {} and float(empty_total) == 0.0


def test_log_values_name_every_term():
    student_features, teacher_features, (student_pred, teacher_pred, target) = tensors()
    loss = distill_loss(
        student_pred, teacher_pred, target, student_features, teacher_features, PAIRS, DistillWeights()
    )
    values = loss.log_values()
    assert set(values) == {
        "loss/total",
        "loss/task",
        "loss/kd_output",
        "loss/kd_feature",
        "loss/kd_feature/down_blocks.0",
        "loss/kd_feature/down_blocks.2",
    }
    assert values["loss/total"] == pytest.approx(loss.total.item())
