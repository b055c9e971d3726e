"""StepVideo Sampler with ``gpus: 2`` in a real ComfyUI server (``--cpu``: the worker is a CPU process on
gloo, the test mode): the shipped T2V API workflow gives gpus 1's latents and frames; ``/interrupt``
reaches the worker, which waits for the next run; a killed worker fails the run with a message naming
it, soon, and the next run starts a new one; "free model and node cache" (``/free``) stops it.

The server runs with ``STEPVIDEO_PARALLEL_TIMEOUT=120`` (tests/e2e/conftest.py), which bounds any hang.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time

import torch

from tests.e2e.comfy_server import at_first_progress
from tests.e2e.test_comfyui_server import API_WORKFLOWS, SAMPLER, load_api, node_id, tiny

T2V = next(p for p in API_WORKFLOWS if p.stem == "stepvideo_t2v")


def graph(gpus: int, name: str, **overrides) -> dict:
    """The shipped T2V API workflow at the tiny size in fp32, on ``gpus``, also saving the latent and the frames."""
    prompt = tiny(load_api(T2V), **overrides)
    for node in prompt.values():
        if node["class_type"] in ("StepVideoModelLoader", "StepVideoVAELoader"):
            node["inputs"]["weight_dtype"] = "fp32"
    sampler = node_id(prompt, SAMPLER)
    prompt[sampler]["inputs"]["gpus"] = gpus
    prompt["990"] = {"class_type": "SaveImage", "inputs": {"images": [node_id(prompt, "StepVideoVAEDecode"), 0],
                                                           "filename_prefix": f"gpus/{name}"}}
    prompt["991"] = {"class_type": "SaveLatent", "inputs": {"samples": [sampler, 0],
                                                            "filename_prefix": f"gpus/{name}"}}
    return prompt


def succeeded(server, result) -> None:
    assert result.status == "success", json.dumps(result.history, indent=1)[-3000:] + server.log_tail()


def summary(result, prompt) -> str:
    (text,) = result.history["outputs"][node_id(prompt, SAMPLER)]["text"]
    return text


def worker_pid(result, prompt) -> int:
    found = re.search(r"rank 1 pid (\d+) on cpu", summary(result, prompt))
    assert found, summary(result, prompt)
    return int(found.group(1))


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def saved_latent(server, result) -> torch.Tensor:
    from safetensors.torch import load

    (file,) = result.output_files(".latent")
    return load(server.view(file))["latent_tensor"]


def run_with_workers(server, name, **overrides):
    prompt = graph(2, name, **overrides)
    result = server.run(prompt, timeout=600)
    succeeded(server, result)
    return prompt, result


def test_gpus_2_gives_the_latents_and_frames_of_gpus_1(comfy_server):
    from tests.e2e.test_native_nodes import decoded_frames

    runs = {}
    for gpus in (1, 2):
        prompt = graph(gpus, f"same{gpus}", seed=5)
        result = comfy_server.run(prompt, timeout=600)
        succeeded(comfy_server, result)
        runs[gpus] = (saved_latent(comfy_server, result), decoded_frames(comfy_server, result).int(), prompt, result)
    (one, frames1, _, _), (two, frames2, prompt, result) = runs[1], runs[2]
    assert one.shape == two.shape and one.shape[2:] == (3, 3, 4)  # [B, C, 17 frames -> 3, 48/16, 64/16]
    assert float((two - one).abs().max() / one.abs().max()) <= 1e-5
    assert frames1.shape == frames2.shape == (17, 48, 64, 3)
    assert (frames1 - frames2).abs().max() <= 1 and frames1.float().std() > 1
    text = summary(result, prompt)
    assert "CFG parallel (cond | uncond)" in text and alive(worker_pid(result, prompt))


def test_interrupt_reaches_the_worker_which_waits_for_the_next_run(comfy_server):
    _, first = run_with_workers(comfy_server, "before", seed=11)
    prompt = graph(2, "long", width=256, height=256, frames=34, steps=1000, seed=12)
    pid = worker_pid(first, prompt)
    sampler = node_id(prompt, SAMPLER)

    def interrupt(result):
        status, _ = comfy_server.post("/interrupt", {"prompt_id": result.prompt_id})
        assert status == 200

    interrupt_on_first_step, sent = at_first_progress(sampler, interrupt)
    result = comfy_server.run(prompt, timeout=600, on_message=interrupt_on_first_step)
    assert sent.is_set(), "the sampler never reported progress"
    assert result.of_type("execution_interrupted"), result.messages[-5:]
    assert max(d["value"] for d in result.of_type("progress") if d.get("node") == sampler) < 1000
    assert result.seconds < 300
    assert alive(pid), comfy_server.log_tail(80)

    after_prompt, after = run_with_workers(comfy_server, "after", seed=13)
    assert worker_pid(after, after_prompt) == pid  # the same worker: it stopped with rank 0 and waited


def test_a_killed_worker_fails_the_run_clearly_then_the_next_run_starts_a_new_one(comfy_server):
    _, first = run_with_workers(comfy_server, "warm", seed=21)
    prompt = graph(2, "killed", width=256, height=256, frames=34, steps=1000, seed=22)
    pid = worker_pid(first, prompt)
    sampler = node_id(prompt, SAMPLER)
    kill_on_first_step, killed = at_first_progress(sampler, lambda result: os.kill(pid, signal.SIGKILL))
    result = comfy_server.run(prompt, timeout=600, on_message=kill_on_first_step)
    assert killed.is_set(), "the sampler never reported progress"
    assert result.status == "error"
    (error,) = result.of_type("execution_error")
    assert error["node_type"] == SAMPLER
    assert re.search(rf"StepVideo: GPU worker 1 \(pid {pid}\) died \(exit code -9\) during sampling",
                     error["exception_message"]), error["exception_message"]
    assert result.seconds < 60  # seen by the watcher at once, not after the 120 s collective timeout

    after_prompt, after = run_with_workers(comfy_server, "fresh", seed=23)
    assert worker_pid(after, after_prompt) != pid


def test_freeing_the_model_stops_the_worker(comfy_server):
    prompt, result = run_with_workers(comfy_server, "free", seed=31)
    pid = worker_pid(result, prompt)
    status, _ = comfy_server.post("/free", {"unload_models": True, "free_memory": True})
    assert status == 200
    stopped = f"StepVideo: GPU workers stopped (rank 1 pid {pid})"  # logged once the worker has exited
    deadline = time.monotonic() + 60
    while (alive(pid) or stopped not in comfy_server.log_text()) and time.monotonic() < deadline:
        time.sleep(0.25)
    assert not alive(pid), comfy_server.log_tail()
    assert stopped in comfy_server.log_text(), comfy_server.log_tail()  # asked to stop, not killed
