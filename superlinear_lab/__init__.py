"""superlinear_lab: the hybrid model, sessions, snapshots, routing traces, evaluation and views on top of
`superlinear_kernels`."""
