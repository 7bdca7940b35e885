"""Diffusion core: schedule identities, q(x_t|x_0) moments, DDIM determinism, guidance, EMA,
overfitting one batch; and the stage end to end in both token spaces on synthetic cells."""

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from cellfoundry.diffusion.process import (
    EMA,
    NoiseSchedule,
    diffusion_loss,
    guided_denoise_fn,
    invert,
    sample,
    sampling_timesteps,
)
from cellfoundry.models.conditions import ConditionCodec, ConditionModel, ConditionSpec, collate_conditions
from cellfoundry.models.denoiser import ConditionalDenoiser
from cellfoundry.models.dit import DiTConfig, LatentDiT
from cellfoundry.utils import UserError


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_alpha_bar_is_monotone_in_0_1(kind):
    schedule = NoiseSchedule(kind, 1000)
    ab = schedule.alphas_cumprod
    assert (ab[1:] < ab[:-1]).all()
    assert 0 < ab[-1] < 0.01 and 0.99 < ab[0] <= 1


def test_linear_schedule_endpoints():
    betas = NoiseSchedule("linear", 1000).betas
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_q_sample_moments(kind):
    schedule = NoiseSchedule(kind, 1000)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000,), 1.5)
    for t in (10, 500, 900):
        tt = torch.full_like(x0, t, dtype=torch.long)
        xt = schedule.q_sample(x0, tt, torch.randn(x0.shape, generator=gen))
        ab = schedule.alphas_cumprod[t].item()
        assert xt.mean().item() == pytest.approx(1.5 * ab**0.5, abs=0.01)
        assert xt.var().item() == pytest.approx(1 - ab, abs=0.01)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_target_inverts_to_eps_and_x0(prediction):
    schedule = NoiseSchedule("cosine", 1000)
    x0, noise = torch.randn(4, 3, 2), torch.randn(4, 3, 2)
    t = torch.tensor([0, 100, 600, 999])
    xt = schedule.q_sample(x0, t, noise)
    eps, x0_hat = schedule.eps_and_x0(schedule.target(x0, noise, t, prediction), xt, t, prediction)
    assert torch.allclose(eps, noise, atol=1e-4)
    assert torch.allclose(x0_hat[:3], x0[:3], atol=1e-3)


def test_sampling_timesteps_are_descending_and_cover_the_range():
    steps = sampling_timesteps(1000, 50)
    assert steps[0] == 999 and steps[-1] == 0 and len(steps) == 50
    assert all(a > b for a, b in zip(steps, steps[1:]))


def tiny_conditional(n_labels=3, hidden=32, cross=False):
    obs = pd.DataFrame({"label": [str(i) for i in range(n_labels)]})
    codec = ConditionCodec.fit([ConditionSpec("label", "categorical", ["label"])], obs)
    net = LatentDiT(
        DiTConfig(num_tokens=2, token_dim=4, hidden=hidden, depth=2, heads=4, mlp_ratio=4.0, cross_attention=cross)
    )
    return ConditionalDenoiser(net, ConditionModel(codec, hidden), cross), codec


def test_ddim_eta0_is_deterministic_given_x_T():
    torch.manual_seed(0)
    model, codec = tiny_conditional()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    cond = collate_conditions(codec.encode([{"label": "1"}] * 3), np.arange(3))
    fn = guided_denoise_fn(model, cond, [2.0])
    x_T = torch.randn(3, 2, 4)
    schedule = NoiseSchedule("linear", 1000)
    a = sample(fn, (3, 2, 4), schedule, steps=20, eta=0.0, x_T=x_T, generator=torch.Generator().manual_seed(1))
    b = sample(fn, (3, 2, 4), schedule, steps=20, eta=0.0, x_T=x_T, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    c = sample(fn, (3, 2, 4), schedule, steps=20, eta=1.0, x_T=x_T, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(a, c)
    d = sample(fn, (3, 2, 4), schedule, method="ddpm", steps=20, x_T=x_T, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(c, d)  # DDPM is the eta = 1 ancestral sampler


def test_sampler_recovers_a_point_mass_with_the_exact_denoiser():
    # With the exact eps of a point mass at x0, every sampler must land on x0.
    schedule = NoiseSchedule("linear", 1000)
    x0 = torch.tensor([[0.5, -1.0, 2.0]])
    ab = schedule.alphas_cumprod.float()

    def exact_eps(x, t):
        a = ab[t].view(-1, 1)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    for method, eta in (("ddim", 0.0), ("ddim", 0.5), ("ddpm", 1.0)):
        out = sample(
            exact_eps, (4, 3), schedule, method=method, steps=25, eta=eta, generator=torch.Generator().manual_seed(0)
        )
        assert torch.allclose(out, x0.expand(4, 3), atol=1e-3), method


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_inversion_round_trips_with_the_exact_denoiser(prediction):
    """Data N(m, s^2 I) has an exact ε(x_t, t); DDIM from the inverted x_T must land back on x0,
    up to the inversion's first-order error (it shrinks with the steps), and the inverted x_T
    must look like noise (mean ~0, sd ~1), not like the data."""
    schedule = NoiseSchedule("linear", 1000)
    ab = schedule.alphas_cumprod.float()
    m, s = torch.tensor([2.0, -1.0, 0.5, 3.0]), 0.5
    x0 = m + s * torch.randn(256, 4, generator=torch.Generator().manual_seed(0))

    def exact(x, t):
        a = ab[t].view(-1, 1)
        eps = (x - a.sqrt() * m) * (1 - a).sqrt() / (a * s**2 + 1 - a)
        if prediction == "eps":
            return eps
        return a.sqrt() * eps - (1 - a).sqrt() * (x - (1 - a).sqrt() * eps) / a.sqrt()

    errors = {}
    for steps in (50, 200):
        x_T = invert(exact, x0, schedule, steps=steps, prediction=prediction)
        assert x_T.mean().abs() < 0.2 and 0.8 < x_T.std() < 1.2
        back = sample(exact, x0.shape, schedule, steps=steps, eta=0.0, prediction=prediction, x_T=x_T)
        errors[steps] = (back - x0).abs().mean()
    assert errors[50] < 0.1 * s and errors[200] < errors[50] / 3
    assert (sample(exact, x0.shape, schedule, steps=50, prediction=prediction) - x0).abs().mean() > 0.3


def test_guidance_combines_conditional_and_unconditional_outputs():
    torch.manual_seed(0)
    model, codec = tiny_conditional()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    cond = collate_conditions(codec.encode([{"label": "0"}, {"label": "2"}]), np.arange(2))
    x, t = torch.randn(2, 2, 4), torch.tensor([10, 700])
    c = guided_denoise_fn(model, cond, [1.0])(x, t)
    u = guided_denoise_fn(model, cond, [0.0])(x, t)
    g = guided_denoise_fn(model, cond, [3.0])(x, t)
    assert torch.allclose(g, u + 3.0 * (c - u), atol=1e-5)
    assert not torch.allclose(c, u)


def test_per_attribute_guidance_scales():
    torch.manual_seed(0)
    obs = pd.DataFrame({"a": ["x", "y"], "b": ["p", "q"]})
    codec = ConditionCodec.fit(
        [ConditionSpec("a", "categorical", ["a"]), ConditionSpec("b", "categorical", ["b"])], obs
    )
    net = LatentDiT(
        DiTConfig(num_tokens=2, token_dim=4, hidden=16, depth=1, heads=2, mlp_ratio=4.0, cross_attention=False)
    )
    model = ConditionalDenoiser(net, ConditionModel(codec, 16))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    cond = collate_conditions(codec.encode(obs), np.arange(2))
    x, t = torch.randn(2, 2, 4), torch.tensor([3, 400])
    none = torch.zeros(2, 2, dtype=torch.bool)
    only_a = torch.tensor([[True, False]] * 2)
    only_b = torch.tensor([[False, True]] * 2)
    u, ea, eb = (model(x, t, cond, k) for k in (none, only_a, only_b))
    out = guided_denoise_fn(model, cond, [2.0, 0.5])(x, t)
    assert torch.allclose(out, u + 2.0 * (ea - u) + 0.5 * (eb - u), atol=1e-5)


def test_ema_tracks_weights_with_warmup():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.9999)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=0)  # warm-up decay 1/10 -> moves 90% of the way
    assert torch.allclose(ema.shadow.weight, model.weight - 0.1, atol=1e-6)
    assert not ema.shadow.weight.requires_grad


def test_overfitting_one_batch_drives_the_loss_down():
    torch.manual_seed(0)
    model, codec = tiny_conditional(hidden=64)
    schedule = NoiseSchedule("linear", 1000)
    x0 = torch.randn(8, 2, 4)
    cond = collate_conditions(codec.encode([{"label": str(i % 3)} for i in range(8)]), np.arange(8))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)

    def eval_loss():
        g = torch.Generator().manual_seed(123)
        with torch.no_grad():
            return np.mean(
                [diffusion_loss(lambda x, t: model(x, t, cond), x0, schedule, "eps", g).item() for _ in range(20)]
            )

    before = eval_loss()
    for _ in range(300):
        loss = diffusion_loss(lambda x, t: model(x, t, cond), x0, schedule, "eps", gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.5 * before, (before, after)


# -- the stage on synthetic cells ------------------------------------------------------------------

SETTINGS = dict(
    gene_tokens=4,
    gene_token_dim=8,
    gene_encoder_hidden=32,
    d_model=32,
    n_layers=1,
    n_heads=4,
    mlp_ratio=2.0,
    cross_attention=False,
    schedule="linear",
    timesteps=100,
    prediction="eps",
    train=dict(
        lr=1e-3,
        weight_decay=0.0,
        batch_size=32,
        max_steps=6,
        gradient_clip=1.0,
        log_every_n_steps=2,
        ema_decay=0.99,
        cond_drop_prob=0.2,
    ),
    trainer={"devices": 1, "num_nodes": 1, "checkpoint_every_n_steps": 3},
)


def with_train(settings: dict, **train) -> dict:
    """`settings` with keys of its `train` recipe replaced."""
    return {**settings, "train": {**settings["train"], **train}}


SAMPLE = dict(
    sampler="ddim",
    steps=5,
    eta=0.0,
    guidance_scale=2.0,
    batch_size=16,
    clip_x0=True,
    heldout_from="control",
    heldout_guidance_scale=3.0,
    guidance_check=True,
    requests=[],
)
CONDITIONS = [{"name": "cell_type", "kind": "categorical", "columns": ["ct"]}]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """80 cells x 30 genes in three types, a 64-d random vocabulary, fake latents [N, 3, 8] and a
    tiny untrained Xpressor checkpoint (its decoder is what the latent space decodes with)."""
    from cellfoundry.models.xpressor import Xpressor, XpressorConfig, save_xpressor
    from cellfoundry.vocab import build_random_vocab

    root = tmp_path_factory.mktemp("diffusion")
    rng = np.random.default_rng(0)
    n, g = 80, 30
    types = np.array(["A", "B", "C"])[np.arange(n) % 3]
    lam = np.full((n, g), 2.0)
    for k, t in enumerate("ABC"):
        lam[types == t, k * 10 : (k + 1) * 10] *= 6
    obs = pd.DataFrame(
        {"ct": pd.Categorical(types), "split": np.where(np.arange(n) % 5 == 0, "test", "train")},
        index=[f"cell{i}" for i in range(n)],
    )
    adata = ad.AnnData(
        sp.csr_matrix(rng.poisson(lam).astype(np.float32)), obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(g)])
    )
    adata.write_h5ad(root / "filtered.h5ad")
    vocab = build_random_vocab([f"G{i}" for i in range(g + 5)], 16, seed=0)
    vocab.save(root / "vocab.pt")
    np.save(root / "latents.npy", rng.normal(size=(n, 3, 8)).astype(np.float32))
    torch.manual_seed(0)
    xp = Xpressor(XpressorConfig.from_dict(dict(d_base=8, gene_dim=16, n_latent=3, d_model=8, n_heads=2, n_blocks=1)))
    save_xpressor(root / "xpressor.ckpt", xp, base_sha256="0" * 64)
    return root


@pytest.mark.parametrize("space", ["latent", "gene"])
def test_stage_trains_and_samples_in_both_token_spaces(synthetic, tmp_path, space):
    from cellfoundry.diffusion.module import load_diffusion
    from cellfoundry.diffusion.stage import run_diffusion_sample, run_diffusion_train

    settings = {**SETTINGS, "token_space": space}
    latent = space == "latent"
    run_diffusion_train(
        synthetic / "filtered.h5ad",
        tmp_path / "model.ckpt",
        tmp_path / "train",
        settings,
        CONDITIONS,
        seed=0,
        device="cpu",
        latents=synthetic / "latents.npy" if latent else None,
        xpressor_checkpoint=synthetic / "xpressor.ckpt" if latent else None,
    )
    ckpt = load_diffusion(tmp_path / "model.ckpt")
    assert ckpt.payload["token_shape"] == ([3, 8] if latent else [30])
    assert ckpt.codec.vocab["cell_type"] == [["A", "B", "C"]]
    assert (tmp_path / "train" / "logs" / "version_0" / "metrics.csv").exists()
    assert (tmp_path / "train" / "checkpoints" / "last.ckpt").exists()
    paths = [tmp_path / "samples.h5ad", tmp_path / "summary.json"]
    kwargs = dict(
        seed=0,
        device="cpu",
        xpressor_checkpoint=synthetic / "xpressor.ckpt",
        vocab=synthetic / "vocab.pt",
        latents=synthetic / "latents.npy",
    )
    summary = run_diffusion_sample(tmp_path / "model.ckpt", synthetic / "filtered.h5ad", *paths, SAMPLE, **kwargs)
    samples = ad.read_h5ad(paths[0])
    real = ad.read_h5ad(synthetic / "filtered.h5ad")
    test = real.obs[real.obs.split == "test"]
    assert samples.n_obs == len(test)  # one per test cell, with its label
    assert sorted(samples.obs["ct"].astype(str)) == sorted(test["ct"].astype(str))
    assert list(samples.var_names) == list(real.var_names)
    assert np.isfinite(samples.layers["mean"]).all() and (samples.layers["mean"] >= 0).all()
    assert samples.X.sum() > 0
    assert samples.obs["condition"].str.startswith("cell_type=").all()
    runs = {"guided (scale 2)", "conditional (scale 1)", "unconditional (scale 0)"}
    check = summary["guidance_check"]
    assert set(check["expression"]["accuracy"]) == runs
    assert ("latent" in check) == latent and ("decoded_real_test_accuracy" in check["expression"]) == latent
    assert check["n_cells"] == {"generated": len(test), "real_train": real.n_obs - len(test), "real_test": len(test)}
    if latent:
        assert set(check["latent"]["accuracy"]) == runs
    assert json.loads(paths[1].read_text()) == summary
    # same seed, same samples (CPU determinism)
    again = tmp_path / "again.h5ad"
    run_diffusion_sample(
        tmp_path / "model.ckpt",
        synthetic / "filtered.h5ad",
        again,
        tmp_path / "s2.json",
        {**SAMPLE, "guidance_check": False},
        **kwargs,
    )
    assert np.array_equal(ad.read_h5ad(again).layers["mean"], samples.layers["mean"])


def test_guidance_check_reads_a_capped_subsample_of_cells(synthetic, tmp_path, monkeypatch):
    """At scale the guidance check classifies a seeded subsample (GUIDANCE_CHECK_MAX_CELLS) of
    the real train / test cells and of the requests, not all of them."""
    import cellfoundry.diffusion.stage as stage
    import cellfoundry.evaluate.generation as generation

    monkeypatch.setattr(generation, "GUIDANCE_CHECK_MAX_CELLS", 10)
    monkeypatch.setattr(stage, "GUIDANCE_CHECK_MAX_CELLS", 10)
    settings = {**with_train(SETTINGS, max_steps=2), "token_space": "latent"}
    latent_inputs = dict(latents=synthetic / "latents.npy", xpressor_checkpoint=synthetic / "xpressor.ckpt")
    model = tmp_path / "model.ckpt"
    stage.run_diffusion_train(
        synthetic / "filtered.h5ad",
        model,
        tmp_path / "train",
        settings,
        CONDITIONS,
        seed=0,
        device="cpu",
        **latent_inputs,
    )
    summary = stage.run_diffusion_sample(
        model,
        synthetic / "filtered.h5ad",
        tmp_path / "samples.h5ad",
        tmp_path / "summary.json",
        SAMPLE,
        seed=0,
        device="cpu",
        vocab=synthetic / "vocab.pt",
        **latent_inputs,
    )
    check = summary["guidance_check"]
    assert summary["n_samples"] == 16 and ad.read_h5ad(tmp_path / "samples.h5ad").n_obs == 16
    assert check["n_cells"] == {"generated": 10, "real_train": 10, "real_test": 10}
    assert all(0.0 <= a <= 1.0 for a in check["expression"]["accuracy"].values())
    assert 0.0 <= check["expression"]["decoded_real_test_accuracy"] <= 1.0


def test_sampling_requests_and_unknown_labels(synthetic, tmp_path):
    from cellfoundry.diffusion.stage import run_diffusion_sample, run_diffusion_train

    settings = {**with_train(SETTINGS, max_steps=2), "token_space": "gene"}
    run_diffusion_train(
        synthetic / "filtered.h5ad",
        tmp_path / "model.ckpt",
        tmp_path / "train",
        settings,
        CONDITIONS,
        seed=0,
        device="cpu",
    )
    requests = [{"n": 5, "obs": {"ct": "B"}}, {"n": 3, "obs": {}}]
    cfg = {**SAMPLE, "requests": requests, "guidance_check": False}
    run_diffusion_sample(
        tmp_path / "model.ckpt",
        synthetic / "filtered.h5ad",
        tmp_path / "s.h5ad",
        tmp_path / "s.json",
        cfg,
        seed=0,
        device="cpu",
    )
    samples = ad.read_h5ad(tmp_path / "s.h5ad")
    assert samples.obs["ct"].astype(str).tolist() == ["B"] * 5 + ["nan"] * 3
    assert samples.obs["condition"].tolist()[-1] == "cell_type=none"
    bad = {**cfg, "requests": [{"n": 2, "obs": {"ct": "Z"}}]}
    with pytest.raises(UserError, match=r"unknown label 'Z'.*'A', 'B', 'C'"):
        run_diffusion_sample(
            tmp_path / "model.ckpt",
            synthetic / "filtered.h5ad",
            tmp_path / "x.h5ad",
            tmp_path / "x.json",
            bad,
            seed=0,
            device="cpu",
        )
    assert not (tmp_path / "x.h5ad").exists()
    with pytest.raises(UserError, match="no condition uses"):
        run_diffusion_sample(
            tmp_path / "model.ckpt",
            synthetic / "filtered.h5ad",
            tmp_path / "x.h5ad",
            tmp_path / "x.json",
            {**cfg, "requests": [{"n": 1, "obs": {"batch": "1"}}]},
            seed=0,
            device="cpu",
        )


def test_unconditional_model_samples_requests(synthetic, tmp_path):
    from cellfoundry.diffusion.stage import run_diffusion_sample, run_diffusion_train

    settings = {**with_train(SETTINGS, max_steps=2), "token_space": "gene", "cross_attention": True}
    run_diffusion_train(
        synthetic / "filtered.h5ad", tmp_path / "model.ckpt", tmp_path / "train", settings, [], seed=0, device="cpu"
    )
    cfg = {**SAMPLE, "requests": [{"n": 4, "obs": {}}], "sampler": "ddpm"}
    summary = run_diffusion_sample(
        tmp_path / "model.ckpt",
        synthetic / "filtered.h5ad",
        tmp_path / "s.h5ad",
        tmp_path / "s.json",
        cfg,
        seed=0,
        device="cpu",
    )
    samples = ad.read_h5ad(tmp_path / "s.h5ad")
    assert samples.n_obs == 4 and (samples.obs["condition"] == "unconditional").all()
    assert "guidance_check" not in summary and summary["conditions"] == []


def test_changed_settings_do_not_resume_a_stale_checkpoint(synthetic, tmp_path):
    from cellfoundry.diffusion.module import load_diffusion
    from cellfoundry.diffusion.stage import run_diffusion_train

    gene = {**with_train(SETTINGS, max_steps=3), "token_space": "gene"}
    run_diffusion_train(
        synthetic / "filtered.h5ad", tmp_path / "a.ckpt", tmp_path / "train", gene, CONDITIONS, seed=0, device="cpu"
    )
    assert (tmp_path / "train" / "checkpoints" / "last.ckpt").exists()
    latent = {**with_train(SETTINGS, max_steps=3), "token_space": "latent"}
    run_diffusion_train(
        synthetic / "filtered.h5ad",
        tmp_path / "b.ckpt",
        tmp_path / "train",
        latent,
        CONDITIONS,
        seed=0,
        device="cpu",
        latents=synthetic / "latents.npy",
    )
    assert load_diffusion(tmp_path / "b.ckpt").payload["token_shape"] == [3, 8]


@pytest.mark.parametrize("stop", [(5, "signal"), (4, "crash")], ids=["signal", "crash-after-checkpoint"])
def test_interrupted_training_resumes_to_the_uninterrupted_result(synthetic, tmp_path, monkeypatch, stop):
    """diffusion_train stopped at a step (SIGTERM; a crash one step after the step-3 checkpoint)
    and re-run ends with the uninterrupted run's weights and EMA weights (every tensor equal) and
    its loss rows, each step once; noise, timesteps and condition dropout are per-step draws."""
    from test_preemption import assert_same_weights, interrupted

    from cellfoundry.diffusion.stage import run_diffusion_train
    from cellfoundry.trainer import read_metrics

    settings = {**with_train(SETTINGS, max_steps=8, log_every_n_steps=1), "token_space": "gene"}  # 2 batches per epoch

    def run(out):
        run_diffusion_train(
            synthetic / "filtered.h5ad", out / "model.ckpt", out / "train", settings, CONDITIONS, seed=0, device="cpu"
        )

    run(tmp_path / "reference")
    interrupted(monkeypatch, *stop, lambda: run(tmp_path / "resumed"))
    run(tmp_path / "resumed")
    for name in ("model.ckpt", "train/checkpoints/last.ckpt"):  # EMA weights; the trained weights
        reference, resumed = (
            torch.load(tmp_path / d / name, weights_only=False)["state_dict"] for d in ("reference", "resumed")
        )
        assert_same_weights(resumed, reference)
    expected = read_metrics(tmp_path / "reference" / "train")
    assert list(expected["step"]) == list(range(8))
    pd.testing.assert_frame_equal(read_metrics(tmp_path / "resumed" / "train"), expected)


def test_resume_identity_is_the_hyperparameters(synthetic):
    """The resume fingerprint comes from the module's and the data module's hyperparameters: a
    larger step budget still resumes (RESUMABLE_CHANGES); another learning rate, seed or training
    data of the same shape does not."""
    from cellfoundry.diffusion.data import DiffusionDataModule, read_training_data
    from cellfoundry.diffusion.module import DiffusionModule
    from cellfoundry.trainer import resume_identity, settings_fingerprint

    data = read_training_data(synthetic / "filtered.h5ad", "gene", CONDITIONS)
    settings = {**SETTINGS, "token_space": "gene"}

    def fingerprint(settings: dict, seed: int = 0, cells: dict = data) -> str:
        module = DiffusionModule(settings, cells["codec"].to_dict(), list(cells["x0"].shape[1:]))
        identity = resume_identity(module, DiffusionDataModule(cells, settings["train"]["batch_size"], seed))
        assert identity["data"]["x0_shape"] == list(cells["x0"].shape) and identity["data"]["seed"] == seed
        return settings_fingerprint(identity)

    base = fingerprint(settings)
    assert fingerprint(with_train(settings, max_steps=60, log_every_n_steps=7)) == base
    assert fingerprint({**settings, "trainer": {**settings["trainer"], "checkpoint_every_n_steps": 9}}) == base
    assert fingerprint(with_train(settings, lr=2e-3)) != base
    assert fingerprint(settings, seed=1) != base
    # other training data of the same shape (e.g. the latents of a retrained Xpressor)
    assert fingerprint(settings, cells={**data, "x0": data["x0"][::-1].copy()}) != base


def test_samples_are_written_batch_by_batch_as_one_would_write_them_whole(tmp_path, monkeypatch):
    """samples.h5ad is streamed (rows appended per decoded batch, so [cells x genes] is never
    held at once); read back it equals the whole decode: X = sampled counts, layers["mean"]."""
    import cellfoundry.diffusion.sample as sample_module
    from cellfoundry.xpressor.decode import sampled_counts

    monkeypatch.setattr(sample_module, "BATCH_CELLS", 16)  # 50 cells: 4 batches, the last partial
    rng = np.random.default_rng(0)
    tokens = np.log1p(rng.gamma(0.3, 4.0, (50, 30))).astype(np.float32)
    library = rng.uniform(500, 3000, 50).astype(np.float32)
    spec = ConditionSpec(name="cell_type", kind="categorical", columns=["cell_type"])
    codec = ConditionCodec.fit([spec], pd.DataFrame({"cell_type": ["a", "b"] * 25}))
    request_obs = pd.DataFrame({"cell_type": ["a", "b"] * 25})
    obs = sample_module.samples_obs(request_obs, codec, library)
    var_names = [f"g{i}" for i in range(30)]
    seen = []
    path = tmp_path / "samples.h5ad"
    sample_module.write_samples(
        path,
        sample_module.gene_space_decoder(tokens, library, seed=3),
        obs,
        var_names,
        {"note": "x"},
        on_batch=lambda b: seen.append((b.lo, b.hi)),
    )
    assert seen == [(0, 16), (16, 32), (32, 48), (48, 50)]
    back = ad.read_h5ad(path)
    whole = list(sample_module.gene_space_decoder(tokens, library, seed=3))
    assert sp.issparse(back.X) and back.X.dtype == np.float32
    assert (back.X != sampled_counts(whole)).nnz == 0 and back.X.nnz > 0
    np.testing.assert_array_equal(back.layers["mean"], np.concatenate([b.mean for b in whole]))
    assert list(back.var_names) == var_names and back.uns["note"] == "x"
    pd.testing.assert_frame_equal(back.obs, obs)


def test_gene_space_decoding_returns_an_observed_cell_unchanged_and_keeps_the_mean():
    """A generated cell imitates an observed one: decoding the log1p(CP10k) of real counts with
    their library gives those counts back (no second counting noise); counts of fractional means
    stay within one of them and keep them on average."""
    from cellfoundry.diffusion.sample import gene_space_decoder
    from cellfoundry.utils import log1p_normalise

    rng = np.random.default_rng(0)
    counts = rng.negative_binomial(2, 0.3, size=(40, 25)).astype(np.float32)
    counts[:, 0] += 1  # no empty cell
    (batch,) = gene_space_decoder(log1p_normalise(counts).astype(np.float32), counts.sum(1), seed=1)
    np.testing.assert_array_equal(batch.counts, counts)

    tokens = np.tile(rng.uniform(0, 3, size=(1, 25)).astype(np.float32), (4000, 1))
    batches = list(gene_space_decoder(tokens, np.full(4000, 37.0, dtype=np.float32), seed=2))
    decoded, mean = (np.concatenate([getattr(b, k) for b in batches]) for k in ("counts", "mean"))
    assert np.all(np.abs(decoded - mean) < 1) and np.all(decoded == np.round(decoded))
    np.testing.assert_allclose(decoded.mean(0), mean[0], atol=0.05)


def test_held_out_cells_are_edited_from_control_latents(synthetic, tmp_path):
    """Latent token space: each held-out (A, stim) cell is edited from a non-held-out (A, ctrl)
    cell's Xpressor latents (rows of latents.npy aligned with the h5ad) and decoded by Xpressor."""
    from cellfoundry.diffusion.stage import run_diffusion_sample, run_diffusion_train

    real = ad.read_h5ad(synthetic / "filtered.h5ad")
    real.obs["cond"] = np.where(np.arange(real.n_obs) % 2 == 0, "ctrl", "stim")
    held = ((real.obs["ct"] == "A") & (real.obs["cond"] == "stim")).to_numpy()
    real.obs["holdout"] = held
    real.obs["split"] = np.where(held, "test", real.obs["split"])
    real.obs["total_counts"] = np.asarray(real.X.sum(1)).ravel()
    path = tmp_path / "filtered.h5ad"
    real.write_h5ad(path)
    conditions = [{"name": "state", "kind": "multi_component", "columns": ["ct", "cond"], "none_value": "ctrl"}]
    latent = dict(latents=synthetic / "latents.npy", xpressor_checkpoint=synthetic / "xpressor.ckpt")
    run_diffusion_train(
        path,
        tmp_path / "model.ckpt",
        tmp_path / "train",
        {**SETTINGS, "token_space": "latent"},
        conditions,
        seed=0,
        device="cpu",
        **latent,
    )
    summary = run_diffusion_sample(
        tmp_path / "model.ckpt",
        path,
        tmp_path / "samples.h5ad",
        tmp_path / "summary.json",
        {**SAMPLE, "guidance_check": False},
        seed=0,
        device="cpu",
        vocab=synthetic / "vocab.pt",
        **latent,
    )
    samples = ad.read_h5ad(tmp_path / "samples.h5ad")
    assert summary["start"] == "real control cells (DDIM inversion)" and samples.n_obs == held.sum()
    sources = real.obs.loc[samples.obs["source_cell"]]
    assert (sources["ct"] == "A").all() and (sources["cond"] == "ctrl").all() and not sources["holdout"].any()
    assert np.isfinite(samples.layers["mean"]).all() and samples.X.sum() > 0
