"""Evaluation: the metrics of every stage and the evaluate rules' entry points.

Modules:
- `embedding`: label transfer, bio conservation and batch mixing of a cell embedding [N, D];
- `knn`: kNN label accuracy (cross-validated transfer, train/test split);
- `generation`: CFGen-style distances between real and generated cells, plus reference generators;
- `prediction`: held-out condition combinations against their references;
- `reconstruction`: tables and decoded-vs-observed values for the Xpressor stage;
- `baselines`: the PCA baseline embedding;
- `inputs`: reading upstream outputs with clear errors, writing the long-format tables;
- `summary`: the tables of a dataset's eval folder as text;
- `stage`: `run_evaluate_*` and `run_stage_costs`, which the rule scripts call.
"""
