"""A longer fuzz run of the targets of ``tests/fuzz`` (hypothesis, time-bounded).

The in-suite fuzz tests run a few hundred examples each; this runs the same targets
(the NBD core: structured handshakes, request streams, mutated recorded sessions; the
VMA reader, the CLI tools on mutated archives, the writer against its model) in
batches of fresh random examples until ``--seconds`` is spent, split evenly across
the targets, and prints how many inputs each one tried and what failed (deduplicated
by exception type and place, with hypothesis' shrunk falsifying example).

    .venv/bin/python benchmarks/fuzz.py --seconds 600
    .venv/bin/python benchmarks/fuzz.py --seconds 60 --target vma-reader
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "fuzz"), str(ROOT)]

import test_fuzz_nbd  # noqa: E402
import test_fuzz_vma  # noqa: E402

TARGETS: dict[str, tuple[st.SearchStrategy[Any], Callable[[Any], object]]] = {
    **test_fuzz_nbd.TARGETS,
    **test_fuzz_vma.TARGETS,
}
BATCH = 100
# A failing multi-megabyte archive makes hypothesis warn about its repr; it is cut anyway.
warnings.filterwarnings("ignore", message="Generating overly large repr")


@attrs.define
class Result:
    """What one target did."""

    name: str
    inputs: int = 0
    seconds: float = 0.0
    batches: int = 0
    findings: dict[str, str] = attrs.Factory(dict)


def _key(exc: BaseException) -> str:
    """Deduplicate failures by type and the innermost frame in the project or tests."""
    frames = traceback.extract_tb(exc.__traceback__)
    inner = [f for f in frames if "/hypothesis/" not in f.filename]
    where = f"{Path(inner[-1].filename).name}:{inner[-1].lineno}" if inner else "?"
    return f"{type(exc).__name__} at {where}"


def fuzz(name: str, seconds: float) -> Result:
    """Run one target for about ``seconds``."""
    strategy, check = TARGETS[name]
    result = Result(name)

    @settings(
        max_examples=BATCH,
        deadline=None,
        database=None,
        phases=[Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )
    @given(case=strategy)
    def target(case: Any) -> None:
        result.inputs += 1
        check(case)

    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        result.batches += 1
        try:
            target()
        except Exception as exc:  # a finding: keep going, report each kind once
            key = _key(exc)
            if key not in result.findings:
                notes = "\n".join(getattr(exc, "__notes__", []))
                text = f"{type(exc).__name__}: {exc}"[:2000]
                result.findings[key] = f"{text}\n{notes}"[:4000]
    result.seconds = time.monotonic() - t0
    return result


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60, help="total time (default 60)")
    ap.add_argument("--target", action="append", choices=sorted(TARGETS), help="repeatable")
    args = ap.parse_args(argv)
    names = args.target or list(TARGETS)
    each = args.seconds / len(names)
    results = []
    for name in names:
        r = fuzz(name, each)
        results.append(r)
        print(
            f"{name:<14} {r.inputs:>8} inputs in {r.seconds:6.1f} s "
            f"({r.inputs / max(r.seconds, 1e-9):7.0f}/s), findings: {len(r.findings)}",
            flush=True,
        )
    print("\n| target | inputs | seconds | inputs/s | findings |\n|---|---:|---:|---:|---:|")
    for r in results:
        rate = r.inputs / max(r.seconds, 1e-9)
        print(f"| {r.name} | {r.inputs} | {r.seconds:.0f} | {rate:.0f} | {len(r.findings)} |")
    total = sum(r.inputs for r in results)
    print(f"| total | {total} | {sum(r.seconds for r in results):.0f} | | |")
    found = [(r.name, k, v) for r in results for k, v in r.findings.items()]
    for name, key, text in found:
        print(f"\n### {name}: {key}\n{text}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
