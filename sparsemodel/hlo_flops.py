"""Matmul FLOPs of a compiled XLA program, read from its HLO text.

Why: XLA:GPU's `cost_analysis()` leaves out the matmuls it hands to cuBLAS (custom calls),
so on an H200 it reports a fifth of a dense model's FLOPs. The compiled program still says
what it multiplies: every `dot` (also those inside fusions, e.g. Triton GEMMs) and every
cuBLAS GEMM call carries its operand shapes and contracting dimensions, and a matmul costs
2 x (output elements) x (contracted size). Summing them gives the compiled program's matmul
work on any backend, which is what tells a grouped matmul from a dense fallback.

Not counted: elementwise work (small next to the matmuls), and custom calls whose FLOPs the
text does not give (e.g. cuDNN attention); `MatmulFlops.uncounted` lists those by target.
A while loop's body is counted once, so count a program whose loops are unrolled.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

# `%name = <shape> <opcode>(<operands>), <attributes>`; a shape is an array or a flat tuple.
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[^\s=]+)\s*=\s*"
    r"(?P<shape>\([^()]*\)|[a-z][a-z0-9]*\[[0-9,]*\](?:\{[^}]*\})?)\s+"
    r"(?P<op>[a-z][a-z0-9\-]*)\((?P<rest>.*)$"
)
_ARRAY = re.compile(r"[a-z][a-z0-9]*\[([0-9,]*)\]")
_GEMM_TARGETS = ("__cublas$gemm", "__cublas$lt$matmul", "__rocblas$gemm")


@dataclass
class MatmulFlops:
    flops: float = 0.0
    matmuls: int = 0
    uncounted: dict[str, int] = field(default_factory=dict)  # custom-call target -> count
    loops: int = 0  # while loops: their bodies are counted once


def _dims(shape: str) -> list[int]:
    """The first array's dimensions in a shape (a tuple's first element: a GEMM's result)."""
    m = _ARRAY.search(shape)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def _first_operand(rest: str) -> str:
    """The first operand's name in `a, f32[2,3]{1,0} %b), attrs...` (shapes may be inline)."""
    depth = 0
    for i, ch in enumerate(rest):
        if ch in "([{":
            depth += 1
        elif ch in ")]}" and depth:
            depth -= 1
        elif ch in ",)" and depth == 0:
            return rest[:i].split()[-1].lstrip("%")
    return rest.split()[-1].lstrip("%")


def _int_list(text: str | None) -> list[int]:
    return [int(d) for d in re.findall(r"\d+", text or "")]


def _contracting(rest: str, op: str) -> list[int]:
    if op == "dot":
        m = re.search(r"lhs_contracting_dims=\{([^}]*)\}", rest)
    else:  # a GEMM's backend_config: "lhs_contracting_dimensions":["1"]
        m = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', rest)
    return _int_list(m.group(1) if m else None)


def count(hlo_text: str) -> MatmulFlops:
    """Sum 2 x output elements x contracted size over the program's dots and GEMM calls."""
    out = MatmulFlops()
    shapes: dict[str, list[int]] = {}  # instruction name -> dims, within one computation
    for line in hlo_text.splitlines():
        if line.rstrip().endswith("{") and "=" not in line.split("(")[0]:
            shapes = {}  # a new computation: names are local to it
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, shape, op, rest = m.group("name", "shape", "op", "rest")
        shapes[name] = _dims(shape)
        if op == "while":
            out.loops += 1
        if op == "custom-call":
            t = re.search(r'custom_call_target="([^"]+)"', rest)
            target = t.group(1) if t else "?"
            if not target.startswith(_GEMM_TARGETS):
                out.uncounted[target] = out.uncounted.get(target, 0) + 1
                continue
        elif op != "dot":
            continue
        lhs = shapes.get(_first_operand(rest))
        if lhs is None:  # never seen in this computation: say so rather than guess
            key = f"{op} with an unknown operand"
            out.uncounted[key] = out.uncounted.get(key, 0) + 1
            continue
        contracted = math.prod(lhs[d] for d in _contracting(rest, op) if d < len(lhs))
        out.flops += 2.0 * math.prod(shapes[name]) * contracted
        out.matmuls += 1
    return out
