"""Markdown table of one checkpoint's deployment formats from `lsskd profile --accuracy --json`
and the `lsskd export` reports: format, file size, batch-1 latency, test top-1, difference to
eager PyTorch, parity.  Usage: deploy_edge_table.py PROFILE.json EXPORT.json..."""
import json
import sys
from pathlib import Path

prof = json.loads(Path(sys.argv[1]).read_text())
parity, exporter = {}, {}
for f in sys.argv[2:]:
    rep = json.loads(Path(f).read_text())
    parity[Path(rep["file"]).name] = rep["parity"]["max_abs_diff"] if rep.get("parity") else None
    exporter[Path(rep["file"]).name] = rep.get("exporter", "")
    if rep.get("int8"):
        parity[Path(rep["int8"]["file"]).name] = None
        exporter[Path(rep["int8"]["file"]).name] = "int8 of the above"
rows = prof["rows"]
dep = rows["deployed"]
n = dep.get("test_inputs")
print(f"{prof['model']} ({prof['method']}), {Path(prof['checkpoint']).parent.name}; test split: {n} inputs; "
      f"batch 1, {prof['threads']} thread(s), median of {prof['repeats']} calls\n")
print("| format | file | size (bytes) | latency / input (ms) | test top-1 (%) | vs eager (points) | "
      "max abs logit diff | exporter |")
print("|---|---|---:|---:|---:|---:|---:|---|")
print(f"| PyTorch eager | (checkpoint) | {dep['state_dict_bytes']:,} (state dict) | {dep['latency_ms']:.3f} | "
      f"{dep['top1']:.2f} | - | - | - |")
for key, r in rows.items():
    if not key.startswith("exported:"):
        continue
    name = key.split(":", 1)[1]
    kind = r["format"] + (" int8" if ".int8." in name else " float32")
    p = parity.get(name)
    print(f"| {kind} | {name} | {r['bytes']:,} | {r['latency_ms']:.3f} | {r['top1']:.2f} | "
          f"{r['top1_diff_vs_eager']:+.2f} | {'-' if p is None else f'{p:.1e}'} | {exporter.get(name, '')} |")
