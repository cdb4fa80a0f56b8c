"""Ahead-of-time build of FlashInfer's SM90 cutlass fused-MoE module (``moe nvidia build``).

FlashInfer JIT-compiles ``fused_moe_90`` on first use: 248 nvcc units, 40-60
minutes on a 16-core host. This package builds only the units that the
requested quant schemes need, from FlashInfer's own generated ``build.ninja``,
on any machine with nvcc (no GPU needed), and installs the result in
FlashInfer's AOT slot ``<flashinfer>/data/aot/fused_moe_90/``.

Modules: :mod:`.units` (which sources each scheme needs), :mod:`.ninja`
(reading and rewriting ``build.ninja``), :mod:`.stubs` (stand-ins for the
omitted dtypes' symbols), :mod:`.build` (the driver), :mod:`.manifest`
(what a built module contains).
"""
