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


def main() -> None:
    name = sys.argv[1]
    {"idle_timeout_raises": idle_timeout_raises, "retried_success": retried_success}[name]()
    print(f"ok {name}")


if __name__ == "__main__":
    main()
