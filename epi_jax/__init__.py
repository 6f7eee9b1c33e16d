"""epi-jax: Evolving Parameter Isolation (arXiv 2604.14010) for JAX, optax and Flax."""

from epi_jax._src.epi import EPIState
from epi_jax._src.epi import MaskStats
from epi_jax._src.epi import epi
from epi_jax._src.grouping import layer_groups
from epi_jax._src.probe import probe_mask
from epi_jax._src.rounding import apply_updates
from epi_jax._src.rounding import float32_state
from epi_jax._src.selection import top_p_mask
from epi_jax._src.state import mask_stats
from epi_jax._src.state import protection_mask
from epi_jax._src.state import refreshed
from epi_jax._src.state import sensitivity
from epi_jax._src.state import sensitivity_of
from epi_jax._src.static import StaticIsolationState
from epi_jax._src.static import static_isolation

__all__ = [
    "EPIState",
    "MaskStats",
    "StaticIsolationState",
    "apply_updates",
    "epi",
    "float32_state",
    "layer_groups",
    "mask_stats",
    "probe_mask",
    "protection_mask",
    "refreshed",
    "sensitivity",
    "sensitivity_of",
    "static_isolation",
    "top_p_mask",
]
