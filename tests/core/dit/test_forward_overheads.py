"""Per-forward overheads of the DiT that are gone: RoPE tables built once per run, the rotation without a
gathered copy of q and k, no host reads of device values inside a forward, the attention backend resolved
once per model and device instead of in every attention call.

Each test names the overhead it guards; the outputs stay the official ones (the parity and bit-exact
tests in this folder run the same code).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from stepvideo_core import attention as attn
from stepvideo_core.dit import model as dit_model
from stepvideo_core.dit.rope import apply_rope, rope_tables
from stepvideo_core.sampling import Placement, SamplingSettings, sample
from stepvideo_core.tiny import TINY_TI2V_DIT_CONFIG
from tests.core.sampling.conftest import conditioning, tiny_model

SIZE = dict(width=32, height=48, frames=17)  # latents [1, 3, 64, 3, 2]


def gathered_rope(x, tables):
    """The rotation as it was: a permuted copy of x (``x[..., partner]``) times the signed sines."""
    cos, signed_sin, partner = tables
    return (x * cos[None, :, None, :]).add_(x[..., partner].mul_(signed_sin[None, :, None, :]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grid", [(3, 4, 6), (5, 3, 4), (21, 5, 7)])
def test_rope_without_the_gather_is_bit_identical_to_the_gather(dtype, grid):
    frames, height, width = grid
    tables = rope_tables(frames, height, width, dtype, torch.device("cpu"))
    gen = torch.Generator().manual_seed(sum(grid))
    x = (torch.randn(2, frames * height * width, 3, 128, generator=gen) * 4).to(dtype)
    assert torch.equal(apply_rope(x, tables), gathered_rope(x, tables))
    # q and k arrive as strided views of the fused q|k|v projection
    fused = torch.randn(2, frames * height * width, 3, 3 * 128, generator=gen).to(dtype)
    q = fused[..., 128:256]
    assert not q.is_contiguous()
    assert torch.equal(apply_rope(q, tables), gathered_rope(q, tables))


def test_rope_rotation_makes_no_full_size_copy_of_its_input(monkeypatch):
    """No indexing kernel (the gather) runs, and the largest temporary is a quarter of x."""
    tables = rope_tables(2, 3, 4, torch.float32, torch.device("cpu"))
    x = torch.randn(1, 24, 2, 128)
    seen = []

    class Sizes(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                seen.append((getattr(func, "__name__", str(func)), out.numel()))
            return out

    with Sizes():
        out = apply_rope(x, tables)
    assert torch.equal(out, gathered_rope(x, tables))
    assert not any("getitem" in name and size == x.numel() for name, size in seen)  # no x[..., partner]
    temporaries = [size for name, size in seen if name in ("mul", "__mul__")]
    assert temporaries[0] == x.numel()                     # x * cos: the output itself
    assert max(temporaries[1:]) == x.numel() // 4          # each rotate_half product: a quarter of x


@pytest.fixture
def rope_builds(monkeypatch):
    """Count calls of rope_tables from the model (the function the DiT forward builds its tables with)."""
    calls = []
    real = dit_model.rope_tables

    def counting(*args, **kwargs):
        calls.append(args[:3])
        return real(*args, **kwargs)

    monkeypatch.setattr(dit_model, "rope_tables", counting)
    return calls


@pytest.mark.parametrize("batch_cfg", [True, False], ids=["batched-cfg", "sequential-cfg"])
def test_rope_tables_are_built_once_per_run(rope_builds, batch_cfg):
    model = tiny_model(torch.float32)
    pos, neg = conditioning(1, valid=5), conditioning(2, valid=2)
    calls = []
    hook = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        first = sample(model, pos, neg, settings=SamplingSettings(**SIZE, steps=3, cfg=5.0, shift=13.0, seed=1),
                       placement=Placement(batch_cfg=batch_cfg))
        assert len(calls) == (3 if batch_cfg else 6) and rope_builds == [(3, 3, 2)]  # 3 latent frames x 3 x 2
        assert model._rope_cache == {}  # dropped when the run ends (the tables may sit on an accelerator)
        second = sample(model, pos, neg, settings=SamplingSettings(**SIZE, steps=3, cfg=5.0, shift=13.0, seed=1),
                        placement=Placement(batch_cfg=batch_cfg))
    finally:
        hook.remove()
    assert len(rope_builds) == 2 and torch.equal(first, second)


def test_kept_rope_tables_are_bounded_and_follow_device_moves(rope_builds):
    model = tiny_model(torch.float32)
    cpu = torch.device("cpu")
    with torch.no_grad():
        a = model.rope(3, 3, 2, torch.float32, cpu)
        assert model.rope(3, 3, 2, torch.float32, cpu) is a and len(rope_builds) == 1
        model.rope(3, 3, 2, torch.bfloat16, cpu)
        model.rope(4, 3, 2, torch.float32, cpu)
        assert len(model._rope_cache) == dit_model.ROPE_CACHE_SIZE  # the oldest set was dropped
        assert model.rope(3, 3, 2, torch.float32, cpu) is not a and len(rope_builds) == 4
        model.to(torch.float32)  # any .to(): the kept tables belong to the old placement
        assert model._rope_cache == {}
    x = torch.zeros(1, requires_grad=True)
    with torch.enable_grad():
        model.rope(3, 3, 2, x.dtype, cpu)
    assert model._rope_cache == {}  # not kept while autograd records


# ----------------------------------------------------------------------------- host reads


class HostReads:
    """Counts reads of tensor values by the host (``int()``, ``float()``, ``bool()``, ``.item()``, ``.tolist()``)
    while ``active``; on a GPU each of them waits for the device (a sync).  Stacks are kept to say where."""

    METHODS = ("__int__", "__float__", "__bool__", "__index__", "item", "tolist")

    def __init__(self, monkeypatch):
        self.active, self.where = False, []
        for name in self.METHODS:
            real = getattr(torch.Tensor, name)

            def counted(tensor, *args, _real=real, _name=name, **kwargs):
                if self.active:
                    import traceback
                    self.where.append((_name, "".join(traceback.format_stack(limit=4)[:-1])))
                return _real(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)

    @contextlib.contextmanager
    def counting(self):
        self.active = True
        try:
            yield self
        finally:
            self.active = False

    def during_forwards(self, model):
        """Count only inside ``model``'s forward calls (hooks switch the counter on and off)."""
        pre = model.register_forward_pre_hook(lambda *a: setattr(self, "active", True))
        post = model.register_forward_hook(lambda *a: setattr(self, "active", False))
        return pre, post


@pytest.fixture
def host_reads(monkeypatch):
    return HostReads(monkeypatch)


def forward_inputs(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pos, neg = conditioning(1, valid=5), conditioning(2, valid=2)
    inputs = {k: torch.cat([pos[k], neg[k]]) for k in ("encoder_hidden_states", "encoder_hidden_states_2",
                                                         "encoder_attention_mask")}
    return dict(hidden_states=torch.randn(2, 3, 64, 3, 2, generator=gen), timestep=torch.tensor([0.4, 0.4]),
                **inputs)


def test_a_forward_given_the_context_length_reads_nothing_back(host_reads):
    model = tiny_model(torch.float32)
    inputs = forward_inputs(model)
    longest = dit_model.longest_context(inputs["encoder_attention_mask"])
    assert longest == 77 + 5
    with torch.no_grad():
        expected = model(**inputs)  # (no counting: the first forward also builds the RoPE tables)
        model.clear_rope_cache()
        with host_reads.counting():
            without = model(**inputs)
        assert [name for name, _ in host_reads.where] == ["__int__"]  # only int(lengths.max()) is left
        host_reads.where.clear()
        model.clear_rope_cache()
        with host_reads.counting():
            given = model(**inputs, context_length=longest)  # the tables built afresh: no reads either
    assert host_reads.where == [], host_reads.where[0][1]
    assert torch.equal(without, expected) and torch.equal(given, expected)


@pytest.mark.parametrize("batch_cfg", [True, False], ids=["batched-cfg", "sequential-cfg"])
def test_the_sampler_passes_the_context_length_so_no_forward_reads_back(host_reads, batch_cfg):
    model = tiny_model(torch.float32)
    pos, neg = conditioning(1, valid=5), conditioning(2, valid=2)
    seen = []
    spy = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("context_length")), with_kwargs=True)
    hooks = host_reads.during_forwards(model)
    try:
        ours = sample(model, pos, neg, settings=SamplingSettings(**SIZE, steps=2, cfg=5.0, shift=13.0, seed=4),
                      placement=Placement(batch_cfg=batch_cfg))
    finally:
        for h in (spy, *hooks):
            h.remove()
    assert host_reads.where == [], host_reads.where[0][1]
    assert seen == ([82, 82] if batch_cfg else [82, 79, 82, 79])  # 77 CLIP tokens + the longest LLM prompt
    plain = tiny_model(torch.float32)
    plain.forward = lambda **kw: type(plain).forward(plain, **{k: v for k, v in kw.items() if k != "context_length"})
    assert torch.equal(ours, sample(plain, pos, neg,
                                    settings=SamplingSettings(**SIZE, steps=2, cfg=5.0, shift=13.0, seed=4),
                                    placement=Placement(batch_cfg=batch_cfg)))


class HostData(torch.overrides.TorchFunctionMode):
    """Records ``torch.tensor(python data)`` calls: on a GPU each is a host-to-device copy (a stream sync)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.tensor:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def test_a_ti2v_run_reads_nothing_back_and_copies_no_host_data_in_its_forwards(host_reads):
    model = tiny_model(torch.bfloat16, config=TINY_TI2V_DIT_CONFIG)
    cond = conditioning(1, valid=5, config=TINY_TI2V_DIT_CONFIG)
    neg = conditioning(2, valid=2, config=TINY_TI2V_DIT_CONFIG)
    image = torch.randn(1, 3, 64, 3, 2, generator=torch.Generator().manual_seed(3))
    modes = []
    hooks = host_reads.during_forwards(model)

    def enter(*args):
        modes.append(HostData())
        modes[-1].__enter__()

    def leave(*args):
        modes[-1].__exit__(None, None, None)

    enter = model.register_forward_pre_hook(enter)
    leave = model.register_forward_hook(leave)
    try:
        sample(model, cond, neg,
               settings=SamplingSettings(**SIZE, steps=2, cfg=5.0, shift=13.0, seed=4, motion_score=5.3),
               condition=image)
    finally:
        for h in (*hooks, enter, leave):
            h.remove()
    assert host_reads.where == [], host_reads.where[0][1]
    assert len(modes) == 2 and [m.calls for m in modes] == [0, 0]  # the motion score is filled on the device


def test_the_motion_score_fill_rounds_like_the_official_tensor():
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for score in (5.3, 5.0, 2.7182818, 0.1, 17.123456789):
            got = dit_model.motion_score_tensor(score, 3, dtype)
            assert torch.equal(got, torch.tensor([score], dtype=dtype).repeat(3)), (dtype, score)


# ----------------------------------------------------------------------------- attention backend


def test_auto_attention_is_resolved_once_per_model_and_device(monkeypatch):
    looked_up = []
    monkeypatch.setattr(attn, "_module_available", lambda module: looked_up.append(module) or False)
    model = tiny_model(torch.float32)
    model.attention_backend = "auto"
    pos, neg = conditioning(1), conditioning(2)
    first = sample(model, pos, neg, settings=SamplingSettings(**SIZE, steps=3, cfg=5.0, shift=13.0, seed=2))
    assert looked_up == ["sageattention", "flash_attn"]  # once for the run, not 2 x per block per step
    sample(model, pos, neg, settings=SamplingSettings(**SIZE, steps=3, cfg=5.0, shift=13.0, seed=2),
           placement=Placement(batch_cfg=False))
    assert len(looked_up) == 2  # the model keeps its resolution for this device and dtype
    model.attention_backend = "auto"  # choosing again resolves again, once
    again = sample(model, pos, neg, settings=SamplingSettings(**SIZE, steps=3, cfg=5.0, shift=13.0, seed=2))
    assert len(looked_up) == 4 and torch.equal(first, again)
    model.attention_backend = "sdpa"
    assert torch.equal(sample(model, pos, neg,
                              settings=SamplingSettings(**SIZE, steps=3, cfg=5.0, shift=13.0, seed=2)), first)


def test_the_blocks_get_the_resolved_backend_equal_to_the_request(monkeypatch):
    model = tiny_model(torch.float32)
    model.attention_backend = "auto"
    backend = model.resolved_attention(torch.device("cpu"), torch.float32)
    assert backend == "auto" and backend.kernel == "sdpa" and isinstance(backend, attn.Resolved)
    assert model.resolved_attention(torch.device("cpu"), torch.float32) is backend
    monkeypatch.setattr(attn, "resolve_backend", lambda *a, **k: pytest.fail("resolved again in a call"))
    q = torch.randn(1, 2, 5, 16)
    torch.testing.assert_close(attn.attention(q, q, q, backend=backend), attn.F.scaled_dot_product_attention(q, q, q))
    mask = torch.ones(1, 1, 1, 5, dtype=torch.bool)
    flash = attn.Resolved("auto", "flash_attn")  # masked calls still take SDPA
    torch.testing.assert_close(attn.attention(q, q, q, mask=mask, backend=flash),
                               attn.F.scaled_dot_product_attention(q, q, q, attn_mask=mask))
    with pytest.raises(ValueError, match="concrete"):
        attn.Resolved("auto", "auto")
