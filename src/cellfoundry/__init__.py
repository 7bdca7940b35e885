"""cellfoundry: single-cell foundation-model workflow library."""

__version__ = "0.1.0"
