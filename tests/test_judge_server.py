"""Slow: the OpenAI-compatible judge against a real server (llama-cpp-python serving the embedded
GGUF model on loopback). Run with `make test-slow`, which installs the `judge-server` extra."""

import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    pytest.importorskip("llama_cpp.server", reason="install the judge-server extra: pip install -e '.[judge-server]'")
    from dpokit.models import embedded_gguf_path

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(embedded_gguf_path()),
                             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "1024", "--model_alias", "smollm2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/models", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail("llama_cpp.server exited during start-up")
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("llama_cpp.server did not answer within 120 s")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_pairwise_judge_against_a_real_openai_compatible_server(server):
    from dpokit.eval.judges import OpenAIJudge

    judge = OpenAIJudge(server, "smollm2", timeout=60, retries=2, backoff=0.1)
    cases = [("What is 2 + 2?", "2 + 2 = 4.", "2 + 2 = 5."),
             ("Name a colour of the clear daytime sky.", "Blue.", "Green cheese."),
             ("Say hello politely.", "Hello, nice to meet you!", "Go away.")]
    outcomes = [judge.compare(p, a, b) for p, a, b in cases]
    assert all(o in (0.0, 0.5, 1.0, None) for o in outcomes)
    # the protocol worked end to end: requests were made in both orders and at least one answer parsed
    assert judge.stats["requests"] >= 2 * len(cases)
    assert any(o is not None for o in outcomes)
