"""BlockStreamer on the CPU: streamed output is bit-identical, weights always end up home, nothing grows.

CUDA copy streams cannot run here; the "copy" transport runs the same schedule with
real copies into separate slot tensors, so the slot logic itself is exercised.
"""

import copy
import weakref

import pytest
import torch

from stepvideo_core import fp8
from stepvideo_core.offload import BlockStreamer, SamplingInterrupted, simulate
from stepvideo_core.offload.streamer import resolve_mode
from stepvideo_core.sampling import Placement, SamplingSettings, sample
from stepvideo_core.sampling.noise import initial_noise, latent_shape
from stepvideo_core.sampling.schedule import euler_step, flow_match_sigmas, guidance
from stepvideo_core.tiny import TINY_DIT_CONFIG
from tests.core.sampling.conftest import conditioning, tiny_model
from tests.capabilities import needs_cpu_fp8_matmul

FIVE = dict(TINY_DIT_CONFIG, num_layers=5)
SIZE = dict(width=32, height=32, frames=17, steps=2, cfg=9.0, shift=13.0, seed=5)


@pytest.fixture(scope="module")
def model():
    return tiny_model(torch.float32, config=FIVE)


@pytest.fixture(scope="module")
def cond():
    return conditioning(1, valid=5, config=FIVE), conditioning(2, valid=2, config=FIVE)


def plain_sample(model, pos, neg, width, height, frames, steps, cfg, shift, seed):
    """The sampler's loop (batched CFG, Euler) written out with plain forward calls: no BlockStreamer at all."""
    sigmas = flow_match_sigmas(steps, shift)
    latents = initial_noise(latent_shape(width, height, frames, 1, model.config.in_channels), seed)
    both = {k: torch.cat([pos[k], neg[k]]) for k in ("encoder_hidden_states", "encoder_hidden_states_2",
                                                     "encoder_attention_mask")}
    with torch.no_grad():
        for i in range(steps):
            x = latents.to(model.compute_dtype)
            v_cond, v_uncond = model(hidden_states=torch.cat([x, x]), timestep=sigmas[i].expand(2), **both).chunk(2)
            latents = euler_step(latents, guidance(v_cond, v_uncond, cfg), sigmas, i)
    return latents


@pytest.fixture(scope="module")
def resident(model, cond):
    """The reference every streamed run must equal: an unstreamed deep copy, sampled without the streamer."""
    return plain_sample(copy.deepcopy(model), *cond, **SIZE)


def homes(model):
    return {name: t.data_ptr() for name, t in list(model.named_parameters()) + list(model.named_buffers())}


def test_the_sampler_without_streaming_is_the_plain_loop(model, cond, resident):
    assert torch.equal(sample(model, *cond, settings=SamplingSettings(**SIZE)), resident)


@pytest.mark.parametrize("blocks_on_device", [0, 1, 3, 5])
def test_streamed_output_is_bit_identical(model, cond, resident, blocks_on_device):
    before = homes(model)
    out = sample(model, *cond, settings=SamplingSettings(**SIZE),
                 placement=Placement(blocks_on_device=blocks_on_device, streamer_mode="copy"))
    assert torch.equal(out, resident)
    assert homes(model) == before  # every tensor points at its home copy again


def model_inputs(cond):
    return dict(timestep=torch.tensor([0.1, 0.1]), **{k: torch.cat([cond[0][k], cond[1][k]])
                                                      for k in ("encoder_hidden_states", "encoder_hidden_states_2",
                                                                "encoder_attention_mask")})


def test_trace_follows_the_schedule(model, cond):
    x = torch.randn(2, 3, 64, 2, 2)
    inputs = model_inputs(cond)
    with torch.no_grad():
        want = copy.deepcopy(model)(x, **inputs)
        with BlockStreamer(model, "cpu", 2, mode="copy") as streamer:
            calls = [model(x, **inputs) for _ in range(3)]
    assert all(torch.equal(c, want) for c in calls)
    assert streamer.trace == [a for actions in simulate(5, 2, 3) for a in actions]


def test_blocks_compute_from_slots_not_from_home(model, cond):
    """While a streamed block runs its weights are slot tensors; afterwards they are home again."""
    seen = {}
    block = model.transformer_blocks[3]
    home_ptr = block.attn1.wqkv.weight.data_ptr()
    hook = block.register_forward_hook(lambda m, a, o: seen.update(ptr=m.attn1.wqkv.weight.data_ptr()))
    try:
        sample(model, *cond, settings=SamplingSettings(**dict(SIZE, steps=1)),
               placement=Placement(blocks_on_device=1, streamer_mode="copy"))
    finally:
        hook.remove()
    assert seen["ptr"] != home_ptr and block.attn1.wqkv.weight.data_ptr() == home_ptr


def test_interrupt_mid_pass_puts_everything_back(model, cond):
    before = homes(model)
    polls = []

    def stop_in_block_four():
        polls.append(1)
        return len(polls) == 1 + 5 + 5  # step-1 check, 5 blocks of call 1, ... block 4 of call 2
    streamer_ref = []
    real_enter = BlockStreamer.__enter__

    def spy_enter(self):
        streamer_ref.append(weakref.ref(self))
        return real_enter(self)

    BlockStreamer.__enter__ = spy_enter
    try:
        with pytest.raises(SamplingInterrupted, match="block 4"):
            sample(model, *cond, settings=SamplingSettings(**SIZE),
                   placement=Placement(blocks_on_device=1, streamer_mode="copy", batch_cfg=False),
                   should_stop=stop_in_block_four)
    finally:
        BlockStreamer.__enter__ = real_enter
    assert homes(model) == before
    assert not model._forward_pre_hooks and not any(b._forward_pre_hooks or b._forward_hooks
                                                    for b in model.transformer_blocks)
    streamer = streamer_ref[0]()
    assert streamer is None or (streamer._slots == [] and streamer._swapped == {} and streamer._homes == [])


def test_repeated_runs_allocate_nothing_new(model, cond):
    """Same home tensors after every run, and the slot tensors of a run are freed when it ends."""
    before = homes(model)
    slot_refs = []
    for _ in range(3):
        with torch.no_grad(), BlockStreamer(model, "cpu", 1, mode="copy") as streamer:
            slot_refs += [weakref.ref(t) for slot in streamer._slots for t in slot]
        assert homes(model) == before
    del streamer
    assert slot_refs and all(ref() is None for ref in slot_refs)


def test_no_copy_transport_runs_the_schedule_in_place(model, cond, resident):
    """"none": the schedule runs (trace), every block computes from its own home tensors, nothing is
    allocated, and the outputs are those of an unstreamed deep copy / of the plain sampling loop."""
    gen = torch.Generator().manual_seed(7)
    xs = [torch.randn(2, 3, 64, 2, 2, generator=gen) for _ in range(3)]
    inputs = model_inputs(cond)
    with torch.no_grad():
        plain = copy.deepcopy(model)
        want = [plain(x, **inputs) for x in xs]
    before = homes(model)
    seen = []
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: seen.append((i, {n: t.data_ptr() for n, t in
                                                                          m.state_dict(keep_vars=True).items()})))
             for i, b in enumerate(model.transformer_blocks)]
    try:
        with torch.no_grad(), BlockStreamer(model, "cpu", 2) as streamer:  # auto -> "none" on the CPU
            assert streamer.mode == "none" and streamer._slots == []
            got = [model(x, **inputs) for x in xs]
    finally:
        for h in hooks:
            h.remove()
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert streamer.trace == [a for actions in simulate(5, 2, 3) for a in actions]
    assert [i for i, _ in seen] == list(range(5)) * 3
    assert all(ptrs == {n: before[f"transformer_blocks.{i}.{n}"] for n in ptrs} for i, ptrs in seen)
    assert homes(model) == before
    out = sample(model, *cond, settings=SamplingSettings(**SIZE),
                 placement=Placement(blocks_on_device=0))  # auto -> "none": every block streamed in place
    assert torch.equal(out, resident)


@pytest.mark.parametrize("mode", [pytest.param("matmul", marks=needs_cpu_fp8_matmul), "dequantize"])
def test_fp8_blocks_stream_with_their_scales(tmp_path, mode):
    """fp8 weights and their scale buffers go through the slots as they are (fp8 stays fp8), under either
    fp8 path; the matmul one where this torch has it on the CPU, the dequantise one under every torch."""
    from stepvideo_core import load_transformer
    from tests.factory import write_tiny_dit
    src = write_tiny_dit(tmp_path / "sv", config=FIVE)
    q = load_transformer(src, dtype=torch.float32, weight_format="fp8_scaled")
    fp8.set_matmul_mode(q, mode)
    pos, neg = conditioning(1, config=FIVE), conditioning(2, config=FIVE)
    one_step = dict(SIZE, steps=1)
    a = sample(copy.deepcopy(q), pos, neg, settings=SamplingSettings(**one_step))
    layer = q.get_submodule("transformer_blocks.3.ff.net.2")
    home = {"weight": layer.weight.data_ptr(), "scale_weight": layer.scale_weight.data_ptr()}
    seen = []
    hook = layer.register_forward_hook(lambda m, args, out: seen.append(
        (m.weight.dtype, m.weight.data_ptr(), m.scale_weight.data_ptr())))
    try:
        b = sample(q, pos, neg, settings=SamplingSettings(**one_step),
                   placement=Placement(blocks_on_device=0, streamer_mode="copy"))
    finally:
        hook.remove()
    assert torch.equal(a, b)
    assert seen and all(dtype == torch.float8_e4m3fn and w != home["weight"] and s != home["scale_weight"]
                        for dtype, w, s in seen)  # computed from slot copies of both
    assert (layer.weight.data_ptr(), layer.scale_weight.data_ptr()) == (home["weight"], home["scale_weight"])


def test_mode_resolution():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_mode("auto", cpu, cpu) == "none"
    assert resolve_mode("auto", cuda, cpu) == "cuda"
    assert resolve_mode("auto", torch.device("xpu"), cpu) == "copy"
    assert resolve_mode("copy", cpu, cpu) == "copy"
    with pytest.raises(ValueError):
        resolve_mode("fast", cpu, cpu)


def test_blocks_of_different_layouts_are_refused(model):
    odd = tiny_model(torch.float32, config=FIVE)
    odd.transformer_blocks[4].attn1.wqkv.weight.data = odd.transformer_blocks[4].attn1.wqkv.weight.data[:10]
    with pytest.raises(ValueError, match="same tensors"):
        with BlockStreamer(odd, "cpu", 2, mode="copy"):
            pass


def test_pinning_happens_once_per_tensor():
    """The pinned copy becomes the home tensor, so a second run pins (allocates) nothing."""
    from stepvideo_core.offload.streamer import pin_in_place
    block = tiny_model(torch.float32, config=FIVE).transformer_blocks[0]
    pinned = set()

    def fake_pin(tensor):
        copy = tensor.clone()
        pinned.add(copy.data_ptr())
        return copy

    first = pin_in_place(block, fake_pin, lambda t: t.data_ptr() in pinned)
    ptrs = {n: t.data_ptr() for n, t in block.state_dict().items()}
    assert first == len(ptrs) and set(ptrs.values()) == pinned
    assert pin_in_place(block, fake_pin, lambda t: t.data_ptr() in pinned) == 0
    assert {n: t.data_ptr() for n, t in block.state_dict().items()} == ptrs
