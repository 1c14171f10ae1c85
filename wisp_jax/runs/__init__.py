"""Experiments: one module per experiment, each with `run(config, workdir)`.

The experiment scripts in `experiments/` and the notebooks call these; the
library below (`serving`, `alloc`, `sim`, `paging`, `traces`, `models`)
holds no orchestration or plotting. `common` owns the workdir layout.
"""
