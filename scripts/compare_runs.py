"""Compare two run folders: registry (paths, timings, recipes aside), every answer, stage summaries (timings and memory aside), 07 tables and judgements. Usage: python scripts/compare_runs.py RUN_A RUN_B"""
import json, sys, hashlib
from pathlib import Path
a, b = Path(sys.argv[1]), Path(sys.argv[2])
TIMING = ("(s)", "GiB", "seconds", "ms", "s/layer", "× finetuned", "threads")
def reg(p):
    r = json.loads((p / "registry.json").read_text())
    out = {}
    for name, v in r["variants"].items():
        extra = {k: val for k, val in v["extra"].items() if k not in ("adapter", "sft_base", "quantized_base", "identity", "setup", "quantize seconds", "SFT seconds", "SFT peak", "log_history", "rebuild")}
        out[name] = {k: v[k] for k in ("stage", "parent", "layers_removed", "bits", "parameters", "notes")} | {"extra": extra}
    return out, sorted(r["answers"])
ra, aa = reg(a); rb, ab = reg(b)
print("registry variants equal:", ra == rb, len(ra), "variants")
if ra != rb:
    for k in sorted(set(ra) | set(rb)):
        if ra.get(k) != rb.get(k): print("  differs:", k, ra.get(k), rb.get(k))
print("answer sets equal:", aa == ab, len(aa))
same = 0
for name in [n for n in aa if n in ab]:
    fa = [json.loads(l) for l in (a / "answers" / f"{name}.jsonl").read_text().splitlines()]
    fb = [json.loads(l) for l in (b / "answers" / f"{name}.jsonl").read_text().splitlines()]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "image"} | {"image": Path(r["image"]).name} for r in rows]
    if strip(fa) == strip(fb): same += 1
    else:
        diff = sum(x != y for x, y in zip(strip(fa), strip(fb)))
        print(f"  answers of {name} differ in {diff} of {len(fa)} rows")
print(f"answers identical for {same} of {len(aa)} variants ({sum(len((a / 'answers' / f'{n}.jsonl').read_text().splitlines()) for n in aa)} rows)")
for stage in sorted(p.name for p in (a / "stages").glob("0*")):
    sa = json.loads((a / "stages" / stage / "summary.json").read_text()) if (a / "stages" / stage / "summary.json").exists() else {}
    sb = json.loads((b / "stages" / stage / "summary.json").read_text()) if (b / "stages" / stage / "summary.json").exists() else {}
    keep = lambda s: {k: v for k, v in s.items() if not any(t in k for t in TIMING)}
    ka, kb = keep(sa), keep(sb)
    print(f"{stage}: {len(ka)} key figures, equal: {ka == kb}")
    if ka != kb:
        for k in sorted(set(ka) | set(kb)):
            if ka.get(k) != kb.get(k): print("   ", k, ka.get(k), "|", kb.get(k))
tables = sorted(p.name for p in (a / "stages" / "07_judge" / "tables").glob("*.csv"))
for name in tables:
    ta = (a / "stages" / "07_judge" / "tables" / name).read_text(); pb = b / "stages" / "07_judge" / "tables" / name
    print(f"07 table {name}: identical: {pb.exists() and ta == pb.read_text()}")
ja = {json.loads(l)["key"]: json.loads(l)["judgement"]["rating"] for l in (a / "stages/07_judge/judgements.jsonl").read_text().splitlines()}
jb = {json.loads(l)["key"]: json.loads(l)["judgement"]["rating"] for l in (b / "stages/07_judge/judgements.jsonl").read_text().splitlines()} if (b / "stages/07_judge/judgements.jsonl").exists() else {}
print(f"07 judgements: {len(ja)} vs {len(jb)}, identical (key -> rating): {ja == jb}")
