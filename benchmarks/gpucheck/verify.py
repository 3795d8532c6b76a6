"""Reads a GPU check's results JSON and lists what makes it incomplete: not finished, a required
section missing or not done, a peer not named (or named without a status, or not run without a
reason), a failed correctness check, a case with an error.

    python -m benchmarks.gpucheck.verify RESULTS.json [--all-done]

--all-done (the --tiny runs here): every section must be done (none skipped), every correctness
check ok and no case in error. Exit 1 with the problems listed, else 0.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REQUIRED_SECTIONS = ("contrastive_loss correctness", "sigmoid_loss correctness", "frame ops correctness",
                     "distillation_loss correctness", "peers agreement")
PEERS = ("open_clip", "inf_cl", "memeff", "siglip_kernel")


def problems(doc: dict, all_done: bool = False) -> list[str]:
    out = []
    if not doc.get("finished"):
        out.append("not finished")
    sections = {s["section"]: s for s in doc.get("sections", [])}
    for name in REQUIRED_SECTIONS:
        if name not in sections:
            out.append(f"section {name!r} missing")
    for name, s in sections.items():
        if s.get("status") not in ("done", "skipped", "error", "out of time"):
            out.append(f"section {name!r} has no status")
        elif s["status"] != "done" and not s.get("reason"):
            out.append(f"section {name!r} {s['status']} without a reason")
        elif all_done and s["status"] != "done":
            out.append(f"section {name!r} {s['status']}: {s.get('reason')}")
    peers = doc.get("peers", {})
    for peer in PEERS:
        recs = {k: v for k, v in peers.items() if k.split("/", 1)[-1].startswith(peer)}
        if not recs:
            out.append(f"peer {peer} not named")
        for key, rec in recs.items():
            if rec.get("status") not in ("run", "not run"):
                out.append(f"peer {key} without a status")
            elif rec["status"] == "not run" and not rec.get("reason"):
                out.append(f"peer {key} not run without a reason")
    if all_done:
        out += [f"correctness failed: {json.dumps(c, default=str)[:300]}" for c in doc.get("correctness", [])
                if not c.get("ok")]
        out += [f"case error: {json.dumps(c, default=str)[:300]}" for c in doc.get("cases", []) if "error" in c]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", type=Path)
    p.add_argument("--all-done", action="store_true")
    args = p.parse_args(argv)
    found = problems(json.loads(args.path.read_text()), args.all_done)
    for line in found:
        print("PROBLEM:", line)
    print(f"{args.path}: " + ("complete" if not found else f"{len(found)} problems"))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
