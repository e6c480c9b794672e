import numpy as np
import pytest

from ksampler_rt.engines.profiles import ProfileRequest, build_hint, compute_profiles, dim_roles
from ksampler_rt.engines.spec import (EngineError, ShapeRange, SpecError, TensorSpec, Validator, normalize_dtype,
                                      parse_range, parse_shapes)

UNET = [TensorSpec("sample", "float32", ("batch", 4, "height", "width")),
        TensorSpec("timestep", "tensor(float)", ("batch",)),
        TensorSpec("encoder_hidden_states", 1, ("batch", "tokens", 768))]


def feeds(b=1, h=64, w=64, t=77, dtype=np.float32):
    return {"sample": np.zeros((b, 4, h, w), dtype), "timestep": np.zeros((b,), np.float32),
            "encoder_hidden_states": np.zeros((b, t, 768), np.float32)}


def test_dtype_normalization():
    assert normalize_dtype("tensor(float16)") == "float16"
    assert normalize_dtype(7) == "int64"
    assert normalize_dtype("fp32") == "float32"
    assert normalize_dtype(np.float32) == "float32"


def test_parse_cli_values():
    assert parse_shapes("512x512, 768X1024") == [(512, 512), (768, 1024)]
    assert parse_range("1-4") == (1, 4) and parse_range("2") == (2, 2)
    with pytest.raises(EngineError, match=r"^shapes: received '512', expected WIDTHxHEIGHT"):
        parse_shapes("512")
    with pytest.raises(EngineError, match=r"^batch: received 4-1, expected MIN-MAX with 1 <= MIN <= MAX"):
        parse_range("4-1")
    with pytest.raises(EngineError, match=r"^tokens: received 'many', expected N or MIN-MAX"):
        parse_range("many", "tokens")


def test_roles_by_position_and_symbol():
    roles = dim_roles("unet", UNET)
    assert roles["sample"] == ["batch", None, "latent_h", "latent_w"]
    assert roles["encoder_hidden_states"] == ["batch", "tokens", None]
    vae = dim_roles("vae_encoder", [TensorSpec("image", "float32", ("b", 3, "h", "w"))])
    assert vae["image"] == ["batch", None, "pixel_h", "pixel_w"]


def test_static_profiles_one_per_size():
    req = ProfileRequest(sizes=((512, 512), (768, 1024)), batch=(1, 4))
    profs = compute_profiles("unet", UNET, req)
    assert len(profs) == 2
    assert profs[0]["sample"] == ShapeRange((1, 4, 64, 64), (2, 4, 64, 64), (4, 4, 64, 64))
    assert profs[1]["sample"].max == (4, 4, 128, 96)  # height 1024, width 768
    assert profs[0]["encoder_hidden_states"] == ShapeRange((1, 77, 768), (2, 77, 768), (4, 77, 768))
    assert profs[0].label == "512x512 static"


def test_dynamic_profile_spans_sizes_and_tokens():
    req = ProfileRequest(sizes=((768, 768), (512, 512), (1024, 1024)), batch=(1, 2), tokens=(77, 231), dynamic=True)
    (p,) = compute_profiles("unet", UNET, req)
    assert p["sample"] == ShapeRange((1, 4, 64, 64), (2, 4, 96, 96), (2, 4, 128, 128))
    assert p["encoder_hidden_states"].max == (2, 231, 768)
    clip = compute_profiles("clip", [TensorSpec("input_ids", "int64", ("batch", "n"))], req)[0]
    assert clip["input_ids"].max == (2, 77)  # CLIP always sees 77-token chunks


def test_unknown_dynamic_dim_is_an_error():
    specs = [TensorSpec("sample", "float32", ("batch", 4, "h", "w")), TensorSpec("extra", "float32", ("batch", "k"))]
    with pytest.raises(EngineError, match="extra.*dim 1"):
        compute_profiles("unet", specs, ProfileRequest())


def test_static_export_dim_conflict():
    specs = [TensorSpec("sample", "float32", (1, 4, 64, 64))]
    assert compute_profiles("unet", specs, ProfileRequest(batch=(1, 1)))[0]["sample"].min == (1, 4, 64, 64)
    with pytest.raises(EngineError, match="static"):
        compute_profiles("unet", specs, ProfileRequest(sizes=((1024, 1024),), batch=(1, 1)))


def test_size_must_match_latent_scale():
    with pytest.raises(EngineError, match=r"shapes: received 500x512, expected .*multiples of the latent scale 8"):
        ProfileRequest(sizes=((500, 512),))


def make_validator(req=ProfileRequest(), export_dir="/exp"):
    profs = compute_profiles("unet", UNET, req)
    return Validator("unet", UNET, profs, build_hint("unet", UNET, req, export_dir, None))


def test_validator_accepts_and_selects_profile():
    v = make_validator(ProfileRequest(sizes=((512, 512), (768, 768))))
    out, idx = v(feeds(2, 96, 96))
    assert idx == 1 and set(out) == {"sample", "timestep", "encoder_hidden_states"}


def test_shape_error_message_says_received_accepted_and_command():
    v = make_validator()
    with pytest.raises(SpecError) as ei:
        v(feeds(1, 128, 128))
    msg = str(ei.value)
    assert "unet input 'sample': received shape (1, 4, 128, 128)" in msg
    assert "this engine's profile accepts (1..4, 4, 64, 64) (512x512 static)" in msg
    assert "ksampler-rt build /exp --shapes 512x512,1024x1024" in msg


def test_batch_and_token_errors_suggest_ranges():
    v = make_validator()
    with pytest.raises(SpecError, match=r"--batch 1-8"):
        v(feeds(8))
    with pytest.raises(SpecError, match=r"--tokens 77-154"):
        v(feeds(1, t=154))


def test_name_dtype_and_type_errors():
    v = make_validator()
    f = feeds()
    f["foo"] = f.pop("timestep")
    with pytest.raises(SpecError, match="unexpected input 'foo'.*takes sample, timestep"):
        v(f)
    f = feeds()
    del f["timestep"]
    with pytest.raises(SpecError, match="missing input 'timestep'"):
        v(f)
    with pytest.raises(SpecError, match="received dtype float16, this engine expects float32"):
        v(feeds(dtype=np.float16))
    f = feeds()
    f["timestep"] = [1.0]
    with pytest.raises(SpecError, match="received list"):
        v(f)


def test_rank_and_static_dim_errors_without_profile():
    v = Validator("unet", UNET)
    with pytest.raises(SpecError, match=r"received shape \(1, 4, 64\).*accepts \(batch, 4, height, width\)"):
        v({**feeds(), "sample": np.zeros((1, 4, 64), np.float32)})
    with pytest.raises(SpecError, match=r"received shape \(1, 3, 64, 64\)"):
        v({**feeds(), "sample": np.zeros((1, 3, 64, 64), np.float32)})


def test_symbolic_dims_must_agree():
    v = Validator("unet", UNET)
    f = feeds(2)
    f["timestep"] = np.zeros((3,), np.float32)
    with pytest.raises(SpecError, match="dim 'batch' is 3"):
        v(f)


def _flow_inputs(guidance: bool):
    x = [TensorSpec("x", "float32", ("B", 16, "h", "w")), TensorSpec("timestep", "float32", ("B",)),
         TensorSpec("context", "float32", ("B", "T", 4096)), TensorSpec("y", "float32", ("B", 768))]
    return x + ([TensorSpec("guidance", "float32", ("B",))] if guidance else [])


def test_flow_transformer_and_t5_profiles_use_their_token_ranges():
    """FLUX.1: the transformer's context and T5's input_ids span ComfyUI's T5 lengths (256 up); CLIP stays 77."""
    req = ProfileRequest(sizes=((1024, 768),), batch=(1, 2), tokens=(256, 512), text_tokens=(256, 512))
    (tr,) = compute_profiles("transformer", _flow_inputs(True), req)
    assert tr["x"].min == (1, 16, 96, 128) and tr["x"].max == (2, 16, 96, 128)
    assert tr["context"].min == (1, 256, 4096) and tr["context"].max == (2, 512, 4096)
    assert tr["guidance"].max == (2,)
    (t5,) = compute_profiles("t5xxl", [TensorSpec("input_ids", "int64", ("B", "T"))], req)
    assert t5["input_ids"].min == (1, 256) and t5["input_ids"].max == (2, 512)
    (clip,) = compute_profiles("clip_l", [TensorSpec("input_ids", "int64", ("B", 77))], req)
    assert clip["input_ids"].max == (2, 77)


def test_sd3_t5_tokens_are_the_context_minus_clip():
    """SD3's context is CLIP-L/G's 77 tokens then T5's: a --tokens range is the context's, T5 gets the rest."""
    from ksampler_rt.engines.build import BuildOptions, profile_request

    class M:
        family, latent_scale = "sd3", 8

    req = profile_request(M(), BuildOptions("tensorrt", tokens=(154, 400)), required=True)
    assert req.tokens == (154, 400) and req.text_tokens == (77, 323)
    assert req.sizes == ((1024, 1024),)
    flux = profile_request(type("F", (), {"family": "flux", "latent_scale": 8})(), BuildOptions("tensorrt"),
                           required=True)
    assert flux.tokens == flux.text_tokens == (256, 512)


def test_fp16_for_a_network_keeps_t5_and_the_flux_vae_in_fp32():
    from ksampler_rt.engines.precision import keeps_fp32, model_precision_of, parse_precision

    assert model_precision_of("fp16", "t5xxl", "flux") == "fp32"
    assert model_precision_of("fp16", "transformer", "flux") == "fp16"
    assert model_precision_of("fp16", "vae_decoder", "flux") == "fp32"
    assert model_precision_of("fp16", "vae_decoder", "sd3") == "fp16"
    assert model_precision_of("clip=fp16", "t5xxl", "sd3") == "fp32"
    assert model_precision_of("fp16,t5xxl=fp16", "t5xxl", "sd3") == "fp16"  # asked by name: honoured
    assert model_precision_of("bf16", "t5xxl", "flux") == "bf16"
    assert keeps_fp32("clip_l", "flux") is None
    assert parse_precision("unet=bf16,t5xxl=fp32").for_model("transformer") == "bf16"


def test_controlnet_residual_dims_follow_the_latent_size():
    """The UNet taking ControlNet residuals: ``h_2`` is the latent height halved (rounded up), per profile."""
    inputs = UNET + [TensorSpec("down_0", "float32", ("batch", 32, "height", "width")),
                     TensorSpec("down_5", "float32", ("batch", 64, "h_2", "w_2")),
                     TensorSpec("mid", "float32", ("batch", 64, "h_8", "w_8"))]
    req = ProfileRequest(sizes=((520, 264), (1024, 1024)), batch=(1, 2), dynamic=True)
    (p,) = compute_profiles("unet_control", inputs, req)
    assert p["sample"].min == (1, 4, 33, 65) and p["sample"].max == (2, 4, 128, 128)
    assert p["down_5"].min == (1, 64, 17, 33) and p["down_5"].max == (2, 64, 64, 64)
    assert p["mid"].min == (1, 64, 5, 9) and p["mid"].opt == (2, 64, 5, 9)
    cn = [TensorSpec("sample", "float32", ("B", 4, "h", "w")), TensorSpec("controlnet_cond", "float32", ("B", 3, "H", "W"))]
    (q,) = compute_profiles("controlnet", cn, ProfileRequest(sizes=((512, 256),)))
    assert q["controlnet_cond"].max == (4, 3, 256, 512) and q["sample"].max == (4, 4, 32, 64)
