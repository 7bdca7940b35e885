"""The SE stage: pretraining (data, module) and embedding (embed), with the rule entry points in
`stage`. Submodules are imported on use, so that embedding does not load Lightning."""
