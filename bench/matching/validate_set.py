"""Validate the demo expert directory and the labelled demand-matching evaluation set.

Run from anywhere:  python bench/matching/validate_set.py
Exits with status 1 and prints every problem if the data is inconsistent; otherwise prints counts.
Standard library only; files are read by path relative to the repository root.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "src/labcommons/catalog/data/demo.json"
TAXONOMY = ROOT / "src/labcommons/catalog/data/taxonomy.csv"
EXPERTS = ROOT / "src/labcommons/matching/data/experts.json"
DEMANDS = ROOT / "bench/matching/demands.jsonl"

EXPERT_KEYS = {
    "code",
    "institution",
    "facility",
    "name_zh",
    "name_en",
    "title_zh",
    "title_en",
    "fields",
    "skills_zh",
    "skills_en",
    "bio_zh",
    "bio_en",
    "languages",
    "availability",
    "consultation_service",
}
DEMAND_KEYS = {"id", "lang", "text", "region", "relevant", "categories"}
LANGS = {"zh", "en", "mixed"}
REGIONS = {None, "SC", "CQ"}
AVAILABILITY = {"available", "limited", "unavailable"}


def load_taxonomy() -> dict[str, str]:
    """code -> parent ('' for top level)."""
    with TAXONOMY.open(encoding="utf-8", newline="") as f:
        return {row["code"]: row["parent"] for row in csv.DictReader(f)}


def check_experts(demo: dict, taxonomy: dict[str, str], errors: list[str]) -> list[dict]:
    institutions = {i["code"]: i for i in demo["institutions"]}
    facilities = {f["code"]: f for f in demo["facilities"]}
    services = {s["code"]: s for s in demo["services"]}
    experts = json.loads(EXPERTS.read_text(encoding="utf-8"))
    if not isinstance(experts, list):
        errors.append("experts.json: top level must be a list")
        return []
    if not 24 <= len(experts) <= 30:
        errors.append(f"experts.json: {len(experts)} experts, expected 24-30")
    seen: set[str] = set()
    for e in experts:
        code = e.get("code", "?")
        where = f"experts.json {code}"
        if set(e) != EXPERT_KEYS:
            errors.append(
                f"{where}: keys differ: missing {sorted(EXPERT_KEYS - set(e))}, extra {sorted(set(e) - EXPERT_KEYS)}"
            )
            continue
        if code in seen:
            errors.append(f"{where}: duplicate code")
        seen.add(code)
        inst = e["institution"]
        if inst not in institutions:
            errors.append(f"{where}: unknown institution {inst}")
        elif not re.fullmatch(rf"EXP-{re.escape(inst)}-\d\d", code):
            errors.append(f"{where}: code must be EXP-{inst}-NN")
        fac = e["facility"]
        if fac is not None:
            if fac not in facilities:
                errors.append(f"{where}: unknown facility {fac}")
            elif facilities[fac]["institution"] != inst:
                errors.append(f"{where}: facility {fac} is not at {inst}")
        if not 1 <= len(e["fields"]) <= 3:
            errors.append(f"{where}: needs 1-3 fields")
        for field in e["fields"]:
            if field not in taxonomy:
                errors.append(f"{where}: unknown taxonomy code {field}")
        for key in ("skills_zh", "skills_en"):
            if not 3 <= len(e[key]) <= 6 or not all(isinstance(s, str) and s.strip() for s in e[key]):
                errors.append(f"{where}: {key} needs 3-6 non-empty strings")
        for key in ("name_zh", "name_en", "title_zh", "title_en", "bio_zh", "bio_en"):
            if not isinstance(e[key], str) or not e[key].strip():
                errors.append(f"{where}: {key} is empty")
        if not e["languages"] or not set(e["languages"]) <= {"zh", "en"}:
            errors.append(f"{where}: languages must be a non-empty subset of zh/en")
        if e["availability"] not in AVAILABILITY:
            errors.append(f"{where}: bad availability {e['availability']}")
        svc = e["consultation_service"]
        if svc is not None:
            if svc not in services:
                errors.append(f"{where}: unknown service {svc}")
            elif services[svc]["kind"] != "consultation":
                errors.append(f"{where}: service {svc} is not a consultation service")
            elif services[svc]["facility"] != fac:
                errors.append(f"{where}: service {svc} is not at facility {fac}")
    return experts


def check_demands(
    demo: dict, taxonomy: dict[str, str], experts: list[dict], errors: list[str], warnings: list[str]
) -> list[dict]:
    facilities = {f["code"]: f for f in demo["facilities"]}
    inst_region = {i["code"]: i["region"] for i in demo["institutions"]}
    items: dict[str, str] = {}  # code -> region
    retired: set[str] = set()
    for i in demo["instruments"]:
        items[i["code"]] = inst_region[facilities[i["facility"]]["institution"]]
        if i["status"] == "retired":
            retired.add(i["code"])
    for s in demo["services"]:
        items[s["code"]] = inst_region[facilities[s["facility"]]["institution"]]
    unavailable = set()
    for e in experts:
        items[e["code"]] = inst_region.get(e["institution"], "?")
        if e["availability"] == "unavailable":
            unavailable.add(e["code"])

    demands: list[dict] = []
    ids: set[str] = set()
    texts: set[str] = set()
    for lineno, line in enumerate(DEMANDS.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"demands.jsonl line {lineno}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(f"{where}: invalid JSON ({exc})")
            continue
        if set(d) != DEMAND_KEYS:
            errors.append(
                f"{where}: keys differ: missing {sorted(DEMAND_KEYS - set(d))}, extra {sorted(set(d) - DEMAND_KEYS)}"
            )
            continue
        where = f"{where} ({d['id']})"
        if not re.fullmatch(r"d\d{3}", str(d["id"])):
            errors.append(f"{where}: id must look like d001")
        if d["id"] in ids:
            errors.append(f"{where}: duplicate id")
        ids.add(d["id"])
        if d["text"] in texts:
            errors.append(f"{where}: duplicate text")
        texts.add(d["text"])
        if d["lang"] not in LANGS:
            errors.append(f"{where}: bad lang {d['lang']}")
        if d["region"] not in REGIONS:
            errors.append(f"{where}: bad region {d['region']}")
        if not isinstance(d["text"], str) or not d["text"].strip():
            errors.append(f"{where}: empty text")
        if not d["relevant"]:
            errors.append(f"{where}: no relevant items")
        if len(set(d["relevant"])) != len(d["relevant"]):
            errors.append(f"{where}: duplicate relevant codes")
        for code in d["relevant"]:
            if code not in items:
                errors.append(f"{where}: unknown item {code}")
                continue
            if code in retired:
                warnings.append(f"{where}: {code} is retired")
            if code in unavailable:
                warnings.append(f"{where}: expert {code} is unavailable")
            if d["region"] and items[code] != d["region"]:
                warnings.append(f"{where}: {code} is outside the requested region {d['region']}")
        if not d["categories"]:
            errors.append(f"{where}: no categories")
        for cat in d["categories"]:
            if cat not in taxonomy:
                errors.append(f"{where}: unknown category {cat}")
        demands.append(d)
    return demands


def main() -> int:
    errors: list[str] = []
    warnings: list[str] = []
    demo = json.loads(DEMO.read_text(encoding="utf-8"))
    taxonomy = load_taxonomy()
    experts = check_experts(demo, taxonomy, errors)
    demands = check_demands(demo, taxonomy, experts, errors, warnings)

    regions = Counter(
        inst["region"] for inst in demo["institutions"] for e in experts if e["institution"] == inst["code"]
    )
    print(
        f"experts: {len(experts)}  by region {dict(sorted(regions.items()))}  "
        f"by availability {dict(Counter(e['availability'] for e in experts))}"
    )
    print(f"demands: {len(demands)}")
    print("  by lang:", dict(sorted(Counter(d["lang"] for d in demands).items())))
    print("  with region:", dict(Counter(d["region"] for d in demands if d["region"])))
    top = Counter()
    for d in demands:
        for t in {taxonomy.get(c) or c for c in d["categories"] if c in taxonomy}:
            top[t] += 1
    print("  by top-level category (a demand counts once per area):", dict(sorted(top.items())))
    leaves_used = {c for d in demands for c in d["categories"]}
    catalogue_leaves = {i["category"] for i in demo["instruments"]} | {s["category"] for s in demo["services"]}
    missing = sorted(catalogue_leaves - leaves_used)
    if missing:
        warnings.append(f"catalogue categories with no demand: {missing}")
    kinds = Counter(
        "expert" if c.startswith("EXP-") else "service" if re.search(r"-S\d\d$", c) else "instrument"
        for d in demands
        for c in d["relevant"]
    )
    print(
        "  relevant labels by kind:",
        dict(kinds),
        f" mean per demand {sum(len(d['relevant']) for d in demands) / max(len(demands), 1):.2f}",
    )
    for w in warnings:
        print("WARNING:", w)
    for e in errors:
        print("ERROR:", e)
    if errors:
        print(f"{len(errors)} error(s)")
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
