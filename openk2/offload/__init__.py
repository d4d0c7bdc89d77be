"""Models bigger than memory: routed experts stay on disk and pass through a bounded cache.

`load_offloaded(folder, cache_bytes)` gives a model like `load_hf`'s whose routed experts (98.9% of
K2's weights) are read on demand into an `ExpertCache`; `openk2.info.offload_report` predicts the
memory split of any config (`openk2 info --expert-cache GB`).
"""

from openk2.offload.cache import POLICIES, ExpertCache, expert_bytes
from openk2.offload.experts import OffloadedExperts, cache_slots, load_offloaded
from openk2.offload.store import ExpertStore, SafetensorsFile

__all__ = ["OffloadedExperts", "ExpertCache", "ExpertStore", "SafetensorsFile", "POLICIES", "cache_slots",
           "expert_bytes", "load_offloaded"]
