"""Heads and losses of components/ssl against independent float64 references written here.

The references are deliberately naive (python loops, ``math``) so they share no code path with the
vectorised implementations they check.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import Tensor, nn

from components.ssl import (
    DINOHead,
    DINOLoss,
    KoLeoLoss,
    TeacherCentering,
    cancel_last_layer_gradients,
    dino_cross_view_loss,
    dino_n_loss_terms,
    iBOTPatchLoss,
    koleo_loss,
    koleo_loss_per_crop,
    masked_token_weights,
    official_head_state_dict,
    sinkhorn_knopp,
)

NATIVE_G = "last_layer.parametrizations.weight.original0"
NATIVE_V = "last_layer.parametrizations.weight.original1"


# ---------------------------------------------------------------------------------------------------
# float64 references (loops)
# ---------------------------------------------------------------------------------------------------
def ref_log_softmax(row: list[float], temp: float) -> list[float]:
    scaled = [v / temp for v in row]
    top = max(scaled)
    log_norm = top + math.log(sum(math.exp(v - top) for v in scaled))
    return [v - log_norm for v in scaled]


def ref_cross_entropy(teacher_row: list[float], student_row: list[float], temp: float) -> float:
    log_probs = ref_log_softmax(student_row, temp)
    return -sum(t * lp for t, lp in zip(teacher_row, log_probs, strict=True))


def ref_dino_pairs(students: list[Tensor], teachers: list[Tensor], temp: float) -> float:
    """sum over (student, teacher) pairs of the batch-mean cross-entropy."""
    total = 0.0
    for s in students:
        for t in teachers:
            rows = [ref_cross_entropy(t[b].tolist(), s[b].tolist(), temp) for b in range(s.shape[0])]
            total += sum(rows) / len(rows)
    return total


def ref_sinkhorn(logits: Tensor, temp: float, n_iterations: int, n_global: float | None = None) -> Tensor:
    """SwAV's algorithm on a K x B list-of-lists, one process."""
    n_samples, n_protos = logits.shape
    big_b = float(n_samples) if n_global is None else n_global
    q = [[math.exp(float(logits[b, k]) / temp) for b in range(n_samples)] for k in range(n_protos)]
    total = sum(sum(row) for row in q)
    q = [[v / total for v in row] for row in q]
    for _ in range(n_iterations):
        for k in range(n_protos):
            row_sum = sum(q[k])
            q[k] = [v / row_sum / n_protos for v in q[k]]
        for b in range(n_samples):
            col_sum = sum(q[k][b] for k in range(n_protos))
            for k in range(n_protos):
                q[k][b] = q[k][b] / col_sum / big_b
    return torch.tensor([[q[k][b] * big_b for k in range(n_protos)] for b in range(n_samples)], dtype=torch.float64)


def ref_koleo(x: Tensor, eps: float = 1e-8) -> float:
    rows = x.tolist()
    unit = []
    for r in rows:
        norm = max(math.sqrt(sum(v * v for v in r)), eps)
        unit.append([v / norm for v in r])
    terms = []
    for i, zi in enumerate(unit):
        best_j, best_d = -1, math.inf
        for j, zj in enumerate(unit):
            if j == i:
                continue
            d = math.sqrt(sum((a - b) ** 2 for a, b in zip(zi, zj, strict=True)))
            if d < best_d:
                best_j, best_d = j, d
        zj = unit[best_j]
        distance = math.sqrt(sum((a - b + eps) ** 2 for a, b in zip(zi, zj, strict=True)))
        terms.append(-math.log(distance + eps))
    return sum(terms) / len(terms)


def ref_gelu(v: float) -> float:
    return 0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0)))


def ref_head_forward(state: dict[str, Tensor], x: Tensor, n_linear: int) -> Tensor:
    """Official-format state (mlp.0/2/4, weight_g, weight_v) applied by hand in float64."""
    out = []
    for row in x.double().tolist():
        h = row
        for layer in range(n_linear):
            w = state[f"mlp.{2 * layer}.weight"].double().tolist()
            bias = state[f"mlp.{2 * layer}.bias"].double().tolist()
            h = [sum(wi * hi for wi, hi in zip(w_row, h, strict=True)) + bi for w_row, bi in zip(w, bias, strict=True)]
            if layer < n_linear - 1:
                h = [ref_gelu(v) for v in h]
        norm = max(math.sqrt(sum(v * v for v in h)), 1e-12)
        z = [v / norm for v in h]
        g = state["last_layer.weight_g"].double().flatten().tolist()
        v_rows = state["last_layer.weight_v"].double().tolist()
        logits = []
        for gk, vk in zip(g, v_rows, strict=True):
            vnorm = math.sqrt(sum(c * c for c in vk))
            logits.append(gk * sum(c / vnorm * zc for c, zc in zip(vk, z, strict=True)))
        out.append(logits)
    return torch.tensor(out, dtype=torch.float64)


def random_probs(*shape: int, generator: torch.Generator) -> Tensor:
    return torch.softmax(torch.randn(*shape, generator=generator, dtype=torch.float64) * 2, dim=-1)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


# ---------------------------------------------------------------------------------------------------
# DINOHead
# ---------------------------------------------------------------------------------------------------
def official_keys(n_linear: int, use_bn: bool = False) -> set[str]:
    keys = {"last_layer.weight_g", "last_layer.weight_v"}
    stride = 3 if use_bn else 2
    for layer in range(n_linear):
        keys |= {f"mlp.{stride * layer}.weight", f"mlp.{stride * layer}.bias"}
        if use_bn and layer < n_linear - 1:
            bn = stride * layer + 1
            keys |= {f"mlp.{bn}.{name}" for name in ("weight", "bias", "running_mean", "running_var",
                                                        "num_batches_tracked")}
    return keys


@pytest.mark.parametrize(("nlayers", "use_bn"), [(3, False), (2, False), (3, True)])
def test_head_exports_official_key_names(nlayers: int, use_bn: bool) -> None:
    head = DINOHead(8, 10, hidden_dim=12, bottleneck_dim=6, nlayers=nlayers, use_bn=use_bn)
    assert set(official_head_state_dict(head)) == official_keys(nlayers, use_bn)
    native = set(head.state_dict())
    assert {NATIVE_G, NATIVE_V} <= native and "last_layer.weight_g" not in native


def test_head_with_one_layer_is_a_bare_linear() -> None:
    head = DINOHead(8, 10, bottleneck_dim=6, nlayers=1)
    assert isinstance(head.mlp, nn.Linear)
    assert set(official_head_state_dict(head)) == {"mlp.weight", "mlp.bias", "last_layer.weight_g",
                                                    "last_layer.weight_v"}


def test_head_loads_official_checkpoint_keys_and_matches_float64_reference(gen: torch.Generator) -> None:
    in_dim, hidden, bottleneck, out_dim = 5, 7, 4, 6
    official = {
        "mlp.0.weight": torch.randn(hidden, in_dim, generator=gen),
        "mlp.0.bias": torch.randn(hidden, generator=gen),
        "mlp.2.weight": torch.randn(hidden, hidden, generator=gen) * 0.5,
        "mlp.2.bias": torch.randn(hidden, generator=gen),
        "mlp.4.weight": torch.randn(bottleneck, hidden, generator=gen) * 0.5,
        "mlp.4.bias": torch.randn(bottleneck, generator=gen),
        "last_layer.weight_g": torch.rand(out_dim, 1, generator=gen) + 0.5,  # trained gains are not 1
        "last_layer.weight_v": torch.randn(out_dim, bottleneck, generator=gen),
    }
    caller_copy = dict(official)
    head = DINOHead(in_dim, out_dim, hidden_dim=hidden, bottleneck_dim=bottleneck).double()
    result = head.load_state_dict(official, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert official.keys() == caller_copy.keys()  # the caller's dict was not renamed in place
    torch.testing.assert_close(head.prototype_gain.detach(), official["last_layer.weight_g"].double())

    x = torch.randn(3, in_dim, generator=gen, dtype=torch.float64)
    expected = ref_head_forward(official, x, n_linear=3)
    torch.testing.assert_close(head(x), expected, rtol=1e-10, atol=1e-10)
    # Export and reload: official names round-trip exactly.
    again = DINOHead(in_dim, out_dim, hidden_dim=hidden, bottleneck_dim=bottleneck).double()
    again.load_state_dict(official_head_state_dict(head), strict=True)
    torch.testing.assert_close(again(x), expected, rtol=1e-10, atol=1e-10)


def test_head_loads_state_dict_of_deprecated_weight_norm_module(gen: torch.Generator) -> None:
    """The official head is built with torch.nn.utils.weight_norm: its real state dict must load."""
    if not hasattr(nn.utils, "weight_norm"):
        pytest.skip("this torch no longer ships torch.nn.utils.weight_norm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old_last = nn.utils.weight_norm(nn.Linear(4, 6, bias=False))
    mlp = nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 7), nn.GELU(), nn.Linear(7, 4))
    with torch.no_grad():
        old_last.weight_g.uniform_(0.5, 1.5)
    official = {f"mlp.{k}": v for k, v in mlp.state_dict().items()}
    official |= {f"last_layer.{k}": v for k, v in old_last.state_dict().items()}
    head = DINOHead(5, 6, hidden_dim=7, bottleneck_dim=4)
    head.load_state_dict(official, strict=True)
    x = torch.randn(3, 5, generator=gen)
    with torch.no_grad():
        expected = old_last(nn.functional.normalize(mlp(x), dim=-1))
        torch.testing.assert_close(head(x), expected)


def test_head_init_follows_official_code() -> None:
    torch.manual_seed(0)
    head = DINOHead(256, 32, hidden_dim=384, bottleneck_dim=64)
    linears = [m for m in head.mlp.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 3
    for linear in linears:
        assert abs(float(linear.weight.detach().std()) - 0.02) < 0.002
        assert torch.count_nonzero(linear.bias) == 0
    assert torch.all(head.prototype_gain == 1.0)
    weight = head.last_layer.weight  # the effective (g * v / ||v||) weight
    torch.testing.assert_close(weight.norm(dim=1), torch.ones(32))
    # the official v keeps nn.Linear's default kaiming-uniform init, bound 1/sqrt(fan_in)
    direction = head.prototype_direction.detach()
    assert float(direction.abs().max()) <= 1 / math.sqrt(64)
    assert float(direction.std()) > 0.05


def test_head_gain_is_trainable_as_dinov2_and_frozen_with_norm_last_layer() -> None:
    x = torch.randn(4, 8)
    dinov2 = DINOHead(8, 10, hidden_dim=12, bottleneck_dim=6)
    dinov2(x).square().sum().backward()
    assert dinov2.prototype_gain.requires_grad and dinov2.prototype_gain.grad is not None
    dino_v1 = DINOHead(8, 10, hidden_dim=12, bottleneck_dim=6, norm_last_layer=True)
    dino_v1(x).square().sum().backward()
    assert not dino_v1.prototype_gain.requires_grad and dino_v1.prototype_gain.grad is None
    assert dino_v1.prototype_direction.grad is not None


def test_head_deepcopy_and_teacher_load_from_student() -> None:
    student = DINOHead(8, 10, hidden_dim=12, bottleneck_dim=6)
    teacher = copy.deepcopy(student)
    fresh = DINOHead(8, 10, hidden_dim=12, bottleneck_dim=6)
    fresh.load_state_dict(student.state_dict(), strict=True)  # native keys load too
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(teacher(x), student(x))
        torch.testing.assert_close(fresh(x), student(x))
        student.prototype_direction.add_(1.0)  # the copies are independent
        assert not torch.allclose(teacher(x), student(x))


def test_cancel_last_layer_gradients_only_while_frozen() -> None:
    head = DINOHead(8, 10, hidden_dim=12, bottleneck_dim=6)
    x = torch.randn(4, 8)

    def backward() -> None:
        head.zero_grad(set_to_none=True)
        head(x).square().sum().backward()

    backward()
    cancel_last_layer_gradients(head, current_epoch_or_iter=0, freeze_until=1)
    assert all(p.grad is None for p in head.last_layer.parameters())
    assert all(p.grad is not None for p in head.mlp.parameters())
    backward()
    cancel_last_layer_gradients(head, current_epoch_or_iter=1, freeze_until=1)
    assert all(p.grad is not None for p in head.last_layer.parameters())


# ---------------------------------------------------------------------------------------------------
# Sinkhorn-Knopp
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_iterations", [0, 1, 3, 7])
def test_sinkhorn_matches_float64_loop(gen: torch.Generator, n_iterations: int) -> None:
    logits = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    expected = ref_sinkhorn(logits, 0.3, n_iterations)
    torch.testing.assert_close(sinkhorn_knopp(logits, 0.3, n_iterations=n_iterations), expected, rtol=1e-12, atol=1e-12)
    # float32 input computes in float32 (the official precision)
    out32 = sinkhorn_knopp(logits.float(), 0.3, n_iterations=n_iterations)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), expected, rtol=1e-5, atol=1e-6)


def test_sinkhorn_marginals(gen: torch.Generator) -> None:
    n_samples, n_protos = 12, 4
    logits = torch.randn(n_samples, n_protos, generator=gen, dtype=torch.float64)
    targets = sinkhorn_knopp(logits, 0.5, n_iterations=3)  # (B, K)
    # every sample is a distribution over prototypes (exact after the final column normalisation)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(n_samples, dtype=torch.float64))
    # with enough iterations every prototype receives B / K of the mass
    balanced = sinkhorn_knopp(logits, 0.5, n_iterations=300)
    torch.testing.assert_close(balanced.sum(dim=0), torch.full((n_protos,), n_samples / n_protos,
                                                               dtype=torch.float64), rtol=1e-8, atol=1e-8)
    # three iterations are already far more balanced than the plain softmax
    softmax_spread = torch.softmax(logits / 0.5, dim=-1).sum(dim=0).std()
    assert float(targets.sum(dim=0).std()) < 0.2 * float(softmax_spread)


def test_sinkhorn_low_precision_input_is_computed_in_float32(gen: torch.Generator) -> None:
    logits = torch.randn(6, 5, generator=gen)
    for dtype in (torch.bfloat16, torch.float16):
        low = logits.to(dtype)
        out = sinkhorn_knopp(low, 0.1)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), ref_sinkhorn(low.double(), 0.1, 3), rtol=1e-5, atol=1e-6)


def test_sinkhorn_has_no_gradient_and_no_overflow(gen: torch.Generator) -> None:
    logits = torch.randn(6, 5, generator=gen, requires_grad=True)
    assert not sinkhorn_knopp(logits, 0.1).requires_grad
    huge = torch.tensor([[30.0, 0.0, -30.0], [0.0, 30.0, 29.0]])  # exp(30 / 0.04) overflows float32
    out = sinkhorn_knopp(huge, 0.04)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.sum(dim=1), torch.ones(2))


def test_sinkhorn_sample_count_argument(gen: torch.Generator) -> None:
    logits = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    count = torch.tensor([5])
    # one process: the count is this process's number of samples; int, tensor and None agree
    for n_samples in (None, 5, count):
        torch.testing.assert_close(sinkhorn_knopp(logits, 0.2, n_samples=n_samples), ref_sinkhorn(logits, 0.2, 3))
    assert count.tolist() == [5]  # not reduced in place
    # with zero iterations the count is the output's scale (nothing normalises it away)
    torch.testing.assert_close(sinkhorn_knopp(logits, 0.2, n_iterations=0, n_samples=7),
                               ref_sinkhorn(logits, 0.2, 0, n_global=7.0))


# ---------------------------------------------------------------------------------------------------
# Centering
# ---------------------------------------------------------------------------------------------------
def test_centering_softmax_uses_current_center_and_lazy_ema_update(gen: torch.Generator) -> None:
    centering = TeacherCentering(4, center_momentum=0.9).double()
    assert centering.state_dict()["center"].shape == (1, 4)
    batches = [torch.randn(3, 4, generator=gen, dtype=torch.float64) for _ in range(3)]
    expected_center = [0.0] * 4
    for batch in batches:
        probs = centering.softmax_center_teacher(batch, teacher_temp=0.07)
        for b in range(3):
            row = [(float(batch[b, k]) - expected_center[k]) / 0.07 for k in range(4)]
            top = max(row)
            denom = sum(math.exp(v - top) for v in row)
            torch.testing.assert_close(probs[b], torch.tensor([math.exp(v - top) / denom for v in row],
                                                              dtype=torch.float64))
        centering.update_center(batch)
        # lazy, as the official code: the buffer moves when the next softmax needs it
        torch.testing.assert_close(centering.center[0], torch.tensor(expected_center, dtype=torch.float64))
        batch_mean = [sum(float(batch[b, k]) for b in range(3)) / 3 for k in range(4)]
        expected_center = [0.9 * c + 0.1 * m for c, m in zip(expected_center, batch_mean, strict=True)]
    centering.apply_center_update()
    torch.testing.assert_close(centering.center[0], torch.tensor(expected_center, dtype=torch.float64))


def test_centering_low_precision_teacher_gives_float32_probabilities() -> None:
    centering = TeacherCentering(5)
    teacher = torch.randn(4, 5).to(torch.bfloat16)
    probs = centering.softmax_center_teacher(teacher, 0.04)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))
    centering.update_center(teacher)
    centering.apply_center_update()
    torch.testing.assert_close(centering.center, 0.1 * teacher.float().mean(0, keepdim=True))


def test_centering_ignores_an_empty_batch() -> None:
    """No outputs (no masked token anywhere) leave the center as it was, never NaN."""
    centering = TeacherCentering(3)
    centering.center.fill_(0.5)
    centering.update_center(torch.zeros(0, 3))
    centering.apply_center_update()
    torch.testing.assert_close(centering.center, torch.full((1, 3), 0.5))


# ---------------------------------------------------------------------------------------------------
# DINO loss
# ---------------------------------------------------------------------------------------------------
def test_dino_loss_forward_matches_double_loop(gen: torch.Generator) -> None:
    students = [torch.randn(4, 6, generator=gen, dtype=torch.float64) for _ in range(3)]
    teachers = [random_probs(4, 6, generator=gen) for _ in range(2)]
    loss = DINOLoss(6, student_temp=0.1)(students, teachers)
    assert loss.dtype == torch.float64 and loss.ndim == 0
    assert math.isclose(float(loss), ref_dino_pairs(students, teachers, 0.1), rel_tol=1e-12)
    # a stacked (n, B, K) teacher tensor iterates like the list (the official meta-arch passes one)
    torch.testing.assert_close(DINOLoss(6)(students, torch.stack(teachers)), loss)


def test_dino_loss_holds_official_center_buffer_and_teachers() -> None:
    loss = DINOLoss(7)
    assert list(loss.state_dict()) == ["center"] and loss.center.shape == (1, 7)
    logits = torch.randn(5, 7)
    torch.testing.assert_close(loss.sinkhorn_knopp_teacher(logits, 0.1, n_iterations=3),
                               ref_sinkhorn(logits.double(), 0.1, 3).float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_local", [0, 1, 3])
def test_dino_cross_view_loss_matches_official_normalisation(gen: torch.Generator, n_local: int) -> None:
    batch, k, temp = 3, 5, 0.1
    student_global = [torch.randn(batch, k, generator=gen, dtype=torch.float64) for _ in range(2)]
    student_local = [torch.randn(batch, k, generator=gen, dtype=torch.float64) for _ in range(n_local)]
    teacher = [random_probs(batch, k, generator=gen) for _ in range(2)]  # crop order
    dino = DINOLoss(k, student_temp=temp)
    local, global_, n_terms = dino_cross_view_loss(dino, student_global, student_local, teacher)

    # explicit pairs: global crop i meets the teacher of the other crop only
    assert n_terms == 2 + max(2 * n_local, 1) == dino_n_loss_terms(2, n_local)
    expected_global = (ref_dino_pairs([student_global[0]], [teacher[1]], temp)
                       + ref_dino_pairs([student_global[1]], [teacher[0]], temp)) / n_terms
    expected_local = ref_dino_pairs(student_local, teacher, temp) / n_terms if n_local else 0.0
    assert math.isclose(float(global_), expected_global, rel_tol=1e-12)
    assert math.isclose(float(local), expected_local, rel_tol=1e-12, abs_tol=1e-15)

    # the official formulation: concatenated crops, teacher chunks swapped, x loss_scales(2)
    swapped = torch.cat((teacher[1], teacher[0]))
    official_global = dino([torch.cat(student_global)], [swapped]) * 2 / n_terms
    torch.testing.assert_close(global_, official_global)
    # a same-view pairing would differ: the test can tell the swap apart
    same_view = dino([torch.cat(student_global)], [torch.cat(teacher)]) * 2 / n_terms
    assert not torch.allclose(global_, same_view)


def test_dino_cross_view_loss_generalises_to_more_global_crops(gen: torch.Generator) -> None:
    students = [torch.randn(2, 4, generator=gen, dtype=torch.float64) for _ in range(3)]
    teachers = [random_probs(2, 4, generator=gen) for _ in range(3)]
    _, global_, n_terms = dino_cross_view_loss(DINOLoss(4), students, [], teachers)
    assert n_terms == 3 * 2 + 1
    expected = sum(ref_dino_pairs([students[i]], [teachers[j]], 0.1)
                   for i in range(3) for j in range(3) if i != j) / n_terms
    assert math.isclose(float(global_), expected, rel_tol=1e-12)


def test_dino_loss_gradcheck(gen: torch.Generator) -> None:
    students = [torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    teachers = [random_probs(3, 4, generator=gen) for _ in range(2)]
    loss = DINOLoss(4, student_temp=0.1)
    assert torch.autograd.gradcheck(lambda a, b: loss([a, b], teachers), tuple(students))
    assert torch.autograd.gradcheck(
        lambda a, b: dino_cross_view_loss(loss, [a, b], [a * 0.5], teachers).global_crops_loss, tuple(students))


# ---------------------------------------------------------------------------------------------------
# iBOT loss
# ---------------------------------------------------------------------------------------------------
def ibot_case(gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    masks = torch.tensor([[1, 0, 1, 1, 0, 0],
                          [0, 0, 0, 0, 0, 0],  # an image without masked patches still counts in B
                          [0, 1, 0, 0, 0, 0],
                          [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    n_masked = int(masks.sum())
    student = torch.randn(n_masked, 5, generator=gen, dtype=torch.float64)
    teacher = random_probs(n_masked, 5, generator=gen)
    return masks, student, teacher


def ref_ibot(masks: Tensor, student: Tensor, teacher: Tensor, temp: float) -> float:
    total, token = 0.0, 0
    for image in range(masks.shape[0]):
        n_image = int(masks[image].sum())
        for position in range(masks.shape[1]):
            if masks[image, position]:
                total += ref_cross_entropy(teacher[token].tolist(), student[token].tolist(), temp) / n_image
                token += 1
    return total / masks.shape[0]


def test_ibot_forward_masked_matches_loop_over_images_and_tokens(gen: torch.Generator) -> None:
    masks, student, teacher = ibot_case(gen)
    loss = iBOTPatchLoss(5, student_temp=0.1)
    expected = ref_ibot(masks, student, teacher, 0.1)
    assert math.isclose(float(loss.forward_masked(student, teacher, student_masks_flat=masks)), expected,
                        rel_tol=1e-12)
    # the collate function's precomputed weights and the official upper-bound padding of the student
    weights = masked_token_weights(masks, dtype=torch.float64)
    assert weights.tolist() == pytest.approx([1 / 3] * 3 + [1.0] + [1 / 5] * 5)
    padded = torch.cat((student, torch.randn(4, 5, generator=gen, dtype=torch.float64)))
    out = loss.forward_masked(padded, teacher, student_masks_flat=masks, n_masked_patches=student.shape[0],
                              masks_weight=weights)
    assert math.isclose(float(out), expected, rel_tol=1e-12)


def test_ibot_dense_forward_equals_forward_masked(gen: torch.Generator) -> None:
    masks, student, teacher = ibot_case(gen)
    dense_student = torch.randn(*masks.shape, 5, generator=gen, dtype=torch.float64)
    dense_teacher = random_probs(*masks.shape, 5, generator=gen)
    dense_student[masks], dense_teacher[masks] = student, teacher
    loss = iBOTPatchLoss(5)
    torch.testing.assert_close(loss(dense_student, dense_teacher, masks),
                               loss.forward_masked(student, teacher, masks))


def test_ibot_rejects_mismatched_token_counts(gen: torch.Generator) -> None:
    masks, student, teacher = ibot_case(gen)
    with pytest.raises(ValueError, match="same masked tokens"):
        iBOTPatchLoss(5).forward_masked(student[:-1], teacher[:-1], masks)


def test_ibot_gradcheck(gen: torch.Generator) -> None:
    masks, student, teacher = ibot_case(gen)
    loss = iBOTPatchLoss(5)
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: loss.forward_masked(s, teacher, masks), (student,))


def test_ibot_teachers_and_official_center_shape(gen: torch.Generator) -> None:
    loss = iBOTPatchLoss(5)
    assert loss.state_dict()["center"].shape == (1, 1, 5)
    tokens = torch.randn(7, 5, generator=gen)
    # (M, K) and the official (1, M, K) layout give the same centering, shapes kept
    probs = loss.softmax_center_teacher(tokens, 0.07)
    assert probs.shape == (7, 5)
    torch.testing.assert_close(loss.softmax_center_teacher(tokens.unsqueeze(0), 0.07), probs.unsqueeze(0))
    loss.update_center(tokens.unsqueeze(0))
    loss.apply_center_update()
    torch.testing.assert_close(loss.center, 0.1 * tokens.mean(0).view(1, 1, 5))
    count = torch.tensor([7])
    torch.testing.assert_close(loss.sinkhorn_knopp_teacher(tokens, 0.07, count),
                               ref_sinkhorn(tokens.double(), 0.07, 3).float(), rtol=1e-5, atol=1e-6)
    assert count.tolist() == [7]


# ---------------------------------------------------------------------------------------------------
# KoLeo
# ---------------------------------------------------------------------------------------------------
def test_koleo_matches_brute_force(gen: torch.Generator) -> None:
    x = torch.randn(7, 4, generator=gen, dtype=torch.float64) * 3
    assert math.isclose(float(KoLeoLoss()(x)), ref_koleo(x), rel_tol=1e-10)
    x32 = x.float()
    assert math.isclose(float(koleo_loss(x32)), ref_koleo(x32.double()), rel_tol=1e-5)
    low = x.to(torch.bfloat16)
    out = koleo_loss(low)
    assert out.dtype == torch.float32 and math.isclose(float(out), ref_koleo(low.double()), rel_tol=1e-4)


def test_koleo_is_scale_invariant_and_spreading_lowers_it() -> None:
    clustered = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.98, -0.1], [0.0, 1.0]], dtype=torch.float64)
    spread = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    assert float(koleo_loss(spread)) < float(koleo_loss(clustered))
    torch.testing.assert_close(koleo_loss(clustered * 5.0), koleo_loss(clustered))


def test_koleo_duplicates_give_finite_loss_and_gradients() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [-1.0, 0.5, 0.0]], requires_grad=True)
    loss = koleo_loss(x)  # rows 0, 1, 2 coincide after normalisation
    value = float(loss.detach())
    assert math.isfinite(value)
    # duplicates saturate at the documented floor: -log(eps * sqrt(D) + eps), never beyond -log(eps)
    saturated = -math.log(1e-8 * math.sqrt(3) + 1e-8)
    assert saturated < -math.log(1e-8)
    rows = x.detach().double()
    assert value == pytest.approx(ref_koleo(rows), rel=1e-4)
    lone_term = -math.log(float(torch.dist(rows[3] / rows[3].norm(), rows[0] / rows[0].norm())))  # row 3 -> row 0
    assert value == pytest.approx((3 * saturated + lone_term) / 4, rel=1e-4)
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    all_same = torch.ones(5, 4, requires_grad=True)
    same_loss = koleo_loss(all_same)
    same_loss.backward()
    assert torch.isfinite(same_loss.detach()) and all_same.grad is not None and torch.isfinite(all_same.grad).all()


def test_koleo_never_matches_a_sample_with_itself() -> None:
    # antipodal pair: the official diagonal fill (-1) ties with the true neighbour's dot product
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    eps = 1e-8
    first = -math.log(math.sqrt((2 + eps) ** 2 + eps**2) + eps)  # z_0 - z_1 + eps = (2 + eps, eps)
    second = -math.log(math.sqrt((-2 + eps) ** 2 + eps**2) + eps)  # z_1 - z_0 + eps = (-2 + eps, eps)
    expected = (first + second) / 2
    assert math.isclose(float(koleo_loss(x)), expected, rel_tol=1e-9)


def test_koleo_batch_of_one_is_a_graph_connected_zero() -> None:
    x = torch.randn(1, 4, requires_grad=True)
    loss = koleo_loss(x)
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    loss.backward()
    assert x.grad is not None and torch.count_nonzero(x.grad) == 0


def test_koleo_per_crop_never_mixes_crops(gen: torch.Generator) -> None:
    crop = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    other = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    out = koleo_loss_per_crop(torch.cat((crop, other)), n_crops=2, weight=0.1)
    assert math.isclose(float(out), 0.1 * (ref_koleo(crop) + ref_koleo(other)), rel_tol=1e-10)
    # two identical crops (as two views of the same images) must not see each other as neighbours
    twice = koleo_loss_per_crop(torch.cat((crop, crop)), n_crops=2)
    assert math.isclose(float(twice), 2 * ref_koleo(crop), rel_tol=1e-10)
    with pytest.raises(ValueError, match="equal crops"):
        koleo_loss_per_crop(torch.randn(5, 3), n_crops=2)


def test_koleo_gradcheck(gen: torch.Generator) -> None:
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(koleo_loss, (x,))
    assert torch.autograd.gradcheck(lambda v: koleo_loss_per_crop(v, n_crops=2, weight=0.1),
                                    (torch.randn(6, 3, generator=gen, dtype=torch.float64, requires_grad=True),))
