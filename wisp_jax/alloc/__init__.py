"""MV-WSA: splitting device memory between expert slots and KV blocks.

Plain numpy over the curves of `wisp_jax.sim`; never touches JAX arrays.

  curves     per-layer LRU miss curves at several concurrency levels
  workload   the workload: lengths, concurrency, curves, model, hardware
  simulate   predicted tokens/s of a split (`predict`), budgets, splits
  marginal   marginal values per byte of slots and KV blocks
  solver     the equimarginal solver (`solve`)
  tiers      the three-way split: raw slots, a compressed device tier, KV
  baselines  fixed splits and the per-workload oracle
  online     pure decision rules for an online controller
  allocate   the configurator's `run(config, workdir)`
  sweep      MV-WSA vs oracle vs fixed splits, `run(config, workdir)`
"""
