"""Shared test configuration."""

import os

import hypothesis

# The first call of every jitted function compiles, so per-example deadlines
# would measure XLA, not bce_jax. CI uses fewer examples to keep the suite
# within a few minutes on 2 cores.
hypothesis.settings.register_profile("default", deadline=None, max_examples=40)
hypothesis.settings.register_profile("ci", deadline=None, max_examples=25, derandomize=True)
hypothesis.settings.load_profile("ci" if os.environ.get("CI") else "default")
