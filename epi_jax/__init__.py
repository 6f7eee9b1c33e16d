"""epi-jax: Evolving Parameter Isolation (arXiv 2604.14010) for JAX, optax and Flax."""

from epi_jax.isolation import EPIState
from epi_jax.isolation import MaskStats
from epi_jax.isolation import StaticIsolationState
from epi_jax.isolation import epi
from epi_jax.isolation import mask_stats
from epi_jax.isolation import probe_mask
from epi_jax.isolation import protection_mask
from epi_jax.isolation import refreshed
from epi_jax.isolation import sensitivity
from epi_jax.isolation import static_isolation
from epi_jax.selection import layer_groups
from epi_jax.selection import top_p_mask

__all__ = [
    "EPIState",
    "MaskStats",
    "StaticIsolationState",
    "epi",
    "layer_groups",
    "mask_stats",
    "probe_mask",
    "protection_mask",
    "refreshed",
    "sensitivity",
    "static_isolation",
    "top_p_mask",
]
