"""Running one model over several processes / GPUs: tensor parallelism (:mod:`.tp`)."""

from .tp import Shards, TPGroup, load_sharded, shard_state_dict

__all__ = ["Shards", "TPGroup", "load_sharded", "shard_state_dict"]
