"""TEMPORARY: re-exports `cellfoundry.trainer` and `cellfoundry.launch` while callers move to
them; this module goes away once none imports it."""

from cellfoundry.launch import *  # noqa: F401,F403
from cellfoundry.launch import _rank_main  # noqa: F401
from cellfoundry.trainer import *  # noqa: F401,F403
