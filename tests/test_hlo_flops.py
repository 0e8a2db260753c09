"""Matmul FLOPs read from compiled HLO: exact on programs whose matmuls we know."""
# ruff: noqa: E501  (HLO lines are long)

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparsemodel import hlo_flops

# The shape of XLA:GPU's optimised HLO: a cuBLAS GEMM returning (result, workspace), a
# Triton GEMM fusion holding a dot, a cuDNN attention call, and a while loop.
GPU_HLO = """
HloModule jit_step, entry_computation_layout={(bf16[64,128]{1,0}, bf16[128,256]{1,0})->f32[]}

%triton_gemm (param_0: bf16[4,64,32], param_1: bf16[4,32,16]) -> bf16[4,64,16] {
  %param_0 = bf16[4,64,32]{2,1,0} parameter(0)
  %param_1 = bf16[4,32,16]{2,1,0} parameter(1)
  ROOT %dot.1 = bf16[4,64,16]{2,1,0} dot(%param_0, %param_1), lhs_batch_dims={0}, lhs_contracting_dims={2}, rhs_batch_dims={0}, rhs_contracting_dims={1}
}

ENTRY %main (p0: bf16[64,128], p1: bf16[128,256]) -> f32[] {
  %p0 = bf16[64,128]{1,0} parameter(0)
  %p1 = bf16[128,256]{1,0} parameter(1)
  %gemm = (bf16[64,256]{1,0}, s8[4194304]{0}) custom-call(bf16[64,128]{1,0} %p0, bf16[128,256]{1,0} %p1), custom_call_target="__cublas$gemm", backend_config={"operation_queue_id":"0","gemm_backend_config":{"alpha_real":1,"beta":0,"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]},"epilogue":"DEFAULT"}}
  %a = bf16[4,64,32]{2,1,0} parameter(2)
  %b = bf16[4,32,16]{2,1,0} parameter(3)
  %fusion = bf16[4,64,16]{2,1,0} fusion(%a, %b), kind=kCustom, calls=%triton_gemm
  %fmha = (bf16[2,128,4,64]{3,2,1,0}, u8[0]{0}) custom-call(%a, %b), custom_call_target="__cudnn$fmhaSoftmax"
  %loop = (s32[], f32[8]{0}) while(%init), condition=%cond, body=%body
  ROOT %r = f32[] constant(0)
}
"""


def test_counts_cublas_calls_and_dots_in_fusions_and_lists_the_rest():
    got = hlo_flops.count(GPU_HLO)
    gemm = 2 * 64 * 256 * 128  # 2 x output elements x contracted size
    batched_dot = 2 * (4 * 64 * 16) * 32
    assert got.flops == gemm + batched_dot
    assert got.matmuls == 2
    assert got.uncounted == {"__cudnn$fmhaSoftmax": 1}
    assert got.loops == 1


def test_counts_a_compiled_jax_program_exactly():
    def f(a, b, c):
        return jnp.einsum("bmk,bkn->bmn", a, b), jnp.tanh(a[0] @ c)

    a, b, c = jnp.ones((3, 16, 32)), jnp.ones((3, 32, 8)), jnp.ones((32, 5))
    got = hlo_flops.count(jax.jit(f).lower(a, b, c).compile().as_text())
    assert got.flops == 2 * (3 * 16 * 8) * 32 + 2 * (16 * 5) * 32
    assert got.matmuls == 2 and not got.uncounted and got.loops == 0
