"""Running one model over several processes / GPUs: tensor parallelism (:mod:`.tp`, with ranks
in lockstep: :mod:`.lockstep`) and tower placement (:mod:`.placement`)."""

from .placement import place_towers
from .tp import Shards, TPGroup, load_sharded, shard_state_dict

__all__ = ["Shards", "TPGroup", "load_sharded", "place_towers", "shard_state_dict"]
