"""Hostile model directories: Hypothesis strategies and the probe that judges one case.

Shared by the property tests (tests/security/test_fuzz.py, a few hundred examples) and the fuzz campaign
(benchmarks/fuzz.py, thousands). A case is a model directory whose ``presso.json`` is a mutated real card: a field
replaced by random JSON or by a value an attacker would pick (a ``.py`` factory, ``python:subprocess.Popen``, a
pickle that writes a file, a path out of the directory, reserved kwargs, dunder names, NaN, huge numbers). Every
piece of code an attacker could get to run writes the *marker* file; the probe opens the directory without trust and
classifies the outcome:

- ``loaded`` -- it loaded (the mutation was harmless);
- ``refused`` -- a PressoError: one clear line;
- ``traceback`` -- any other exception (a finding);
- ``code-executed`` -- the marker exists (a finding).
"""

from __future__ import annotations

import copy
import json
import pickle
import shutil
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

MARKER = "CODE-RAN"


class _WritesMarker:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def make_bases(root: Path) -> dict[str, Path]:
    """Real model directories to mutate: a built-in ResNet, the same pruned (a real prune recipe), and a user-code
    model (its card names ``code/evil.py``, which writes the marker). Also plants the attacker's files in `root`."""
    import torch

    import presso

    root.mkdir(parents=True, exist_ok=True)
    marker = root / MARKER
    code = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    code += "import torch\ndef build(**kw):\n    return torch.nn.Linear(2, 2)\n"
    (root / "evil.py").write_text(code)
    (root / "evil.pt").write_bytes(pickle.dumps(_WritesMarker(str(marker))))
    bases = {}
    model = presso.load_model("presso:resnet8", num_classes=4)
    bases["plain"] = presso.save_model_dir(model, root / "base-plain", input_spec="1,3,16,16")
    pruned = presso.compress(model, "1,3,16,16", presso.PruneConfig(ratio=0.3)).model
    bases["pruned"] = presso.save_model_dir(pruned, root / "base-pruned", input_spec="1,3,16,16")
    user = root / "base-user"
    (user / "code").mkdir(parents=True)
    (user / "code" / "evil.py").write_text(code)
    from safetensors.torch import save_model

    save_model(torch.nn.Linear(2, 2), str(user / "weights.safetensors"))
    card = {"format": "presso-model", "version": 1, "input_spec": "1,2",
            "source": {"source": "evil.py:build", "code": "code/evil.py", "kwargs": {}}}  # fmt: skip
    (user / "presso.json").write_text(json.dumps(card))
    bases["user"] = user
    return bases


def hostile_values(root: Path) -> list[Any]:
    """Values an attacker would put anywhere in a card."""
    evil = str(root / "evil.py")
    return [
        f"{evil}:build", "evil.py:build", "../evil.py", "../../evil.py:build", evil, "code/../../evil.py",
        "python:subprocess.Popen", "python:os.system", "python:builtins.eval", "python:evil.Model", "timm:test_vit",
        str(root / "evil.pt"), "/dev/zero", "/proc/self/mem", str(root), ".", "",
        "__class__", "__init__", "__globals__", "_modules", "forward", "trust", "build",
        True, None, -1, 0, 2**63, -(2**63), 10**30, float("nan"), float("inf"), 1e308,
        [], {}, [[[[]]]], {"trust": True}, {"__class__": 1}, {"source": evil}, ["touch", str(root / MARKER)],
        "1," * 50 + "1", "99999999,99999999", "1,3,16,16:object",
    ]  # fmt: skip


def json_values(root: Path):
    leaf = st.one_of(
        st.sampled_from(hostile_values(root)),
        st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=30),
    )  # fmt: skip
    return st.recursive(leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4),
                        max_leaves=12)  # fmt: skip


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:6]):  # long index lists: their first entries stand for the rest
            out += _paths(v, (*prefix, i))
    return out


def mutated_cards(bases: dict[str, Path], root: Path, under: str | None = None):
    """A strategy of (base name, card JSON text): 1-3 mutations of a real card, or raw hostile text.
    ``under="recipe"``: mutate only inside the recipe of the pruned base (hostile recipes)."""
    cards = {name: json.loads((d / "presso.json").read_text()) for name, d in bases.items()}
    if under is not None:
        cards = {name: c for name, c in cards.items() if c.get(under)}
    values = json_values(root)

    @st.composite
    def mutate(draw):
        name = draw(st.sampled_from(sorted(cards)))
        card = copy.deepcopy(cards[name])
        for _ in range(draw(st.integers(1, 3))):
            paths = [p for p in _paths(card) if p and (under is None or p[0] == under)]
            path = draw(st.sampled_from(paths))
            parent = card
            for key in path[:-1]:
                parent = parent[key]
            if draw(st.booleans()) and isinstance(parent, dict):
                # names that switch trust on, or make a builder read a file itself (timm's checkpoint_path, ...)
                names = ["trust", "code", "build", "__class__", "checkpoint_path", "pretrained_cfg_overlay", path[-1]]
                parent[draw(st.sampled_from(names))] = copy.deepcopy(draw(values))
            else:
                parent[path[-1]] = copy.deepcopy(draw(values))
        return name, json.dumps(card)

    raw = st.tuples(
        st.sampled_from(sorted(cards)),
        st.one_of(
            st.integers(1, 200_000).map(lambda n: "[" * n + "]" * n),
            st.integers(1, 200_000).map(lambda n: '{"a":' * n + "1" + "}" * n),
            st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
            values.map(json.dumps),
        ),
    )
    return mutate() if under is not None else st.one_of(mutate(), mutate(), mutate(), raw)


def probe(base: Path, card_text: str, work: Path, marker: Path) -> str:
    """Open a copy of `base` with `card_text` as its card, without trust; the outcome (see the module doc).
    `marker`: the file hostile code writes (``root / MARKER`` of ``make_bases``); removed again if it appears."""
    import presso
    from presso.errors import PressoError

    marker.unlink(missing_ok=True)
    target = work / "model"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(base, target)
    (target / "presso.json").write_text(card_text)
    try:
        presso.load_model(str(target))
        outcome = "loaded"
    except PressoError:
        outcome = "refused"
    except Exception as e:  # anything else is a traceback the user would see: a finding
        outcome = f"traceback: {type(e).__name__}: {str(e)[:160]}"
    if marker.exists():
        marker.unlink()
        outcome = "code-executed"
    return outcome
