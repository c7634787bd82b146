"""The fuzz campaign of issue 19: thousands of hostile cards, recipes, bundles and agent requests, and kills.

Each section generates cases with Hypothesis (the same strategies and probes as the property tests in
tests/security/, many more examples) and classifies every outcome. Findings are what must never happen:

- **code executed**: a hostile file's code ran without --trust (every such payload writes a marker file);
- **traceback**: an exception other than Presso's one-line errors (PressoError) reached the user, or an agent
  answered 5xx;
- **user files lost**: after a kill, a file the user had in the output location is gone or changed, or the output is
  half-written, or a rerun fails or leaves work files behind;
- **agent hang**: a request not answered within its measurement limit plus a margin.

    python benchmarks/fuzz.py [--cards 2500] [--recipes 1000] [--bundles 1000] [--requests 500] [--kills 50]
                              [--seed 0] [--out benchmarks/results/fuzz.json]

Prints cases tried, handled cleanly, and every finding (with the case that produced it); exits 1 on any finding.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the strategies and probes live with the tests (tests/security/)


def _run_given(strategy, n: int, seed: int, fn) -> None:
    """Call fn on `n` examples of `strategy` (Hypothesis generation, no shrinking: every case counts once)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    @hseed(seed)
    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(strategy)
    def run(case):
        fn(case)

    run()


class Tally:
    def __init__(self, name: str):
        self.name, self.outcomes, self.findings, self.t0 = name, Counter(), [], time.perf_counter()
        self.notes: Counter = Counter()  # descriptive counts that are not outcomes (e.g. kills that landed mid-run)

    def add(self, outcome: str, case: object = None) -> None:
        kind = outcome.split(":")[0]
        self.outcomes[kind] += 1
        if kind not in ("loaded", "refused", "ok", "clean", "4xx", "2xx"):
            self.findings.append({"section": self.name, "outcome": outcome, "case": repr(case)[:400]})

    def summary(self) -> dict:
        tried = sum(self.outcomes.values())
        return {"section": self.name, "tried": tried, "clean": tried - len(self.findings),
                "findings": len(self.findings), "outcomes": dict(self.outcomes),
                **({"notes": dict(self.notes)} if self.notes else {}),
                "seconds": round(time.perf_counter() - self.t0, 1)}  # fmt: skip


# --------------------------------------------------------------------------- cards and recipes
def fuzz_cards(n: int, seed: int, tmp: Path, under: str | None) -> Tally:
    from tests.security.hostile import MARKER, make_bases, mutated_cards, probe

    tally = Tally("recipes" if under else "cards")
    root = tmp / f"hostile-{under or 'card'}"
    bases = make_bases(root)
    work = tmp / f"work-{under or 'card'}"
    work.mkdir()

    def one(case):
        name, text = case
        tally.add(probe(bases[name], text, work, root / MARKER), case)

    _run_given(mutated_cards(bases, root, under), n, seed, one)
    return tally


# --------------------------------------------------------------------------- bundles
def fuzz_bundles(n: int, seed: int, tmp: Path) -> Tally:
    """Hostile bundles (lying cards, damaged or external-data models, odd members, top-k) through the predictor the
    bundle ships (convert/predict.py): a result with k labels and k scores, or one PressoError line."""
    import numpy as np
    from PIL import Image
    from tests.security.test_inputs import _bundle, _bundles

    from presso.convert.predict import Predictor
    from presso.errors import PressoError

    tally = Tally("bundles")
    image = tmp / "image.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(image)

    def one(case):
        model, card, extra, k = case
        bundle = _bundle(tmp / "fuzz.zip", model, card, extra)
        try:
            result = Predictor(bundle).predict([image, image], top_k=k)
        except PressoError as e:
            tally.add("refused" if str(e).strip() and "\n" not in str(e).strip() else f"traceback: multi-line {e}")
            return
        except Exception as e:  # anything else reaches the user as a traceback
            tally.add(f"traceback: {type(e).__name__}: {str(e)[:160]}", case)
            return
        good = len(result) == 2 and all(len(r["top"]) == k and all(0 <= t["score"] <= 1 for t in r["top"])
                                        for r in result)  # fmt: skip
        tally.add("ok" if good else f"traceback: malformed result {result!r:.160}", case)

    _run_given(_bundles(), n, seed, one)
    return tally


# --------------------------------------------------------------------------- agent requests
def fuzz_agent(n: int, seed: int) -> Tally:
    """Requests to a real agent app in this process (its measurements in its child process, as served)."""
    import httpx
    from hypothesis import strategies as st
    from tests.security.test_agent import forever, relu, reshape_to_5x5, unknown_op

    from presso.bench.agent import create_app

    tally = Tally("agent requests")
    token, limit = "f" * 24, 3.0
    app = create_app(token, measure_timeout=limit, max_upload_mb=1, auth_failures=0)
    good = relu()

    def mostly(valid, odd):  # four in five valid, so that most requests reach the runtime
        return st.integers(0, 4).flatmap(lambda i: odd if i == 4 else valid)

    odd = st.one_of(st.integers(-3, 3000), st.sampled_from([10**7, -(10**9), 2**63, "", "x", "1e400"]),
                    st.floats(allow_nan=True, allow_infinity=True))  # fmt: skip
    shapes = st.sampled_from(["", "", "1,8", "25", "5,5", "1,9", "1,8;1,8", "1,8:int64", "0,8", "1,1,40000,40000",
                              "999999999,99999999", "1,-8", "a,b"])  # fmt: skip
    query = st.fixed_dictionaries(
        {
            "runtime": mostly(st.just("onnxruntime"), st.sampled_from(["openvino", "torch", "", "tensorrt"])),
            "threads": mostly(st.integers(0, os.cpu_count() or 1), odd),
            "warmup": mostly(st.integers(0, 3), odd),
            "repeat": mostly(st.integers(1, 10), odd),
            "max_seconds": mostly(st.floats(0.01, 0.3), odd),
            "profile": mostly(st.sampled_from(["false", "true"]), st.sampled_from(["1", "maybe", ""])),
            "input_shape": shapes,
        }
    )
    flipped = st.tuples(st.integers(0, len(good) - 1), st.integers(0, 255)).map(
        lambda ib: good[: ib[0]] + bytes([ib[1]]) + good[ib[0] + 1 :]
    )
    models = st.one_of(
        st.sampled_from(
            [good, good, good, reshape_to_5x5(), unknown_op(), relu(["batch", 8]), good[:40], b"", forever()]
        ),  # fmt: skip
        flipped,
        st.binary(max_size=2048),
    )
    headers = st.sampled_from([f"Bearer {token}"] * 8 + ["Bearer wrong-token-xxxxxxxxxxxx", "", token, "Basic x"])

    import socket
    import threading

    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(timeout=limit + 30) as client:

            def one(case):
                q, model, auth = case
                t0 = time.perf_counter()
                try:
                    r = client.post(url + "/benchmark", params={k: str(v) for k, v in q.items()}, content=model,
                                    headers={"Authorization": auth} if auth else {})  # fmt: skip
                except httpx.TimeoutException:
                    tally.add("agent hang: no answer within the limit + 30 s", case)
                    return
                took = time.perf_counter() - t0
                if took > limit + 15:
                    tally.add(f"agent hang: answered after {took:.0f} s", case)
                elif r.status_code >= 500:
                    tally.add(f"traceback: HTTP {r.status_code} {r.text[:200]}", case)
                else:
                    tally.add("2xx" if r.status_code < 300 else "4xx", case)

            _run_given(st.tuples(query, models, headers), n, seed, one)
            # never-ending models, each with a second client's measurement sent while it runs: the first must be
            # killed at the limit (408) and the second served (200), both well within the limit plus a margin
            auth = {"Authorization": f"Bearer {token}"}
            for i in range(max(1, n // 100)):
                answers: dict[str, int] = {}

                def post(key, model, answers=answers):
                    try:
                        answers[key] = client.post(url + "/benchmark", params={"repeat": 3}, content=model,
                                                   headers=auth).status_code  # fmt: skip
                    except httpx.TimeoutException:
                        answers[key] = -1

                first = threading.Thread(target=post, args=("forever", forever()))
                first.start()
                time.sleep(0.5)
                t0 = time.perf_counter()
                post("second", good)
                first.join()
                took = time.perf_counter() - t0
                ok = answers == {"forever": 408, "second": 200} and took < limit + 15
                tally.add("2xx" if ok else f"agent hang: {answers} after {took:.0f} s", f"never-ending #{i}")
            if client.get(url + "/info", headers={"Authorization": f"Bearer {token}"}).status_code != 200:
                tally.add("agent hang: /info does not answer after the campaign")
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    return tally


# --------------------------------------------------------------------------- kills
def fuzz_kills(n: int, seed: int, tmp: Path) -> Tally:
    from tests.security._kills import VERBS, kill_case

    tally = Tally("kills")
    for i in range(n):
        verb = "run" if i % 10 == 9 else VERBS[i % len(VERBS)]  # a run takes ~2 min here: one kill in ten
        r = kill_case(verb, tmp / f"kill-{i}", seed + i)
        problems = [k for k in ("user_files_lost", "half_written", "rerun_failed", "leftovers") if r.get(k)]
        tally.notes[f"{verb} {'killed mid-run' if r['killed'] else 'finished before the kill'}"] += 1
        tally.notes[f"output after kill: {r['output_after_kill'].split(':')[0]}"] += 1
        tally.add("clean" if not problems else "user files lost: " + ", ".join(problems), {"verb": verb, **r})
    return tally


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cards", type=int, default=2500)
    ap.add_argument("--recipes", type=int, default=1000)
    ap.add_argument("--bundles", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--kills", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fuzz.json")
    args = ap.parse_args()
    os.environ.setdefault("PRESSO_HOME", tempfile.mkdtemp(prefix="presso-fuzz-home-"))
    tallies = []
    with tempfile.TemporaryDirectory(prefix="presso-fuzz-") as t:
        tmp = Path(t)
        sections = [
            ("cards", lambda: fuzz_cards(args.cards, args.seed, tmp, None)),
            ("recipes", lambda: fuzz_cards(args.recipes, args.seed, tmp, "recipe")),
            ("bundles", lambda: fuzz_bundles(args.bundles, args.seed, tmp)),
            ("requests", lambda: fuzz_agent(args.requests, args.seed)),
            ("kills", lambda: fuzz_kills(args.kills, args.seed, tmp)),
        ]
        for key, run in sections:
            if getattr(args, key) <= 0:
                continue
            tally = run()
            tallies.append(tally)
            s = tally.summary()
            print(f"{s['section']:>15}: {s['tried']:5d} tried, {s['clean']:5d} handled cleanly, "
                  f"{s['findings']} findings  ({s['seconds']:.0f} s; {s['outcomes']} {s.get('notes', '')})",
                  flush=True)  # fmt: skip
    findings = [f for t in tallies for f in t.findings]
    total = sum(t.summary()["tried"] for t in tallies)
    kinds = Counter(f["outcome"].split(":")[0] for f in findings)
    print(f"{'total':>15}: {total} cases, {total - len(findings)} handled cleanly; code executed "
          f"{kinds['code-executed']}, tracebacks {kinds['traceback']}, user files lost {kinds['user files lost']}, "
          f"agent hangs {kinds['agent hang']}")  # fmt: skip
    for f in findings[:50]:
        print(f"  FINDING [{f['section']}] {f['outcome']}\n      case: {f['case']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"sections": [t.summary() for t in tallies], "findings": findings}, indent=2))
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
