"""What LOC-BE computes (method.md): CAMs and the region partition (cam), PAR refinement (par), the loss terms
(losses), the regularized dense-CRF loss on the lattice engine (regloss, and the authors' host layout of it in
regloss_host for benchmarks), and one training step over all views (step).

May import: locbe.config, locbe.errors, locbe.data, locbe.models, locbe.lattice, locbe.runtime; never
locbe.report or locbe.training (the loop and the reports use the method, not the other way round)."""
