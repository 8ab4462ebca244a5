"""The speed-run components (scripts.image.speedrun) one by one, on the CPU, and that the
PyTorch trainer's CIFAR-10 recipe is built from them."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from scripts.image import speedrun
from scripts.image import torch_trainer as image_torch


def correlated_images(n: int = 400, seed: int = 0) -> torch.Tensor:
    """Smooth colour images: neighbouring pixels and the three channels strongly correlated, so
    the raw 2x2 patch covariance is far from the identity."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 1, 20, 20, generator=g)
    smooth = F.avg_pool2d(F.pad(noise, (2, 2, 2, 2), mode="reflect"), 5, stride=1)  # 20x20
    mix = torch.tensor([1.0, 0.8, 0.6]).view(1, 3, 1, 1)
    return smooth * mix + 0.1 * torch.randn(n, 3, 20, 20, generator=g)


def second_moment(responses: torch.Tensor) -> torch.Tensor:
    flat = responses.permute(0, 2, 3, 1).reshape(-1, responses.shape[1]).double()
    return flat.T @ flat / len(flat)


def test_patch_whitening_makes_the_patch_covariance_the_identity():
    images = correlated_images()
    raw = second_moment(F.conv2d(images, torch.eye(12).view(12, 3, 2, 2)))  # the patches themselves
    assert (raw - torch.eye(12)).abs().max() > 0.5, "the test images must be correlated"

    layer = speedrun.PatchWhitening(channels=3, size=2)
    layer.fit(images, eps=1e-6)
    assert layer.out_channels == 24 and tuple(layer.weight.shape) == (24, 3, 2, 2)
    assert torch.equal(layer.weight[12:], -layer.weight[:12])  # both signs of every direction
    with torch.no_grad():
        out = layer(images)
    assert torch.allclose(second_moment(out[:, :12]), torch.eye(12, dtype=torch.float64), atol=2e-3)
    # The filters are fixed (not a parameter); only the bias is, and it can be frozen.
    assert [name for name, _ in layer.named_parameters()] == ["bias"]
    layer.set_bias_trainable(False)
    assert not layer.bias.requires_grad


def test_patch_whitening_eps_damps_the_weak_directions():
    images = correlated_images()
    covariance = second_moment(F.conv2d(images, torch.eye(12).view(12, 3, 2, 2)))
    weakest = float(torch.linalg.eigvalsh(covariance)[0])
    out = F.conv2d(images, speedrun.whitening_filters(images, eps=weakest))
    variances = torch.diagonal(second_moment(out[:, :12]))
    # Strongest direction first, near 1 (eps is small beside it); the weakest at 1/2 (eps = its
    # eigenvalue): lambda / (lambda + eps).
    assert variances[0] > 0.95 and variances[-1] == pytest.approx(0.5, abs=0.02)
    assert all(a >= b - 1e-9 for a, b in zip(variances[:-1], variances[1:], strict=True))


def test_batchnorm_has_no_learnable_scale():
    bn = speedrun.frozen_scale_batchnorm(8)
    assert not bn.weight.requires_grad and bn.bias.requires_grad and torch.all(bn.weight == 1)
    net = image_torch.SpeedNet()
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 6 and all(not m.weight.requires_grad for m in norms)
    # A training step moves the shifts and leaves every scale at 1.
    optimizer = image_torch.make_optimizer(net, image_torch.CIFAR_FAST, 0.1, 1e-3)
    net.whiten.fit(torch.randn(64, 3, 32, 32))
    F.cross_entropy(net(torch.randn(16, 3, 32, 32)), torch.arange(16) % 10).backward()
    before = [m.bias.clone() for m in norms]
    optimizer.step()
    assert all(torch.all(m.weight == 1) for m in norms)
    assert any(not torch.equal(b, m.bias) for b, m in zip(before, norms, strict=True))


def test_identity_init_passes_the_input_through():
    conv = speedrun.identity_init_(nn.Conv2d(4, 6, 3, padding=1, bias=False))
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        assert torch.allclose(conv(x)[:, :4], x)


def test_decoupled_weight_decay_does_not_depend_on_the_learning_rate():
    def decayed(lr: float) -> torch.Tensor:
        p = nn.Parameter(torch.full((3, 3), 2.0))
        optimizer = speedrun.decoupled_sgd([([p], lr, 0.01)], momentum=0.85)
        p.grad = torch.zeros_like(p)  # no loss gradient: only the decay moves the weight
        optimizer.step()
        return p.detach()

    # Nesterov's first step is (1 + momentum) x the gradient: the decay term included.
    expected = torch.full((3, 3), 2.0 * (1 - 1.85 * 0.01))
    assert torch.allclose(decayed(0.1), expected) and torch.allclose(decayed(5.0), expected)
    optimizer = speedrun.decoupled_sgd([([nn.Parameter(torch.ones(2))], 0.5, 0.01)], momentum=0.85)
    assert optimizer.param_groups[0]["nesterov"] and optimizer.param_groups[0]["momentum"] == 0.85


def test_norm_shifts_take_the_larger_step_and_the_recipe_is_batch_1024():
    net = image_torch.SpeedNet()
    recipe = image_torch.CIFAR_FAST
    optimizer = image_torch.make_optimizer(net, recipe, 1.5, 0.002)
    shifts = {id(m.bias) for m in net.modules() if isinstance(m, nn.BatchNorm2d)}
    for group in optimizer.param_groups:
        is_shift = {id(p) in shifts for p in group["params"]}
        assert len(is_shift) == 1
        assert group["lr"] == pytest.approx(1.5 * 64 if is_shift.pop() else 1.5)
        assert group["lr"] * group["weight_decay"] == pytest.approx(0.002)
    assert image_torch.recipe_for("cifar10", "fast").peak_lr(1024) == pytest.approx(1.5)
    from scripts.image.base import PROFILE_TABLE

    assert {PROFILE_TABLE["cifar10"][p].batch_size for p in ("fast", "quality")} == {1024}


def test_triangular_schedule():
    factors = [speedrun.triangular_lr(s, 100, 0.23, 0.2, 0.07) for s in range(101)]
    assert factors[0] == pytest.approx(0.2) and factors[23] == pytest.approx(1.0)
    assert factors[100] == pytest.approx(0.07) and max(factors) == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(factors[:23], factors[1:24], strict=True))
    assert all(a >= b for a, b in zip(factors[23:-1], factors[24:], strict=True))


def test_label_smoothing_is_point_two_for_cifar10():
    assert image_torch.recipe_for("cifar10", "fast").label_smoothing == 0.2
    assert image_torch.recipe_for("cifar10", "quality").label_smoothing == 0.2
    # A confident right answer still costs: targets are 0.8 + 0.02 on the label, 0.02 elsewhere.
    logits = torch.full((1, 10), -1e4)
    logits[0, 3] = 0.0
    loss = speedrun.smoothed_cross_entropy(logits, torch.tensor([3]))
    assert float(loss) == pytest.approx(0.02 * 9 * 1e4, rel=1e-4)
    assert float(speedrun.smoothed_cross_entropy(logits, torch.tensor([3]), 0.0)) == pytest.approx(0.0)


def test_lookahead_moves_the_slow_weights_toward_the_fast_ones_by_the_rate():
    model = nn.Linear(3, 2)
    nn.init.constant_(model.weight, 1.0)
    lookahead = speedrun.Lookahead(model)
    with torch.no_grad():
        model.weight.fill_(3.0)  # the fast weights moved
    lookahead.update(model, decay=0.75)
    # slow = 0.75 * 1 + 0.25 * 3 = 1.5, and the model is reset to it
    assert torch.allclose(model.weight, torch.full((2, 3), 1.5))
    with torch.no_grad():
        model.weight.fill_(9.0)
    lookahead.update(model, decay=1.0)  # decay 1: back to the slow weights, unchanged
    assert torch.allclose(model.weight, torch.full((2, 3), 1.5))
    # Batch-norm statistics are averaged too (they must match the averaged weights).
    bn = nn.BatchNorm1d(2)
    bn_lookahead = speedrun.Lookahead(bn)
    bn.running_mean.fill_(4.0)
    bn_lookahead.update(bn, decay=0.5)
    assert torch.allclose(bn.running_mean, torch.full((2,), 2.0))


def test_lookahead_decay_rises_to_its_base():
    assert speedrun.lookahead_decay(0, 100) == 0.0
    assert speedrun.lookahead_decay(50, 100) == pytest.approx(0.95 ** 5 * 0.125)
    assert speedrun.lookahead_decay(100, 100) == pytest.approx(0.95 ** 5)


@pytest.mark.parametrize("n", [10, 11])
def test_alternating_flip_flips_exactly_half_then_the_other_half(n):
    flips = speedrun.AlternatingFlip(n, seed=7)
    even, odd = flips.mask(0), flips.mask(1)
    assert int(even.sum()) == n // 2 and int(odd.sum()) == n - n // 2
    assert torch.all(even ^ odd)  # every image in exactly one of two consecutive epochs
    assert torch.equal(flips.mask(2), even) and torch.equal(flips.mask(5), odd)
    # Seeded: the same start again (a resume), another seed another half.
    assert torch.equal(speedrun.AlternatingFlip(n, seed=7).mask(0), even)
    assert any(not torch.equal(speedrun.AlternatingFlip(n, seed=s).mask(0), even) for s in range(8, 12))
    images = torch.arange(n * 2 * 3, dtype=torch.float32).view(n, 1, 2, 3)
    flipped = speedrun.flip_where(images, even)
    assert torch.equal(flipped[even], images[even].flip(3)) and torch.equal(flipped[~even], images[~even])


def test_translate_moves_at_most_pad_pixels_and_keeps_the_content():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(200, 3, 8, 8, generator=g)
    pad = 2
    out = speedrun.random_translate(F.pad(images, (pad,) * 4, mode="reflect"), pad, torch.Generator().manual_seed(1))
    assert out.shape == images.shape
    seen = set()
    for image, moved in zip(images, out, strict=True):
        # The centre 4x4 of the original must be where some shift of at most 2 puts it.
        found = [(dy, dx) for dy in range(-pad, pad + 1) for dx in range(-pad, pad + 1)
                 if torch.equal(moved[:, 2 - dy:6 - dy, 2 - dx:6 - dx], image[:, 2:6, 2:6])]
        assert found, "every output is the input shifted by at most 2 pixels"
        seen.add(found[0])
    assert len(seen) == 25  # every shift is drawn
    assert torch.equal(speedrun.random_translate(images, 0), images)


def test_cutout_blanks_one_square_inside_each_image():
    images = torch.ones(50, 3, 10, 10)
    out = speedrun.cutout(images, 4, torch.Generator().manual_seed(0))
    zeros = (out == 0).all(dim=1)  # all channels at once
    assert torch.all(zeros.sum(dim=(1, 2)) == 16)
    rows, cols = zeros.any(dim=2), zeros.any(dim=1)
    assert torch.all(rows.sum(1) == 4) and torch.all(cols.sum(1) == 4)  # a square, not scattered


def test_tta_averages_the_views():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5))
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        model(x)
        assert torch.allclose(speedrun.tta_logits(model, x, 0), model(x))
        mirror = (model(x) + model(x.flip(3))) / 2
        assert torch.allclose(speedrun.tta_logits(model, x, 1), mirror, atol=1e-6)
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        shifted = [padded[:, :, :8, :8], padded[:, :, 2:, 2:]]
        shifted_mean = sum(model(v) + model(v.flip(3)) for v in shifted) / 4
        assert torch.allclose(speedrun.tta_logits(model, x, 2), 0.5 * mirror + 0.5 * shifted_mean, atol=1e-5)
        # Without flips (digits): only the shifted views join.
        no_flip = 0.5 * model(x) + 0.25 * (model(shifted[0]) + model(shifted[1]))
        assert torch.allclose(speedrun.tta_logits(model, x, 2, flip=False), no_flip, atol=1e-5)
    assert not torch.allclose(speedrun.tta_logits(model, x, 1), model(x))  # the views differ


def test_the_cifar_recipe_uses_every_component():
    fast = image_torch.recipe_for("cifar10", "fast")
    assert (fast.flip, fast.translate, fast.whiten_bias_epochs, fast.lookahead_every, fast.tta_level) == (
        True, 2, 3, 5, 2)
    net = fast.make_net(10)
    assert isinstance(net.whiten, speedrun.PatchWhitening)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    quality = image_torch.recipe_for("cifar10", "quality").make_net(10)
    assert quality(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert sum(p.numel() for p in quality.parameters()) > 3 * sum(p.numel() for p in net.parameters())
    mnist = image_torch.recipe_for("mnist", "fast")
    assert not mnist.flip and mnist.tta_level == 0  # digits are not mirror-symmetric


def test_the_quality_group_is_a_residual_block():
    """depth 3: conv - pool - BN - GELU = x0, then conv - BN - GELU - conv - BN added to x0 and GELU
    after the sum. With the block's two convs silenced its output is GELU(x0) exactly."""
    group = image_torch.ConvGroup(4, 6, depth=3).eval()
    with torch.no_grad():
        for conv in group.convs[1:]:
            conv.weight.zero_()
        x = torch.randn(2, 4, 8, 8)
        x0 = F.gelu(group.norms[0](F.max_pool2d(group.convs[0](x), 2)))
        assert torch.allclose(group(x), F.gelu(x0))
        two = image_torch.ConvGroup(4, 6, depth=2).eval()
        assert two(x).shape == group(x).shape == (2, 6, 4, 4)
    with pytest.raises(ValueError, match="depth"):
        image_torch.ConvGroup(4, 6, depth=4)


def test_cifar_recipe_resumes_exactly_after_a_kill(tmp_path):
    """Lookahead, alternating flips, the whitening bias's freeze and the schedule all pick up where
    the killed run stopped: the resumed run ends on the same predictions as an uninterrupted one."""
    import numpy as np

    from scripts.image.base import ImageArrays, TrainConfig
    from tests.image_synth import learnable

    x, y = learnable(200, (32, 32, 3), 3)
    xt, yt = learnable(100, (32, 32, 3), 4)
    arrays = ImageArrays(x, y.astype(np.int64), xt, yt.astype(np.int64), tuple("0123456789"))
    # 5 epochs: the whitening bias freezes after the third, the lookahead runs from the fourth.
    cfg = TrainConfig("cifar10", "smoke", epochs=5, batch_size=50)

    def die_after_fourth(epoch):
        if epoch.epoch == 4:
            raise KeyboardInterrupt("worker killed")

    with pytest.raises(KeyboardInterrupt):
        image_torch.train_torch(arrays, cfg, on_epoch=die_after_fourth, checkpoint_dir=tmp_path)
    resumed = image_torch.train_torch(arrays, cfg, checkpoint_dir=tmp_path)
    uninterrupted = image_torch.train_torch(arrays, cfg)
    assert resumed.resumed_from_epoch == 4
    assert np.array_equal(resumed.predictions, uninterrupted.predictions)
    assert resumed.history[-1].train_loss == pytest.approx(uninterrupted.history[-1].train_loss, rel=1e-6)
