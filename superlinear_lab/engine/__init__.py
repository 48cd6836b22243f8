"""superlinear_lab.engine (being built)."""
