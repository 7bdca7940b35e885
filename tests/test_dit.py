"""DiT denoiser: AdaLN-Zero blocks start as identities, shapes, cross-attention masking."""

import torch

from cellfoundry.models.dit import DiT, DiTBlock, DiTConfig, GeneDiT, LatentDiT, timestep_embedding


def test_adaln_zero_block_is_identity_at_init():
    torch.manual_seed(0)
    block = DiTBlock(32, 4, cross_attention=True)
    x = torch.randn(3, 5, 32)
    c = torch.randn(3, 32)
    cond_tokens = torch.randn(3, 2, 32)
    assert torch.equal(block(x, c, cond_tokens), x)


def test_block_stops_being_identity_after_modulation_moves():
    torch.manual_seed(0)
    block = DiTBlock(32, 4)
    torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.1)
    x = torch.randn(3, 5, 32)
    assert not torch.allclose(block(x, torch.randn(3, 32)), x)


def test_dit_output_is_zero_at_init_and_has_token_shape():
    cfg = DiTConfig(num_tokens=6, token_dim=8, hidden=32, depth=2, heads=4, mlp_ratio=4.0, cross_attention=False)
    model = DiT(cfg)
    out = model(torch.randn(4, 6, 8), torch.tensor([0, 10, 500, 999]), torch.randn(4, 32))
    assert out.shape == (4, 6, 8)
    assert torch.count_nonzero(out) == 0


def test_timestep_embedding_distinguishes_steps():
    emb = timestep_embedding(torch.tensor([0, 1, 999]), 256)
    assert emb.shape == (3, 256)
    assert not torch.allclose(emb[0], emb[1])


def test_gene_dit_maps_genes_to_genes():
    cfg = DiTConfig(num_tokens=4, token_dim=8, hidden=16, depth=1, heads=2, mlp_ratio=4.0, cross_attention=False)
    model = GeneDiT(cfg, n_genes=30, encoder_hidden=20)
    out = model(torch.randn(5, 30), torch.randint(0, 1000, (5,)))
    assert out.shape == (5, 30)
    out.sum().backward()
    assert model.encoder[0].weight.grad is not None


def test_cross_attention_ignores_padded_condition_tokens():
    torch.manual_seed(0)
    cfg = DiTConfig(num_tokens=3, token_dim=4, hidden=16, depth=1, heads=2, mlp_ratio=4.0, cross_attention=True)
    model = LatentDiT(cfg)
    for p in model.parameters():  # move away from the zero initialisation
        torch.nn.init.normal_(p, std=0.2)
    x, t, c = torch.randn(2, 3, 4), torch.tensor([5, 6]), torch.randn(2, 16)
    tokens = torch.randn(2, 3, 16)
    mask = torch.tensor([[False, False, True], [False, False, True]])
    changed = tokens.clone()
    changed[:, 2] = 100.0
    a = model(x, t, c, tokens, mask)
    b = model(x, t, c, changed, mask)
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, model(x, t, c, changed, None), atol=1e-3)
