"""Resilience scenarios for the official `openai` Python SDK through sluice.

Usage: resilience.py SCENARIO, with SLUICE_BASE_URL set (the Rust test starts
the mock upstream and sluice). Prints `ok SCENARIO` or exits non-zero.
"""

import os
import sys

import openai


def client() -> openai.OpenAI:
    # max_retries=0: any retry seen here was sluice's, not the SDK's.
    return openai.OpenAI(api_key="sk-client", base_url=os.environ["SLUICE_BASE_URL"], max_retries=0, timeout=20.0)


def idle_timeout_raises() -> None:
    stream = client().chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
    got = []
    try:
        for chunk in stream:
            got.append(chunk.choices[0].delta.content)
    except openai.APIError as e:
        assert "idle timeout" in e.message, e.message
        assert got == ["Hel"], got
        return
    raise AssertionError(f"the stream ended without an error after {got!r}")


def retried_success() -> None:
    resp = client().chat.completions.with_raw_response.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert resp.headers.get("x-sluice-attempts") == "3", dict(resp.headers)
    assert resp.headers.get("x-should-retry") == "false", dict(resp.headers)
    completion = resp.parse()
    assert completion.choices[0].message.content == "recovered", completion


def rate_limited_retry() -> None:
    # The route allows one request per second: the second call gets a 429 with
    # retry-after: 1, and the SDK (max_retries=2) waits and succeeds.
    c = openai.OpenAI(api_key="sk-client", base_url=os.environ["SLUICE_BASE_URL"], max_retries=2, timeout=20.0)
    for _ in range(2):
        completion = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert completion.choices[0].message.content == "ok", completion


def main() -> None:
    name = sys.argv[1]
    scenarios = {
        "idle_timeout_raises": idle_timeout_raises,
        "retried_success": retried_success,
        "rate_limited_retry": rate_limited_retry,
    }
    scenarios[name]()
    print(f"ok {name}")


if __name__ == "__main__":
    main()
