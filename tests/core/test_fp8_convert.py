"""python -m stepvideo_core.convert: official bf16 shards -> one scaled-fp8 file, streamed."""

import json
import weakref

import pytest
import torch
from safetensors import safe_open

from stepvideo_core import convert, fp8, load_transformer
from stepvideo_core.checkpoint import CheckpointError
from tests.factory import write_tiny_dit


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    return write_tiny_dit(tmp_path_factory.mktemp("convert") / "stepvideo-t2v", layout="official")


def test_converted_file_equals_quantising_at_load(official, tmp_path):
    out = convert.convert_to_fp8(official, tmp_path / "dit_fp8.safetensors")
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        scale = f.get_tensor("transformer_blocks.0.attn1.wqkv.scale_weight")
        assert f.get_tensor("transformer_blocks.0.attn1.wqkv.weight").dtype == torch.float8_e4m3fn
        assert f.get_tensor("proj_out.weight").dtype == torch.bfloat16
    assert "scaled_fp8" in keys and meta["stepvideo_weight_format"] == "fp8_scaled"
    assert json.loads(meta["stepvideo_config"])["num_layers"] == 2
    assert scale.shape == (768, 1) and scale.dtype == torch.float32
    from_file = load_transformer(out, dtype=torch.float32)  # format auto-detected
    at_load = load_transformer(official, dtype=torch.float32, weight_format="fp8_scaled")
    a, b = from_file.state_dict(), at_load.state_dict()
    assert from_file.weight_format == "fp8_scaled" and set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].float(), b[k].float()), k
    assert out.stat().st_size < 0.65 * sum(p.stat().st_size for p in (official / "transformer").glob("*.safetensors"))


def test_conversion_streams_one_tensor_at_a_time(official, tmp_path, monkeypatch):
    """Every tensor read from the source is freed before the next one is read."""
    alive = []
    real_open = convert.safe_open

    class Spy:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            self.inner = self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def get_tensor(self, name):
            tensor = self.inner.get_tensor(name)
            alive.append(sum(ref() is not None for ref in refs))
            refs.append(weakref.ref(tensor))
            return tensor

    refs = []
    monkeypatch.setattr(convert, "safe_open", lambda *a, **k: Spy(real_open(*a, **k)))
    convert.convert_to_fp8(official, tmp_path / "streamed.safetensors")
    assert len(alive) == len(load_transformer(official).state_dict())
    assert max(alive) == 0


def test_refusals(official, tmp_path):
    out = convert.convert_to_fp8(official, tmp_path / "once.safetensors")
    with pytest.raises(FileExistsError):
        convert.convert_to_fp8(official, out)
    with pytest.raises(CheckpointError, match="already an fp8"):
        convert.convert_to_fp8(out, tmp_path / "twice.safetensors")
    assert not list(tmp_path.glob("*.partial*"))


def test_cli(official, tmp_path, capsys):
    dst = tmp_path / "cli.safetensors"
    assert convert.main([str(official), str(dst)]) == 0
    assert "wrote" in capsys.readouterr().out and dst.is_file()
    assert convert.main([str(official), str(dst)]) == 2
    assert "exists" in capsys.readouterr().err


def test_streaming_writer_checks_what_it_is_given(tmp_path):
    entries = [("a", torch.float32, (2,))]
    with pytest.raises(RuntimeError, match="header says"):
        convert.write_safetensors_streaming(tmp_path / "x.safetensors", entries, lambda n: torch.zeros(3))
    convert.write_safetensors_streaming(tmp_path / "y.safetensors", entries + [("b", fp8.FP8, (0,))],
                                        lambda n: torch.ones(2) if n == "a" else torch.empty(0, dtype=fp8.FP8),
                                        {"k": "v"})
    with safe_open(str(tmp_path / "y.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_tensor("a"), torch.ones(2)) and f.metadata()["k"] == "v"
