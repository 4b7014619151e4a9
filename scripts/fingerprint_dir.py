#!/usr/bin/env python3
"""Prints "sha256  path" for every file under DIR (see behaviour_fingerprint.sh): JSON reports
without timings and command lines, safetensors as sorted metadata + tensor header + data."""
import hashlib, json, os, struct, sys

# Timings differ run to run; file hashes of weights differ with the metadata order (see above).
DROP = {"timings", "timing", "seconds", "tokens_per_s", "command", "input_weights_sha256",
        "output_weights_sha256", "weights_sha256", "sani_source_sha256"}


def scrub(v):
    if isinstance(v, dict):
        return {k: scrub(x) for k, x in v.items() if k not in DROP}
    if isinstance(v, list):
        return [scrub(x) for x in v]
    return v


def content(path, name):
    data = open(path, "rb").read()
    if name.endswith(".safetensors"):
        n = struct.unpack("<Q", data[:8])[0]
        header = scrub(json.loads(data[8 : 8 + n]))
        return json.dumps(header, sort_keys=True).encode() + data[8 + n :]
    if name.endswith(".json") and (name.startswith(("sani_", "eval")) or "-eval" in name):
        return json.dumps(scrub(json.loads(data)), sort_keys=True).encode()
    return data


root = sys.argv[1]
for dirpath, dirs, files in sorted(os.walk(root)):
    dirs.sort()
    for f in sorted(files):
        if f.endswith(".log"):
            continue
        p = os.path.join(dirpath, f)
        print(hashlib.sha256(content(p, f)).hexdigest(), os.path.relpath(p, root))
