"""config/schema.yaml is well formed, and config errors are one short message."""

from __future__ import annotations

from pathlib import Path

import yaml

from cellfoundry.utils import UserError

SCHEMA = Path(__file__).resolve().parents[1] / "config" / "schema.yaml"

# JSON Schema (2020-12) keywords the schema may use; anything else is a typo or a description cut
# by a comma in a YAML flow mapping (`{..., description: a, b}` gives a stray key `b`).
KEYWORDS = {
    "$schema",
    "$defs",
    "$ref",
    "$id",
    "$comment",
    "title",
    "description",
    "default",
    "examples",
    "deprecated",
    "type",
    "enum",
    "const",
    "properties",
    "additionalProperties",
    "patternProperties",
    "propertyNames",
    "required",
    "minProperties",
    "maxProperties",
    "items",
    "prefixItems",
    "minItems",
    "maxItems",
    "uniqueItems",
    "contains",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "minLength",
    "maxLength",
    "pattern",
    "format",
    "allOf",
    "anyOf",
    "oneOf",
    "not",
    "if",
    "then",
    "else",
}
SUBSCHEMA_MAPS = ("properties", "$defs", "patternProperties")  # name -> subschema
SUBSCHEMAS = ("additionalProperties", "items", "propertyNames", "contains", "not", "if", "then", "else")
SUBSCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")


def _schemas(node: dict, path: str = "#"):
    """Every (path, subschema) of the schema, depth first."""
    yield path, node
    for key in SUBSCHEMA_MAPS:
        for name, sub in (node.get(key) or {}).items():
            yield from _schemas(sub, f"{path}/{key}/{name}")
    for key in SUBSCHEMAS:
        if isinstance(node.get(key), dict):
            yield from _schemas(node[key], f"{path}/{key}")
    for key in SUBSCHEMA_LISTS:
        for i, sub in enumerate(node.get(key) or []):
            yield from _schemas(sub, f"{path}/{key}/{i}")


def test_schema_uses_only_keywords_and_full_descriptions():
    schema = yaml.safe_load(SCHEMA.read_text())
    stray, bad = [], []
    for path, node in _schemas(schema):
        assert isinstance(node, dict), f"{path} is not a schema object"
        stray += [f"{path}: {key!r}" for key in node if key not in KEYWORDS]
        if "description" in node and not (isinstance(node["description"], str) and node["description"].strip()):
            bad.append(path)
    assert not stray, "keys that are no JSON Schema keyword (a comma in a flow mapping?):\n" + "\n".join(stray)
    assert not bad, f"descriptions that are not a non-empty string: {bad}"


def test_config_errors_name_the_key_and_a_close_match():
    from cellfoundry.config import config_errors

    schema = yaml.safe_load(SCHEMA.read_text())
    config = yaml.safe_load((SCHEMA.parent / "config.yaml").read_text())
    name = next(iter(config["datasets"]))
    config["qc"]["min_gene"] = 5
    config["datasets"][name]["cell_typ"] = "x"
    config["device"] = "tpu"
    assert config_errors(config, schema) == [
        f"unknown key 'datasets.{name}.cell_typ': did you mean 'cell_type'?",
        "'device': 'tpu' is not one of ['auto', 'cpu', 'cuda'] (" + schema["properties"]["device"]["description"] + ")",
        "unknown key 'qc.min_gene': did you mean 'min_genes'?",
    ]


def test_misspelt_key_is_a_short_message(tmp_path):
    from conftest import copy_workflow, run_snakemake

    work = copy_workflow(tmp_path / "wf")
    cfg_path = work / "config" / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["qc"]["min_gene"] = cfg["qc"].pop("min_genes")
    cfg_path.write_text(yaml.safe_dump(cfg))
    proc = run_snakemake(work, "-n", check=False)
    out = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode != 0 and not (work / "results").exists()
    assert any(line.strip() == "unknown key 'qc.min_gene': did you mean 'min_genes'?" for line in out), out
    assert len(out) < 20, "\n".join(out)


def _schema_node(schema: dict, dotted: str) -> dict | None:
    """The subschema of config key `dotted` (e.g. xpressor.train.lr), or None."""
    node = schema
    for part in dotted.split("."):
        node = (node.get("properties") or {}).get(part)
        if node is None:
            return None
    return node


def test_renamed_keys_give_one_error_naming_the_new_key():
    """Every old key of the rename table (issue 15) stops with one line naming its new place,
    nested moves included; the new keys exist in the schema and the old ones do not."""
    import copy

    from cellfoundry.config import RENAMED_KEYS, config_errors

    schema = yaml.safe_load(SCHEMA.read_text())
    demo = yaml.safe_load((SCHEMA.parent / "config.yaml").read_text())
    assert config_errors(demo, schema) == []
    for old, new in RENAMED_KEYS.items():
        assert _schema_node(schema, new) is not None, f"{new} is not in the schema"
        assert _schema_node(schema, old) is None, f"{old} is still in the schema"
        config = copy.deepcopy(demo)
        *new_parent, new_key = new.split(".")
        *old_parent, old_key = old.split(".")
        section = config
        for part in new_parent:
            section = section[part]
        value = section.pop(new_key, 1)
        section = config
        for part in old_parent:
            section = section[part]
        section[old_key] = value
        assert config_errors(config, schema) == [f"config key {old} was renamed to {new}; rename it in your config"]
    assert RENAMED_KEYS["xpressor.n_blocks"] == "xpressor.n_layers"
    assert RENAMED_KEYS["xpressor.lr"] == "xpressor.train.lr"
    assert RENAMED_KEYS["diffusion.grad_clip"] == "diffusion.train.gradient_clip"


def test_old_key_stops_the_workflow_with_its_new_name(tmp_path):
    from conftest import copy_workflow, run_snakemake

    work = copy_workflow(tmp_path / "wf")
    cfg_path = work / "config" / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["xpressor"]["n_blocks"] = cfg["xpressor"].pop("n_layers")
    cfg_path.write_text(yaml.safe_dump(cfg))
    proc = run_snakemake(work, "-n", check=False)
    out = [line.strip() for line in (proc.stdout + proc.stderr).strip().splitlines()]
    assert proc.returncode != 0 and not (work / "results").exists()
    assert "config key xpressor.n_blocks was renamed to xpressor.n_layers; rename it in your config" in out, out
    assert len(out) < 20, "\n".join(out)


def test_stage_settings_carry_no_defaults_of_their_own():
    """The schema is the one source of defaults: the dataclasses the stages build from the config
    have no defaults, and a key missing from the settings fails loudly."""
    import dataclasses

    import pytest

    from cellfoundry.se.module import PretrainConfig
    from cellfoundry.xpressor.module import TrainSettings
    from cellfoundry.xpressor.stage import StageSettings, stage_settings

    for cls in (PretrainConfig, TrainSettings, StageSettings):
        with_default = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        ]
        assert not with_default, f"{cls.__name__} has defaults {with_default}; the schema's are the only ones"
    demo = yaml.safe_load((SCHEMA.parent / "config.yaml").read_text())
    settings = stage_settings(demo["xpressor"])
    assert settings.train.lr == demo["xpressor"]["train"]["lr"]
    assert settings.inference_batch_size == demo["xpressor"]["encode"]["batch_size"]
    assert settings.model["n_blocks"] == demo["xpressor"]["n_layers"]
    broken = {**demo["xpressor"], "train": {k: v for k, v in demo["xpressor"]["train"].items() if k != "patience"}}
    with pytest.raises(KeyError, match="patience"):
        stage_settings(broken)
    too_late = {**demo["xpressor"], "train": {**demo["xpressor"]["train"], "patience": 3, "lr_patience": 2}}
    with pytest.raises(UserError, match=r"lr_patience \(2\) must be at most xpressor.train.patience - 2 \(1\)"):
        stage_settings(too_late)
    # se.pretrain (less the datasets list, which is no setting of the module) fills PretrainConfig
    pretrain = yaml.safe_load(SCHEMA.read_text())["properties"]["se"]["properties"]["pretrain"]["properties"]
    assert {f.name for f in dataclasses.fields(PretrainConfig)} == set(pretrain) - {"datasets"}


def test_model_configs_take_every_config_field_from_the_settings():
    """XpressorConfig and DiTConfig have no defaults for fields that come from the config, and the
    stages fill each of them from the validated settings."""
    import dataclasses

    from cellfoundry.models.dit import DiTConfig
    from cellfoundry.models.xpressor import CHECKPOINT_DEFAULTS, XpressorConfig
    from cellfoundry.xpressor.stage import stage_settings

    no_config_key = {"pooling", "target_sum", "dropout"}  # dropout: DiTConfig's; Xpressor's has a key
    for cls in (XpressorConfig, DiTConfig):
        with_default = {
            f.name
            for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        }
        assert with_default <= no_config_key, f"{cls.__name__} has defaults {with_default - no_config_key}"
    demo = yaml.safe_load((SCHEMA.parent / "config.yaml").read_text())
    model = stage_settings(demo["xpressor"]).model
    required = {f.name for f in dataclasses.fields(XpressorConfig) if f.name not in ("pooling", "target_sum")}
    assert set(model) == required - {"d_base", "gene_dim", "labels"}  # those three come from the data
    assert set(CHECKPOINT_DEFAULTS) == required - {"d_base", "gene_dim"}  # every field an old checkpoint may lack
