"""Compiles every Triton kernel for a Hopper GPU (sm_90) without a GPU, and prints, as JSON,
which vector memory instructions each PTX uses. Runs in its own process (see
test_compile_cuda.py) because the Triton interpreter the other tests use patches triton.language.
"""

import json
import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastbml.kernels import (
    axpby,
    combined_nll,
    lerp,
    row_drop,
    scale_noise,
    split_gram,
    true_class_prob,
)

HOPPER = GPUTarget("cuda", 90, 32)
DTYPES = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}
TABLES = {"ptr_table": "*i64", "numel_table": "*i64", "chunk_tensor": "*i64",
          "chunk_start": "*i64"}


def specs():
    for name, dtype in DTYPES.items():
        yield f"moments[{name}]", scale_noise._moments_kernel, {
            **TABLES, "moments": "*fp64", "DTYPE": "constexpr", "BLOCK": "constexpr",
            "ALIGNED": "constexpr"}, {"DTYPE": dtype, "BLOCK": 4096, "ALIGNED": True}
        yield f"rewrite[{name}]", scale_noise._rewrite_kernel, {
            **TABLES, "offset_table": "*i64", "scale_index": "*i64", "scales": "*fp32",
            "sigma": "*fp32", "seed_ptr": "*i64", "stream": "i32", "NOISE": "constexpr",
            "DTYPE": "constexpr", "BLOCK": "constexpr", "ALIGNED": "constexpr"}, {
            "NOISE": True, "DTYPE": dtype, "BLOCK": 4096, "ALIGNED": True}
        yield f"lerp[{name}]", lerp._lerp_kernel, {
            **TABLES, "target_table": "*i64", "weight_index": "*i64", "weights": "*fp32",
            "DTYPE": "constexpr", "BLOCK": "constexpr", "ALIGNED": "constexpr"}, {
            "DTYPE": dtype, "BLOCK": 4096, "ALIGNED": True}
        yield f"true_class_prob[{name}]", true_class_prob._true_class_prob_kernel, {
            "logits": f"*{name}", "labels": "*i64", "out": "*fp32", "batch": "i32",
            "n_classes": "i32", "stride_g": "i64", "stride_b": "i64", "stride_c": "i64",
            "ROWS": "constexpr", "COLS": "constexpr"}, {"ROWS": 64, "COLS": 64}
        yield f"combined_nll[{name}]", combined_nll._combined_nll_kernel, {
            "logits": f"*{name}", "weights": "*fp32", "labels": "*i64", "out": "*fp32",
            "n_sets": "i32", "batch": "i32", "n_classes": "i32", "max_nll": "fp32",
            "stride_s": "i64", "stride_b": "i64", "stride_c": "i64", "ROWS": "constexpr",
            "COLS": "constexpr"}, {"ROWS": 64, "COLS": 64}
        yield f"drop_scale[{name}]", row_drop._drop_scale_kernel, {
            "in_table": "*i64", "out_table": "*i64", "stride_table": "*i64",
            "dim_table": "*i64", "first_prog": "*i64", "q": "*fp32", "n_mod": "i32",
            "batch": "i32", "total_dim": "fp32", "threshold": "fp32", "seed_ptr": "*i64",
            "mask_seed_ptr": "*i64", "coin_stream": "i32", "mask_stream": "i32",
            "DTYPE": "constexpr", "MP": "constexpr", "ROWS": "constexpr",
            "COLS": "constexpr", "ALIGNED": "constexpr"}, {
            "DTYPE": dtype, "MP": 4, "ROWS": 8, "COLS": 512, "ALIGNED": True}
        yield f"split_gram[{name}]", split_gram._partial_kernel, {
            "sum_table": "*i64", "part_table": "*i64", "numel_table": "*i64",
            "chunk_tensor": "*i64", "chunk_start": "*i64", "partial": "*fp64",
            "DTYPE": "constexpr", "BLOCK": "constexpr", "ALIGNED": "constexpr"}, {
            "DTYPE": dtype, "BLOCK": 4096, "ALIGNED": True}
        yield f"axpby[{name}]", axpby._axpby_kernel, {
            "x_table": "*i64", "y_table": "*i64", "numel_table": "*i64", "coeff_row": "*i64",
            "coeffs": "*fp32", "chunk_tensor": "*i64", "chunk_start": "*i64",
            "DTYPE": "constexpr", "BLOCK": "constexpr", "ALIGNED": "constexpr"}, {
            "DTYPE": dtype, "BLOCK": 4096, "ALIGNED": True}
    yield "split_gram_combine", split_gram._combine_kernel, {
        "partial": "*fp64", "first_chunk": "*i64", "out_row": "*i64", "out": "*fp64",
        "n_iters": "i32", "CHUNKS": "constexpr"}, {"CHUNKS": 256}
    yield "sigma", scale_noise._sigma_kernel, {
        "moments": "*fp64", "first_chunk": "*i64", "sigma": "*fp32", "eps": "fp32",
        "n_iters": "i32", "CHUNKS": "constexpr"}, {"CHUNKS": 1024}
    yield "weights", row_drop._weights_kernel, {
        "q": "*fp32", "weights": "*fp32", "executed_ptr": "*i8", "n_mod": "i32", "batch": "i32",
        "threshold": "fp32", "seed_ptr": "*i64", "mask_seed_ptr": "*i64", "coin_stream": "i32",
        "mask_stream": "i32", "ROWS": "constexpr"}, {"ROWS": 256}


def main():
    report = {}
    for name, fn, signature, constexprs in specs():
        ptx = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                             target=HOPPER).asm["ptx"]
        report[name] = {"ld_v4": bool(re.search(r"ld\.global(\.\w+)*\.v4", ptx)),
                        "st_v4": bool(re.search(r"st\.global(\.\w+)*\.v4", ptx))}
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
