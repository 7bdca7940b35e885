"""Model definitions (plain nn.Modules, no framework glue): SE, Xpressor, DiT."""
