"""The benchmark families of bench/run.py, one module each."""

from families.all_reduce import add_all_reduce_args, run_all_reduce
from families.attention import add_block_attention_args, run_block_attention
from families.mamba import add_mamba_args, run_mamba
from families.moe import add_moe_args, run_moe
from families.rmsnorm import add_rmsnorm_args, run_rmsnorm
from families.sampling import (
    add_mask_sampling_args,
    add_sample_tokens_args,
    run_mask_sampling,
    run_sample_tokens,
)

# Family name -> (add its arguments, run it). A new kernel family adds one entry.
FAMILIES = {
    "rmsnorm": (add_rmsnorm_args, run_rmsnorm),
    "block_attention": (add_block_attention_args, run_block_attention),
    "mask_sampling": (add_mask_sampling_args, run_mask_sampling),
    "sample_tokens": (add_sample_tokens_args, run_sample_tokens),
    "mamba": (add_mamba_args, run_mamba),
    "moe": (add_moe_args, run_moe),
    "all_reduce": (add_all_reduce_args, run_all_reduce),
}
