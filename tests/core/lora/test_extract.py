"""LoRA extraction: full rank reproduces the tuned checkpoint; a low-rank change is recovered at its rank; CLI."""

import json

import pytest
import torch
from safetensors import safe_open

from stepvideo_core.checkpoint import CheckpointError
from stepvideo_core.lora import LoraEntry, attached, extract_lora, load_lora
from stepvideo_core.lora.__main__ import main
from stepvideo_core.tiny import TINY_DIT_CONFIG, tiny_dit_state_dict, write_dit_checkpoint
from tests.core.sampling.conftest import tiny_model


def tuned_state(base: dict, rank=None, seed=9) -> dict:
    """``base`` with every weight changed: matrices by a random update of ``rank`` (None: full), the rest densely."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, value in base.items():
        if value.ndim >= 2 and name.endswith(".weight") and rank is not None:
            flat = value.flatten(1)
            update = torch.randn(flat.shape[0], rank, generator=gen) @ torch.randn(rank, flat.shape[1], generator=gen)
            out[name] = value + 0.01 * update.reshape(value.shape) / flat.shape[1] ** 0.5
        elif name == "transformer_blocks.1.norm1.weight":
            out[name] = value  # one identical tensor: left out of the adapter
        else:
            out[name] = value + 0.01 * torch.randn(value.shape, generator=gen)
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    base = tiny_dit_state_dict()
    paths = {"base": write_dit_checkpoint(base, TINY_DIT_CONFIG, root / "base", layout="official")}
    for key, rank in (("full", None), ("rank3", 3)):
        state = tuned_state(base, rank)
        paths[key] = write_dit_checkpoint(state, TINY_DIT_CONFIG, root / key, layout="single",
                                          prefix="model.diffusion_model.")
        paths[key + "_state"] = state
    return paths


def merged_weights(path, rank_model=None):
    model = rank_model or tiny_model(torch.float32)
    adapter = load_lora(path, model)
    assert adapter.unmatched == ()
    with attached(model, [LoraEntry(adapter, 1.0, "merge")]):
        return adapter, {k: v.clone() for k, v in model.state_dict().items()}


def test_full_rank_extraction_reproduces_the_tuned_weights(checkpoints, tmp_path):
    info = extract_lora(checkpoints["base"], checkpoints["full"], rank=4096, out=tmp_path / "full.safetensors",
                        dtype=torch.float32)
    assert info["identical"] == 1 and info["lowrank"] > 0 and info["diff"] > 0
    adapter, got = merged_weights(tmp_path / "full.safetensors")
    assert "lora_down/lora_up" in adapter.format and "differences" in adapter.format
    for name, want in checkpoints["full_state"].items():
        torch.testing.assert_close(got[name], want, rtol=0, atol=2e-5, msg=name)
    with safe_open(str(tmp_path / "full.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["stepvideo_lora"])["rank"] == 4096
        assert float(f.get_tensor("transformer_blocks.0.attn1.wqkv.alpha")) == 256  # alpha = rank (capped)


@pytest.mark.parametrize("method", ["full", "lowrank"])
def test_a_rank_3_change_is_recovered_at_rank_3(checkpoints, tmp_path, method):
    out = tmp_path / "r3.safetensors"
    extract_lora(checkpoints["base"], checkpoints["rank3"], rank=3, out=out, dtype=torch.float32, method=method)
    with safe_open(str(out), "pt") as f:
        assert f.get_slice("transformer_blocks.0.ff.net.0.proj.lora_down.weight").get_shape() == [3, 256]
        assert f.get_slice("pos_embed.proj.lora_up.weight").get_shape() == [256, 3, 1, 1]
    _, got = merged_weights(out)
    for name, want in checkpoints["rank3_state"].items():
        torch.testing.assert_close(got[name], want, rtol=0, atol=2e-5, msg=name)


def test_cli_extract_and_info(checkpoints, tmp_path, capsys):
    out = tmp_path / "cli.safetensors"
    assert main(["extract", "--base", str(checkpoints["base"]), "--tuned", str(checkpoints["rank3"]),
                 "--rank", "3", "--out", str(out), "--device", "cpu"]) == 0
    assert "low-rank layers" in capsys.readouterr().out
    with safe_open(str(out), "pt") as f:
        assert f.get_tensor("proj_out.lora_down.weight").dtype == torch.bfloat16  # default storage dtype
    assert main(["info", str(out), "--model", str(checkpoints["base"])]) == 0
    text = capsys.readouterr().out
    assert "tensors matched" in text and "NOT matched" not in text


def test_different_architectures_are_refused(checkpoints, tmp_path):
    other = write_dit_checkpoint(tiny_dit_state_dict(dict(TINY_DIT_CONFIG, num_layers=1)),
                                 dict(TINY_DIT_CONFIG, num_layers=1), tmp_path / "one", layout="single")
    with pytest.raises(CheckpointError, match="not the same architecture"):
        extract_lora(checkpoints["base"], other, rank=2, out=tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="identical"):
        extract_lora(checkpoints["base"], checkpoints["base"], rank=2, out=tmp_path / "x.safetensors")
