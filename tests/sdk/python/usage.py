"""Usage injection (SPEC §10) seen through the official `openai` Python SDK.

Run by the Rust integration test after it has started the OpenAI mock and
sluice with `[routes.usage] inject = "always"`. From the environment:

  SLUICE_BASE_URL  e.g. http://127.0.0.1:41234/v1  (routed to the mock)

Each scenario sends one chat request whose user message is the scenario's
name, so the test can find what the upstream received for it. sluice asks
the upstream for usage on a streamed request whose client did not, and must
then hide the usage-only chunk (`"choices": []`) it caused: a client that
indexes `choices[0]` on every chunk, as many do, must not crash.

The raw bytes of every response are kept too (an httpx response hook), to
check that the stream still ends with `data: [DONE]`.

Prints `ok <scenario>` per scenario and `all ok` at the end; exits non-zero on
the first failure.
"""

import json
import os
import sys

import httpx2
import openai

from common import CLIENT_KEY, EXPECTED_TEXT, TIMEOUT_S, check, env, run

MODEL = "mock-model"
DONE = b"data: [DONE]\n\n"

# The raw bytes of each response, in order.
RAW: list[bytearray] = []


class Tee(httpx2.SyncByteStream):
    """A response body that keeps a copy of every byte it hands on."""

    def __init__(self, inner: httpx2.SyncByteStream, into: bytearray) -> None:
        self._inner = inner
        self._into = into

    def __iter__(self):
        for part in self._inner:
            self._into.extend(part)
            yield part

    def close(self) -> None:
        self._inner.close()

    @property
    def elapsed(self):
        return getattr(self._inner, "elapsed", None)


def keep_raw(response: httpx2.Response) -> None:
    RAW.append(bytearray())
    response.stream = Tee(response.stream, RAW[-1])


def make_client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(
        api_key=CLIENT_KEY,
        base_url=base_url,
        max_retries=0,
        timeout=TIMEOUT_S,
        http_client=openai.DefaultHttpxClient(event_hooks={"response": [keep_raw]}),
    )


def messages(name: str) -> list:
    return [{"role": "user", "content": name}]


def check_raw_stream(raw: bytes, usage_chunk: bool) -> None:
    """The bytes the client got: events ending in `[DONE]`, and a
    `"choices":[]` event only when the client asked for usage."""
    check(raw.endswith(DONE), f"stream does not end with data: [DONE]: {raw[-200:]!r}")
    if os.environ.get("SLUICE_KEEPALIVE") == "1":
        check(b": keep-alive\n" in raw, f"keepalive is on, yet no comment came: {raw!r}")
    # Keep-alive comment lines go before an event; the SDK skips them.
    events = [b"\n".join(l for l in e.split(b"\n") if not l.startswith(b":")) for e in raw.split(b"\n\n")]
    events = [e for e in events if e.strip()]
    empty = []
    for event in events[:-1]:
        check(event.startswith(b"data: "), f"not a data event: {event!r}")
        chunk = json.loads(event[len(b"data: ") :])
        if chunk.get("choices") == []:
            empty.append(chunk)
    want = 1 if usage_chunk else 0
    check(
        len(empty) == want,
        f"{len(empty)} events with \"choices\": [] reached the client, expected {want}: {empty!r}",
    )


def stream_without_usage(client: openai.OpenAI, name: str, **extra) -> None:
    """A stream whose client did not ask for usage: every chunk has a
    choice, none has usage, and the text is whole."""
    RAW.clear()
    stream = client.chat.completions.create(model=MODEL, messages=messages(name), stream=True, **extra)
    parts = []
    with stream:
        for i, chunk in enumerate(stream):
            check(
                len(chunk.choices) > 0,
                f"chunk {i} has \"choices\": [] (usage {chunk.usage!r}): sluice leaked the "
                "usage-only chunk it asked the upstream for",
            )
            check(chunk.usage is None, f"chunk {i} carries usage {chunk.usage!r}")
            piece = chunk.choices[0].delta.content
            if piece:
                parts.append(piece)
    text = "".join(parts)
    check(text == EXPECTED_TEXT, f"streamed text was {text!r}, expected {EXPECTED_TEXT!r}")
    check(len(RAW) == 1, f"{len(RAW)} responses recorded, expected 1")
    check_raw_stream(bytes(RAW[0]), usage_chunk=False)


def injected(client: openai.OpenAI) -> None:
    stream_without_usage(client, "injected")


def asked_false(client: openai.OpenAI) -> None:
    stream_without_usage(client, "asked_false", stream_options={"include_usage": False})


def asked(client: openai.OpenAI) -> None:
    RAW.clear()
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages("asked"),
        stream=True,
        stream_options={"include_usage": True},
    )
    with stream:
        chunks = list(stream)
    check(len(chunks) >= 2, f"only {len(chunks)} chunks")
    last = chunks[-1]
    check(last.choices == [], f"last chunk has choices {last.choices!r}, expected []")
    check(last.usage is not None, "last chunk has no usage")
    check(last.usage.prompt_tokens == 11, f"prompt_tokens was {last.usage.prompt_tokens!r}, expected 11")
    check(
        last.usage.completion_tokens == 5,
        f"completion_tokens was {last.usage.completion_tokens!r}, expected 5",
    )
    for i, chunk in enumerate(chunks[:-1]):
        check(len(chunk.choices) > 0, f"chunk {i} (not the last) has no choices")
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    check(text == EXPECTED_TEXT, f"streamed text was {text!r}, expected {EXPECTED_TEXT!r}")
    check_raw_stream(bytes(RAW[0]), usage_chunk=True)


def not_streamed(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model=MODEL, messages=messages("not_streamed"), stream=False)
    content = resp.choices[0].message.content
    check(content == EXPECTED_TEXT, f"content was {content!r}, expected {EXPECTED_TEXT!r}")
    check(resp.usage is not None, "no usage in the completion")
    check(resp.usage.prompt_tokens == 1, f"prompt_tokens was {resp.usage.prompt_tokens!r}, expected 1")
    check(
        resp.usage.completion_tokens == 6,
        f"completion_tokens was {resp.usage.completion_tokens!r}, expected 6",
    )


SCENARIOS = [
    ("injected", injected),
    ("asked", asked),
    ("asked_false", asked_false),
    ("not_streamed", not_streamed),
]


def main() -> int:
    return run(SCENARIOS, make_client(env("SLUICE_BASE_URL")))


if __name__ == "__main__":
    sys.exit(main())
