"""The conformance kit: the kernel contract, checked for one plugin's kernels.

Run it on any registered kernel (from the plugin's own CI, or anywhere the
plugin is installed)::

    pytest --pyargs moe_core.conformance --moe-kernel example.torch.loop
    pytest --pyargs moe_core.conformance --moe-kernel portable.triton --moe-device cuda

``--moe-kernel`` takes a kernel name or a dotted prefix (every kernel of a
plugin or backend) and may be repeated; ``--moe-device`` defaults to ``cuda``
when torch sees a GPU, else ``cpu``. Both come from moe-core's pytest plugin
(:mod:`moe_core.testing.plugin`). Without ``--moe-kernel`` every module is
skipped (pytest then exits with 5, no tests collected).

Cases come from what each kernel's :class:`~moe_core.KernelEntry` declares
(family, quant schemes, activations, features) and from its ``supports``: a
combination the kernel refuses is reported as skipped with its reason, never
failed. Modules, one per contract:

- :mod:`.test_registry`: the names resolve; declarations use known names.
- :mod:`.test_experts`: ``moe_apply`` vs the float64 reference, empty
  batches, poisoned ``out``, bad inputs raising before launch, ``prepare``
  idempotence, out-of-range ids, CUDA graphs.
- :mod:`.test_routing`: ``select_experts`` kernels vs the reference.
- :mod:`.test_sorting`: ``align_block_size`` / ``moe_sorting`` /
  ``ragged_metadata`` kernels by the contract's invariants.

Data are random, drawn afresh for each case from a seed derived from the
case's id (so a failure reproduces). Shapes are small: a kernel running in
Triton's CPU interpreter finishes the kit in about a minute.
"""
