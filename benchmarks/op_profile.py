"""Where an XLA:CPU program's time goes: a jax.profiler trace grouped by what each op does.

    python benchmarks/throughput.py --model unet-small --mode train --reps 3 \\
        --profile /tmp/prof --dump-hlo /tmp/step.hlo
    python benchmarks/op_profile.py /tmp/prof /tmp/step.hlo --reps 3

XLA:CPU's thunk runtime records one trace event per executed HLO instruction (a fusion, a dot,
a convolution, a copy), named as in the optimised HLO that `--dump-hlo` writes. Each event is
put in one class by the instructions it contains, in this order of precedence:

  convolution   any convolution (forward, or a gradient's dilated / transposed one)
  dot           any dot (matmuls, attention)
  reduction     reduce or reduce-window (norm statistics and their gradients, softmax, bias grads)
  layout        only data movement: copy, transpose, bitcast, slice, concatenate, pad, broadcast
  elementwise   everything else (activations, optimizer update, fused arithmetic)

It prints milliseconds per rep and the share of all op time for each class and for the top ops.
Times are the events' durations on the executing thread; ops that XLA splits across its intra-op
pool record each part, so the class totals add up CPU time, not wall time.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re

CLASSES = ("convolution", "dot", "reduction", "layout", "elementwise")
_LAYOUT_OPS = {
    "copy", "transpose", "bitcast", "slice", "concatenate", "pad", "broadcast", "reshape", "parameter",
    "constant", "tuple", "get-tuple-element", "dynamic-slice", "dynamic-update-slice", "copy-start", "copy-done",
}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = .*? ([a-z][\w\-]*)\(")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{$")


def parse_hlo(text: str) -> tuple[dict[str, tuple[str, list[str]]], dict[str, list[str]]]:
    """Instruction name -> (opcode, called computations); computation name -> its instructions."""
    instructions, computations, current = {}, collections.defaultdict(list), None
    for line in text.splitlines():
        if m := _COMPUTATION.match(line):
            current = m[1]
        elif m := _INSTRUCTION.match(line):
            instructions[m[1]] = (m[2], _CALLS.findall(line))
            computations[current].append(m[1])
    return instructions, computations


def classify(name: str, instructions: dict, computations: dict) -> str:
    """The class of instruction `name` (module docstring), from every opcode it contains."""
    opcodes, stack, seen = set(), [name], set()
    while stack:
        instruction = stack.pop()
        if instruction in seen or instruction not in instructions:
            continue
        seen.add(instruction)
        opcode, called = instructions[instruction]
        opcodes.add(opcode)
        for computation in called:
            stack.extend(computations.get(computation, ()))
    opcodes.discard("fusion")
    if "convolution" in opcodes:
        return "convolution"
    if "dot" in opcodes:
        return "dot"
    if opcodes & {"reduce", "reduce-window"}:
        return "reduction"
    if opcodes <= _LAYOUT_OPS:
        return "layout"
    return "elementwise"


def load_events(trace_dir: str) -> list[dict]:
    """The complete ('X') events of the newest perfetto trace under `trace_dir`."""
    paths = sorted(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "perfetto_trace.json.gz")))
    if not paths:
        raise SystemExit(f"error: no perfetto_trace.json.gz under {trace_dir}/plugins/profile/ "
                         "(throughput.py --profile writes one)")
    with gzip.open(paths[-1]) as f:
        trace = json.load(f)
    return [e for e in trace["traceEvents"] if e.get("ph") == "X"]


def summarize(events: list[dict], instructions: dict, computations: dict, reps: int) -> dict:
    """Per class and per op: milliseconds per rep and number of calls per rep."""
    by_class, by_op, calls = collections.Counter(), collections.Counter(), collections.Counter()
    for event in events:
        name = event["name"]
        if name not in instructions:  # Python frames, executor and client bookkeeping
            continue
        by_class[classify(name, instructions, computations)] += event.get("dur", 0) / 1e3 / reps
        by_op[name] += event.get("dur", 0) / 1e3 / reps
        calls[name] += 1 / reps
    return {"classes": by_class, "ops": by_op, "calls": calls}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace_dir", help="the directory given to throughput.py --profile")
    p.add_argument("hlo", help="the optimised HLO given to throughput.py --dump-hlo")
    p.add_argument("--reps", type=int, required=True, help="timed reps in the trace (throughput.py --reps)")
    p.add_argument("--top", type=int, default=15, help="ops listed one by one")
    args = p.parse_args(argv)
    with open(args.hlo) as f:
        instructions, computations = parse_hlo(f.read())
    result = summarize(load_events(args.trace_dir), instructions, computations, args.reps)
    total = sum(result["classes"].values())
    print(f"op time per rep: {total:.1f} ms (summed over threads)\n")
    print("| class | ms per rep | share |\n|---|---|---|")
    for name in CLASSES:
        ms = result["classes"][name]
        print(f"| {name} | {ms:.1f} | {100 * ms / total:.1f}% |")
    print(f"\n| op (top {args.top}) | class | calls per rep | ms per rep | share |\n|---|---|---|---|---|")
    for name, ms in result["ops"].most_common(args.top):
        print(f"| {name} | {classify(name, instructions, computations)} | {result['calls'][name]:.0f} | "
              f"{ms:.1f} | {100 * ms / total:.1f}% |")


if __name__ == "__main__":
    main()
