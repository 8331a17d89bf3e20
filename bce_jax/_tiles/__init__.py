"""The shared ``[B, D] x [C, D]`` tile sweep of the pairwise and linear losses.

Both losses score rows ``a_i`` against columns ``b_j`` with a logit
``z_ij = s <a_i, b_j> + bias_j`` and a binary label from a *positives rule*;
each element's loss is ``softplus(-z)`` for a positive pair and
``softplus(z)`` for a negative one, and its derivative in ``z`` is
``sigmoid(z) - [positive]``. One tile's arithmetic lives in :mod:`.tile`;
the sweeps over tiles (the portable XLA loop and the GPU kernels) build on
it, so the formula is written once.
"""
