"""bce_jax: binary cross-entropy for JAX, with Keras values and numerical care.

Public API:

* :func:`binary_crossentropy`, :func:`binary_crossentropy_elementwise`: pure
  functions; jit, vmap, grad and shard.
* :class:`BinaryCrossentropy`: the loss object (reductions, sample weights,
  masks, configs), a static pytree.
* :class:`BinaryCrossentropyMetric` and its :class:`MetricState`: a streaming
  mean with ``init / update / merge / result``.
* :func:`binary_focal_crossentropy`, :func:`binary_focal_crossentropy_elementwise`,
  :class:`BinaryFocalCrossentropy` and :class:`BinaryFocalCrossentropyMetric`:
  the focal loss (Lin et al., 2017) with the same API.
* :func:`pairwise_sigmoid_loss` and :class:`PairwiseSigmoidLoss`: the pairwise
  sigmoid loss of SigLIP (Zhai et al., 2023), blockwise and across devices.
* :func:`linear_binary_crossentropy` and :class:`LinearBinaryCrossentropy`:
  one-vs-all BCE over a huge label space from features and a label matrix,
  tile by tile without the ``[B, C]`` logits, and sharded over labels;
  :func:`top_k_labels` and :class:`TopKMetric` (streaming precision@k and
  nDCG@k) to evaluate it.
* :func:`checked`: opt-in data-dependent value checks.
"""

from bce_jax._bce import binary_crossentropy, binary_crossentropy_elementwise
from bce_jax._checked import ValueCheckError, checked
from bce_jax._focal import binary_focal_crossentropy, binary_focal_crossentropy_elementwise
from bce_jax._linear import LinearBinaryCrossentropy, linear_binary_crossentropy
from bce_jax._loss import BinaryCrossentropy, BinaryFocalCrossentropy
from bce_jax._metric import BinaryCrossentropyMetric, BinaryFocalCrossentropyMetric, MetricState
from bce_jax._pairwise import PairwiseSigmoidLoss, pairwise_sigmoid_loss
from bce_jax._topk import TopKMetric, TopKState, top_k_labels

__version__ = "0.1.0"

__all__ = [
  "BinaryCrossentropy",
  "BinaryCrossentropyMetric",
  "BinaryFocalCrossentropy",
  "BinaryFocalCrossentropyMetric",
  "LinearBinaryCrossentropy",
  "MetricState",
  "PairwiseSigmoidLoss",
  "TopKMetric",
  "TopKState",
  "ValueCheckError",
  "__version__",
  "binary_crossentropy",
  "binary_crossentropy_elementwise",
  "binary_focal_crossentropy",
  "binary_focal_crossentropy_elementwise",
  "checked",
  "linear_binary_crossentropy",
  "pairwise_sigmoid_loss",
  "top_k_labels",
]
