"""Xpressor stage: latent tokens on a frozen SE base.

`data` reads the cells, their tokens and the frozen base's outputs; `module` is the
LightningModule; `stage` holds the rules' entry points re-exported here. The model itself is
cellfoundry.models.xpressor.
"""

from cellfoundry.xpressor.data import resolve_label_columns, split_indices
from cellfoundry.xpressor.stage import run_xpressor_encode, run_xpressor_train

__all__ = ["resolve_label_columns", "run_xpressor_encode", "run_xpressor_train", "split_indices"]
