r"""Contrastive region guidance on the shapes world (METHODS §7; the `shapes_region_guidance` job).

    python -m launch.main --config=configs/shapes/region_guidance.py --workdir=workdirs/shapes_crg

The main job's stage-2 model (configs/shapes/vila.py) on the region-guidance tasks of the
shapes world (region questions, What'sUp-like spatial questions with both objects' boxes,
SugarCrepe-like hard negatives, referring-expression box selection, SeeTRUE-like
"generated" images with controlled errors), α in {0, 0.5, 1, 2} on the test split, α
chosen on validation reported separately (`vlm_jax.guidance.jobs.evaluate`). Then the
paper's reported gains beside ours, and how often the guided greedy answer differs from
the plain one, per question type.
"""

import os

import jax

from vlm_jax import report
from vlm_jax.guidance import jobs

# What the CRG paper (Wan et al. 2024) reports, per task family of ours (absolute points of
# accuracy over the same model without guidance). None: no comparable number.
PAPER = {
    "region_mc": "+11.1 (ViP-Bench, region prompts; best case)",
    "region_answer": "+11.1 (ViP-Bench, region prompts; best case)",
    "spatial_mc": "+10 (What'sUp, spatial relations)",
    "spatial_answer": "+10 (What'sUp, spatial relations)",
    "hard_negative": "gains (SugarCrepe, compositional hard negatives)",
    "refer": "gains (RefCOCO re-ranking of detector boxes)",
    "generated": "better alignment (SeeTRUE, generated images)",
}


def comparison(out: dict) -> list[dict]:
  alphas = out["alphas"]
  base = alphas.index(0.0) if 0.0 in alphas else None
  rows = []
  for name, r in out["tasks"].items():
    test = r["test"]
    row = {"task": name, "metric": r["metric"], "α=0": test[base] if base is not None else None}
    if name == "refer":  # α = 0 cannot rank boxes (every box scores alike): chance
      row["α=0"] = r["test_details"].get("chance", row["α=0"])
    if base is not None and 1.0 in alphas:
      row["Δ at α=1 (points)"] = round(100 * (test[alphas.index(1.0)] - test[base]), 1)
    row["α (val)"] = f"{r['alpha']:g}"
    if base is not None:
      row["Δ at α (val) (points)"] = round(100 * (r["test_at_alpha"] - test[base]), 1)
    row["paper"] = PAPER.get(name, "-")
    rows.append(row)
  return rows


def changed(out: dict) -> list[dict]:
  """Share of greedy answers that differ from plain decoding's, per α and question type."""
  rows = []
  for name, r in out["tasks"].items():
    details = r["test_details"]
    for key, values in details.items():
      if key == "changed" or key.startswith("changed/"):
        rows.append({"task": name, "qtype": key.partition("/")[2] or "all",
                     **{f"α={a:g} changed %": v for a, v in zip(out["alphas"], values)}})
  return rows


def run(config, workdir: str) -> dict:
  out = jobs.evaluate(config, workdir)
  result = {"comparison": comparison(out), "changed": changed(out)}
  if jax.process_index() == 0:
    report.print_table(result["comparison"], "CRG on the shapes world (test split) beside the paper")
    if result["changed"]:
      report.print_table(result["changed"], "how often guidance changes the greedy answer (test split)")
    report.write_json(os.path.join(workdir, "demo.json"), result)
  return result
