"""The SE model: SE-600M shapes and key names (on the meta device), forward-pass properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellfoundry.models.se import SEConfig, StateEmbedding, embedding_keys

# The spec's SE-600M table (shared/spec/se.md): token_dim 5120, d 2048, 16 layers, d_hid 2048,
# output 2048, count encoder 1 -> 512 -> 10 bins, dataset embedding 10.
T, D, H, OUT = 5120, 2048, 2048, 2048
SE600M_KEYS = {
    "cls_token": (1, T),
    "dataset_token": (1, T),
    "encoder.0.weight": (D, T),
    "encoder.0.bias": (D,),
    "encoder.1.weight": (D,),
    "encoder.1.bias": (D,),
    "decoder.0.intermediate_dense.weight": (2 * D, D),
    "decoder.0.intermediate_dense.bias": (2 * D,),
    "decoder.0.dense.weight": (D, 2 * D),
    "decoder.0.dense.bias": (D,),
    "decoder.0.layer_norm.weight": (D,),
    "decoder.0.layer_norm.bias": (D,),
    "decoder.1.weight": (OUT, D),
    "decoder.1.bias": (OUT,),
    "count_encoder.0.weight": (512, 1),
    "count_encoder.0.bias": (512,),
    "count_encoder.2.weight": (10, 512),
    "count_encoder.2.bias": (10,),
    "bin_encoder.weight": (10, D),
    "dataset_embedder.weight": (10, OUT),
    "dataset_embedder.bias": (10,),
}
for i in range(16):
    p = f"transformer_encoder.layers.{i}."
    SE600M_KEYS.update(
        {
            p + "qkv_proj.weight": (3 * D, D),
            p + "qkv_proj.bias": (3 * D,),
            p + "out_proj.weight": (D, D),
            p + "out_proj.bias": (D,),
            p + "norm1.weight": (D,),
            p + "norm1.bias": (D,),
            p + "linear1.weight": (H, D),
            p + "linear1.bias": (H,),
            p + "linear2.weight": (D, H),
            p + "linear2.bias": (D,),
            p + "norm2.weight": (D,),
            p + "norm2.bias": (D,),
        }
    )


def tiny_cfg(**kw) -> SEConfig:
    base = dict(token_dim=12, d_model=16, nhead=2, d_hid=24, nlayers=2, output_dim=8, pad_length=10)
    return SEConfig(**{**base, **kw})


def tiny_inputs(cfg: SEConfig, batch: int = 4, vocab: int = 30, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(vocab, cfg.token_dim, generator=g)
    ids = torch.stack([torch.randperm(vocab, generator=g)[: cfg.pad_length] for _ in range(batch)])
    ids[:, 0] = -2
    counts = torch.rand(batch, cfg.pad_length, generator=g) * 5
    return ids, counts, table


def test_se600m_shapes_and_key_names_match_the_spec():
    cfg = SEConfig()  # defaults are SE-600M's sizes
    with torch.device("meta"):
        model = StateEmbedding(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == SE600M_KEYS
    assert embedding_keys(cfg) == SE600M_KEYS
    n_params = sum(v.numel() for v in model.parameters())
    # 434.5M with d_hid 2048; the name's "600M" also counts the training heads and gene table
    assert n_params == 434_513_940
    assert cfg.embedding_dim == 2058


def test_forward_shapes_and_normalised_cls_part():
    cfg = tiny_cfg()
    model = StateEmbedding(cfg).eval()
    ids, counts, table = tiny_inputs(cfg)
    emb = model(ids, counts, table)
    assert emb.shape == (4, cfg.output_dim + 10)
    torch.testing.assert_close(emb[:, : cfg.output_dim].norm(dim=1), torch.ones(4))
    outputs, padding = model.encode(ids, counts, table)
    assert outputs.shape == (4, cfg.pad_length + 1, cfg.d_model)
    assert padding.shape == (4, cfg.pad_length + 1) and not padding.any()


def test_decoder_on_cls_and_dataset_tokens_equals_full_decoder():
    cfg = tiny_cfg()
    model = StateEmbedding(cfg).eval()
    ids, counts, table = tiny_inputs(cfg)
    outputs, _ = model.encode(ids, counts, table)
    full = model.decoder(outputs)  # what the reference does: every token through the decoder
    expected = torch.cat(
        [torch.nn.functional.normalize(full[:, 0], dim=-1), model.dataset_embedder(full[:, -1])], dim=-1
    )
    torch.testing.assert_close(model(ids, counts, table), expected)


@pytest.mark.parametrize("encoding", ["se", "scaled"])
def test_gene_token_order_does_not_matter(encoding):
    cfg = tiny_cfg(encoding=encoding)
    model = StateEmbedding(cfg).eval()
    ids, counts, table = tiny_inputs(cfg)
    perm = torch.cat(
        [
            torch.zeros(1, dtype=torch.long),
            1 + torch.randperm(cfg.pad_length - 1, generator=torch.Generator().manual_seed(1)),
        ]
    )
    with torch.inference_mode():
        a = model(ids, counts, table)
        b = model(ids[:, perm], counts[:, perm], table)
    assert not torch.equal(ids, ids[:, perm])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_scaled_encoding_masks_padding():
    cfg = tiny_cfg(encoding="scaled")
    model = StateEmbedding(cfg).eval()
    ids, counts, table = tiny_inputs(cfg)
    ids[:, 6:] = -1  # padding
    counts2 = counts.clone()
    counts2[:, 6:] = 123.0  # values at padding slots must not matter
    with torch.inference_mode():
        a = model(ids, counts, table)
        b = model(ids, counts2, table)
        short = model(ids[:, :6], counts[:, :6], table)  # the same cell without padding slots
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, short, atol=1e-5, rtol=1e-5)
    _, padding = model.encode(ids, counts, table)
    assert padding[:, 6:-1].all() and not padding[:, :6].any() and not padding[:, -1].any()


def test_counts_change_the_se_embedding():
    cfg = tiny_cfg()
    model = StateEmbedding(cfg).eval()
    ids, counts, table = tiny_inputs(cfg)
    with torch.inference_mode():
        assert not torch.allclose(model(ids, counts, table), model(ids, counts * 3, table))


def test_eval_mode_has_no_dropout():
    cfg = tiny_cfg(dropout=0.5)
    model = StateEmbedding(cfg).eval()
    ids, counts, table = tiny_inputs(cfg)
    torch.testing.assert_close(model(ids, counts, table), model(ids, counts, table))


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="divisible"):
        SEConfig(d_model=10, nhead=3)
    with pytest.raises(ValueError, match="encoding"):
        SEConfig(encoding="bogus")
    assert SEConfig.from_dict({**tiny_cfg().to_dict(), "unknown": 1}) == tiny_cfg()
    np.testing.assert_equal(tiny_cfg().embedding_dim, 18)
