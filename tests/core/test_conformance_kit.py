"""The conformance kit (``pytest --pyargs moe_core.conformance --moe-kernel NAME``), run as plugin authors run it.

Each run is a separate pytest process (``pytester.runpytest_subprocess``), so
plugins load from their entry points as in a plugin's own CI. The kit must
pass on this repository's CPU kernels (the reference, the portable Triton
kernels under ``TRITON_INTERPRET=1``, the example plugin) and must FAIL on a
plugin whose kernels break the contract.
"""

from __future__ import annotations

import re
import textwrap
from importlib import metadata
from pathlib import Path

import pytest
import torch

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]
KIT = ("--pyargs", "moe_core.conformance", "-p", "no:cacheprovider", "-ra")


def run_kit(pytester: pytest.Pytester, *kernels: str) -> pytest.RunResult:
    args = [*KIT, *(f"--moe-kernel={name}" for name in kernels)]
    return pytester.runpytest_subprocess(*args, timeout=600)


def assert_passes(result: pytest.RunResult) -> dict[str, int]:
    outcomes = result.parseoutcomes()
    assert result.ret == 0, "\n".join(result.outlines[-40:])
    assert outcomes.get("passed", 0) > 0 and not outcomes.get("failed") and not outcomes.get("errors")
    return outcomes


def installed(distribution: str) -> bool:
    try:
        metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


def failed_cases(result: pytest.RunResult, kernel: str) -> list[str]:
    """The ``FAILED`` summary lines of ``kernel``'s cases."""
    return [line for line in result.outlines if line.startswith("FAILED") and f"[{kernel}:" in line]


def test_without_a_kernel_everything_is_skipped(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_inprocess(*KIT)
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED
    assert result.parseoutcomes().get("skipped", 0) >= 4
    result.stdout.fnmatch_lines(
        ["*no kernel to check: run pytest --pyargs moe_core.conformance --moe-kernel NAME*"]
    )


def test_reference_kernels_conform(pytester: pytest.Pytester) -> None:
    """Every reference kernel: experts (all schemes, activations, features), routing, sorting."""
    outcomes = assert_passes(run_kit(pytester, "reference"))
    assert outcomes["passed"] >= 80


@pytest.mark.slow
def test_portable_kernels_conform(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """``portable.triton.fused_moe``, routing and sorting: on the CPU in Triton's interpreter."""
    if not installed("moe-plugin-portable"):
        pytest.skip("moe-plugin-portable is not installed (nox -s tests installs it)")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("MOE_LOAD_PLUGINS", "portable")
    result = run_kit(pytester, "portable.triton")
    outcomes = assert_passes(result)
    assert outcomes["passed"] >= 60


def test_example_plugin_conforms(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tutorial plugin of examples/minimal-plugin, discovered through its entry point."""
    if not installed("moe-plugin-example"):
        pytest.skip(
            "the example plugin is not installed: pip install -e examples/minimal-plugin (nox -s tests does)"
        )
    monkeypatch.setenv("MOE_LOAD_PLUGINS", "example")
    result = run_kit(pytester, "example.torch.loop")
    assert_passes(result)
    # what it does not declare is refused with a reason, and reported as skipped
    result.stdout.fnmatch_lines(["*example.torch.loop refuses bias: feature bias not supported*"])


# A plugin whose kernels break the contract in the ways kernels do. The kit must fail each.
FAULTY = """
import torch
from dataclasses import replace
from moe_core import KernelEntry, hookimpl
from moe_core.reference import _apply, _prepare
from moe_core.routing import select_experts_reference
from moe_core.sorting import align_block_size_reference

def wrong_values(spec, x, prepared, w, ids, out):
    _apply(spec, x, prepared, w, ids, out)
    out.mul_(1.1)

def returns_instead_of_writing(spec, x, prepared, w, ids, out):
    result = torch.zeros_like(out)
    _apply(spec, x, prepared, w, ids, result)
    return result

def writes_its_input(spec, x, prepared, w, ids, out):
    _apply(spec, x, prepared, w, ids, out)
    x.mul_(0.5)

def routing_ignores_renormalize(logits, routing, bias):
    return select_experts_reference(logits, replace(routing, renormalize=False), bias)

def align_pads_with_minus_one(topk_ids, *, num_experts, block_size, expert_map=None):
    out = align_block_size_reference(topk_ids, num_experts=num_experts, block_size=block_size,
                                     expert_map=expert_map)
    ids = out.sorted_token_ids
    return out._replace(sorted_token_ids=torch.where(ids == topk_ids.numel(), -1, ids))

def experts(name, apply):
    return KernelEntry(f"faulty.torch.{name}", "experts", apply, prepare=_prepare, quant={"bf16"},
                       activations={"silu"}, features={"bias", "expert_parallel"}, needs_contiguous=False)

@hookimpl
def register_kernels(register):
    register(experts("correct", _apply))
    register(experts("wrong_values", wrong_values))
    register(experts("returns_instead_of_writing", returns_instead_of_writing))
    register(experts("writes_its_input", writes_its_input))
    register(KernelEntry("faulty.torch.routing", "routing", routing_ignores_renormalize,
                         features={"softmax", "sigmoid"}))
    register(KernelEntry("faulty.torch.align", "sorting", align_pads_with_minus_one,
                         op="align_block_size", features={"expert_map"}))
"""


def _install_faulty_plugin(root: Path) -> None:
    """A distribution on ``root`` (the subprocess' PYTHONPATH) with entry point ``faulty``."""
    (root / "moe_faulty_plugin.py").write_text(textwrap.dedent(FAULTY))
    info = root / "moe_faulty_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: moe-faulty-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[moe_core.plugins]\nfaulty = moe_faulty_plugin\n")


def test_kit_fails_broken_kernels(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    _install_faulty_plugin(pytester.path)
    monkeypatch.setenv("MOE_LOAD_PLUGINS", "faulty")
    result = run_kit(pytester, "faulty", "nosuch.torch.kernel")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert result.parseoutcomes().get("passed", 0) > 0
    assert not failed_cases(result, "faulty.torch.correct"), "the correct control kernel failed"
    for kernel, test in [
        ("faulty.torch.wrong_values", "test_matches_reference"),
        ("faulty.torch.returns_instead_of_writing", "test_writes_every_row_of_out"),
        ("faulty.torch.writes_its_input", "test_matches_reference"),
        ("faulty.torch.routing", "test_matches_reference"),
        ("faulty.torch.align", "test_contract"),
    ]:
        lines = failed_cases(result, kernel)
        assert any(f"::{test}[" in line for line in lines), f"{kernel} should fail {test}: {lines}"
    # only the renormalizing routing cases fail
    assert all("renormalize" in line for line in failed_cases(result, "faulty.torch.routing"))
    assert any(
        re.search(r"FAILED .*test_kernel_is_registered\[nosuch\.torch\.kernel\]", line)
        for line in result.outlines
    )
    result.stdout.fnmatch_lines(["*--moe-kernel nosuch.torch.kernel matches no registered kernel*"])


@pytest.mark.parametrize(
    "path",
    ["examples/minimal-plugin/pyproject.toml", "examples/minimal-plugin/src/moe_plugin_example/plugin.py"],
)
def test_guide_shows_the_example_as_it_is(path: str) -> None:
    """docs/writing-a-plugin.md quotes these files whole: it must not drift from them."""
    guide = (ROOT / "docs" / "writing-a-plugin.md").read_text()
    assert (ROOT / path).read_text() in guide, f"docs/writing-a-plugin.md no longer quotes {path} as it is"
