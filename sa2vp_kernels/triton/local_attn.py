"""Triton kernels for local cross attention (placeholder: being written)."""
import torch


@torch.library.triton_op("sa2vp_kernels::local_attn_fwd_triton", mutates_args=())
def local_attn_fwd_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid_h: int, grid_w: int,
                          window: int, num_prefix: int, zero_border: bool, scale: float
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    raise RuntimeError("triton local attention not written yet")


@torch.library.triton_op("sa2vp_kernels::local_attn_bwd_triton", mutates_args=())
def local_attn_bwd_triton(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          out: torch.Tensor, lse: torch.Tensor, grid_h: int, grid_w: int, window: int,
                          num_prefix: int, zero_border: bool, scale: float
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    raise RuntimeError("triton local attention not written yet")
