"""End-to-end check of the official `openai` Python SDK against sluice.

Run by the Rust integration test after it has started a mock upstream and
sluice. Everything comes from the environment:

  SLUICE_BASE_URL           e.g. http://127.0.0.1:41234/v1  (routed to the mock)
  SLUICE_UNROUTED_BASE_URL  e.g. http://127.0.0.1:41234/nothing-here/v1  (404)
  SLUICE_CHAT_MODEL, SLUICE_EMBED_MODEL, SLUICE_MODEL_IDS  (optional) the
      names the client sends and the list it expects, when the route routes
      by model aliases; the mock always answers as the model it was sent

The client sends a placeholder key; the mock upstream only accepts the real
key, so every successful call proves sluice injected the upstream key.

Prints `ok <scenario>` per scenario and `all ok` at the end; exits non-zero on
the first failure.
"""

import os
import sys

import openai

from common import CLIENT_KEY, EXPECTED_TEXT, TIMEOUT_S, check, env, run

MESSAGES = [{"role": "user", "content": "hi"}]
CHAT_MODEL = os.environ.get("SLUICE_CHAT_MODEL", "mock-model")
EMBED_MODEL = os.environ.get("SLUICE_EMBED_MODEL", "mock-embed")
MODEL_IDS = os.environ.get("SLUICE_MODEL_IDS", "mock-model,mock-embed").split(",")


def make_client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(
        api_key=CLIENT_KEY,
        base_url=base_url,
        max_retries=0,
        timeout=TIMEOUT_S,
    )


def chat_non_streaming(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES)
    content = resp.choices[0].message.content
    check(content == EXPECTED_TEXT, f"content was {content!r}, expected {EXPECTED_TEXT!r}")
    check(resp.model == "mock-model", f"model was {resp.model!r}, expected 'mock-model'")


def chat_streaming(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, stream=True)
    parts = []
    with stream:
        for chunk in stream:
            if not chunk.choices:
                continue
            piece = chunk.choices[0].delta.content
            if piece:
                parts.append(piece)
    text = "".join(parts)
    check(text == EXPECTED_TEXT, f"streamed text was {text!r}, expected {EXPECTED_TEXT!r}")
    check(
        len(parts) >= 5,
        f"only {len(parts)} content-bearing chunks ({parts!r}); expected at least 5",
    )


def embeddings(client: openai.OpenAI) -> None:
    # Ask for floats explicitly so the mock never has to produce base64.
    resp = client.embeddings.create(model=EMBED_MODEL, input="hello", encoding_format="float")
    vec = resp.data[0].embedding
    check(vec == [0.25, -0.5, 0.125], f"embedding was {vec!r}, expected [0.25, -0.5, 0.125]")


def models_list(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    check(ids == MODEL_IDS, f"model ids were {ids!r}, expected {MODEL_IDS!r}")


def unrouted_404(_client: openai.OpenAI) -> None:
    unrouted = make_client(env("SLUICE_UNROUTED_BASE_URL"))
    try:
        unrouted.chat.completions.create(model="mock-model", messages=MESSAGES)
    except openai.NotFoundError as err:
        check(err.status_code == 404, f"status_code was {err.status_code!r}, expected 404")
        check(
            "no route matches" in err.message,
            f"error message {err.message!r} does not contain 'no route matches'",
        )
        check(err.code == "route_not_found", f"error code was {err.code!r}, expected 'route_not_found'")
    except openai.APIStatusError as err:
        raise AssertionError(
            f"expected NotFoundError, got {type(err).__name__} "
            f"(status {err.status_code}): {err.message}"
        ) from err
    else:
        raise AssertionError("expected NotFoundError, but the request succeeded")


SCENARIOS = [
    ("chat_non_streaming", chat_non_streaming),
    ("chat_streaming", chat_streaming),
    ("embeddings", embeddings),
    ("models_list", models_list),
    ("unrouted_404", unrouted_404),
]


def main() -> int:
    return run(SCENARIOS, make_client(env("SLUICE_BASE_URL")))


if __name__ == "__main__":
    sys.exit(main())
