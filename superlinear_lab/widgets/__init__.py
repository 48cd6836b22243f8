"""superlinear_lab.widgets (being built)."""
