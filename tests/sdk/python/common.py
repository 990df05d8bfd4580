"""What the SDK scripts share: the client's settings, `env`, `check`, and
the runner that prints `ok <scenario>` per scenario and `all ok` at the end
(exiting non-zero on the first failure)."""

import os
import traceback

import openai

CLIENT_KEY = "sk-client-placeholder"
TIMEOUT_S = 20.0
EXPECTED_TEXT = "Hello from the mock upstream."


def env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise SystemExit(f"FAIL: environment variable {name} is not set")
    return value


def check(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(what)


def run(scenarios, client: openai.OpenAI) -> int:
    print(f"openai python SDK {openai.__version__}", flush=True)
    for name, fn in scenarios:
        try:
            fn(client)
        except Exception as exc:  # noqa: BLE001 - report any failure and exit 1
            print(f"FAIL {name}: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc()
            return 1
        print(f"ok {name}", flush=True)
    print("all ok", flush=True)
    return 0
