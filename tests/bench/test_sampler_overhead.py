"""Smoke test: the sampler-overhead bench runs in quick mode and prints its table (no timing asserts)."""
import json
import os

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
