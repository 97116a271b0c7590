"""Quantized weights: GGUF blocks kept packed, load-time int8/int4, and the kernels.

ggml_blocks.py    GGUF blocks -> GroupAffine (codes + per-group scale/min), exact
group_affine.py   that form: slicing for tensor parallelism, exact dequantization
int4_kernel.py    GroupAffine -> torch's CPU int4 kernel (one or two parts)
load_time.py      int8 per-row and int4 per-group quantization of float weights
packed_linear.py  a layer's matmul over its packed row blocks (+ optional dense copy)
choose.py         --quantization and the per-model default
spec.py           the decision, handed to every layer's finalize_weights
"""
