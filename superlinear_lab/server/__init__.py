"""superlinear_lab.server (being built)."""
