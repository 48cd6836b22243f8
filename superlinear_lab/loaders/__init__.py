"""superlinear_lab.loaders (being built)."""
