#!/usr/bin/env python3
"""Print the GGUF metadata key/values of a model (big arrays summarised).

Usage: dump_gguf_metadata.py MODEL.gguf > metadata-<family>.txt
Needs the `gguf` Python package (pip install gguf, or PYTHONPATH=<llama.cpp>/gguf-py).
"""
import sys

from gguf import GGUFReader, GGUFValueType


def fmt_value(field):
    types = field.types
    if not types:
        return "<no type>"
    if types[0] == GGUFValueType.ARRAY:
        n = len(field.data)
        sub = types[1] if len(types) > 1 else None
        subname = sub.name if sub is not None else "?"
        if n <= 16:
            vals = [field.contents(i) for i in range(n)]
            return f"array<{subname}>[{n}] = {vals!r}"
        head = [field.contents(i) for i in range(4)]
        return f"array<{subname}>[{n}] (first 4: {head!r})"
    v = field.contents()
    return f"{types[0].name} = {v!r}"


def main():
    path = sys.argv[1]
    r = GGUFReader(path)
    print(f"# GGUF metadata of {path.rsplit('/', 1)[-1]}")
    print(f"# tensors: {len(r.tensors)}")
    for name, field in r.fields.items():
        print(f"{name}: {fmt_value(field)}")
    # Summary of token types (1=normal 2=unknown 3=control 4=user_defined 5=unused 6=byte)
    if "tokenizer.ggml.token_type" in r.fields:
        tt = r.fields["tokenizer.ggml.token_type"]
        toks = r.fields["tokenizer.ggml.tokens"]
        names = {1: "NORMAL", 2: "UNKNOWN", 3: "CONTROL", 4: "USER_DEFINED", 5: "UNUSED", 6: "BYTE"}
        types = [int(tt.contents(i)) for i in range(len(tt.data))]
        counts = {}
        for t in types:
            counts[t] = counts.get(t, 0) + 1
        print("# token_type counts: " + ", ".join(f"{names.get(k, k)}({k})={v}" for k, v in sorted(counts.items())))
        for k in (2, 3, 4, 6):
            ids = [i for i, t in enumerate(types) if t == k]
            if not ids:
                continue
            shown = ids[:40]
            desc = ", ".join(f"{i}:{toks.contents(i)!r}" for i in shown)
            more = f" ... (+{len(ids) - len(shown)} more, last {ids[-1]}:{toks.contents(ids[-1])!r})" if len(ids) > len(shown) else ""
            print(f"# {names[k]} tokens: {desc}{more}")


if __name__ == "__main__":
    main()
