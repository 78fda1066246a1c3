#!/usr/bin/env python3
"""Fails on an include that goes up the layer order.

nestcache's layers (DESIGN.md section 1) are folders under src/, bottom first:

    base, host, vm, vmx, cpu, guest, workloads, cli

A file in src/<layer>/ may include headers of its own layer and of the layers
below it, never of a layer above. Third-party headers follow the same rule:
CLI11 (<CLI/...>) belongs to cli alone. bench/ and tests/ may include anything,
so they are not read.

Usage: check-layering.py [ROOT]   (ROOT holds src/; default: the repository)
Prints one line per violation ("src/vm/a.cc:12: vm includes cpu/machine.h,
and cpu is above vm") and exits 1 when there is any, 0 otherwise.
"""
import pathlib
import re
import sys

LAYERS = ["base", "host", "vm", "vmx", "cpu", "guest", "workloads", "cli"]
# Third-party include prefixes that only some layers may use: prefix -> the
# lowest layer allowed to include it.
THIRD_PARTY_FLOOR = {"CLI/": "cli"}
SOURCE_SUFFIXES = {".h", ".cc", ".hpp", ".cpp"}
INCLUDE = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]')


def rank(layer):
    return LAYERS.index(layer)


def violations_in(path, layer, root):
    found = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        match = INCLUDE.match(line)
        if not match:
            continue
        kind, target = match.groups()
        where = f"{path.relative_to(root)}:{number}"
        if kind == '"':
            first = target.split("/", 1)[0]
            if "/" in target and first in LAYERS and rank(first) > rank(layer):
                found.append(f"{where}: {layer} includes {target}, and {first} is above {layer}")
        else:
            for prefix, floor in THIRD_PARTY_FLOOR.items():
                if target.startswith(prefix) and rank(layer) < rank(floor):
                    found.append(f"{where}: {layer} includes <{target}>, which only {floor} may use")
    return found


def main(argv):
    root = pathlib.Path(argv[1] if len(argv) > 1 else pathlib.Path(__file__).resolve().parent.parent)
    src = root / "src"
    if not src.is_dir():
        print(f"check-layering: {src} is not a directory", file=sys.stderr)
        return 2
    problems = []
    files = 0
    for layer_dir in sorted(p for p in src.iterdir() if p.is_dir()):
        if layer_dir.name not in LAYERS:
            problems.append(f"{layer_dir.relative_to(root)}: not a layer (expected one of {', '.join(LAYERS)})")
            continue
        for path in sorted(layer_dir.rglob("*")):
            if path.suffix in SOURCE_SUFFIXES and path.is_file():
                files += 1
                problems.extend(violations_in(path, layer_dir.name, root))
    for p in problems:
        print(p)
    if problems:
        print(f"check-layering: {len(problems)} violation(s) in {files} files (order: {', '.join(LAYERS)})")
        return 1
    print(f"check-layering: {files} files, no upward include (order: {', '.join(LAYERS)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
