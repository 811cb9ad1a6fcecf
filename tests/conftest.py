import os

# Tests are CPU-only and must not grab every core of a shared machine for threads.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Implicit rank promotion hides shape bugs; the library spells its broadcasts out.
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def rng(request):
  """A fresh generator per test; the seed is printed so a failure can be replayed."""
  seed = int(np.random.SeedSequence().entropy % (2**31))
  print(f"\n[{request.node.name}] seed={seed}")
  return np.random.default_rng(seed)
