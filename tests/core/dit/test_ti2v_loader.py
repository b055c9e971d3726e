"""Step-Video-TI2V checkpoints: told from the weights in every layout, config.json checked against them,
broken mixtures refused, and the forward's image inputs required (TI2V) or refused (T2V) by name."""

import json
import warnings

import pytest
import torch

from stepvideo_core import CheckpointError, StepVideoDiTConfig, build_transformer, load_transformer
from stepvideo_core.dit.loader import (VariantMismatchWarning, find_transformer_files, infer_config,
                                       meta_transformer, weights_are_ti2v)
from stepvideo_core.tiny import TINY_TI2V_DIT_CONFIG
from tests.factory import TINY_DIT_CONFIG, tiny_dit_state_dict, write_dit_checkpoint


@pytest.fixture(scope="module")
def ti2v_weights():
    return tiny_dit_state_dict(TINY_TI2V_DIT_CONFIG, seed=3, dtype=torch.bfloat16)


def inputs(batch=2, frames=2, height=2, width=3, image=True):
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(batch, 7 + 5)
    mask[:, :7 + 4] = 1
    out = dict(hidden_states=torch.randn(batch, frames, 64, height, width, generator=g),
               timestep=torch.full((batch,), 0.4),
               encoder_hidden_states=torch.randn(batch, 5, 96, generator=g),
               encoder_hidden_states_2=torch.randn(batch, 7, 48, generator=g), encoder_attention_mask=mask)
    if image:
        condition = torch.zeros(batch, frames, 64, height, width)
        condition[:, :1] = torch.randn(batch, 1, 64, height, width, generator=g)
        out.update(condition_hidden_states=condition, motion_score=5.0)
    return out


def test_config_knows_the_variant():
    t2v, ti2v = StepVideoDiTConfig(), StepVideoDiTConfig(use_additional_conditions=True)
    assert not t2v.is_ti2v and t2v.patch_in_channels == 64 and t2v.variant == "Step-Video-T2V"
    assert ti2v.is_ti2v and ti2v.patch_in_channels == 128 and ti2v.variant == "Step-Video-TI2V"
    full = build_transformer(ti2v)  # the released TI2V architecture, on the meta device
    shapes = {k: tuple(v.shape) for k, v in full.state_dict().items()}
    assert shapes["pos_embed.proj.weight"] == (6144, 128, 1, 1)
    assert shapes["adaln_single.emb.motion_score_embedder.linear_1.weight"] == (6144, 256)
    assert shapes["adaln_single.emb.motion_score_embedder.linear_2.weight"] == (6144, 6144)
    assert len(shapes) == 785 + 4 and full.is_ti2v and not build_transformer(None).is_ti2v
    with pytest.raises(ValueError, match="use_additional_conditions must be true"):
        StepVideoDiTConfig(use_additional_conditions="yes")


@pytest.mark.parametrize("layout, prefix", [("official", ""), ("transformer", ""), ("single", ""),
                                            ("single", "model.diffusion_model.")])
def test_ti2v_is_told_from_the_weights_in_every_layout(tmp_path, ti2v_weights, layout, prefix):
    path = write_dit_checkpoint(ti2v_weights, TINY_TI2V_DIT_CONFIG, tmp_path / "stepvideo-ti2v", layout=layout,
                                prefix=prefix)
    model = load_transformer(path, dtype=torch.bfloat16)
    assert model.is_ti2v and model.config.use_additional_conditions is True
    assert model.config.in_channels == 64 and model.pos_embed.proj.weight.shape == (256, 128, 1, 1)
    assert meta_transformer(path).is_ti2v
    loaded = model.state_dict()
    assert set(loaded) == set(ti2v_weights)
    assert all(torch.equal(loaded[k], v) for k, v in ti2v_weights.items())


def test_t2v_stays_t2v(tmp_path):
    path = write_dit_checkpoint(tiny_dit_state_dict(seed=3), TINY_DIT_CONFIG, tmp_path / "t2v", layout="single")
    index, _ = find_transformer_files(path)
    assert not weights_are_ti2v(index) and not infer_config(index).is_ti2v
    assert not load_transformer(path).is_ti2v


def rewrite_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def test_config_json_without_the_flag_follows_the_weights_silently(tmp_path, ti2v_weights):
    folder = write_dit_checkpoint(ti2v_weights, TINY_TI2V_DIT_CONFIG, tmp_path, layout="transformer")
    rewrite_config(folder, use_additional_conditions=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = load_transformer(folder)
    assert model.is_ti2v


def test_config_json_that_contradicts_the_weights_is_overruled_with_a_warning(tmp_path, ti2v_weights):
    folder = write_dit_checkpoint(ti2v_weights, TINY_TI2V_DIT_CONFIG, tmp_path / "a", layout="transformer")
    rewrite_config(folder, use_additional_conditions=False)
    with pytest.warns(VariantMismatchWarning, match=r"use_additional_conditions: config.json says False, the weights "
                                                    r"have True .*128-channel pos_embed.proj.*the weights win"):
        model = load_transformer(folder)
    assert model.is_ti2v
    t2v = write_dit_checkpoint(tiny_dit_state_dict(seed=3), TINY_DIT_CONFIG, tmp_path / "b", layout="transformer")
    rewrite_config(t2v, use_additional_conditions=True)
    with pytest.warns(VariantMismatchWarning, match="config.json says True, the weights have False.*Step-Video-T2V"):
        assert not load_transformer(t2v).is_ti2v


def test_config_json_in_channels_is_the_latent_width_not_the_patch_input(tmp_path, ti2v_weights):
    folder = write_dit_checkpoint(ti2v_weights, TINY_TI2V_DIT_CONFIG, tmp_path, layout="transformer")
    rewrite_config(folder, in_channels=128)
    with pytest.raises(CheckpointError, match="in_channels: config.json says 128, the weights have 64"):
        load_transformer(folder)


def test_half_ti2v_checkpoints_are_refused_by_name(tmp_path, ti2v_weights):
    no_motion = {k: v for k, v in ti2v_weights.items() if "motion_score_embedder" not in k}
    path = write_dit_checkpoint(no_motion, TINY_TI2V_DIT_CONFIG, tmp_path / "a", layout="single")
    with pytest.raises(CheckpointError, match="128 = 2 x 64 channels like Step-Video-TI2V's, but no "
                                              "adaln_single.emb.motion_score_embedder"):
        load_transformer(path)
    t2v_with_motion = dict(tiny_dit_state_dict(seed=3), **{k: v for k, v in ti2v_weights.items()
                                                            if "motion_score_embedder" in k})
    path = write_dit_checkpoint(t2v_with_motion, TINY_DIT_CONFIG, tmp_path / "b", layout="single")
    with pytest.raises(CheckpointError, match="motion-score embedder .* pos_embed.proj takes 64 channels, not 2 x 64"):
        load_transformer(path)


def test_ti2v_forward_needs_both_image_inputs(tmp_path, ti2v_weights):
    model = load_transformer(write_dit_checkpoint(ti2v_weights, TINY_TI2V_DIT_CONFIG, tmp_path, layout="single"))
    with torch.no_grad():
        out = model(**inputs())
        assert out.shape == (2, 2, 64, 2, 3) and torch.isfinite(out).all()
        one = inputs()
        one["condition_hidden_states"] = one["condition_hidden_states"][:1]  # batch 1 is repeated
        both_first = inputs()
        both_first["condition_hidden_states"] = both_first["condition_hidden_states"][:1].expand(2, -1, -1, -1, -1)
        assert torch.equal(model(**one), model(**both_first))
    for missing, named in ((("condition_hidden_states",), "missing: condition_hidden_states"),
                           (("motion_score",), "missing: motion_score"),
                           (("condition_hidden_states", "motion_score"), "missing: condition_hidden_states, "
                                                                         "motion_score")):
        kw = {k: v for k, v in inputs().items() if k not in missing}
        with pytest.raises(ValueError, match=f"Step-Video-TI2V .*{named}"):
            model(**kw)
    bad = inputs()
    bad["condition_hidden_states"] = torch.zeros(2, 2, 64, 3, 3)
    with pytest.raises(ValueError, match=r"condition_hidden_states must be \[2 \(or 1\), 2, 64, 2, 3\].*"
                                         r"got \[2, 2, 64, 3, 3\]"):
        model(**bad)
    for score, message in ((float("nan"), "motion_score must be a finite number"),
                           ("5", "motion_score must be a number"),
                           (torch.tensor([1.0, 2.0, 3.0]), "one score per sample")):
        kw = inputs()
        kw["motion_score"] = score
        with pytest.raises(ValueError, match=message):
            model(**kw)


def test_t2v_forward_refuses_image_inputs(tmp_path):
    model = load_transformer(write_dit_checkpoint(tiny_dit_state_dict(seed=3), TINY_DIT_CONFIG, tmp_path,
                                                  layout="single"))
    with pytest.raises(ValueError, match="Step-Video-T2V transformer .* takes no condition_hidden_states or "
                                         "motion_score"):
        model(**inputs())
    kw = inputs(image=False)
    with pytest.raises(ValueError, match="takes no motion_score"):
        model(**kw, motion_score=2.0)
    with torch.no_grad():
        assert model(**kw).shape == (2, 2, 64, 2, 3)
