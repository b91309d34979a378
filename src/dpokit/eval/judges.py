"""Judges: who decides which completion is better.

Reward judges score one completion: ``score(prompts, completions) -> list[float]``.
* ``FunctionJudge``: any Python function ``module:function`` taking (prompt, completion) -> float;
* ``RewardModelJudge``: a Hugging Face sequence-classification reward model (logit of the last
  label, over prompt + completion, through the model's chat template when it has one).

Pairwise judges compare two: ``compare(prompt, a, b) -> 1 (a better) | 0 (b better) | 0.5 | None``.
* ``RewardPairwise``: a reward judge's scores compared (equal scores are a tie);
* ``OpenAIJudge``: any OpenAI-compatible chat endpoint, asked in both orders to cancel position
  bias: a win only when both orders agree, a tie when they disagree, None (counted as invalid,
  never folded into ties) when a valid answer cannot be had after the retries.

The endpoint is not trusted (``post_json``): each request has a deadline for the whole exchange
(connect, headers, body; a reply that drips in slowly is cut off), the reply is read up to
``max_response_bytes`` and no further, a reply that is not the expected JSON shape (garbage, deeply
nested, huge numbers) is a failed attempt, and redirects are followed only when they keep the
method (307/308), never with the API key to another origin (scheme, host, port). Nothing the
endpoint sends raises out of ``compare``: every failure is an invalid judgement, and the caller
decides how many it tolerates (``evaluate.generation_eval``'s ``max_invalid``).
"""

from __future__ import annotations

import contextlib
import http.client
import importlib
import json
import logging
import os
import re
import socket
import ssl
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urljoin, urlsplit

from dpokit.progress import Progress

log = logging.getLogger("dpokit")


class JudgeError(RuntimeError):
    pass


class RewardJudge(Protocol):
    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]: ...


class PairwiseJudge(Protocol):
    def compare(self, prompt: str, a: str, b: str) -> float | None: ...


@dataclass
class FunctionJudge:
    fn: Callable[[str, str], float]
    name: str = "function"

    @classmethod
    def load(cls, spec: str) -> FunctionJudge:
        """``package.module:function``; the function takes (prompt, completion) and returns a float. The module is
        looked up on the Python path, then in the working directory (as ``python -m`` would find it)."""
        if ":" not in spec or not all(spec.split(":", 1)):
            raise JudgeError(f"judge '{spec}': expected module:function, e.g. mypkg.rewards:score")
        module, fn_name = spec.split(":", 1)
        cwd = os.getcwd()
        try:
            mod = _import(module, cwd)
        except Exception as e:  # noqa: BLE001 - whatever the user's module raises, say which module and why
            raise JudgeError(f"judge '{spec}': cannot import module '{module}' ({type(e).__name__}: {e}); it is "
                             f"looked up on the Python path and in the working directory {cwd}") from None
        fn = getattr(mod, fn_name, None)
        if not callable(fn):
            names = sorted(n for n, v in vars(mod).items() if callable(v) and not n.startswith("_"))[:10]
            raise JudgeError(f"judge '{spec}': module '{module}' has no function '{fn_name}' "
                             f"(it has: {', '.join(names) or 'none'})")
        return cls(fn, spec)

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        out = []
        with Progress(f"judging with {self.name}", total=len(prompts), unit="sample") as bar:
            for i, (p, c) in enumerate(zip(prompts, completions)):
                value = self.fn(p, c)
                try:
                    out.append(float(value))
                except (TypeError, ValueError):
                    raise JudgeError(f"judge '{self.name}' returned {value!r} for sample {i} (prompt {p[:40]!r}); "
                                     "a reward judge returns a number") from None
                bar.update(1)
        return out


def _import(module: str, cwd: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        top = module.split(".")[0]
        if e.name not in (module, top) or cwd in sys.path or "" in sys.path:
            raise
    sys.path.append(cwd)  # after everything installed: never shadows a package
    log.info("judge: importing %s from the working directory %s", module, cwd)
    return importlib.import_module(module)


@dataclass
class RewardModelJudge:
    """A sequence-classification reward model; the score is ``logits[:, 0]`` at the last non-pad token.

    A reward model trained by ``dpokit rm`` (its config.json has ``dpokit_reward_model``) scores (prompt,
    completion) tokenized as its training data was: jointly, EOS appended; the prompt as plain text, or with
    ``chat=True`` as a user turn and the completion as the assistant's (``--chat``). Any other reward model
    reads ``prompt + completion`` through its chat template when its tokenizer has one (as a user and an
    assistant message), else as plain text.
    """

    path: str
    batch_size: int = 16
    chat: bool = False
    max_length: int = 1024
    _model: Any = None
    _tok: Any = None

    def __post_init__(self) -> None:
        from pathlib import Path

        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from dpokit.models import from_hub, resolve_source

        src = resolve_source(self.path)  # a checked local directory, or a hub id within reach

        def load(cls: Any) -> Any:
            return cls.from_pretrained(src) if Path(src).is_dir() else from_hub(cls.from_pretrained, src)

        self._tok = load(AutoTokenizer)
        if self._tok.pad_token is None:
            self._tok.pad_token = self._tok.eos_token
        self._model = load(AutoModelForSequenceClassification).eval()
        if self._model.config.pad_token_id is None:
            self._model.config.pad_token_id = self._tok.pad_token_id

    @property
    def trained_by_dpokit(self) -> bool:
        return getattr(self._model.config, "dpokit_reward_model", None) is not None

    def _text(self, prompt: str, completion: str) -> str:
        if self._tok.chat_template:
            msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            return self._tok.apply_chat_template(msgs, tokenize=False)
        return prompt + completion

    def _ids(self, prompts: Sequence[str], completions: Sequence[str]) -> list[list[int]]:
        if not self.trained_by_dpokit:
            texts = [self._text(p, c) for p, c in zip(prompts, completions)]
            return [list(x) for x in self._tok(texts, truncation=True)["input_ids"]]
        from dpokit.data.formats import SFTExample
        from dpokit.data.tokenize import tokenize_sft

        out = []
        for p, c in zip(prompts, completions):
            ex = SFTExample([{"role": "user", "content": p}], [{"role": "assistant", "content": c}]) if self.chat \
                else SFTExample(p, c)
            item = tokenize_sft(self._tok, ex, max_length=self.max_length, max_prompt_length=self.max_length // 2)
            out.append(item.prompt_ids + item.completion_ids)
        return out

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        import torch

        out: list[float] = []
        ids = self._ids(prompts, completions)
        pad = self._model.config.pad_token_id
        with Progress(f"judging with the reward model {self.path}", total=len(ids), unit="sample") as bar:
            for i in range(0, len(ids), self.batch_size):
                chunk = ids[i : i + self.batch_size]
                width = max(len(x) for x in chunk)
                input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros_like(input_ids)
                for r, x in enumerate(chunk):  # right padding: the model reads its last non-pad token
                    input_ids[r, : len(x)] = torch.tensor(x)
                    mask[r, : len(x)] = 1
                with torch.no_grad():
                    logits = self._model(input_ids=input_ids, attention_mask=mask).logits.float()
                out += logits[:, -1].tolist()
                bar.update(len(chunk))
        return out


@dataclass
class RewardPairwise:
    judge: RewardJudge

    def compare(self, prompt: str, a: str, b: str) -> float | None:
        sa, sb = self.judge.score([prompt, prompt], [a, b])
        return 1.0 if sa > sb else 0.0 if sb > sa else 0.5


PAIRWISE_TEMPLATE = """Which response answers the prompt better? Reply with exactly one letter: A or B.

Prompt:
{prompt}

Response A:
{a}

Response B:
{b}"""


class RequestFailed(Exception):
    """One HTTP exchange with the judge endpoint failed; the message says why, in one line."""


def _one_line(e: BaseException, limit: int = 160) -> str:
    """An exception's message as one short line: the endpoint's bytes may be in it."""
    return " ".join(repr(str(e))[1:-1].split())[:limit]


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or (443 if scheme == "https" else 80)


def _cut_at_deadline(conn: http.client.HTTPConnection, deadline: float, done: threading.Event) -> None:
    """Shut the connection's socket down at the deadline, so a read that blocks (a reply dripping in a
    byte at a time, headers included) returns at once; per-read timeouts alone never end such a reply."""
    if done.wait(max(0.0, deadline - time.monotonic())):
        return
    while not done.is_set():
        sock = conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            return
        done.wait(0.01)  # still connecting (bounded by the connect timeout): try again


def _exchange(url: str, body: bytes, headers: dict[str, str], deadline: float,
              max_bytes: int) -> tuple[int, str | None, bytes]:
    """One POST: (status, Location header, body read up to ``max_bytes``) before ``deadline``."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RequestFailed(f"not an http(s) URL: {url[:200]!r}")
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise RequestFailed("deadline passed")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host, port = parts.hostname, parts.port
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname):  # $http_proxy / $https_proxy, as urllib does
        via = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = via.hostname, via.port
        if parts.scheme == "http":
            target = url  # a plain-HTTP proxy takes the absolute URL
    if parts.scheme == "https":
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            host, port, timeout=remaining, context=ssl.create_default_context())
        if host != parts.hostname or port != parts.port:
            conn.set_tunnel(parts.hostname, parts.port)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=remaining)
    done = threading.Event()
    threading.Thread(target=_cut_at_deadline, args=(conn, deadline, done), daemon=True).start()
    try:
        conn.request("POST", target, body, headers)
        resp = conn.getresponse()
        if resp.status != 200:
            return resp.status, resp.getheader("Location"), b""
        declared = resp.getheader("Content-Length")
        if declared and declared.strip().isdigit() and int(declared) > max_bytes:
            raise RequestFailed(f"the reply is {int(declared):,} bytes, more than the {max_bytes:,} allowed")
        chunks, size = [], 0
        while chunk := resp.read1(65536):
            size += len(chunk)
            if size > max_bytes:
                raise RequestFailed(f"the reply is longer than the {max_bytes:,} bytes allowed")
            chunks.append(chunk)
            if time.monotonic() > deadline:
                raise RequestFailed("deadline passed")
        if declared and declared.strip().isdigit() and size < int(declared):
            raise RequestFailed(f"the reply ended after {size:,} of the {int(declared):,} bytes it announced")
        return 200, None, b"".join(chunks)
    except (OSError, http.client.HTTPException, ValueError) as e:
        if time.monotonic() >= deadline:
            raise RequestFailed("no complete reply before the deadline") from None
        raise RequestFailed(f"{type(e).__name__}: {_one_line(e)}") from None
    finally:
        done.set()
        conn.close()


def post_json(url: str, payload: Any, headers: dict[str, str], *, timeout: float, max_bytes: int,
              max_redirects: int = 3) -> Any:
    """POST ``payload`` as JSON and return the parsed reply, or raise ``RequestFailed``.

    ``timeout`` bounds the whole exchange, redirects included. A 307/308 redirect is followed (the
    method and body stay); the ``Authorization`` header only goes to the origin of ``url``. Any other
    status than 200 fails. The reply must be JSON of at most ``max_bytes`` bytes.
    """
    deadline = time.monotonic() + timeout
    body = json.dumps(payload).encode()
    home = _origin(url)
    for _ in range(max_redirects + 1):
        send = headers if _origin(url) == home else {k: v for k, v in headers.items() if k.lower() != "authorization"}
        status, location, data = _exchange(url, body, send, deadline, max_bytes)
        if status in (307, 308) and location:
            url = urljoin(url, location)
            continue
        if status != 200:
            raise RequestFailed(f"HTTP {status}" + (" (a redirect other than 307/308 would turn the POST into a GET)"
                                                    if 300 <= status < 400 else ""))
        try:
            return json.loads(data)
        except RecursionError:
            raise RequestFailed("the reply is nested too deeply to parse") from None
        except ValueError as e:
            raise RequestFailed(f"the reply is not JSON ({_one_line(e)})") from None
    raise RequestFailed(f"more than {max_redirects} redirects")


def reply_text(reply: Any) -> str | None:
    """``reply["choices"][0]["message"]["content"]`` when the reply has that shape and it is a string."""
    choices = reply.get("choices") if isinstance(reply, dict) else None
    first = choices[0] if isinstance(choices, list) and choices else None
    message = first.get("message") if isinstance(first, dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    return content if isinstance(content, str) else None


@dataclass
class OpenAIJudge:
    """Pairwise judge over an OpenAI-compatible ``/v1/chat/completions`` endpoint (stdlib HTTP only).

    ``timeout``: seconds for one whole request (connect, send, the complete reply), not per read;
    ``max_response_bytes``: the longest reply read (a judgement is a few hundred bytes).
    """

    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    timeout: float = 30.0
    retries: int = 3
    backoff: float = 0.5
    max_response_bytes: int = 1 << 20
    template: str = PAIRWISE_TEMPLATE
    stats: dict[str, int] = field(default_factory=lambda: {"requests": 0, "retries": 0, "invalid": 0})
    last_error: str = ""

    def _ask(self, prompt: str) -> str | None:
        """One judgement: 'A', 'B', or None after exhausting retries on timeouts, errors or unparseable replies."""
        url = self.base_url.rstrip("/") + "/chat/completions"
        payload = {"model": self.model, "temperature": 0, "max_tokens": 4,
                   "messages": [{"role": "user", "content": prompt}]}
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        for attempt in range(self.retries + 1):
            if attempt:
                self.stats["retries"] += 1
                time.sleep(self.backoff * 2 ** (attempt - 1))
            self.stats["requests"] += 1
            try:
                text = reply_text(post_json(url, payload, headers, timeout=self.timeout,
                                            max_bytes=self.max_response_bytes))
            except RequestFailed as e:
                self.last_error = f"{url}: {e}"
                log.debug("judge request failed: %s", self.last_error)
                continue
            answer = parse_choice(text)
            if answer is not None:
                return answer
            self.last_error = f"{url}: the reply is not 'A' or 'B' ({str(text)[:80]!r})"
            log.debug("judge reply not A or B: %r", str(text)[:200])
        self.stats["invalid"] += 1
        return None

    def compare(self, prompt: str, a: str, b: str) -> float | None:
        first = self._ask(self.template.format(prompt=prompt, a=a, b=b))
        if first is None:  # invalid either way: do not spend the second order's retries
            return None
        second = self._ask(self.template.format(prompt=prompt, a=b, b=a))
        if second is None:
            return None
        a_first, a_second = first == "A", second == "B"  # did a win in each order?
        if a_first and a_second:
            return 1.0
        if not a_first and not a_second:
            return 0.0
        return 0.5  # the orders disagree: position bias, not a preference


_CHOICE = re.compile(r"\b([AB])\b")


def parse_choice(text: Any) -> str | None:
    if not isinstance(text, str):
        return None
    found = set(_CHOICE.findall(text.strip().upper()[:40]))
    return found.pop() if len(found) == 1 else None
