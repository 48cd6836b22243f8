"""superlinear_lab.model (being built)."""
