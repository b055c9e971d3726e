"""The text encoder and the VAE under ComfyUI's model management, with ComfyUI's real modules in-process
(``--cpu`` unless a GPU is present), and the release of the text encoder in a real server run.

What ComfyUI must be able to do with them: see them in ``current_loaded_models`` after use with their
size, evict them (``unload_all_models``, ``free_memory``) and load them again for the next use with the
same output bit for bit, forget them when it drops the node output (``--cache-none``, "Free model and
node cache"), and, with StepVideo Text Encoder Memory's ``keep_in_ram`` off, lose the text encoder's
weights from RAM after each encode (RSS measured on a mid-size model) without the copy back home an
ordinary unload makes. The block streamer's pinning goes to ComfyUI's ``pin_memory``.

Skipped without COMFYUI_DIR, failed instead under CI=true (see tests/e2e/conftest.py).
"""

from __future__ import annotations

import copy
import gc
import logging
import sys
import weakref

import psutil
import pytest
import torch

from stepvideo_core.tiny import write_tiny_hunyuan_clip, write_tiny_step_llm, write_tiny_text_encoders, write_tiny_vae
from tests.e2e.test_comfyui_server import API_WORKFLOWS, load_api, node_id, tiny

PROMPT = "A panda 在竹林里 eating bamboo."
# A mid-size Step-LLM (6 layers x 1024, 72 M parameters: 0.27 GiB in fp32) for the RSS measurement.
MID_LLM = dict(hidden_size=1024, num_layers=6, num_attention_heads=8, num_attention_groups=2, ffn_hidden_size=2816,
               padded_vocab_size=4096)


@pytest.fixture(scope="module")
def comfy(comfyui_importable):
    """ComfyUI's model_management, model_patcher and folder_paths, on the CPU when there is no GPU."""
    tree = str(comfyui_importable)
    if tree not in sys.path:
        sys.path.append(tree)  # last, so ComfyUI's own `tests`/`nodes` shadow nothing of ours
    from comfy.cli_args import args

    if not torch.cuda.is_available():
        args.cpu = True  # what `main.py --cpu` sets; model_management reads it at import
    import comfy.model_management as mm
    import comfy.model_patcher as mp
    import folder_paths

    return mm, mp, folder_paths


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """models/text_encoders/{tiny,mid} and models/vae/stepvideo_vae.safetensors, written once."""
    root = tmp_path_factory.mktemp("managed-models")
    write_tiny_text_encoders(root / "text_encoders" / "tiny")
    write_tiny_step_llm(root / "text_encoders" / "mid" / "step_llm", config=MID_LLM)
    write_tiny_hunyuan_clip(root / "text_encoders" / "mid" / "hunyuan_clip")
    write_tiny_vae(root / "vae", layout="single", seed=2)
    return root


@pytest.fixture
def nodes(pack, comfy, model_files, monkeypatch):
    """The pack's node modules on the real ComfyUI (bridge cache emptied), its loaded-model list emptied
    before and after, and ComfyUI's text_encoders/vae folders pointing at :func:`model_files`."""
    mm, _, folder_paths = comfy
    bridge = sys.modules[f"{pack.__name__}.nodes.comfy_bridge"]
    monkeypatch.setattr(bridge.modules, "_MODULES", {})
    monkeypatch.delenv(bridge.ENV_MODELS_DIR, raising=False)
    for kind in ("text_encoders", "vae"):
        monkeypatch.setitem(folder_paths.folder_names_and_paths, kind,
                            ([str(model_files / kind)], folder_paths.supported_pt_extensions))
    mm.unload_all_models()
    yield {name: sys.modules[f"{pack.__name__}.nodes.{name}"] for name in ("comfy_bridge", "text", "vae", "types")}
    mm.unload_all_models()


def load_text(text, name="tiny", dtype="fp32"):
    return text.StepVideoTextEncoderLoader().load(name, name, dtype, True, "auto")["result"][0]


def encode(text, handle, prompt):
    out = text.StepVideoTextEncode().encode(text_encoder=handle, prompt=prompt, add_magic=False)
    return out["result"][0], out["ui"]["text"][0]


def entry_of(mm, patcher):
    """ComfyUI's LoadedModel for ``patcher``, or None when ComfyUI does not hold it loaded."""
    return next((m for m in mm.current_loaded_models if m.model is patcher), None)


def state_bytes(*modules) -> int:
    return sum(t.nbytes for m in modules for t in m.state_dict().values())


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.dit_inputs().values(), b.dit_inputs().values()))


def rss() -> int:
    return psutil.Process().memory_info().rss


# ----------------------------------------------------------------------------- the text encoder


def test_text_encoder_is_a_comfy_model_after_encoding(nodes, comfy):
    mm, mp, _ = comfy
    text = nodes["text"]
    handle = load_text(text)
    patcher = handle.patcher
    assert isinstance(patcher, mp.ModelPatcher) and not patcher.is_dynamic()
    assert mp.is_model_patcher_output(handle)  # what ComfyUI's RAM-pressure cache looks for
    assert patcher.load_device == mm.get_torch_device() and patcher.offload_device == mm.unet_offload_device()
    assert entry_of(mm, patcher) is None  # loading the files does not load the model yet

    encode(text, handle, PROMPT)
    entry = entry_of(mm, patcher)
    assert entry is not None and entry.device == patcher.load_device
    expected = state_bytes(handle.encoder.llm, handle.encoder.clip)
    assert entry.model_memory() == patcher.model_size() == expected > 1_000_000
    assert entry.model_loaded_memory() == expected  # all of it where it computes (the CPU here)


@pytest.mark.parametrize("evict", ["unload_all_models", "free_memory"])
def test_comfy_evicts_the_text_encoder_and_the_next_encode_brings_it_back_identical(nodes, comfy, evict):
    mm, _, _ = comfy
    text = nodes["text"]
    handle = load_text(text)
    first, _ = encode(text, handle, PROMPT)
    if evict == "unload_all_models":
        mm.unload_all_models()  # POST /free {"unload_models": true}
    else:
        mm.free_memory(1e30, handle.patcher.load_device)  # another model's load asking for the memory
    assert entry_of(mm, handle.patcher) is None
    assert not handle.encoder.weights_released  # an ordinary unload keeps them (in RAM)

    handle.encoder.clear_cache()
    second, note = encode(text, handle, PROMPT)
    assert "from cache" not in note and entry_of(mm, handle.patcher) is not None
    assert same(first, second)


def test_keep_in_ram_off_releases_through_comfy_without_the_copy_home(nodes, comfy, monkeypatch):
    mm, _, _ = comfy
    text = nodes["text"]
    handle = load_text(text)
    keep = load_text(text)  # a second loaded copy, for the reference output
    reference, _ = encode(text, keep, "a dog")
    low = text.StepVideoTextEncoderMemory().apply(text_encoder=handle, keep_in_ram=False)["result"][0]
    bridge, moves, during_unload = nodes["comfy_bridge"], [], []
    to, unload = handle.patcher.model.to, bridge.unload_model
    monkeypatch.setattr(handle.patcher.model, "to", lambda *a, **k: moves.append(a) or to(*a, **k))

    def spied_unload(patcher, drop=None):
        moves.clear()  # the moves of the load before the encode do not count
        try:
            return unload(patcher, drop)
        finally:
            during_unload.extend(moves)

    monkeypatch.setattr(bridge, "unload_model", spied_unload)
    _, note = encode(text, low, PROMPT)
    assert "weights released" in note and handle.encoder.weights_released
    assert all(p.is_meta for p in handle.patcher.model.parameters())
    assert entry_of(mm, handle.patcher) is None and entry_of(mm, keep.patcher) is not None  # only this one
    assert moves == [] and during_unload == []  # ComfyUI forgot its placement: no copy to the offload device

    _, note = encode(text, low, PROMPT)
    assert "from cache" in note and "read again" not in note  # the cache answers, nothing is read
    assert handle.encoder.weights_released
    again, note = encode(text, low, "a dog")
    assert "read again from disk" in note and "weights released" in note and same(again, reference)

    mm.unload_all_models()  # ComfyUI's own unload of a released encoder: nothing to do, nothing breaks
    _, note = encode(text, low, "a cat")
    assert "read again from disk" in note


def test_comfy_evicts_an_encoder_whose_weights_were_dropped_behind_its_back(nodes, comfy):
    """The core's release_weights() called directly while ComfyUI holds the encoder: ComfyUI's next eviction
    must still work (meta tensors cannot be copied home) and the next encode reads the weights again."""
    mm, _, _ = comfy
    text = nodes["text"]
    handle = load_text(text)
    first, _ = encode(text, handle, PROMPT)
    handle.encoder.release_weights()
    mm.unload_all_models()
    assert entry_of(mm, handle.patcher) is None
    handle.encoder.clear_cache()
    second, note = encode(text, handle, PROMPT)
    assert "read again" in note and same(first, second)


@pytest.mark.usefixtures("one_thread")
def test_release_frees_the_weights_from_ram(nodes, comfy):
    """RSS with a mid-size Step-LLM in fp32 (0.27 GiB): it drops by about the weights after an encode with
    keep_in_ram off, stays down when the cache answers, and comes back down after a new prompt."""
    text = nodes["text"]
    handle = load_text(text, "mid", "fp32")
    weights = handle.encoder.weight_bytes()
    assert weights > 250 * 2**20
    low = text.StepVideoTextEncoderMemory().apply(text_encoder=handle, keep_in_ram=False)["result"][0]
    gc.collect()
    loaded = rss()
    encode(text, low, PROMPT)
    gc.collect()
    after = rss()
    assert loaded - after > 0.8 * weights, (loaded - after, weights)
    _, note = encode(text, low, PROMPT)
    assert "from cache" in note and "read again" not in note and rss() - after < 0.1 * weights
    _, note = encode(text, low, "a different prompt")
    gc.collect()
    assert "read again" in note and rss() - after < 0.2 * weights


def test_comfy_forgets_a_dropped_text_encoder(nodes, comfy):
    """--cache-none, "Free model and node cache" or the RAM-pressure cache drop the loader's output: then
    nothing of ours keeps the weights alive and ComfyUI's loaded list holds no stale entry."""
    mm, _, _ = comfy
    text = nodes["text"]
    handle = load_text(text)
    encode(text, handle, PROMPT)
    llm, patcher = weakref.ref(handle.encoder.llm), weakref.ref(handle.patcher)
    del handle
    gc.collect()
    assert llm() is None and patcher() is None
    mm.cleanup_models_gc()
    assert all(m.model is not None for m in mm.current_loaded_models)


# ----------------------------------------------------------------------------- the VAE


def test_vae_is_a_comfy_model_after_decode_and_comes_back_after_eviction(nodes, comfy):
    mm, mp, _ = comfy
    vae_nodes = nodes["vae"]
    handle = vae_nodes.StepVideoVAELoader().load(vae_name="stepvideo_vae.safetensors", weight_dtype="fp32")["result"][0]
    assert isinstance(handle.patcher, mp.ModelPatcher) and mp.is_model_patcher_output(handle)
    assert handle.patcher.load_device == handle.device and handle.patcher.offload_device == handle.offload_device
    samples = {"samples": torch.randn(1, 8, 3, 1, 2, generator=torch.Generator().manual_seed(0))}
    (first,) = vae_nodes.StepVideoVAEDecode().decode(vae=handle, samples=samples)
    entry = entry_of(mm, handle.patcher)
    assert entry is not None and entry.model_memory() == state_bytes(handle.vae) == entry.model_loaded_memory()

    mm.unload_all_models()
    assert entry_of(mm, handle.patcher) is None and handle.vae.device == handle.offload_device
    (second,) = vae_nodes.StepVideoVAEDecode().decode(vae=handle, samples=copy.deepcopy(samples))
    assert entry_of(mm, handle.patcher) is not None and torch.equal(first, second)
    images = torch.rand(17, 16, 32, 3, generator=torch.Generator().manual_seed(3))
    (latent,) = vae_nodes.StepVideoVAEEncode().encode(vae=handle, images=images, mode="mean", seed=0)
    assert latent["samples"].shape == (1, 8, 3, 1, 2) and entry_of(mm, handle.patcher) is not None


# ----------------------------------------------------------------------------- pinned memory


def test_streamer_pinning_goes_to_comfys_pin_memory(nodes, comfy, monkeypatch, caplog):
    """The bridge's cuda_api pins through the real comfy.model_management.pin_memory; on a CPU ComfyUI has
    pinning off (MAX_PINNED_MEMORY <= 0), so every tensor stays pageable, unchanged, with one log line."""
    mm, _, _ = comfy
    bridge = nodes["comfy_bridge"]
    asked, real = [], mm.pin_memory
    monkeypatch.setattr(mm, "pin_memory", lambda t: asked.append(t) or real(t))
    api = bridge.cuda_api()
    assert isinstance(api, bridge.ComfyPinnedCuda)
    from stepvideo_core.offload.streamer import pin_in_place

    block = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    before = [p.data_ptr() for p in block.parameters()]
    with caplog.at_level(logging.INFO, logger="StepVideo"):
        pin_in_place(block, api.pin, lambda t: False)
    assert [t.data_ptr() for t in asked] == before == [p.data_ptr() for p in block.parameters()]
    if mm.MAX_PINNED_MEMORY <= 0:
        assert api.refused == len(before) and len([r for r in caplog.records if "pageable" in r.getMessage()]) == 1


# ----------------------------------------------------------------------------- a real server run


def test_memory_node_in_a_server_run_then_free(comfy_server):
    """keep_in_ram off in a real run: the encodes release, a new prompt reads again, POST /free and a run after it."""
    prompt = tiny(load_api(API_WORKFLOWS[0]), seed=31)
    loader = node_id(prompt, "StepVideoTextEncoderLoader")
    positive, negative = node_id(prompt, "StepVideoTextEncode"), node_id(prompt, "StepVideoNegativeTextEncode")
    prompt["950"] = {"class_type": "StepVideoTextEncoderMemory",
                     "inputs": {"text_encoder": [loader, 0], "keep_in_ram": False}}
    for node in (positive, negative):
        prompt[node]["inputs"]["text_encoder"] = ["950", 0]
    prompt[positive]["inputs"]["prompt"] = "a memory test prompt"

    result = comfy_server.run(prompt, timeout=600)
    assert result.status == "success", result.messages[-5:]
    assert "weights released" in result.history["outputs"][positive]["text"][0]

    prompt[positive]["inputs"]["prompt"] = "another memory test prompt"
    result = comfy_server.run(prompt, timeout=600)
    assert result.status == "success", result.messages[-5:]
    note = result.history["outputs"][positive]["text"][0]
    assert "read again from disk" in note and "weights released" in note
    assert positive in result.history["outputs"] and negative not in result.history["outputs"]  # negative cached

    status, _ = comfy_server.post("/free", {"unload_models": True, "free_memory": True})
    assert status == 200
    result = comfy_server.run(tiny(load_api(API_WORKFLOWS[0]), seed=32), timeout=600)
    assert result.status == "success", result.messages[-5:]
