"""Condition encoders: every kind embeds batches with missing values and variable lengths; unknown
labels fail with the known ones; null embeddings replace dropped conditions."""

import numpy as np
import pandas as pd
import pytest
import torch

from cellfoundry.models.conditions import (
    ConditionCodec,
    ConditionModel,
    ConditionSpec,
    HierarchicalEmbedder,
    SetEmbedder,
    collate_conditions,
    level_dim,
)
from cellfoundry.utils import UserError

OBS = pd.DataFrame(
    {
        "cell_type": ["T", "B", None, "NK", "T"],
        "knockout": ["g1", "ctrl", "g2", None, "ctrl"],
        "drug": ["x", "y", None, "x", "y"],
        "dose": [1.0, np.nan, 10.0, 0.1, None],
        "perturbations": ["p1;p2;p3", "", None, "p2", "p1"],
        "organism": ["human", "human", "mouse", None, "human"],
        "tissue": ["blood", "lung", "blood", None, "blood"],
    }
)
SPECS = [
    ConditionSpec("cell_type", "categorical", ["cell_type"]),
    ConditionSpec("perturbation", "multi_component", ["knockout", "drug"], continuous=["dose"], none_value="ctrl"),
    ConditionSpec("perturbations", "set", ["perturbations"], delimiter=";"),
    ConditionSpec("lineage", "hierarchical", ["organism", "tissue", "cell_type"]),
]


@pytest.fixture
def codec():
    return ConditionCodec.fit(SPECS, OBS)


def test_codec_encodes_missing_values_and_variable_lengths(codec):
    arrays = codec.encode(OBS)
    assert arrays["cell_type.label"].tolist() == [2, 0, 3, 1, 2]  # B, NK, T; 3 = missing
    # knockout: 0 = none (ctrl), labels g1, g2 -> 1, 2, missing -> 3
    assert arrays["perturbation.parts"][:, 0].tolist() == [1, 0, 2, 3, 0]
    assert arrays["perturbation.cont_mask"][:, 0].tolist() == [1, 0, 1, 1, 0]
    assert arrays["perturbations.elements"].shape == (5, 3)
    assert (arrays["perturbations.elements"] > 0).sum(1).tolist() == [3, 0, 0, 1, 1]
    assert arrays["lineage.levels"][3].tolist() == [2, 2, 1]  # organism, tissue missing; NK
    assert arrays["lineage.levels"][2].tolist() == [1, 0, 3]  # mouse, blood, cell type missing


def test_each_kind_embeds_a_batch_with_missing_values(codec):
    torch.manual_seed(0)
    model = ConditionModel(codec, dim=16)
    batch = collate_conditions(codec.encode(OBS), np.arange(5))
    vector, tokens = model(batch)
    assert vector.shape == (5, 16) and tokens.shape == (5, 4, 16)
    assert torch.isfinite(vector).all() and torch.isfinite(tokens).all()
    missing = model.missing(batch)
    assert missing[:, 0].tolist() == [False, False, True, False, False]
    # a missing label uses the condition's learned null embedding
    assert torch.allclose(tokens[2, 0], model.null[0])
    vector.sum().backward()
    assert model.embedders["perturbations"].embedding.weight.grad is not None


def test_keep_mask_swaps_in_null_embeddings(codec):
    model = ConditionModel(codec, dim=16)
    batch = collate_conditions(codec.encode(OBS), np.arange(5))
    _, dropped = model(batch, torch.zeros(5, 4, dtype=torch.bool))
    assert torch.allclose(dropped, model.null[None].expand(5, -1, -1))
    _, kept = model(batch, torch.ones(5, 4, dtype=torch.bool))
    assert not torch.allclose(kept[0], dropped[0])


def test_unknown_label_lists_known_ones(codec):
    with pytest.raises(UserError, match=r"unknown label 'Megakaryocyte'.*'B', 'NK', 'T'"):
        codec.encode([{"cell_type": "Megakaryocyte"}])
    arrays = codec.encode([{"cell_type": "Megakaryocyte"}], strict=False)
    assert arrays["cell_type.label"].tolist() == [3]


def test_set_embedding_is_order_invariant_and_ignores_padding():
    torch.manual_seed(0)
    emb = SetEmbedder(n_elements=5, dim=8)
    a = emb({"s.elements": torch.tensor([[1, 2, 3, 0, 0]])}, "s")
    b = emb({"s.elements": torch.tensor([[3, 1, 2]])}, "s")
    assert torch.allclose(a, b, atol=1e-5)
    empty = emb({"s.elements": torch.tensor([[0, 0], [4, 0]])}, "s")
    assert torch.allclose(empty[0], emb.empty) and torch.isfinite(empty).all()


def test_set_condition_accepts_list_columns():
    obs = pd.DataFrame({"perts": [["a", "b"], [], ["c"]]})
    codec = ConditionCodec.fit([ConditionSpec("p", "set", ["perts"])], obs)
    assert codec.vocab["p"] == [["a", "b", "c"]]
    assert codec.encode(obs)["p.elements"].tolist() == [[1, 2], [0, 0], [3, 0]]


def test_hierarchy_composes_bottom_up_with_level_sizes():
    emb = HierarchicalEmbedder([2, 10, 100], dim=64)
    assert [e.embedding_dim for e in emb.levels] == [level_dim(2, 64), level_dim(10, 64), level_dim(100, 64)]
    assert emb.levels[0].embedding_dim < emb.levels[2].embedding_dim
    codes = torch.tensor([[0, 3, 7], [1, 3, 7]])
    out = emb({"h.levels": codes}, "h")
    assert out.shape == (2, 64)
    assert not torch.allclose(out[0], out[1])  # the top level changes the composition


def test_codec_round_trips_through_a_dict(codec):
    again = ConditionCodec.from_dict(codec.to_dict())
    for key, value in codec.encode(OBS).items():
        assert np.array_equal(again.encode(OBS)[key], value)


def test_unknown_column_is_a_user_error():
    with pytest.raises(UserError, match="obs column"):
        ConditionCodec.fit([ConditionSpec("x", "categorical", ["nope"])], OBS)


def test_no_conditions_gives_none():
    codec = ConditionCodec.fit([], OBS)
    assert ConditionModel(codec, 8)({}) == (None, None)


def test_nan_labels_form_no_condition_and_train_unconditionally():
    obs = pd.DataFrame({"ct": pd.Categorical(["T", np.nan, "B", "nan", ""])})
    codec = ConditionCodec.fit([ConditionSpec("ct", "categorical", ["ct"])], obs)
    assert codec.vocab["ct"] == [["B", "T"]]  # no "nan" or "" label
    codes = codec.encode(obs)["ct.label"]
    assert codes.tolist() == [1, 2, 0, 2, 2]  # 2 = missing
    model = ConditionModel(codec, dim=8)
    batch = collate_conditions(codec.encode(obs), np.arange(5))
    assert model.missing(batch)[:, 0].tolist() == [False, True, False, True, True]
    _, tokens = model(batch)
    assert torch.equal(tokens[1, 0], model.null[0]) and not torch.equal(tokens[0, 0], model.null[0])
