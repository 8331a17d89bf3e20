"""bce_jax: binary cross-entropy for JAX, with Keras values and numerical care.

Public API:

* :func:`binary_crossentropy`, :func:`binary_crossentropy_elementwise`: pure
  functions; jit, vmap, grad and shard.
* :class:`BinaryCrossentropy`: the loss object (reductions, sample weights,
  masks, configs), a static pytree.
* :class:`BinaryCrossentropyMetric` and its :class:`MetricState`: a streaming
  mean with ``init / update / merge / result``.
* :func:`checked`: opt-in data-dependent value checks.
"""

from bce_jax._bce import binary_crossentropy, binary_crossentropy_elementwise
from bce_jax._checked import ValueCheckError, checked
from bce_jax._loss import BinaryCrossentropy
from bce_jax._metric import BinaryCrossentropyMetric, MetricState

__version__ = "0.1.0"

__all__ = [
  "BinaryCrossentropy",
  "BinaryCrossentropyMetric",
  "MetricState",
  "ValueCheckError",
  "__version__",
  "binary_crossentropy",
  "binary_crossentropy_elementwise",
  "checked",
]
