"""A real ComfyUI server for the end-to-end tests: a temporary base folder with this pack
linked in and tiny models in the official layout, started with ``--cpu`` on a free
loopback port, and a small HTTP/websocket client for it.

Nothing here imports ComfyUI: the server is ``<python> <COMFYUI_DIR>/main.py`` in a child
process, talked to over HTTP (``/prompt``, ``/history``, ``/view``, ``/interrupt``,
``/object_info``) and the websocket (``/ws``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parents[2]
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
NO_COMFYUI = "COMFYUI_DIR not set: no ComfyUI tree to test against"
PACK_LINK = "ComfyUI-StepVideo"
# What the shipped workflows' model combos name (the README's layout), and what each points at
# inside a tiny release (stepvideo_core.tiny.write_tiny_release).
TINY_LAYOUT = {
    "diffusion_models/stepvideo-t2v": "",
    "diffusion_models/stepvideo-t2v-turbo": "",
    "diffusion_models/stepvideo-ti2v": "transformer-ti2v",   # the tiny release's Step-Video-TI2V transformer
    "text_encoders/stepvideo-t2v": "",
    "text_encoders/stepvideo-ti2v": "",
    "vae/stepvideo/vae_v2.safetensors": "vae/vae_v2.safetensors",
}


def free_port() -> int:
    """A port nothing listens on right now (the kernel's pick on 127.0.0.1)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_base_dir(base: Path, release: Path) -> Path:
    """Lay out a ComfyUI base folder: ``custom_nodes/ComfyUI-StepVideo`` -> this repository and
    ``models/...`` -> the parts of the tiny ``release`` (symlinks, nothing copied), plus a tiny LoRA
    for that release in ``models/loras`` and ``input/example.png`` (the image the TI2V workflow loads)."""
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / PACK_LINK).symlink_to(REPO_ROOT, target_is_directory=True)
    for entry, part in TINY_LAYOUT.items():
        link = base / "models" / entry
        link.parent.mkdir(parents=True, exist_ok=True)
        target = release / part if part else release
        link.symlink_to(target, target_is_directory=target.is_dir())
    from stepvideo_core.tiny import TINY_RELEASE_DIT_CONFIG, write_tiny_image, write_tiny_lora

    write_tiny_image(base / "input" / "example.png", width=80, height=48)  # what Load Image lists (as ComfyUI ships)

    (base / "models" / "loras").mkdir(parents=True, exist_ok=True)  # one adapter for the LoRA loader's tests
    write_tiny_lora(base / "models" / "loras" / "tiny_lora.safetensors", config=TINY_RELEASE_DIT_CONFIG, keys="comfy",
                    alpha=4.0)
    return base


@dataclass
class RunResult:
    """One prompt's life: its id, every websocket message for it, binary frames, and the history entry."""

    prompt_id: str
    messages: list = field(default_factory=list)
    binary_frames: int = 0
    history: Optional[dict] = None
    seconds: float = 0.0

    def of_type(self, kind: str) -> list:
        return [data for t, data in self.messages if t == kind]

    @property
    def status(self) -> Optional[str]:
        return (self.history or {}).get("status", {}).get("status_str")

    def output_files(self, suffix: str = "") -> list[dict]:
        """Files listed in the history's outputs (``{"filename", "subfolder", "type"}``)."""
        files = []
        for out in (self.history or {}).get("outputs", {}).values():
            for value in out.values():
                if isinstance(value, list):
                    files += [f for f in value if isinstance(f, dict) and str(f.get("filename", "")).endswith(suffix)]
        return files


class ComfyServer:
    """``main.py --cpu`` on 127.0.0.1:``port`` with ``base`` as its base directory."""

    def __init__(self, comfyui_dir: Path, base: Path, python: str = sys.executable, port: Optional[int] = None,
                 extra_args: tuple = (), env: Optional[dict] = None):
        self.comfyui_dir = Path(comfyui_dir)
        self.env = dict(env or {})  # set in the server's environment on top of this process's
        self.base = Path(base)
        self.python = python
        self.port = port or free_port()
        self.extra_args = tuple(extra_args)
        self.log_path = self.base / "server.log"
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ lifecycle

    def command(self) -> list[str]:
        return [self.python, str(self.comfyui_dir / "main.py"), "--cpu", "--listen", "127.0.0.1",
                "--port", str(self.port), "--base-directory", str(self.base), "--disable-auto-launch",
                "--database-url", "sqlite:///:memory:", *self.extra_args]

    def start(self, timeout: float = 240.0) -> "ComfyServer":
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("STEPVIDEO_MODELS_DIR", None)  # only the temporary models folder counts
        env.update(self.env)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command(), cwd=self.comfyui_dir, stdout=log,
                                         stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                if self.get("/system_stats", timeout=2)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Terminate the server this object started (only that process), politely first."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # ------------------------------------------------------------------ HTTP

    def request(self, method: str, path: str, payload=None, timeout: float = 30.0) -> tuple[int, object]:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as res:
                body = res.read()
                status = res.status
        except urllib.error.HTTPError as err:
            body, status = err.read(), err.code
        try:
            return status, (json.loads(body) if body else None)
        except ValueError:
            return status, body.decode(errors="replace")

    def get(self, path: str, timeout: float = 30.0):
        return self.request("GET", path, timeout=timeout)

    def post(self, path: str, payload, timeout: float = 30.0):
        return self.request("POST", path, payload, timeout=timeout)

    def view(self, file: dict) -> bytes:
        """Download an output file listed in a history entry through ``/view``."""
        query = urllib.parse.urlencode({"filename": file["filename"], "subfolder": file.get("subfolder", ""),
                                        "type": file.get("type", "output")})
        with urllib.request.urlopen(f"{self.url}/view?{query}", timeout=60) as res:
            return res.read()

    def history(self, prompt_id: str) -> Optional[dict]:
        status, body = self.get(f"/history/{prompt_id}")
        return body.get(prompt_id) if status == 200 and isinstance(body, dict) else None

    # ------------------------------------------------------------------ prompts

    def connect(self, client_id: str, timeout: float = 30.0):
        """An open websocket for ``client_id`` (websocket-client)."""
        import websocket  # websocket-client

        return websocket.create_connection(f"ws://127.0.0.1:{self.port}/ws?clientId={client_id}", timeout=timeout)

    def submit(self, prompt: dict, client_id: str, extra_data: Optional[dict] = None) -> tuple[int, dict]:
        """POST ``prompt`` to ``/prompt``; ``extra_data`` is what the frontend adds (e.g. its ``preview_method``)."""
        payload = {"prompt": prompt, "client_id": client_id}
        if extra_data is not None:
            payload["extra_data"] = dict(extra_data)
        return self.post("/prompt", payload)

    def run(self, prompt: dict, timeout: float = 300.0, on_message=None,
            extra_data: Optional[dict] = None) -> RunResult:
        """Submit ``prompt`` and follow it on the websocket until it ends; returns the :class:`RunResult`.

        ``on_message(kind, data, result)`` is called for every JSON message of this prompt
        (e.g. to interrupt it); ``extra_data`` goes with the prompt (see :meth:`submit`). Raises
        AssertionError when ``/prompt`` refuses the prompt.
        """
        import websocket  # websocket-client

        client_id = uuid.uuid4().hex
        ws = self.connect(client_id)
        try:
            status, body = self.submit(prompt, client_id, extra_data)
            assert status == 200, f"/prompt answered {status}: {json.dumps(body)[:2000]}"
            result = RunResult(prompt_id=body["prompt_id"])
            start = time.monotonic()
            deadline = start + timeout
            while time.monotonic() < deadline:
                ws.settimeout(max(0.5, deadline - time.monotonic()))
                try:
                    opcode, raw = ws.recv_data()
                except websocket.WebSocketTimeoutException:
                    break
                if opcode == websocket.ABNF.OPCODE_BINARY:
                    result.binary_frames += 1
                    continue
                message = json.loads(raw)
                kind, data = message.get("type"), message.get("data") or {}
                if not isinstance(data, dict) or data.get("prompt_id") != result.prompt_id:
                    continue  # another prompt's, or not tied to a prompt (queue status)
                result.messages.append((kind, data))
                if on_message is not None:
                    on_message(kind, data, result)
                if kind in ("execution_error", "execution_interrupted"):
                    break
                if kind == "executing" and data.get("node") is None:
                    break
            result.seconds = time.monotonic() - start
        finally:
            ws.close()
        for _ in range(40):  # the history entry lands right after the last message
            result.history = self.history(result.prompt_id)
            if result.history:
                break
            time.sleep(0.25)
        return result


def at_first_progress(node: str, action):
    """(``on_message`` for :meth:`ComfyServer.run`, Event): calls ``action(result)`` once, on the first
    progress message of ``node`` (e.g. to interrupt or kill mid-run), and sets the Event then."""
    done = threading.Event()

    def on_message(kind, data, result):
        if kind == "progress" and data.get("node") == node and not done.is_set():
            done.set()
            action(result)

    return on_message, done
