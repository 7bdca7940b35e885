"""TEMPORARY: re-exports what scripts/evaluate_generation.py and tests/test_provenance.py import
from the diffusion stage, now the package cellfoundry.diffusion (run_train / run_sample are
run_diffusion_train / run_diffusion_sample, whose keyword arguments have the new names); this
module goes away once none imports it."""

from cellfoundry.diffusion.sample import xpressor_decoder  # noqa: F401
from cellfoundry.diffusion.stage import run_diffusion_sample as run_sample, run_diffusion_train as run_train  # noqa: F401
