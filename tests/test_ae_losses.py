"""Autoencoder losses against independent references: hinge losses in closed form on constructed
logits, the adaptive GAN weight against a separate autograd computation, KL against
torch.distributions, PSNR against scikit-image, the perceptual loss on a random conv net, the
PatchGAN's geometry, and the assembled generator loss term by term."""

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio
from torch import nn

from microdiff.encoders.ae_losses import (AELossConfig, PatchDiscriminator, PerceptualLoss, adaptive_disc_weight,
                                          disc_active, generator_loss, hinge_d_loss, hinge_g_loss,
                                          load_perceptual_loss, load_vgg16_features, psnr, reconstruction_loss,
                                          vgg16_features)
from microdiff.encoders.vae import AutoencoderOutput, DiagonalGaussian, KLAutoencoder, gaussian_kl


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# --- GAN losses -------------------------------------------------------------------------------------------
def test_hinge_losses_on_constructed_logits():
    real = torch.tensor([2.0, 0.5, -1.0, 1.0])  # relu(1 - real) = [0, 0.5, 2, 0] -> mean 0.625
    fake = torch.tensor([-3.0, -0.5, 0.0])  # relu(1 + fake) = [0, 0.5, 1] -> mean 0.5
    assert float(hinge_d_loss(real, fake)) == pytest.approx(0.5 * (0.625 + 0.5))
    assert float(hinge_g_loss(fake)) == pytest.approx(3.5 / 3)
    # a perfect discriminator (margins >= 1) has zero loss; patch maps reduce by their mean
    assert float(hinge_d_loss(torch.full((2, 1, 3, 3), 1.5), torch.full((2, 1, 3, 3), -1.0))) == 0.0
    assert float(hinge_d_loss(torch.zeros(2, 1, 3, 3), torch.zeros(2, 1, 3, 3))) == 1.0


def test_adaptive_weight_equals_manual_autograd():
    torch.manual_seed(0)
    last = nn.Conv2d(4, 3, 3, padding=1)
    body = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 8, 8, generator=_gen(1))
    recon = last(torch.relu(body(x)))
    nll = (recon - x).abs().mean()
    g = -(recon * torch.randn(recon.shape, generator=_gen(2))).mean()
    w = adaptive_disc_weight(nll, g, last.weight)
    assert not w.requires_grad
    # reference: separate graphs, torch.autograd.grad on each loss, norms in float64
    def grad_of(loss_fn):
        r = last(torch.relu(body(x)))
        return torch.autograd.grad(loss_fn(r), last.weight)[0].double()
    gn = grad_of(lambda r: (r - x).abs().mean()).norm()
    gg = grad_of(lambda r: -(r * torch.randn(r.shape, generator=_gen(2))).mean()).norm()
    assert float(w) == pytest.approx(float(gn / (gg + 1e-4)), rel=1e-5)
    # graphs were retained: both losses still backpropagate
    (nll + g).backward()
    assert body.weight.grad is not None
    # clamp
    recon = last(torch.relu(body(x)))
    assert float(adaptive_disc_weight((recon - x).abs().mean(), 1e-9 * recon.mean(), last.weight, max_weight=7.0)) == 7.0


def test_disc_starts_at_disc_start():
    assert not disc_active(0, None) and not disc_active(9, 10) and disc_active(10, 10) and disc_active(11, 10)


@pytest.mark.parametrize("n_layers,size,spectral,norm", [(1, 16, False, "batch"), (2, 16, True, "none"),
                                                         (3, 32, False, "group"), (3, 64, True, "none")])
def test_patch_discriminator_geometry(n_layers, size, spectral, norm):
    torch.manual_seed(0)
    d = PatchDiscriminator(3, 8, n_layers, norm=norm, spectral_norm=spectral)
    out = d(torch.randn(2, 3, size, size, generator=_gen(0)))
    side = size // 2 ** n_layers - 2  # n stride-2 4x4 convs halve, the two stride-1 4x4 convs take 1 each
    assert out.shape == (2, 1, side, side)
    with pytest.raises(ValueError, match="too small"):
        d(torch.zeros(1, 3, d.min_size() - 1, d.min_size() - 1))
    if spectral:  # every conv has a largest singular value of about 1 after a few power iterations
        for _ in range(20):
            d(torch.randn(2, 3, size, size, generator=_gen(1)))
        d.eval()
        conv = d.main[0]
        sigma = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2)
        assert float(sigma) == pytest.approx(1.0, rel=0.05)


# --- KL, reconstruction, PSNR -------------------------------------------------------------------------------
def test_kl_matches_torch_distributions():
    mean = torch.randn(3, 4, 5, 5, generator=_gen(0), dtype=torch.float64)
    logvar = torch.randn(3, 4, 5, 5, generator=_gen(1), dtype=torch.float64)
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    ref = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_kl(mean, logvar), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(DiagonalGaussian(mean, logvar).kl(), ref, rtol=1e-12, atol=1e-12)
    assert float(gaussian_kl(torch.zeros(1, 3), torch.zeros(1, 3))) == 0.0


def test_reconstruction_loss_and_psnr_against_references():
    a = torch.rand(2, 3, 8, 8, generator=_gen(0)) * 2 - 1
    b = (a + 0.1 * torch.randn(a.shape, generator=_gen(1))).clamp(-1, 1)
    d = (a - b).numpy().astype(np.float64)
    assert float(reconstruction_loss(b, a)) == pytest.approx(np.abs(d).mean(), rel=1e-5)
    want = 0.5 * np.abs(d).mean() + 2 * (d ** 2).mean()
    assert float(reconstruction_loss(b, a, 0.5, 2.0)) == pytest.approx(want, rel=1e-5)
    ref = [peak_signal_noise_ratio(a[i].numpy().astype(np.float64), b[i].numpy().astype(np.float64), data_range=2.0)
           for i in range(2)]
    np.testing.assert_allclose(psnr(b, a).numpy(), ref, rtol=1e-5)


# --- perceptual ------------------------------------------------------------------------------------------------
def _random_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))


def test_perceptual_zero_for_identical_positive_otherwise():
    loss = PerceptualLoss(_random_net(), layers=[1, "3"])
    x = torch.rand(2, 3, 16, 16, generator=_gen(0)) * 2 - 1
    y = (x + 0.2 * torch.randn(x.shape, generator=_gen(1))).requires_grad_(True)
    assert float(loss(x, x)) == 0.0
    per_image = loss(y, x, reduction="none")
    assert per_image.shape == (2,) and (per_image > 0).all()
    per_image.mean().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0  # gradients reach the images...
    assert all(p.grad is None and not p.requires_grad for p in loss.net.parameters())  # ...not the extractor
    # the distance grows with the perturbation
    z = x + 0.6 * torch.randn(x.shape, generator=_gen(1))
    assert float(loss(z, x)) > float(loss(y.detach(), x))


def test_perceptual_matches_a_hand_computation_and_stays_in_eval():
    net = _random_net()
    loss = PerceptualLoss(net, layers=["1"], mean=None, std=None)
    loss.train()
    assert not loss.net.training
    x = torch.rand(1, 3, 8, 8, generator=_gen(0)) * 2 - 1
    y = torch.rand(1, 3, 8, 8, generator=_gen(1)) * 2 - 1
    fx, fy = (net[:2]((v + 1) / 2).double() for v in (x, y))
    fx, fy = fx / (fx.norm(dim=1, keepdim=True) + 1e-10), fy / (fy.norm(dim=1, keepdim=True) + 1e-10)
    ref = ((fx - fy) ** 2).sum(1).mean()
    assert float(loss(x, y)) == pytest.approx(float(ref), rel=1e-5)


def test_perceptual_rejects_unknown_layers():
    with pytest.raises(ValueError, match=r"no layer\(s\) \['7'\]"):
        PerceptualLoss(_random_net(), layers=[7])


def test_vgg16_weights_load_from_a_torchvision_style_state_dict(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    reference = vgg16_features()
    state = {f"features.{k}": v for k, v in reference.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)  # ignored
    save_file(state, str(tmp_path / "vgg16.safetensors"))
    net = load_vgg16_features(tmp_path / "vgg16.safetensors")
    assert len(net) == 30  # up to relu5_3
    x = torch.rand(1, 3, 32, 32, generator=_gen(0))
    with torch.no_grad():
        torch.testing.assert_close(net(x), reference[:30](x))
    loss = load_perceptual_loss(tmp_path / "vgg16.safetensors")
    assert loss.layers == ["3", "8", "15", "22", "29"]
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not a VGG16 features state dict"):
        load_vgg16_features(tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError, match="perceptual weights not found"):
        load_vgg16_features(tmp_path / "missing.safetensors")


# --- the assembled generator loss ----------------------------------------------------------------------------
def test_generator_loss_terms_and_disc_start():
    torch.manual_seed(0)
    model = KLAutoencoder(channels=8, channel_mult=[1, 2], norm_groups=4, latent_channels=2)
    disc = PatchDiscriminator(3, 8, 1)
    x = torch.rand(2, 3, 16, 16, generator=_gen(0)) * 2 - 1
    out = model(x, generator=_gen(1))
    cfg = AELossConfig(kl_weight=0.3, disc_start=5, disc_weight=0.5)
    loss, logs = generator_loss(x, out, cfg, step=4, last_layer=model.last_layer, discriminator=disc)
    l1 = (out.recon - x).abs().mean()
    want = l1 + 0.3 * out.kl.mean() / (3 * 16 * 16)  # KL per image over the number of pixel values
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert "g_loss" not in logs  # before disc_start
    loss, logs = generator_loss(x, out, cfg, step=5, last_layer=model.last_layer, discriminator=disc)
    g = -disc(out.recon).mean()
    w = 0.5 * adaptive_disc_weight(l1, g, model.last_layer)
    assert loss.item() == pytest.approx((want + w * g).item(), rel=1e-5)
    assert logs["d_weight"] == pytest.approx(float(w), rel=1e-5)
    # VQ-style output: the commitment loss enters with vq_weight
    vq_out = AutoencoderOutput(recon=out.recon, vq_loss=torch.tensor(0.2))
    loss, _ = generator_loss(x, vq_out, AELossConfig(vq_weight=2.0), 0, model.last_layer)
    assert loss.item() == pytest.approx(l1.item() + 0.4, rel=1e-6)


def test_loss_config_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown loss config field"):
        AELossConfig.from_dict({"disc_begin": 3})
