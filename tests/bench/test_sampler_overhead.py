"""Smoke tests: the sampler-overhead bench prints its tables (no timing asserts); the full level's
peer protocol against a fake ComfyUI peer subprocess, and against real ComfyUI when one is given."""
import json
import os
import sys

import numpy as np
import pytest

from ksampler_rt.bench import sampler_overhead

COMFYUI = "/work/comfyui"


def test_quick_ours_only(capsys, tmp_path):
    out = tmp_path / "r.json"
    res = sampler_overhead.main(["--quick", "--samplers", "euler,dpmpp_2m_sde", "--repeats", "1",
                                 "--steps", "4", "--out", str(out)])
    text = capsys.readouterr().out
    assert "peer unavailable" in text and "prepare_noise vs torch.randn" in text
    assert "euler" in text and "dpmpp_2m_sde" in text
    data = json.loads(out.read_text())
    assert [r["sampler"] for r in data["rows"]] == ["euler", "dpmpp_2m_sde"]
    assert all(r["ours_ms_per_step"] > 0 and r["peer_ms_per_step"] is None for r in res["rows"])


@pytest.mark.skipif(not os.path.isfile(os.path.join(COMFYUI, "comfy", "k_diffusion", "sampling.py")),
                    reason="no ComfyUI checkout")
def test_quick_with_comfyui_peer(capsys):
    pytest.importorskip("torchsde")
    res = sampler_overhead.main(["--quick", "--comfyui", COMFYUI, "--repeats", "1", "--steps", "4",
                                 "--samplers", "euler,dpmpp_2m_sde,dpmpp_sde,ddim"])
    text = capsys.readouterr().out
    assert "ComfyUI k-diffusion from" in text and "ratio" in text
    assert all(r["peer_ms_per_step"] is not None for r in res["rows"]), res["rows"]


def test_prefetch_both_side_by_side(capsys):
    res = sampler_overhead.main(["--samplers", "euler_ancestral", "--sizes", "8", "--repeats", "1",
                                 "--steps", "3", "--unet-ms", "1", "--prefetch", "both"])
    text = capsys.readouterr().out
    assert "no-pf ms" in text and "host %" in text
    (row,) = res["rows"]
    assert row["engine_calls_per_run"] == 3
    assert row["ours_noprefetch_ms_per_step"] is not None
    assert 0 < row["ours_host_fraction"] < 1 and 0 < row["ours_noprefetch_host_fraction"] < 1


# ------------------------------------------------------------------------------ --level full
# A fake ComfyUI peer speaking comfyui_peer.py's protocol, run as a real subprocess: it prints
# non-protocol noise on stdout and stderr, logs the requests it gets next to its --comfyui dir,
# and behaves as FAKE_PEER_MODE says (ok / import_error / crash_at_start / die_on_dpmpp_2m).
FAKE_PEER = r'''
import json, os, sys
MARKER = %(marker)r
mode = os.environ.get("FAKE_PEER_MODE", "ok")
root = sys.argv[sys.argv.index("--comfyui") + 1]
print("WARNING: some ComfyUI import chatter on stdout", flush=True)
print("noise on stderr", file=sys.stderr, flush=True)
if mode == "crash_at_start":
    print("Traceback: boom at import", file=sys.stderr, flush=True)
    sys.exit(3)
if mode == "import_error":
    print(MARKER + json.dumps({"error": "importing ComfyUI failed: ModuleNotFoundError: psutil"}), flush=True)
    sys.exit(1)
print(MARKER + json.dumps({"ready": True, "python": "3.fake", "torch": "0.fake", "torch_threads": 1,
                           "comfyui": "0.fake", "comfyui_path": root, "samplers": ["euler", "dpmpp_2m"]}),
      flush=True)
for line in sys.stdin:
    req = json.loads(line)
    if req.get("quit"):
        break
    with open(os.path.join(root, "requests.log"), "a") as fh:
        fh.write(json.dumps(req) + "\n")
    print("more chatter", flush=True)
    if req["sampler"] == "dpmpp_2m" and mode == "die_on_dpmpp_2m":
        print("killed", file=sys.stderr, flush=True)
        os._exit(9)
    if req["sampler"] == "euler":
        rep = {"ms_per_step": 1000.0}
    elif req["sampler"] == "dpmpp_2m":
        rep = {"ms_per_step": 0.001}
    else:
        rep = {"error": req["sampler"] + " is not in fake ComfyUI's KSampler.SAMPLERS"}
    print(MARKER + json.dumps(rep), flush=True)
'''

FULL_ARGS = ["--level", "full", "--sizes", "8", "--steps", "3", "--repeats", "2", "--passes", "1"]


def _fake_peer(tmp_path):
    from ksampler_rt.bench.comfyui_peer import MARKER

    script = tmp_path / "fake_peer.py"
    script.write_text(FAKE_PEER % {"marker": MARKER})
    root = tmp_path / "comfy"
    root.mkdir()
    return ["--comfyui", str(root), "--comfyui-python", sys.executable, "--peer-script", str(script)], root


def _record_call_order(monkeypatch) -> list:
    """The ("ours" | "peer", sampler) of every timed or warm-up call, in the order they happen."""
    order = []
    real_runner, real_request = sampler_overhead._ours_full_runner, sampler_overhead.PeerProcess.request

    def runner(name, size, steps, family="sd15"):
        run = real_runner(name, size, steps, family)

        def wrapped():
            order.append(("ours", name))
            return run()
        return wrapped

    def request(self, req, *a, **kw):
        order.append(("peer", req["sampler"]))
        return real_request(self, req, *a, **kw)

    monkeypatch.setattr(sampler_overhead, "_ours_full_runner", runner)
    monkeypatch.setattr(sampler_overhead.PeerProcess, "request", request)
    return order


def test_full_level_fake_peer_interleaved(capsys, tmp_path, monkeypatch):
    argv, root = _fake_peer(tmp_path)
    order = _record_call_order(monkeypatch)
    out = tmp_path / "r.json"
    res = sampler_overhead.main(FULL_ARGS + argv + ["--samplers", "euler,dpmpp_2m,exp_heun_2_x0",
                                                    "--out", str(out)])
    text = capsys.readouterr().out
    assert "ours-ms" in text and "comfyui-ms" in text and "target<=0.25" in text
    assert "ComfyUI 0.fake KSampler node" in text and "torch 0.fake" in text and "chatter" not in text
    assert "n/a: exp_heun_2_x0 is not in fake ComfyUI's KSampler.SAMPLERS" in text
    assert "full level: 1/4 target met by 1 of 2 rows" in text
    # one untimed warm-up of ours per row, then (one pass, as --passes 1 asks) ours, peer, ours, peer
    # per row; the peer stops being asked after an error
    assert order == [("ours", "euler"), ("ours", "dpmpp_2m"), ("ours", "exp_heun_2_x0")] + \
        [("ours", "euler"), ("peer", "euler")] * 2 + [("ours", "dpmpp_2m"), ("peer", "dpmpp_2m")] * 2 + \
        [("ours", "exp_heun_2_x0"), ("peer", "exp_heun_2_x0"), ("ours", "exp_heun_2_x0")]
    reqs = [json.loads(line) for line in (root / "requests.log").read_text().splitlines()]
    assert reqs[0] == {"sampler": "euler", "size": 8, "steps": 3} and len(reqs) == 5
    data = json.loads(out.read_text())
    assert data["level"] == "full" and data["rows"] == [] and data["prepare_noise"] is None  # old keys kept
    rows = {r["sampler"]: r for r in data["full"]["rows"]}
    assert rows == {r["sampler"]: r for r in res["full"]["rows"]}
    assert rows["euler"]["comfyui_ms_per_step"] == 1000.0 and rows["euler"]["target_met"] is True
    assert rows["euler"]["latent"] == [1, 4, 8, 8] and rows["euler"]["ours_ms_per_step"] > 0
    assert rows["dpmpp_2m"]["target_met"] is False and rows["dpmpp_2m"]["ratio"] > 0.25
    assert rows["exp_heun_2_x0"]["comfyui_ms_per_step"] is None and "not in fake" in rows["exp_heun_2_x0"]["peer_error"]
    assert data["full"]["peer_info"]["comfyui"] == "0.fake"


def test_full_level_passes_spread_repeats(capsys, tmp_path, monkeypatch):
    """--passes 2 with 3 repeats: every row gets 2 repeats in the first pass through the table and 1 in
    the second, each one call of ours followed by one of the peer; medians over all 3."""
    argv, _ = _fake_peer(tmp_path)
    order = _record_call_order(monkeypatch)
    res = sampler_overhead.main(["--level", "full", "--sizes", "8", "--steps", "3", "--repeats", "3",
                                 "--passes", "2"] + argv + ["--samplers", "euler,dpmpp_2m"])
    text = capsys.readouterr().out
    pair = lambda n: [("ours", n), ("peer", n)]  # noqa: E731
    assert order == [("ours", "euler"), ("ours", "dpmpp_2m")] + pair("euler") * 2 + pair("dpmpp_2m") * 2 + \
        pair("euler") + pair("dpmpp_2m")
    assert "3 interleaved repeats in 2 passes through the table" in text
    assert "pass 1 of 2: 2 repeat(s) per row" in text and "pass 2 of 2: 1 repeat(s) per row" in text
    assert res["full"]["passes"] == 2
    for row in res["full"]["rows"]:
        assert len(row["ours_ms_per_step_each"]) == 3 and len(row["comfyui_ms_per_step_each"]) == 3
        assert row["ours_ms_per_step"] == pytest.approx(float(np.median(row["ours_ms_per_step_each"])))


def test_split_repeats():
    assert sampler_overhead.split_repeats(9, 3) == [3, 3, 3]
    assert sampler_overhead.split_repeats(7, 3) == [3, 2, 2]
    assert sampler_overhead.split_repeats(2, 3) == [1, 1]
    assert sampler_overhead.split_repeats(5, 1) == [5]


@pytest.mark.parametrize("bad", [["--repeats", "0"], ["--passes", "0"]])
def test_bad_repeats_or_passes(bad, capsys):
    with pytest.raises(SystemExit):
        sampler_overhead.main(["--level", "full", "--samplers", "euler", "--sizes", "8"] + bad)
    assert "received 0, expected an integer >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("mode,why", [("import_error", "ModuleNotFoundError: psutil"),
                                      ("crash_at_start", "exited (rc 3)"),
                                      ("no_python", "cannot start")])
def test_full_level_peer_unavailable(capsys, tmp_path, monkeypatch, mode, why):
    argv, _ = _fake_peer(tmp_path)
    monkeypatch.setenv("FAKE_PEER_MODE", mode)
    if mode == "no_python":
        argv[argv.index("--comfyui-python") + 1] = str(tmp_path / "no-such-python")
    res = sampler_overhead.main(FULL_ARGS + argv + ["--samplers", "euler"])
    text = capsys.readouterr().out
    assert "peer: peer unavailable:" in text and why in text
    if mode == "crash_at_start":
        assert "boom at import" in text  # the tail of its stderr
    (row,) = res["full"]["rows"]
    assert row["ours_ms_per_step"] > 0 and row["comfyui_ms_per_step"] is None and row["target_met"] is None


def test_full_level_peer_dies_midway(capsys, tmp_path, monkeypatch):
    argv, _ = _fake_peer(tmp_path)
    monkeypatch.setenv("FAKE_PEER_MODE", "die_on_dpmpp_2m")
    res = sampler_overhead.main(FULL_ARGS + argv + ["--samplers", "euler,dpmpp_2m,ddim"])
    text = capsys.readouterr().out
    rows = {r["sampler"]: r for r in res["full"]["rows"]}
    assert rows["euler"]["comfyui_ms_per_step"] == 1000.0
    for n in ("dpmpp_2m", "ddim"):
        assert rows[n]["comfyui_ms_per_step"] is None and "peer unavailable" in rows[n]["peer_error"]
        assert rows[n]["ours_ms_per_step"] > 0
    assert "exited (rc 9)" in text


def test_full_level_peer_dies_in_a_later_pass(capsys, tmp_path, monkeypatch):
    """Over 2 passes, euler gets its first 2 peer figures before the peer dies on dpmpp_2m: a row with
    only part of its repeats answered is n/a with the reason, never a median of fewer repeats."""
    argv, _ = _fake_peer(tmp_path)
    monkeypatch.setenv("FAKE_PEER_MODE", "die_on_dpmpp_2m")
    res = sampler_overhead.main(["--level", "full", "--sizes", "8", "--steps", "3", "--repeats", "4",
                                 "--passes", "2"] + argv + ["--samplers", "euler,dpmpp_2m"])
    capsys.readouterr()
    rows = {r["sampler"]: r for r in res["full"]["rows"]}
    assert rows["euler"]["comfyui_ms_per_step_each"] == [1000.0, 1000.0]
    for n in ("euler", "dpmpp_2m"):
        assert rows[n]["comfyui_ms_per_step"] is None and rows[n]["target_met"] is None
        assert "exited (rc 9)" in rows[n]["peer_error"] and len(rows[n]["ours_ms_per_step_each"]) == 4


@pytest.mark.parametrize("extra,want", [([], (9, 3)), (["--quick"], (2, 1)), (["--repeats", "5"], (5, 3)),
                                        (["--passes", "2"], (9, 2))])
def test_full_level_default_repeats_and_passes(extra, want, monkeypatch, capsys):
    seen = {}

    def fake_run_full_level(names, sizes, steps, repeats, peer, peer_note, passes=1, family="sd15"):
        seen["got"] = (repeats, passes)
        return {"repeats": repeats, "rows": [], "summary": ""}

    monkeypatch.setattr(sampler_overhead, "run_full_level", fake_run_full_level)
    res = sampler_overhead.main(["--level", "full", "--samplers", "euler"] + extra)
    capsys.readouterr()
    assert seen["got"] == want and res["repeats"] == want[0]


@pytest.mark.parametrize("family, pooled", [("flux", 768), ("sd3", 2048), ("flux-schnell", 768)])
def test_full_level_flow_family_on_both_sides(capsys, tmp_path, monkeypatch, family, pooled):
    """--family: our side runs Model(zero-cost UNet, family) on a 16-channel latent with pooled outputs,
    and every request asks the peer for the same family."""
    from ksampler_rt.runtime import Model

    argv, root = _fake_peer(tmp_path)
    seen = []
    real_call = Model.unet_output

    def spy(self, x_in, sigma, context, **kwargs):
        seen.append((self.family.name, x_in.shape, context.shape, kwargs["y"].shape, "guidance" in kwargs))
        return real_call(self, x_in, sigma, context, **kwargs)

    monkeypatch.setattr(Model, "unet_output", spy)
    res = sampler_overhead.main(FULL_ARGS + argv + ["--samplers", "euler", "--family", family])
    text = capsys.readouterr().out
    assert f"family {family}" in text and f"pooled [1,{pooled}]" in text
    reqs = [json.loads(line) for line in (root / "requests.log").read_text().splitlines()]
    assert reqs and all(r["family"] == family for r in reqs)
    (row,) = res["full"]["rows"]
    assert row["latent"] == [1, 16, 8, 8] and res["full"]["family"] == family
    tokens = 154 if family == "sd3" else 77
    assert set(seen) == {(family, (2, 16, 8, 8), (2, tokens, 4096), (2, pooled), family == "flux")}


def test_family_needs_the_full_level(capsys):
    with pytest.raises(SystemExit):
        sampler_overhead.main(["--family", "flux", "--samplers", "euler"])
    assert "--family: received 'flux' with --level sampler, expected --level full" in capsys.readouterr().err


def test_full_level_no_comfyui_and_both(capsys):
    res = sampler_overhead.main(["--level", "both", "--samplers", "euler", "--sizes", "8", "--steps", "3",
                                 "--repeats", "1"])
    text = capsys.readouterr().out
    assert "peer unavailable: no --comfyui PATH given" in text
    assert "ours ms" in text and "ours-ms" in text  # both tables
    assert "sampler level: 1/4 target met by 0 of 0 rows" in text and "full level:    1/4 target met by 0 of 0 rows" in text
    assert res["rows"][0]["sampler"] == "euler" and res["full"]["rows"][0]["sampler"] == "euler"


def test_zero_unet_is_cached():
    unet = sampler_overhead.zero_unet_factory()
    x = np.ones((2, 4, 8, 8), np.float32)
    a = unet(x, np.zeros(2, np.float32), np.zeros((2, 77, 768), np.float32))
    assert a.shape == x.shape and not a.any() and unet(x + 1, None, None) is a


@pytest.mark.skipif(not os.environ.get("KSAMPLER_RT_COMFYUI"),
                    reason="set KSAMPLER_RT_COMFYUI (and KSAMPLER_RT_COMFYUI_PYTHON) to a ComfyUI checkout "
                           "and an interpreter with its requirements")
@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_full_level_real_comfyui(capsys, family):
    python = os.environ.get("KSAMPLER_RT_COMFYUI_PYTHON", sys.executable)
    res = sampler_overhead.main(["--level", "full", "--comfyui", os.environ["KSAMPLER_RT_COMFYUI"],
                                 "--comfyui-python", python, "--samplers", "euler,exp_heun_2_x0",
                                 "--sizes", "8", "--steps", "3", "--repeats", "1", "--family", family])
    text = capsys.readouterr().out
    assert "KSampler node (nodes.KSampler().sample)" in text, text
    rows = {r["sampler"]: r for r in res["full"]["rows"]}
    assert rows["euler"]["comfyui_ms_per_step"] > 0, rows
    assert rows["exp_heun_2_x0"]["comfyui_ms_per_step"] is None
    assert "KSampler.SAMPLERS" in rows["exp_heun_2_x0"]["peer_error"]
