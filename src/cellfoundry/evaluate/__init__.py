"""Evaluation metrics: embeddings, Xpressor reconstruction and generated cells.

Modules:
- `embedding`: label transfer, bio conservation and batch mixing of a cell embedding [N, D];
- `generation`: CFGen-style distances between real and generated cells, plus reference generators;
- `reconstruction`: tables and decoded-vs-observed values for the Xpressor stage;
- `baselines`: the PCA baseline embedding;
- `io`: reading upstream outputs with clear errors, writing the long-format tables.
"""
