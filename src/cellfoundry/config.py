"""Config validation for the workflow: one short message per problem instead of snakemake's
schema dump (the whole schema printed after the first line)."""

from __future__ import annotations

import difflib
from pathlib import Path

import yaml

MAX_ERRORS = 5

#: Config keys that were renamed or moved (old dotted path -> new dotted path, issue 15: one name
#: per concept across sections, the training recipes nested). An old key stops the run with one
#: message naming its new place instead of "unknown key".
XPRESSOR_TRAIN_KEYS = (
    "lr",
    "weight_decay",
    "gradient_clip",
    "batch_size",
    "max_epochs",
    "patience",
    "val_fraction",
    "genes_per_step",
    "baselines",
    "cache_base_outputs",
    "cache_max_gb",
)
DIFFUSION_TRAIN_KEYS = (
    "lr",
    "weight_decay",
    "batch_size",
    "max_steps",
    "log_every_n_steps",
    "ema_decay",
    "cond_drop_prob",
)
RENAMED_KEYS = {
    "se.nhead": "se.n_heads",
    "se.nlayers": "se.n_layers",
    "embed.knn_neighbors": "embed.knn_k",
    "xpressor.n_blocks": "xpressor.n_layers",
    "xpressor.n_decoder_blocks": "xpressor.n_decoder_layers",
    **{f"xpressor.{key}": f"xpressor.train.{key}" for key in XPRESSOR_TRAIN_KEYS},
    "xpressor.inference_batch_size": "xpressor.encode.batch_size",
    "xpressor.knn_k": "xpressor.encode.knn_k",
    "diffusion.hidden": "diffusion.d_model",
    "diffusion.depth": "diffusion.n_layers",
    "diffusion.heads": "diffusion.n_heads",
    "diffusion.grad_clip": "diffusion.train.gradient_clip",
    "diffusion.train.grad_clip": "diffusion.train.gradient_clip",
    **{f"diffusion.{key}": f"diffusion.train.{key}" for key in DIFFUSION_TRAIN_KEYS},
}


def renamed_key_message(path: str) -> str | None:
    """The error for an old (renamed or moved) config key at dotted `path`, or None."""
    new = RENAMED_KEYS.get(path)
    return f"config key {path} was renamed to {new}; rename it in your config" if new else None


def config_errors(config: dict, schema: dict) -> list[str]:
    """One line per schema violation of `config`: the key path, the problem, and for an unknown
    key the closest allowed key."""
    from jsonschema import Draft202012Validator

    lines = []
    for err in sorted(Draft202012Validator(schema).iter_errors(config), key=lambda e: list(map(str, e.absolute_path))):
        where = ".".join(map(str, err.absolute_path))
        if err.validator == "additionalProperties" and isinstance(err.instance, dict):
            allowed = sorted(err.schema.get("properties", {}))
            for key in sorted(set(err.instance) - set(allowed)):
                path = f"{where}.{key}" if where else key
                renamed = renamed_key_message(path)
                if renamed:
                    lines.append(renamed)
                    continue
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"allowed here: {', '.join(allowed)}"
                lines.append(f"unknown key '{path}': {hint}")
            continue
        message = err.message if len(err.message) <= 200 else err.message[:200] + "..."
        about = err.schema.get("description") if isinstance(err.schema, dict) else None
        lines.append(f"'{where or '(top level)'}': {message}" + (f" ({about})" if about else ""))
    return lines


def validate_config(config: dict, schema_path: str | Path) -> None:
    """Validate `config` against the schema and fill in its defaults (snakemake's validate); stop
    with a WorkflowError of a few lines naming each bad key."""
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    schema_path = Path(schema_path).resolve()  # validate() resolves relative paths from its caller's workflow
    try:
        validate(config, schema=str(schema_path))
    except WorkflowError:
        lines = config_errors(config, yaml.safe_load(schema_path.read_text()))
        if not lines:  # not a schema violation (e.g. an unreadable schema): keep snakemake's message
            raise
        more = f"\n  ... and {len(lines) - MAX_ERRORS} more" if len(lines) > MAX_ERRORS else ""
        raise WorkflowError(
            f"config does not match {schema_path.name} (see config/README.md):\n  "
            + "\n  ".join(lines[:MAX_ERRORS])
            + more
        ) from None
