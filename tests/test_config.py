"""config/schema.yaml is well formed, and config errors are one short message."""

from __future__ import annotations

from pathlib import Path

import yaml

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
