#!/usr/bin/env python3
"""Writes the scenario-parser target's seeds: one file per case of each
scenario file named, holding the file's top-level keys (family, vm) and that
one case, so every seed is a small, valid scenario file.

    fuzz/scenario_seeds.py DIR FILE...          write DIR/<file>-<case>.json
    fuzz/scenario_seeds.py --check DIR FILE...  exit 1 if one is missing or differs

Small seeds keep the fuzzer fast (its time per input grows with the input's
length) and let it mutate one case at a time; whole conformance files are tens
of kilobytes. Other files in DIR (hand-written broken inputs, regressions)
are left alone.
"""
import json
import os
import re
import sys


def seeds(path):
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    stem = os.path.splitext(os.path.basename(path))[0]
    top = {k: v for k, v in doc.items() if k not in ("cases", "note")}
    for case in doc["cases"]:
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", case["name"])
        text = json.dumps(dict(top, cases=[case]), indent=1) + "\n"
        yield f"{stem}-{name}.json", text


def main(argv):
    check = len(argv) > 1 and argv[1] == "--check"
    args = argv[2:] if check else argv[1:]
    if len(args) < 2:
        print(f"usage: {argv[0]} [--check] DIR FILE...", file=sys.stderr)
        return 2
    out, files = args[0], args[1:]
    bad = written = 0
    for path in files:
        for name, text in seeds(path):
            target = os.path.join(out, name)
            if check:
                try:
                    with open(target, encoding="utf-8") as f:
                        same = f.read() == text
                except OSError:
                    same = False
                if not same:
                    print(f"{target}: missing or out of date (regenerate with {argv[0]} {out} FILE...)", file=sys.stderr)
                    bad += 1
                continue
            os.makedirs(out, exist_ok=True)
            with open(target, "w", encoding="utf-8") as f:
                f.write(text)
            written += 1
    if check:
        print(f"{'out of date: ' + str(bad) if bad else 'all seeds current'}")
    else:
        print(f"{written} seeds written to {out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
