"""How the project installs: pyproject.toml is the source, requirements.txt (for Spaces) agrees with it,
constraints say why each pin exists, and the light front end runs without Paddle or paddlenlp."""
import os
import re
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import pytest
from servers import RecordingEngine, serve_api

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
ONLY_FROM_THE_SPACE = {"gradio", "huggingface_hub"}  # the Space's own Gradio step installs them (requirements.txt)


def name_of(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("-", "_")


def lines(path: Path) -> list[str]:
    return [line.split("#")[0].strip() for line in path.read_text().splitlines() if line.split("#")[0].strip()]


def extra(name: str) -> list[str]:
    """An extra's requirements, with the extras it names (llava-ui[engine]) expanded."""
    found = []
    for requirement in PROJECT["optional-dependencies"][name]:
        inner = re.fullmatch(r"llava-ui\[(\w+)\]", requirement)
        found += extra(inner.group(1)) if inner else [requirement]
    return found


@pytest.mark.parametrize("file, flavour", [("requirements.txt", "server"), ("requirements-gpu.txt", "gpu")])
def test_requirements_txt_matches_pyproject(file, flavour):
    declared = PROJECT["dependencies"] + extra(flavour)
    listed = [line for line in lines(ROOT / file) if not line.startswith("-")]
    expected = sorted(r.replace(" ", "") for r in declared if name_of(r) not in ONLY_FROM_THE_SPACE)
    pinned = dict(line.split("==") for line in lines(ROOT / "constraints.txt") if "==" in line)
    assert sorted(r for r in listed if name_of(r) != "paddlenlp") == expected
    assert f"paddlenlp=={pinned['paddlenlp']}" in listed
    assert "-c constraints.txt" in lines(ROOT / file)


def test_the_space_runs_the_gradio_the_project_pins():
    gradio = next(r for r in PROJECT["dependencies"] if name_of(r) == "gradio")
    front_matter = (ROOT / "README.md").read_text().split("---")[1]
    assert f"sdk_version: {gradio.split('==')[1]}" in front_matter
    for key in ("short_description:", "models:", "preload_from_hub:", "lmms-lab/llava-next-interleave-qwen-0.5b"):
        assert key in front_matter


def test_every_constraint_says_why():
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement, _, reason = line.partition("#")
            assert len(reason.strip()) > 20, f"{requirement.strip()} has no reason"


def test_the_console_command_is_declared():
    assert PROJECT["scripts"]["llava-ui"] == "llava_ui.commands.main:cli"
    from llava_ui.commands.main import cli

    assert callable(cli)


BLOCK_PADDLE = """
import importlib.abc, sys
class NoPaddle(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("paddle", "paddlenlp"):
            raise ImportError(f"{name} is not installed in the light front end")
sys.meta_path.insert(0, NoPaddle())
from llava_ui.commands.main import main
sys.exit(main(sys.argv[1:]))
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_light_front_end_starts_and_answers_through_a_remote_engine_without_paddle(tiny_dir):
    engine = RecordingEngine(str(tiny_dir), dtype="float32").load()
    port = free_port()
    ask = {"model": "", "max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": "hello"}]}
    with serve_api(engine) as engine_url:
        direct = httpx.post(engine_url + "/chat/completions", json=ask, timeout=120).json()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        front = subprocess.Popen([sys.executable, "-c", BLOCK_PADDLE, "serve", "--backend", "remote", "--base-url",
                                  engine_url, "--port", str(port)], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while True:
                assert front.poll() is None, front.stderr.read()[-3000:]
                try:
                    page = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "the front end did not start"
                    time.sleep(0.5)
            assert page.status_code == 200
            while True:  # 503 + Retry-After while the front end connects to its engine
                answer = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=ask, timeout=120)
                if answer.status_code != 503 or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            through = answer.json()
        finally:
            front.terminate()
            front.wait(20)
    assert "choices" in through, through
    assert through["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]


def test_the_gpu_requirements_use_paddles_own_index():
    text = (ROOT / "requirements-gpu.txt").read_text()
    assert "--extra-index-url https://www.paddlepaddle.org.cn/packages/stable/cu126/" in lines(ROOT / "requirements-gpu.txt")
    assert "paddlepaddle-gpu==3.3.1 -i https://www.paddlepaddle.org.cn/packages/stable/cu126/" in text
