"""`presso info` from the command line."""

from presso.cli import app

from ._helpers import ok_json, runner


def test_pickle_without_trust_is_refused(tmp_path):
    import torch

    f = tmp_path / "m.pt"
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 3)), f)
    res = runner.invoke(app, ["info", str(f), "-s", "1,3,16,16"])
    assert res.exit_code == 2 and "--trust" in res.stderr
    ok = runner.invoke(app, ["info", str(f), "-s", "1,3,16,16", "--trust", "--json"])
    assert ok_json(ok)["params"] == 8 * 3 * 9 + 8 + 4 * 8 * 9 + 4
