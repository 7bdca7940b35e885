"""Unit tests of the Xpressor model, its PEFT wrapper, checkpoint and decoder (tiny sizes, CPU)."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from cellfoundry.evaluate.knn import knn_split_accuracy
from cellfoundry.evaluate.reconstruction import ReconstructionScores, reconstruction_metrics
from cellfoundry.models.attention import Attention, count_attention_scores
from cellfoundry.models.se import SEConfig, StateEmbedding
from cellfoundry.models.xpressor import (
    CHECKPOINT_DEFAULTS,
    DecoderOutput,
    Xpressor,
    XpressorConfig,
    decode_expression,
    expected_counts,
    load_xpressor,
    masked_mean,
    nb_log_prob,
    sample_counts,
    save_xpressor,
    zinb_log_prob,
)
from cellfoundry.utils import UserError, file_sha256
from cellfoundry.xpressor.data import (
    CellBatches,
    CellData,
    base_layer_outputs,
    collate,
    resolve_layers,
    split_indices,
    split_outputs,
)
from cellfoundry.xpressor.module import TrainSettings, XpressorModule

torch.set_num_threads(1)
V, E, D_BASE, L = 40, 16, 32, 17  # vocabulary, gene-vector width, base width, sentence length


def tiny_base(seed: int = 0) -> StateEmbedding:
    torch.manual_seed(seed)
    cfg = SEConfig(token_dim=E, d_model=D_BASE, nhead=4, d_hid=64, nlayers=2, output_dim=D_BASE, pad_length=L)
    return StateEmbedding(cfg).eval()


def tiny_cells(n: int = 24, g: int = 12, seed: int = 0):
    """Token inputs [n, L], counts [n, g] and vocabulary ids [g] of synthetic cells."""
    rng = np.random.default_rng(seed)
    decode_genes = np.arange(g, dtype=np.int64)
    counts = rng.poisson(rng.gamma(1.0, 3.0, size=(n, g))).astype(np.float32)
    gene_ids = np.stack([np.concatenate([[-2], rng.permutation(V)[: L - 1]]) for _ in range(n)]).astype(np.int32)
    values = rng.random((n, L), dtype=np.float32) * 5
    return gene_ids, values, counts, decode_genes


def xcfg(**kw) -> XpressorConfig:
    base = dict(d_base=D_BASE, gene_dim=E, n_latent=4, d_model=16, n_blocks=2, n_heads=2, mlp_ratio=2)
    return XpressorConfig(**{**CHECKPOINT_DEFAULTS, **base, **kw})


def test_shapes_encode_decode_labels():
    cfg = xcfg(labels={"cell_type": ["a", "b", "c"]}, label_dim=5)
    model = Xpressor(cfg)
    tokens = torch.randn(3, 10, D_BASE)
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, 7:] = True
    latents = model.encode(tokens, mask)
    assert latents.shape == (3, cfg.n_latent + 1, cfg.d_model)
    out = model.decode(latents, torch.randn(7, E))
    for field in out:
        assert field.shape == (3, 7)
    assert torch.allclose(out.scale.sum(-1), torch.ones(3))
    assert model.classify(latents)["cell_type"].shape == (3, 3)
    assert model.embedding(latents).shape == (3, 5)
    # padded tokens are ignored: changing them leaves cell 0's latents unchanged
    tokens2 = tokens.clone()
    tokens2[0, 7:] += 10.0
    assert torch.allclose(model.encode(tokens2, mask)[0], latents[0], atol=1e-5)
    assert not torch.allclose(model.encode(tokens2, mask)[1:], model.encode(tokens2 * 2, mask)[1:])


@pytest.mark.parametrize("layers", [[-1], [0, -1]])
def test_pooled_queries_start_from_the_pooled_baselines_map(layers):
    """With pooled_queries the encoder starts as the pooled baselines' model: its blocks' residual
    branches are zero, so the latents are final_norm(learned queries + a linear map of the layer
    means and CLS); the cross-attention then learns what it adds. It needs the CLS."""
    torch.manual_seed(0)
    model = Xpressor(xcfg(pooled_queries=True, base_layers=layers))
    k = len(layers)
    tokens, cls = torch.randn(3, k, 10, D_BASE), torch.randn(3, D_BASE)
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[1, 6:] = True
    keep = (~mask).float()[:, None, :, None]
    means = ((tokens * keep).sum(2) / keep.sum(2)).flatten(1)
    summary = model.query_proj(torch.cat([means, cls], dim=1)).view(3, -1, 16)
    expected = model.final_norm(model.latents + summary)
    torch.testing.assert_close(model.encode(tokens, mask, cls), expected)
    with pytest.raises(ValueError, match="CLS"):
        model.encode(tokens, mask)


@pytest.mark.parametrize("kw", [{}, {"log1p_head": True, "dispersion": "gene"}, {"n_decoder_blocks": 0}])
def test_decoding_in_gene_chunks_equals_decoding_at_once(monkeypatch, kw):
    """Many genes are decoded in chunks (bounded memory); only the softmax spans all genes."""
    import cellfoundry.models.xpressor as xpressor_module

    torch.manual_seed(0)
    model = Xpressor(xcfg(**kw)).eval()
    latents, genes = torch.randn(3, 4, 16), torch.randn(50, E)
    whole = model.decode(latents, genes)
    monkeypatch.setattr(xpressor_module, "DECODE_CHUNK_ELEMENTS", 3 * 16 * 7)  # chunks of 7 genes
    chunked = model.decode(latents, genes)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b)
    assert torch.allclose(chunked.scale.sum(-1), torch.ones(3))


def test_multi_layer_keys_and_pooled_baselines_read_the_same_layers():
    base = tiny_base()
    gene_ids, values, _, _ = tiny_cells(n=3)
    ids, vals, table = torch.from_numpy(gene_ids.astype(np.int64)), torch.from_numpy(values), torch.randn(V, E)
    with torch.no_grad():
        stack, final, padding = base_layer_outputs(base, ids, vals, table, [0, 1, -1])
        h0, _ = base.token_inputs(ids, vals, table)
        full, _ = base.encode(ids, vals, table)
    assert stack.shape == (3, 3, L + 1, D_BASE)
    assert torch.allclose(stack[:, 0], h0) and torch.allclose(stack[:, -1], full) and torch.equal(final, full)
    tokens, mask, cls = split_outputs(stack, final, padding)
    assert tokens.shape == (3, 3, L - 1, D_BASE) and torch.equal(cls, full[:, 0])
    model = Xpressor(xcfg(base_layers=[0, 1, 2]))
    with count_attention_scores() as n:
        latents = model.encode(tokens, mask)
    one = Xpressor(xcfg())
    with count_attention_scores() as n1:
        one.encode(tokens[:, -1], mask)
    # each layer read adds T keys to the cross-attention (self-attention among latents unchanged)
    cross_one = 3 * 2 * 4 * (L - 1) * 2  # cells x heads x latents x keys x blocks
    assert n[0] - n1[0] == 2 * cross_one
    assert latents.shape == (3, 4, 16)
    # the layer embedding marks where a key comes from: swapping two layers' tokens changes the latents
    assert not torch.allclose(model.encode(tokens[:, [1, 0, 2]], mask), latents)
    # the mean baseline averages every layer read, concatenated
    pooled = masked_mean(tokens, mask)
    assert pooled.shape == (3, 3 * D_BASE) and torch.allclose(pooled[:, :D_BASE], tokens[:, 0].mean(1))
    assert Xpressor(xcfg(pooling="mean", base_layers=[0, 1, 2])).encode(pooled).shape == (3, 4, 16)
    with pytest.raises(UserError, match="base_layers"):
        resolve_layers([3], 2)


def test_gene_dispersion_depends_on_the_gene_only():
    model = Xpressor(xcfg(dispersion="gene"))
    genes = torch.randn(6, E)
    out = model.decode(torch.randn(4, 5, 16), genes)
    assert out.theta.shape == (4, 6) and torch.allclose(out.theta, out.theta[:1].expand(4, -1))
    assert not torch.allclose(out.theta[0, 0], out.theta[0, 1])
    cell = Xpressor(xcfg(dispersion="gene-cell")).decode(torch.randn(4, 5, 16), genes)
    assert not torch.allclose(cell.theta, cell.theta[:1].expand(4, -1))


def test_pooled_baseline_shapes():
    model = Xpressor(xcfg(pooling="mean"))
    latents = model.encode(torch.randn(5, D_BASE))
    assert latents.shape == (5, 4, 16)
    assert model.decode(latents, torch.randn(9, E)).log1p.shape == (5, 9)


def test_nb_and_zinb_log_prob_match_references():
    x = torch.tensor([0.0, 1.0, 4.0, 10.0])
    mu = torch.tensor([0.5, 2.0, 3.0, 8.0])
    theta = torch.tensor([1.5, 0.7, 3.0, 10.0])
    # NB(mu, theta) == torch's NegativeBinomial(total_count=theta, probs=mu / (mu + theta))
    ref = torch.distributions.NegativeBinomial(total_count=theta, probs=mu / (mu + theta)).log_prob(x)
    assert torch.allclose(nb_log_prob(x, mu, theta), ref, atol=1e-4)
    pi_logit = torch.tensor([0.3, -1.0, 2.0, 0.0])
    pi = torch.sigmoid(pi_logit)
    zref = torch.where(x == 0, torch.log(pi + (1 - pi) * ref.exp()), torch.log1p(-pi) + ref)
    assert torch.allclose(zinb_log_prob(x, mu, theta, pi_logit), zref, atol=1e-4)


def _module(cfg=None, unfreeze=False, labels=None):
    base = tiny_base()
    table = torch.randn(V, E)
    gene_ids, values, counts, decode_genes = tiny_cells()
    cfg = cfg or xcfg(labels=labels or {})
    settings = TrainSettings(
        lr=3e-3,
        weight_decay=0.01,
        batch_size=32,
        max_epochs=20,
        patience=5,
        lr_patience=None,
        gradient_clip=1.0,
        val_fraction=0.1,
        eval_max_cells=None,
        unfreeze_last_layer=unfreeze,
        genes_per_step=None,
    )
    module = XpressorModule(base, table, decode_genes, cfg.to_dict(), asdict(settings))
    n = len(gene_ids)
    data = CellData(
        gene_ids,
        values,
        sp.csr_matrix(counts),
        decode_genes,
        [f"g{i}" for i in range(len(decode_genes))],
        np.array(["train"] * n),
        {"cell_type": np.arange(n) % 2} if labels else {},
        labels or {},
    )
    batch = collate([CellBatches(data, np.arange(n))[i] for i in range(n)])
    return module, batch


@pytest.mark.parametrize("layers", [[-1], [0, 1, -1]])
def test_frozen_base_gets_no_gradient_and_stays_in_eval(layers):
    module, batch = _module(xcfg(base_layers=layers))
    module.train()
    assert not module.base.training  # dropout of the base stays off while training
    loss = module.losses(batch)["loss"]
    loss.backward()
    assert all(p.grad is None for p in module.base.parameters())
    assert all(not p.requires_grad for p in module.base.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.xpressor.parameters())
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("xpressor.") for n in trainable)
    assert all(k.startswith("xpressor.") for k in module.trainable_state())


def test_unfreeze_last_layer_trains_only_that_layer():
    module, batch = _module(unfreeze=True)
    module.train()
    module.losses(batch)["loss"].backward()
    last = f"transformer_encoder.layers.{module.base.cfg.nlayers - 1}."
    for name, p in module.base.named_parameters():
        if name.startswith(last):
            assert p.grad is not None
        else:
            assert p.grad is None, name


@pytest.mark.parametrize("loss", ["nb", "zinb", "mse"])
def test_overfits_a_small_batch(loss):
    torch.manual_seed(0)
    module, batch = _module(cfg=xcfg(loss=loss))
    module.train()
    opt = module.configure_optimizers()
    first = None
    for _ in range(150):
        opt.zero_grad()
        terms = module.losses(batch)
        terms["loss"].backward()
        opt.step()
        first = first if first is not None else terms["loss"].item()
    assert terms["loss"].item() < 0.6 * first


def test_label_head_learns_labels():
    torch.manual_seed(0)
    module, batch = _module(labels={"cell_type": ["a", "b"]})
    module.train()
    opt = module.configure_optimizers()
    for _ in range(100):
        opt.zero_grad()
        terms = module.losses(batch)
        terms["loss"].backward()
        opt.step()
    assert terms["ce_cell_type"].item() < 0.3


def test_checkpoint_roundtrip_and_base_hash_mismatch(tmp_path):
    base_a, base_b = tmp_path / "a.ckpt", tmp_path / "b.ckpt"
    torch.save({"w": torch.ones(2)}, base_a)
    torch.save({"w": torch.zeros(2)}, base_b)
    model = Xpressor(xcfg(labels={"ct": ["x", "y"]}))
    path = tmp_path / "model.ckpt"
    save_xpressor(path, model, file_sha256(base_a), meta={"genes": ["A", "B"]})
    loaded = load_xpressor(path, base_checkpoint=base_a)
    assert loaded.meta["genes"] == ["A", "B"]
    assert loaded.config == model.cfg
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v)
    with pytest.raises(UserError, match="SHA-256"):
        load_xpressor(path, base_checkpoint=base_b)
    with pytest.raises(UserError, match="does not exist"):
        load_xpressor(tmp_path / "missing.ckpt")


def test_decoder_callable_alone():
    torch.manual_seed(0)
    model = Xpressor(xcfg()).eval()
    table = torch.randn(V, E)
    latents = torch.randn(6, 4, 16)
    genes = torch.tensor([3, 1, 7])
    log1p = decode_expression(model, latents, genes, table)
    assert log1p.shape == (6, 3) and torch.all(log1p >= 0)
    library = torch.full((6,), 1000.0)
    counts = decode_expression(model, latents, genes, table, library_size=library)
    assert torch.allclose(counts.sum(-1), library)
    # a gene's prediction does not depend on the other requested genes (up to the softmax scale)
    ratio_a = decode_expression(model, latents, torch.tensor([3, 1]), table, library)
    assert torch.allclose(ratio_a[:, 0] / ratio_a[:, 1], counts[:, 0] / counts[:, 1], rtol=1e-4)
    out = model.decode(latents, table[genes])
    g1 = torch.Generator().manual_seed(1)
    g2 = torch.Generator().manual_seed(1)
    s1, s2 = sample_counts(out, library, "nb", g1), sample_counts(out, library, "nb", g2)
    assert torch.equal(s1, s2) and s1.shape == (6, 3) and torch.all(s1 >= 0)


@pytest.mark.parametrize("loss", ["nb", "zinb", "mse"])
def test_log1p_output_is_the_decoded_mean(loss):
    """The log1p field (MSE term, metrics) and the expected counts describe the same mean; for
    ZINB that mean includes the zero-inflation, (1 - pi) * scale."""
    torch.manual_seed(0)
    model = Xpressor(xcfg(loss=loss)).eval()
    with torch.no_grad():
        model.head.bias[2] = 1.0  # pi = sigmoid(1) ~ 0.73: far from negligible
        out = model.decode(torch.randn(5, 4, 16), torch.randn(7, E))
    target_sum = model.cfg.target_sum
    counts = expected_counts(out, torch.full((5,), target_sum), loss)
    assert torch.allclose(out.log1p, torch.log1p(counts), atol=1e-5)
    if loss == "zinb":
        assert torch.all(out.log1p < torch.log1p(out.scale * target_sum))


@pytest.mark.parametrize("loss", ["nb", "mse"])
def test_gene_subset_loss_targets_the_whole_library(loss):
    """A training step decodes a random gene subset. Fractions that are exact within the subset
    must score an MSE of zero against the expression normalised by the cell's whole library
    (what the evaluation compares), not only against a target renormalised to the subset."""
    model = Xpressor(xcfg(loss=loss))
    counts = torch.tensor([[5.0, 0.0, 3.0, 12.0, 1.0, 9.0], [0.0, 2.0, 7.0, 1.0, 4.0, 6.0]])
    library, pick = counts.sum(1), torch.tensor([0, 2, 3])
    sub = counts[:, pick]
    scale = sub / sub.sum(1, keepdim=True)
    out = DecoderOutput(scale, torch.full_like(scale, 1e4), torch.full_like(scale, -20.0), torch.log1p(scale * 1e4))
    assert model.reconstruction_loss(out, sub, library)["mse"] < 1e-8
    wrong = DecoderOutput(counts[:, pick] / library[:, None], out.theta, out.pi_logit, out.log1p)
    assert model.reconstruction_loss(wrong, sub, library)["mse"] > 0.01


def test_criss_cross_attention_cost_is_linear_in_tokens():
    model = Xpressor(xcfg(attention="criss-cross")).eval()
    standard = Xpressor(xcfg()).eval()
    counts = {}
    with torch.no_grad():
        for n in (64, 128, 256):
            with count_attention_scores() as counter:
                model.encode(torch.randn(1, n, D_BASE))
            counts[n] = counter[0]
    assert counts[256] / counts[64] <= 4.5  # linear growth (quadratic would be 16x)
    assert counts[256] > counts[128] > counts[64]
    with torch.no_grad(), count_attention_scores() as counter:
        standard.encode(torch.randn(1, 256, D_BASE))
    assert counts[256] > counter[0]  # criss-cross also attends tokens -> latents
    # the counter sees quadratic cost when there is some: full self-attention among tokens
    attn = Attention(16, 2)
    sizes = {}
    for n in (64, 256):
        with torch.no_grad(), count_attention_scores() as counter:
            x = torch.randn(1, n, 16)
            attn(x, x)
        sizes[n] = counter[0]
    assert sizes[256] / sizes[64] == 16


def test_masked_mean_ignores_padding():
    tokens = torch.tensor([[[1.0], [3.0], [100.0]]])
    mask = torch.tensor([[False, False, True]])
    assert masked_mean(tokens, mask).item() == 2.0


def test_reconstruction_metrics_and_knn():
    rng = np.random.default_rng(0)
    obs = rng.random((10, 30))
    perfect = reconstruction_metrics(obs, obs)
    assert perfect["pearson_mean"] == pytest.approx(1.0) and perfect["mse"] == 0.0
    noisy = reconstruction_metrics(obs + rng.normal(0, 1, obs.shape), obs)
    assert noisy["pearson_mean"] < 0.9 and noisy["spearman_mean"] < 0.9
    # scored batch by batch (the stage's held-out cells), the same figures
    pred = obs + rng.normal(0, 1, obs.shape)
    scores = ReconstructionScores()
    for lo in range(0, 10, 3):
        scores.add(pred[lo : lo + 3], obs[lo : lo + 3])
    assert scores.summary() == pytest.approx(reconstruction_metrics(pred, obs), rel=1e-12)
    assert scores.summary()["mse"] == pytest.approx(np.mean((pred - obs) ** 2))
    emb = np.concatenate([rng.normal(0, 0.1, (20, 2)), rng.normal(5, 0.1, (20, 2))])
    labels = np.repeat([0, 1], 20)
    idx = np.arange(40)
    assert knn_split_accuracy(emb, labels, idx[::2], idx[1::2], k=3) == 1.0
    assert knn_split_accuracy(rng.normal(size=(40, 2)), labels, idx[::2], idx[1::2], k=3) < 1.0


def test_split_indices_keep_test_apart():
    split = np.array(["train"] * 20 + ["test"] * 5)
    fit, val, test = split_indices(split, 0.2, seed=0, eval_max_cells=None)
    assert set(test) == set(range(20, 25))
    assert len(val) == 4 and not set(fit) & set(val) and set(fit) | set(val) == set(range(20))
    assert np.array_equal(split_indices(split, 0.2, seed=0, eval_max_cells=None)[1], val)
    # the cap: 3 validation cells (the 4th trains), 3 of the 5 test cells, the same at every call
    capped = split_indices(split, 0.2, seed=0, eval_max_cells=3)
    assert len(capped[1]) == 3 and set(capped[1]) < set(val) and len(capped[0]) == 17
    assert len(capped[2]) == 3 and set(capped[2]) < set(test)
    assert all(np.array_equal(a, b) for a, b in zip(capped, split_indices(split, 0.2, 0, 3)))


@pytest.mark.parametrize("log1p_head", [True, False])
def test_log1p_head_keeps_the_nb_mean_in_count_space(log1p_head):
    """The MSE term pulls log1p of the NB mean towards the mean of log1p, far lower for sparse
    genes; its own read-out leaves the NB mean at the count-space mean that sampling needs."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    means = np.geomspace(0.2, 20.0, 12)
    counts = torch.from_numpy(rng.poisson(rng.gamma(2.0, means / 2.0, size=(256, 12))).astype(np.float32))
    library = counts.sum(1)
    model = Xpressor(xcfg(dispersion="gene", log1p_head=log1p_head))
    latents, genes = torch.randn(1, 4, 16).expand(256, -1, -1), torch.randn(12, E)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        model.reconstruction_loss(model.decode(latents, genes), counts, library)["loss"].backward()
        opt.step()
    with torch.no_grad():
        out = model.decode(latents, genes)
    ratio = (expected_counts(out, library, "nb").mean(0) / counts.mean(0)).numpy()
    if log1p_head:
        assert np.all(np.abs(ratio - 1) < 0.15), ratio
        target = torch.log1p(counts / library[:, None] * 1e4).mean(0)
        assert torch.allclose(out.log1p[0], target, atol=0.1)  # the read-out is the mean of log1p
    else:
        assert ratio[:3].max() < 0.8, ratio  # sparse genes decoded well below their count mean
