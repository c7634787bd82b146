"""The per-layer values a compression used, as YAML files the user can edit and pass back.

``presso compress`` saves them beside the model (``per_layer.yaml`` for ``--per-layer``, ``ranks.yaml`` for
``--ranks``), so a recommended or searched allocation can be inspected, tweaked and replayed.
"""

from __future__ import annotations

from typing import Any


def per_layer_files(result: Any) -> dict[str, str]:
    """File name -> YAML text of the per-layer pruning ratios and decomposition ranks in ``result.per_layer``.

    Only what the run used is written: no ratios file when nothing was pruned, no ranks file when nothing was
    decomposed. The content is returned rather than written so the caller can save it with the model in one atomic
    step (``save_model_dir(..., extra_files=...)``).
    """
    import yaml

    files = {}
    ratios = {n: v["ratio"] for n, v in result.per_layer.items() if v.get("ratio")}
    if ratios:
        files["per_layer.yaml"] = "# pruning ratio per layer (feed back with --per-layer)\n" + yaml.safe_dump(ratios)
    # a Tucker layer has two ranks [out, in]; CP and SVD one, written as a plain number as --ranks accepts it
    ranks = {n: v["ranks"] if len(v["ranks"]) > 1 else v["ranks"][0] for n, v in result.per_layer.items()
             if "ranks" in v}  # fmt: skip
    if ranks:
        files["ranks.yaml"] = "# decomposition rank per layer (feed back with --ranks)\n" + yaml.safe_dump(ranks)
    return files
